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
