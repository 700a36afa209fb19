-- Bench database: quota_ext, and the naive hand-written upsert it is compared with.
CREATE EXTENSION quota_ext;
-- A limit that is never reached, so every call does the full grant path (lock, increment, audit).
SELECT quota.set_limit('free', 'api', 'day', 1000000000000);

-- What apps write by hand: one upsert with the limit in the WHERE clause, no audit, no
-- idempotency, one period.
CREATE TABLE naive_usage (
    subject      text        NOT NULL,
    metric       text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         bigint      NOT NULL,
    lim          bigint      NOT NULL,
    PRIMARY KEY (subject, metric, window_start)
);

-- Inventory: 1 000 batches (and one hot one) that never run out, numbered for pgbench.
CREATE TABLE bench_batches (n int PRIMARY KEY, id uuid NOT NULL);
INSERT INTO bench_batches
SELECT n, (quota.create_batch('bench', 'widget', 1000000000000)).id FROM generate_series(0, 1000) n;
-- The plain UPDATE baseline runs on quota.batches itself (same rows, same indexes). For
-- comparison, the same rows in a table with only a primary key, where an UPDATE of quantity
-- is a HOT update: quota.batches' FEFO index is partial on quantity > 0, so an UPDATE of
-- quantity there also inserts index entries, whoever runs it.
CREATE TABLE plain_batches (id uuid PRIMARY KEY, quantity bigint NOT NULL CHECK (quantity >= 0),
                            version bigint NOT NULL DEFAULT 1) WITH (fillfactor = 80);
INSERT INTO plain_batches (id, quantity) SELECT id, 1000000000000 FROM bench_batches;

-- Rate limits: the best hand-written SQL alternative, a GCRA bucket in one upsert on an
-- UNLOGGED table (no WAL, no fsync; lost on a crash, like shared memory).
CREATE UNLOGGED TABLE plpgsql_buckets (key text PRIMARY KEY, tat timestamptz NOT NULL);
CREATE FUNCTION plpgsql_rate_check(p_key text, p_rate bigint, p_per interval, p_burst bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    t  interval    := p_per / p_rate;
    ts timestamptz := clock_timestamp();
    ok boolean;
BEGIN
    INSERT INTO plpgsql_buckets AS b VALUES (p_key, ts + t)
        ON CONFLICT (key) DO UPDATE SET tat = greatest(b.tat, ts) + t
     WHERE greatest(b.tat, ts) + t - ts <= t * p_burst
    RETURNING true INTO ok;
    RETURN coalesce(ok, false);
END
$$;

-- The policy path: a policy that never denies in the benchmark (the bench role is a
-- superuser without a JWT, so it is plan 'anonymous' and may name any key).
INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES ('bench', 'anonymous', 1000000000, '1 second');
