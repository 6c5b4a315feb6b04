-- Verification rows name the key's identity ('' when none) and the rate limits that
-- refused a RATE_LIMITED verification (a JSON array of names).
-- Kept identical to ../postgres/0008_verification_identity.sql.
ALTER TABLE key_verifications ADD COLUMN identity_id TEXT NOT NULL DEFAULT '';
ALTER TABLE key_verifications ADD COLUMN exceeded_ratelimits TEXT NOT NULL DEFAULT '[]';
