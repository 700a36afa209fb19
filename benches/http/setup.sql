-- The HTTP bench's database: quota_ext, the roles' policies, and the hand-written consume
-- apps expose instead (one upsert with the limit in its WHERE clause, no audit), as a function.
CREATE EXTENSION quota_ext;
SELECT quota.set_limit('free', 'api', 'day', 1000000000000);
UPDATE quota.rate_policies SET rate = 1000000000 WHERE policy = 'default';
CREATE TABLE public.naive_usage (
    subject      text        NOT NULL,
    metric       text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         bigint      NOT NULL,
    lim          bigint      NOT NULL,
    PRIMARY KEY (subject, metric, window_start)
);
CREATE FUNCTION public.naive_consume(metric text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    used bigint;
BEGIN
    INSERT INTO public.naive_usage AS u (subject, metric, window_start, used, lim)
    VALUES (current_setting('request.jwt.claims', true)::json ->> 'sub', naive_consume.metric,
            date_trunc('day', now()), 1, 1000000000000)
    ON CONFLICT (subject, metric, window_start)
    DO UPDATE SET used = u.used + 1 WHERE u.used + 1 <= u.lim
    RETURNING u.used INTO used;
    RETURN used;
END
$$;
-- A function that does nothing, for the cost of a PostgREST request itself, and a pre-request
-- hook that does nothing, for the cost of having one at all (PostgREST runs it as a statement of
-- its own in the request's transaction).
CREATE FUNCTION public.noop() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 1';
CREATE FUNCTION public.empty_hook() RETURNS void LANGUAGE plpgsql AS 'BEGIN END';
-- And a hook that only sets headers of the size quota's sets (nine, with the expose list): what
-- PostgREST's handling of response headers costs, apart from any rate limiting.
CREATE FUNCTION public.static_headers_hook() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.set_config('response.headers', '[{"RateLimit-Policy":"\"default\";q=1000000000;w=60"},{"RateLimit":"\"default\";r=999999999;t=1"},{"RateLimit-Limit":"1000000000"},{"RateLimit-Remaining":"999999999"},{"RateLimit-Reset":"1"},{"X-RateLimit-Limit":"1000000000"},{"X-RateLimit-Remaining":"999999999"},{"X-RateLimit-Reset":"1796170000"},{"Access-Control-Expose-Headers":"Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, Transfer-Encoding, Range-Unit, RateLimit-Policy, RateLimit, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"}]', true);
END
$$;
GRANT EXECUTE ON FUNCTION public.naive_consume(text), public.noop(), public.empty_hook(), public.static_headers_hook()
    TO authenticated;
