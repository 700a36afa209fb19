-- Pooled quotas bench: 1 000 organizations of 10 members each, beside 10 000 independent
-- subjects. Limits that are never reached, so every call does the full grant path.
CREATE EXTENSION quota_ext;
INSERT INTO quota.plans VALUES ('org', 'organizations'), ('seat', 'members with a cap'),
                               ('member', 'members without a cap of their own');
SELECT quota.set_limit('free', 'api', 'day', 1000000000000);
SELECT quota.set_limit('org', 'api', 'day', 1000000000000);
SELECT quota.set_limit('seat', 'api', 'day', 1000000000000);
INSERT INTO quota.subjects (subject, plan) SELECT 'org-' || o, 'org' FROM generate_series(1, 1000) o;
-- m-<org>-<k>: a cap of its own and the organization's limit (two windows per charge);
-- n-<org>-<k>: the organization's limit only (one window, on the organization's row).
INSERT INTO quota.subjects (subject, plan, parent)
SELECT 'm-' || o || '-' || k, 'seat', 'org-' || o FROM generate_series(1, 1000) o, generate_series(1, 10) k;
INSERT INTO quota.subjects (subject, plan, parent)
SELECT 'n-' || o || '-' || k, 'member', 'org-' || o FROM generate_series(1, 1000) o, generate_series(1, 10) k;
