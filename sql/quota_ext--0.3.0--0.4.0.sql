\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.4.0'" to load this file. \quit

-- 0.3.0 -> 0.4.0: the functions on the request path no longer carry a function-level
-- SET search_path. A function-level setting costs a GUC switch and a search-path recomputation
-- on every call and on every return (10-20% of a consume inside the database). These
-- functions run every statement inside the switch to the extension owner, which now pins
-- the search path (pg_catalog only) for exactly those statements; the caller's search path
-- still resolves nothing the extension runs.
ALTER FUNCTION quota.consume(text, text, bigint, text) RESET search_path;
ALTER FUNCTION quota.require_decision(text, text, bigint, text) RESET search_path;
ALTER FUNCTION quota.refund(text, text, bigint, text) RESET search_path;
ALTER FUNCTION quota.status(text) RESET search_path;
ALTER FUNCTION quota.consume_batch_quantity(uuid, bigint, bigint) RESET search_path;
ALTER FUNCTION quota.consume_item(text, text, bigint, text) RESET search_path;
