\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.5.0'" to load this file. \quit

-- 0.4.0 -> 0.5.0: pg_dump dumps the extension's data.
-- Backups. pg_dump writes an extension's tables as the single line CREATE EXTENSION unless
-- they are marked as configuration tables: without the marks a dump and restore (a backup, a
-- move to another server or project) came back with no limits, no usage, no audit trail and no
-- batches. Every table is dumped whole, and so is the audit ids' sequence, so that ids go on
-- after a restore instead of colliding with the restored rows.
--
-- quota.plans and quota.rate_policies start with rows of the install script. A restore runs
-- CREATE EXTENSION, which inserts those again, and then the dumped rows: a dumped row whose key
-- belongs to a shipped row that still holds its shipped values replaces that row instead of
-- failing on the key, so an edited shipped row (a plan's description, the default policy's
-- rates) comes back edited. Any other insert behaves as before.
CREATE FUNCTION quota.replace_shipped_plan()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE quota.plans p
       SET description = NEW.description
     WHERE p.plan = NEW.plan
       AND (p.plan, p.description) IN (VALUES
            ('anonymous',  'Callers without a JWT subject'),
            ('free',       'Default plan (quota_ext.default_plan)'),
            ('pro',        'Paid plan'),
            ('enterprise', 'Contract plan'));
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER replace_shipped_row BEFORE INSERT ON quota.plans
    FOR EACH ROW EXECUTE FUNCTION quota.replace_shipped_plan();

CREATE FUNCTION quota.replace_shipped_rate_policy()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE quota.rate_policies r
       SET rate = NEW.rate, per = NEW.per, burst = NEW.burst, shadow = NEW.shadow
     WHERE (r.policy, r.plan) = (NEW.policy, NEW.plan)
       AND r.burst IS NULL AND NOT r.shadow
       AND (r.policy, r.plan, r.rate, r.per) IN (VALUES
            ('default', 'anonymous',     20::bigint, '1 minute'::interval),
            ('default', 'free',         100, '1 minute'),
            ('default', 'pro',         1000, '1 minute'),
            ('default', 'enterprise', 10000, '1 minute'));
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER replace_shipped_row BEFORE INSERT ON quota.rate_policies
    FOR EACH ROW EXECUTE FUNCTION quota.replace_shipped_rate_policy();

SELECT pg_catalog.pg_extension_config_dump('quota.plans', '');
SELECT pg_catalog.pg_extension_config_dump('quota.limits', '');
SELECT pg_catalog.pg_extension_config_dump('quota.subjects', '');
SELECT pg_catalog.pg_extension_config_dump('quota.overrides', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage', '');
SELECT pg_catalog.pg_extension_config_dump('quota.idempotency_keys', '');
SELECT pg_catalog.pg_extension_config_dump('quota.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('quota.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('quota.rate_policies', '');
SELECT pg_catalog.pg_extension_config_dump('quota.batches', '');

-- As in a fresh install: nothing new is callable by PUBLIC; service_role may execute everything.
REVOKE ALL ON FUNCTION quota.replace_shipped_plan(), quota.replace_shipped_rate_policy() FROM PUBLIC;
DO $grants$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT EXECUTE ON FUNCTION quota.replace_shipped_plan(), quota.replace_shipped_rate_policy()
            TO service_role;
    END IF;
END
$grants$;
