-- Hot subjects bench: 10 000 independent subjects, one hot subject, 10 hot subjects, and one
-- organization of 10 members each with a cap of its own (two windows a charge, the
-- organization's shared by all). Limits that are never reached: every call takes the full
-- grant path.
CREATE EXTENSION quota_ext;
INSERT INTO quota.plans VALUES ('org', 'organizations'), ('seat', 'members with a cap');
SELECT quota.set_limit('free', 'api', 'day', 1000000000000);
SELECT quota.set_limit('org', 'api', 'day', 1000000000000);
SELECT quota.set_limit('seat', 'api', 'day', 1000000000000);
INSERT INTO quota.subjects (subject, plan) VALUES ('org-1', 'org');
INSERT INTO quota.subjects (subject, plan, parent)
SELECT 'm-1-' || k, 'seat', 'org-1' FROM generate_series(1, 10) k;

-- What apps write by hand: the upsert with the limit in its WHERE clause and the audit row, in
-- one statement, on quota_ext's own tables (consume_random's and consume_hot's baselines).
-- The organization again for the cold path (quota_ext.hot_after = 0 from its first call: its
-- windows never turn hot).
INSERT INTO quota.subjects (subject, plan) VALUES ('org-2', 'org');
INSERT INTO quota.subjects (subject, plan, parent)
SELECT 'm-2-' || k, 'seat', 'org-2' FROM generate_series(1, 10) k;
