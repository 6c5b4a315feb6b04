-- The `api_requests` rows lose their index. Nothing reads them by workspace and time
-- (they are the request log, read whole by the suite's audits and by hand), and the index
-- cost a second B-tree insert for every request, the verifications' hot path included.
-- Kept identical on SQLite and Postgres.
DROP INDEX IF EXISTS api_requests_workspace;
