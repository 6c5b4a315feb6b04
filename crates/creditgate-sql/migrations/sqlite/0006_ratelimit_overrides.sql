-- Rate-limit overrides: per workspace and namespace, the limit and window that
-- ratelimit.limit applies to identifiers matching `identifier` ('*' = any run of
-- characters). Kept column-for-column identical to ../postgres/0006_ratelimit_overrides.sql.
CREATE TABLE ratelimit_overrides (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL,
    namespace     TEXT NOT NULL,
    identifier    TEXT NOT NULL,
    limit_value   BIGINT NOT NULL,
    duration      BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT
);

CREATE UNIQUE INDEX ratelimit_overrides_identifier
    ON ratelimit_overrides (workspace_id, namespace, identifier);
