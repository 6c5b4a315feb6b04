-- Webhook endpoints of a workspace: where events about its keys' balances are sent.
-- events: JSON array of event names; secret: the Standard Webhooks signing secret
-- (whsec_…), kept in clear because signing needs it. Kept column-for-column identical to
-- ../postgres/0010_webhook_endpoints.sql.
CREATE TABLE webhook_endpoints (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL,
    url           TEXT NOT NULL,
    events        TEXT NOT NULL,
    description   TEXT,
    secret        TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id, id);
