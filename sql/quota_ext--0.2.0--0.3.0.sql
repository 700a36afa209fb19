\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.3.0'" to load this file. \quit

-- 0.2.0 -> 0.3.0: refusals that raise are audited by the audit writer (a background worker)
-- instead of in the transaction the raise rolls back. For quotas this is require's PT429:
-- require now decides through require_decision, which queues a denial's audit row.

CREATE FUNCTION quota."require_decision"(
	"subject" TEXT DEFAULT NULL,
	"metric" TEXT DEFAULT NULL,
	"amount" bigint DEFAULT 1,
	"idempotency_key" TEXT DEFAULT NULL
) RETURNS quota.decision
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'require_decision_wrapper';

CREATE OR REPLACE FUNCTION quota.require(subject text DEFAULT NULL, metric text DEFAULT NULL,
                              amount bigint DEFAULT 1, idempotency_key text DEFAULT NULL)
RETURNS quota.decision
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d quota.decision;
BEGIN
    -- consume, but a denial's audit row is queued: the raise below rolls this transaction back.
    d := quota.require_decision(subject, metric, amount, idempotency_key);
    IF NOT d.allowed THEN
        RAISE EXCEPTION USING
            ERRCODE = 'PT429',
            MESSAGE = format('quota exceeded: %s of %s for subject %s (%s/%s used)',
                             metric, d.period, d.subject, d.used, d.quota_limit),
            DETAIL  = pg_catalog.to_json(d)::text,
            HINT    = CASE WHEN d.retry_after_seconds IS NULL
                           THEN 'The amount exceeds the limit; it can never be granted.'
                           ELSE format('Retry after %s seconds.', d.retry_after_seconds) END;
    END IF;
    RETURN d;
END
$$;

-- The same privileges as every function: none for PUBLIC; the Supabase roles as the install
-- script grants them.
REVOKE ALL ON FUNCTION quota.require_decision(text, text, bigint, text) FROM PUBLIC;
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT EXECUTE ON FUNCTION quota.require_decision(text, text, bigint, text) TO service_role;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT EXECUTE ON FUNCTION quota.require_decision(text, text, bigint, text) TO authenticated;
    END IF;
END
$grants$;
