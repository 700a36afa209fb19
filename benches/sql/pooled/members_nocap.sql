\set o random(1, 1000)
\set k random(1, 10)
SELECT quota.consume('n-' || :o || '-' || :k, 'api');
