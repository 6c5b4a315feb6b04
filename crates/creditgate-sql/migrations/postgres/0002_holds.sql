-- Holds (keys.reserveCredits / settleCredits / releaseCredits). Kept column-for-column
-- identical to ../sqlite/0002_holds.sql.

-- Ledger: credits in open holds (out of `remaining`, not spent).
ALTER TABLE keys ADD COLUMN held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0);

-- Each hold leaves 'open' exactly once, under its key's row lock.
CREATE TABLE holds (
    id          TEXT COLLATE "C" PRIMARY KEY,
    key_id      TEXT COLLATE "C" NOT NULL,
    amount      BIGINT NOT NULL,
    -- 1: `amount` left the balance; 0: the key was unlimited (the hold records the cost).
    funded      BIGINT NOT NULL,
    -- 'open' | 'settled' | 'released' | 'expired'.
    state       TEXT NOT NULL,
    -- What the settle spent.
    cost        BIGINT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    closed_at   BIGINT
);

CREATE INDEX holds_due ON holds (state, expires_at);
CREATE INDEX holds_key ON holds (key_id, state, expires_at);
