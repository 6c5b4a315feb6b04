-- The analytics rows lose their per-key index. Every usage query names a workspace and
-- a time range and runs on `key_verifications (workspace_id, time)`; a key, like an API
-- or an identity, is a filter on the rows of that range. The per-key index cost more than
-- it saved: each active key's rows went to a leaf page of their own, so a batch over
-- 1,000 keys rewrote about 1,000 index pages (on SQLite, into the WAL and back at the
-- checkpoint), where rows in time order append to a few. Measured on SQLite, 1,000 keys
-- at full speed: the row writer went from about half a core to a tenth.
-- Kept identical on SQLite and Postgres.
DROP INDEX IF EXISTS key_verifications_key;
