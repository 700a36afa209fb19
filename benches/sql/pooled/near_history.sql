-- History: old daily windows of the 10 000 subjects, up to :rows usage rows in all.
INSERT INTO quota.usage (subject, metric, period, window_start, used)
SELECT 'user-' || (i % 10000 + 1), 'api', 'day',
       date_trunc('day', now(), 'UTC') - make_interval(days => (i / 10000)::int + 1), 90
  FROM generate_series((SELECT count(*) FROM quota.usage) - 11000, :rows - 11000 - 1) AS i;
VACUUM ANALYZE quota.usage;
