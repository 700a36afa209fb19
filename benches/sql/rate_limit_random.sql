SELECT quota.rate_limit('bench', 'user-' || (random() * 9999)::int);
