-- The webhook outbox. An event is written in the same transaction as the change it
-- tells of, with one delivery row per endpoint of the workspace subscribed to its type;
-- any node's delivery worker claims due deliveries (a lease), sends them, and records
-- every attempt. Kept column-for-column identical to ../postgres/0011_webhook_outbox.sql.
CREATE TABLE webhook_events (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL,
    type          TEXT NOT NULL,
    -- The JSON body sent: {"type", "timestamp", "data"}.
    payload       TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE webhook_deliveries (
    event_id         TEXT NOT NULL,
    endpoint_id      TEXT NOT NULL,
    workspace_id     TEXT NOT NULL,
    -- pending, delivered or failed (gave up after the retry window).
    state            TEXT NOT NULL,
    attempts         BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    lease_until      BIGINT NOT NULL,
    last_status      BIGINT,
    last_error       TEXT,
    delivered_at     BIGINT,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (event_id, endpoint_id)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at);

CREATE TABLE webhook_attempts (
    event_id       TEXT NOT NULL,
    endpoint_id    TEXT NOT NULL,
    attempt        BIGINT NOT NULL,
    at             BIGINT NOT NULL,
    -- The receiver's HTTP status; NULL when no answer came (error says why).
    status         BIGINT,
    latency_ms     BIGINT NOT NULL,
    error          TEXT,
    -- When the next attempt is due; NULL after the last one.
    next_retry_at  BIGINT,
    PRIMARY KEY (event_id, endpoint_id, attempt)
);
