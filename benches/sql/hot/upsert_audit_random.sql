\set s random(1, 10000)
WITH u AS (
    INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
    VALUES ('user-' || :s, 'api', 'day', date_trunc('day', now()), 1)
        ON CONFLICT (subject, metric, period, window_start) DO UPDATE
       SET used = u.used + excluded.used
     WHERE u.used <= 1000000000000 - excluded.used
    RETURNING u.used)
INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details)
SELECT 'user-' || :s, 'consume', 'api', 1, true, 'granted',
       ('{"plan": "free", "period": "day", "limit": 1000000000000, "used": ' || u.used || '}')::jsonb
  FROM u
RETURNING id;
