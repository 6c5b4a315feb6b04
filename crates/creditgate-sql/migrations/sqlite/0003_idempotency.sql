-- Idempotency keys (Idempotency-Key on verifyKey, reserve / settle / release, updateCredits).
-- Kept column-for-column identical to ../postgres/0003_idempotency.sql.

-- One record per workspace and key. A request claims it ('claimed', with a lease), the
-- transaction that makes its change marks it 'decided', and its answer is stored
-- ('answered'); kept 24 h.
CREATE TABLE idempotency (
    scope        TEXT NOT NULL,
    idem_key     TEXT NOT NULL,
    -- Digest of the route and body: the same key with another request is refused.
    fingerprint  TEXT NOT NULL,
    -- The request holding (or last holding) the claim.
    token        TEXT NOT NULL,
    -- 'claimed' | 'decided' | 'answered'.
    state        TEXT NOT NULL,
    answer       TEXT,
    created_at   BIGINT NOT NULL,
    lease_until  BIGINT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);

CREATE INDEX idempotency_created ON idempotency (created_at);
