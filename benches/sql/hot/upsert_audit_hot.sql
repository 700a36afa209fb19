WITH u AS (
    INSERT INTO quota.usage AS u (subject, metric, period, window_start, used)
    VALUES ('hand-hot', 'api', 'day', date_trunc('day', now()), 1)
        ON CONFLICT (subject, metric, period, window_start) DO UPDATE
       SET used = u.used + excluded.used
     WHERE u.used <= 1000000000000 - excluded.used
    RETURNING u.used)
INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details)
SELECT 'hand-hot', 'consume', 'api', 1, true, 'granted',
       ('{"plan": "free", "period": "day", "limit": 1000000000000, "used": ' || u.used || '}')::jsonb
  FROM u
RETURNING id;
