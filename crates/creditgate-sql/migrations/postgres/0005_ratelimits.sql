-- Named rate limits on keys and identities: a JSON array of
-- {id, name, limit, duration, autoApply}, or NULL for none.
-- Kept column-for-column identical to ../sqlite/0005_ratelimits.sql.
ALTER TABLE keys ADD COLUMN ratelimits TEXT;
ALTER TABLE identities ADD COLUMN ratelimits TEXT;
