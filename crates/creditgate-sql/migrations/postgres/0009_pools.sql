-- Shared credit pools: an identity's balance, spent together with its keys' balances.
-- A pool is one more ledger account (the ledger's columns of `keys`), named by its
-- identity's id; the ledger picks this table for ids of identities. A deleted identity's
-- pool is kept, deleted (its credits can still return from the hot store).
-- Kept column-for-column identical to ../sqlite/0009_pools.sql.
CREATE TABLE pools (
    id               TEXT COLLATE "C" PRIMARY KEY,
    workspace_id     TEXT COLLATE "C" NOT NULL,
    remaining        BIGINT CHECK (remaining IS NULL OR remaining >= 0),
    hot_allocated    BIGINT NOT NULL DEFAULT 0 CHECK (hot_allocated >= 0),
    generation       BIGINT NOT NULL DEFAULT 0,
    version          BIGINT NOT NULL DEFAULT 0,
    hot_epoch        TEXT,
    refill_interval  TEXT,
    refill_amount    BIGINT,
    refill_day       BIGINT,
    last_refill_at   BIGINT,
    held             BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at       BIGINT NOT NULL,
    deleted_at       BIGINT
);
