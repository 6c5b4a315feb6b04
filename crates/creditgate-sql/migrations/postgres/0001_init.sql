-- creditgate schema, Postgres flavour. Kept column-for-column identical to
-- ../sqlite/0001_init.sql; only the collation of ids differs ("C": bytewise, as in
-- SQLite, so listing order and cursors agree). Times are Unix ms,
-- booleans BIGINT 0/1, JSON documents TEXT.

CREATE TABLE workspaces (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE root_keys (
    id            TEXT COLLATE "C" PRIMARY KEY,
    workspace_id  TEXT COLLATE "C" NOT NULL REFERENCES workspaces (id),
    hash          TEXT NOT NULL UNIQUE,
    name          TEXT,
    -- JSON array of permission strings, e.g. ["api.*.verify_key"].
    permissions   TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    deleted_at    BIGINT
);

CREATE TABLE apis (
    id            TEXT COLLATE "C" PRIMARY KEY,
    workspace_id  TEXT COLLATE "C" NOT NULL,
    name          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    deleted_at    BIGINT
);

CREATE INDEX apis_workspace ON apis (workspace_id, id);

CREATE TABLE keys (
    id               TEXT COLLATE "C" PRIMARY KEY,
    workspace_id     TEXT COLLATE "C" NOT NULL,
    api_id           TEXT COLLATE "C" NOT NULL REFERENCES apis (id),
    hash             TEXT NOT NULL UNIQUE,
    start            TEXT NOT NULL,
    name             TEXT,
    external_id      TEXT,
    -- JSON object.
    meta             TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT,
    expires          BIGINT,
    enabled          BIGINT NOT NULL DEFAULT 1,
    -- Ledger: credits not handed out; NULL = unlimited.
    remaining        BIGINT CHECK (remaining IS NULL OR remaining >= 0),
    -- Ledger: credits handed to the hot store and not yet returned.
    hot_allocated    BIGINT NOT NULL DEFAULT 0 CHECK (hot_allocated >= 0),
    -- Ledger: bumped by every fence (set / decrement / refill).
    generation       BIGINT NOT NULL DEFAULT 0,
    -- Ledger: bumped by every change of `remaining`.
    version          BIGINT NOT NULL DEFAULT 0,
    -- Ledger: epoch of the hot store that holds `hot_allocated`.
    hot_epoch        TEXT,
    refill_interval  TEXT,
    refill_amount    BIGINT,
    refill_day       BIGINT,
    last_refill_at   BIGINT,
    deleted_at       BIGINT
);

CREATE INDEX keys_api ON keys (api_id, id);
CREATE INDEX keys_api_external ON keys (api_id, external_id);
CREATE INDEX keys_hot_epoch ON keys (hot_epoch);

-- Every movement of credits between the ledger and the hot store, idempotent on `id`.
CREATE TABLE transfers (
    id          TEXT COLLATE "C" PRIMARY KEY,
    key_id      TEXT COLLATE "C" NOT NULL,
    -- 'alloc' (ledger -> hot store) or 'return' (hot store -> ledger).
    kind        TEXT NOT NULL,
    amount      BIGINT NOT NULL,
    generation  BIGINT NOT NULL,
    -- alloc: 'pending' | 'credited' | 'cancelled' | 'lost'; return: 'applied'.
    state       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE INDEX transfers_state ON transfers (state, created_at);
CREATE INDEX transfers_key ON transfers (key_id, state);

-- Fencing operations (set / decrement / refill), idempotent on `op_id`.
CREATE TABLE fences (
    op_id         TEXT COLLATE "C" PRIMARY KEY,
    key_id        TEXT COLLATE "C" NOT NULL,
    -- 'set' | 'decrement' | 'refill'.
    kind          TEXT NOT NULL,
    -- set: new balance (NULL = unlimited); decrement: amount; refill: refill amount.
    value         BIGINT,
    -- refill only: start of the period it was applied for.
    period_start  BIGINT,
    generation    BIGINT NOT NULL,
    -- 'pending' | 'done'.
    state         TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE INDEX fences_state ON fences (state, created_at);
CREATE INDEX fences_key ON fences (key_id, state, kind, generation);

-- Analytics: one row per verification.
CREATE TABLE key_verifications (
    request_id     TEXT COLLATE "C" NOT NULL,
    time           BIGINT NOT NULL,
    workspace_id   TEXT COLLATE "C" NOT NULL,
    api_id         TEXT COLLATE "C" NOT NULL,
    key_id         TEXT COLLATE "C" NOT NULL,
    node_id        TEXT NOT NULL,
    region         TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    cost           BIGINT NOT NULL,
    spent_credits  BIGINT NOT NULL,
    remaining      BIGINT,
    latency_us     BIGINT NOT NULL,
    -- JSON array of strings.
    tags           TEXT NOT NULL
);

CREATE INDEX key_verifications_key ON key_verifications (key_id, time);
CREATE INDEX key_verifications_workspace ON key_verifications (workspace_id, time);

-- Analytics: one row per API request.
CREATE TABLE api_requests (
    request_id    TEXT COLLATE "C" NOT NULL,
    time          BIGINT NOT NULL,
    workspace_id  TEXT COLLATE "C" NOT NULL,
    method        TEXT NOT NULL,
    path          TEXT NOT NULL,
    status        BIGINT NOT NULL,
    latency_us    BIGINT NOT NULL,
    node_id       TEXT NOT NULL
);

CREATE INDEX api_requests_workspace ON api_requests (workspace_id, time);
