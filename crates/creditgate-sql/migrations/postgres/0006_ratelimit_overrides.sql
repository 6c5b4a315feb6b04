-- Rate-limit overrides: per workspace and namespace, the limit and window that
-- ratelimit.limit applies to identifiers matching `identifier` ('*' = any run of
-- characters). Kept column-for-column identical to ../sqlite/0006_ratelimit_overrides.sql;
-- ids compare bytewise ("C"), as in 0004.
CREATE TABLE ratelimit_overrides (
    id            TEXT COLLATE "C" PRIMARY KEY,
    workspace_id  TEXT COLLATE "C" NOT NULL,
    namespace     TEXT COLLATE "C" NOT NULL,
    identifier    TEXT COLLATE "C" NOT NULL,
    limit_value   BIGINT NOT NULL,
    duration      BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT
);

CREATE UNIQUE INDEX ratelimit_overrides_identifier
    ON ratelimit_overrides (workspace_id, namespace, identifier);
