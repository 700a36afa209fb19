-- The database PostgREST serves in the HTTP tests, after CREATE EXTENSION quota_ext.
-- Rate policies generous enough that the tests' own traffic is never limited, but for plan
-- `tiny` (3 requests a minute), on which the tests that want a 429 put their callers.
UPDATE quota.rate_policies SET rate = 1000000 WHERE policy = 'default';
INSERT INTO quota.plans (plan) VALUES ('tiny');
INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES ('default', 'tiny', 3, '1 minute');
-- An ordinary table of the app, next to quota's: readable by every role, as a project's are.
CREATE TABLE public.notes (id int PRIMARY KEY, body text);
INSERT INTO public.notes VALUES (1, 'hello');
GRANT SELECT ON public.notes TO anon, authenticated, service_role;
