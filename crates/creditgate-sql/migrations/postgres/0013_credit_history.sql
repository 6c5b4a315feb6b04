-- Per-account credit history (keys.getCreditHistory, identities.getCreditHistory): one
-- row per change of an account's credits other than a single spend, written by the
-- transaction that makes the change. Kept column-for-column identical to
-- ../sqlite/0013_credit_history.sql.

-- Ledger: the account's books are `booked - spent` (`remaining + hot_allocated + held`
-- outside a pending fence). `booked` moves only with a history entry; `spent` counts
-- single spends as the ledger learns of them; `history_seq` is the newest entry's seq.
ALTER TABLE keys ADD COLUMN booked BIGINT NOT NULL DEFAULT 0 CHECK (booked >= 0);
ALTER TABLE keys ADD COLUMN spent BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0);
ALTER TABLE keys ADD COLUMN history_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pools ADD COLUMN booked BIGINT NOT NULL DEFAULT 0 CHECK (booked >= 0);
ALTER TABLE pools ADD COLUMN spent BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0);
ALTER TABLE pools ADD COLUMN history_seq BIGINT NOT NULL DEFAULT 0;
-- Accounts made before the history: their books as they stand (no entries yet).
UPDATE keys SET booked = COALESCE(remaining, 0) + hot_allocated + held;
UPDATE pools SET booked = COALESCE(remaining, 0) + hot_allocated + held;

-- The root key that asked for a fence (set / decrement), recorded by its entry when the
-- fence finishes (maybe on another node). NULL: a system change (refill).
ALTER TABLE fences ADD COLUMN actor TEXT;

CREATE TABLE credit_history (
    -- A key's id, or an identity's id for its pool.
    account_id      TEXT COLLATE "C" NOT NULL,
    -- 1, 2, ... per account, without gaps.
    seq             BIGINT NOT NULL,
    at              BIGINT NOT NULL,
    -- create | increment | decrement | set | refill | hold.reserve | hold.settle |
    -- hold.release | hold.expire | write_off | late_return.
    kind            TEXT NOT NULL,
    value           BIGINT,
    actor           TEXT,
    hold_id         TEXT,
    -- Balance outside holds (books - held); NULL: unlimited (or none yet).
    balance_before  BIGINT,
    balance_after   BIGINT,
    held_before     BIGINT NOT NULL,
    held_after      BIGINT NOT NULL,
    spent_total     BIGINT NOT NULL,
    -- 1: the balances are the exact balance then; 0: upper bounds (spends the hot store
    -- had not reported yet).
    exact           BIGINT NOT NULL,
    PRIMARY KEY (account_id, seq)
);
