\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.7.0'" to load this file. \quit

-- 0.6.0 -> 0.7.0: the answers PostgREST gives (tested through a real PostgREST).

-- The headers of the pre-request hook are built by quota.request_rate_limit (new, in the
-- library). consume_batch_quantity becomes the SQL function below; the library's function is
-- quota.take_batch_quantity, with the grants it had.
CREATE FUNCTION quota.request_rate_limit(method text) RETURNS text[]
VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'request_rate_limit_wrapper';
ALTER FUNCTION quota.consume_batch_quantity(uuid, bigint, bigint) RENAME TO take_batch_quantity;

-- PostgREST's db-pre-request: rate-limit every request by policy 'read' (GET, HEAD) or
-- 'write', falling back to 'default'. quota.request_rate_limit sets the rate-limit headers
-- (quota_ext.rate_limit_headers) and exposes them to browsers; a denial raises PostgREST's custom
-- status error, answered as HTTP 429 with Retry-After and the same headers. Trusted roles pass
-- unlimited.
CREATE OR REPLACE FUNCTION quota.pre_request()
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    denial text[];
BEGIN
    denial := quota.request_rate_limit(current_setting('request.method', true));
    IF denial IS NOT NULL THEN
        RAISE SQLSTATE 'PGRST' USING MESSAGE = denial[1], DETAIL = denial[2];
    END IF;
END
$$;

-- Take from one batch (quota.take_batch_quantity). Called through PostgREST, the refusals
-- that PostgREST would misreport get an HTTP status of their own: a version conflict (40001)
-- is 409 Conflict (PostgREST retries a 40001 as a serialization failure, and the version never
-- matches again: the request would hang), an unknown batch (P0002) 404; their SQLSTATE, message
-- and hint stay in the JSON body. SQL callers get the SQLSTATEs themselves, without the
-- subtransaction the translation takes. No function-level search_path, which would cost every
-- call a settings save and restore: every name and operator here is schema-qualified.
CREATE FUNCTION quota.consume_batch_quantity(p_batch_id uuid, p_quantity_to_consume bigint,
                                             p_expected_version bigint DEFAULT NULL)
RETURNS TABLE (batch_id uuid, consumed bigint, remaining bigint, version bigint)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    state   text;
    message text;
    detail  text;
    hint    text;
BEGIN
    IF pg_catalog.current_setting('request.method', true) IS NULL
       OR pg_catalog.current_setting('request.method', true) OPERATOR(pg_catalog.=) '' THEN
        RETURN QUERY SELECT * FROM quota.take_batch_quantity(p_batch_id, p_quantity_to_consume, p_expected_version);
        RETURN;
    END IF;
    BEGIN
        RETURN QUERY SELECT * FROM quota.take_batch_quantity(p_batch_id, p_quantity_to_consume, p_expected_version);
    EXCEPTION WHEN serialization_failure OR no_data_found THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
        RAISE SQLSTATE 'PGRST' USING
            MESSAGE = pg_catalog.json_build_object(
                'code', state, 'message', message,
                'details', CASE WHEN detail OPERATOR(pg_catalog.=) '' THEN NULL ELSE detail END,
                'hint', CASE WHEN hint OPERATOR(pg_catalog.=) '' THEN NULL ELSE hint END)::text,
            DETAIL  = pg_catalog.json_build_object(
                'status', CASE WHEN state OPERATOR(pg_catalog.=) '40001' THEN 409 ELSE 404 END,
                'headers', pg_catalog.json_build_object())::text;
    END;
END
$$;

REVOKE ALL ON FUNCTION quota.request_rate_limit(text), quota.consume_batch_quantity(uuid, bigint, bigint) FROM PUBLIC;
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT EXECUTE ON FUNCTION quota.request_rate_limit(text), quota.consume_batch_quantity(uuid, bigint, bigint)
            TO service_role;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT EXECUTE ON FUNCTION quota.request_rate_limit(text), quota.consume_batch_quantity(uuid, bigint, bigint)
            TO authenticated;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        GRANT EXECUTE ON FUNCTION quota.request_rate_limit(text) TO anon;
    END IF;
END
$grants$;
