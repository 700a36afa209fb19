-- pre_request with and without routes: two databases (noroutes, routes) made from this script;
-- routes.sql then adds 20 routes to the second. Policies that never deny.
CREATE EXTENSION quota_ext;
INSERT INTO quota.rate_policies (policy, plan, rate, per) VALUES
    ('read', 'free', 1000000000, '1 second'), ('write', 'free', 1000000000, '1 second');
GRANT USAGE ON SCHEMA quota TO bench_user;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA quota TO bench_user;
