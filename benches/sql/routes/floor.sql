\set u random(1, 10000)
BEGIN;
SET LOCAL ROLE bench_user;
SELECT set_config('request.method', 'GET', true), set_config('request.path', '/events/7', true),
       set_config('request.headers', '{"x-forwarded-for": "203.0.113.' || (:u % 250) || '"}', true),
       set_config('request.jwt.claims', '{"sub": "user-' || :u || '", "role": "authenticated"}', true);
SELECT 1;
COMMIT;
