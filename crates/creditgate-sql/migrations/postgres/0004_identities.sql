-- Identities: a workspace's customers, grouping keys by their external id.
-- Kept column-for-column identical to ../sqlite/0004_identities.sql; ids compare
-- bytewise ("C") and external ids as keys.external_id does, as in 0001.

-- A key belongs to the identity of its workspace with its external_id; creating or
-- updating a key with an external id creates the identity when missing, and deleting an
-- identity clears its keys' external id in the same transaction.
CREATE TABLE identities (
    id            TEXT COLLATE "C" PRIMARY KEY,
    workspace_id  TEXT COLLATE "C" NOT NULL,
    external_id   TEXT NOT NULL,
    -- JSON object, or NULL.
    meta          TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT
);

CREATE UNIQUE INDEX identities_external ON identities (workspace_id, external_id);

-- Keys that had an external id before identities existed get theirs.
INSERT INTO identities (id, workspace_id, external_id, meta, created_at, updated_at)
SELECT 'id_' || substr(md5(random()::text || k.workspace_id || k.external_id), 1, 20), k.workspace_id, k.external_id, NULL, MIN(k.created_at), NULL
FROM keys k
WHERE k.external_id IS NOT NULL AND k.deleted_at IS NULL
GROUP BY k.workspace_id, k.external_id;
