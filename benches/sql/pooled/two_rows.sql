-- The floor of a pooled charge: what two independent subjects' charges write, the subject's
-- window and another's, in one transaction (two statements, two audit rows).
\set s random(1, 10000)
\set o random(1, 1000)
BEGIN;
SELECT quota.consume('user-' || :s, 'api');
SELECT quota.consume('org-' || :o, 'api');
COMMIT;
