\echo Use "ALTER EXTENSION quota_ext UPDATE TO '0.2.0'" to load this file. \quit

-- 0.1.0 -> 0.2.0: quota.subjects gains metadata, as sql/schema.sql creates it.
ALTER TABLE quota.subjects ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
