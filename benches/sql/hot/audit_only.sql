\set s random(1, 10000)
INSERT INTO quota.audit_log (subject, action, metric, amount, success, reason, details)
VALUES ('user-' || :s, 'consume', 'api', 1, true, 'granted',
        '{"plan": "free", "period": "day", "limit": 1000000000000, "used": 1}'::jsonb)
RETURNING id;
