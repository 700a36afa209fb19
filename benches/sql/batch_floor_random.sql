\set n random(1, 1000)
WITH b AS (
    UPDATE quota.batches AS b SET quantity = b.quantity - 1, version = b.version + 1
     WHERE b.id = (SELECT id FROM bench_batches WHERE n = :n) AND b.quantity >= 1
    RETURNING b.id, b.owner, b.item, b.quantity, b.version),
a AS (
    INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details)
    SELECT b.owner, 'consume_batch', b.item, 1, true, 'consumed',
           ('{"batch_id": "' || b.id::text || '", "consumed": 1, "remaining": ' || b.quantity::text
            || ', "version_before": ' || (b.version - 1)::text || ', "version_after": ' || b.version::text || '}')::jsonb
      FROM b)
SELECT quantity, version FROM b;
