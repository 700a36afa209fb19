\set k random(1, 10000)
SELECT quota.rate_limit('bench', 'user-' || :k);
