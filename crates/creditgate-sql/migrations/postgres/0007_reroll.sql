-- keys.rerollKey: the secret a key had before its last reroll, verifying until
-- previous_hash_expires (Unix ms). Kept identical to ../sqlite/0007_reroll.sql.
ALTER TABLE keys ADD COLUMN previous_hash TEXT;
ALTER TABLE keys ADD COLUMN previous_hash_expires BIGINT;
CREATE INDEX keys_previous_hash ON keys (previous_hash);
