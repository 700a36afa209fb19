INSERT INTO naive_usage AS u (subject, metric, window_start, used, lim)
VALUES ('hot', 'api', date_trunc('day', now()), 1, 1000000000000)
ON CONFLICT (subject, metric, window_start)
DO UPDATE SET used = u.used + 1 WHERE u.used + 1 <= u.lim
RETURNING used;
