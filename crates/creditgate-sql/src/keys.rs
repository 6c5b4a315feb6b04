//! The [`KeyStore`] port on SQL: workspaces, root keys, APIs and keys.
//!
//! A key is *live* when neither it nor its API is soft-deleted; every read of keys
//! goes through that filter. Creating a key also writes its ledger columns
//! (`remaining`, `hot_allocated`, `generation`, `version`), which from then on belong
//! to the [`Ledger`](creditgate_limiter::ports::Ledger) implementation in `ledger.rs`.

use async_trait::async_trait;
use std::sync::Arc;

use creditgate_domain::store::KeyPage;
use creditgate_domain::{
    ApiId, ApiRecord, Credits, Crossing, IdentityId, IdentityPage, IdentityPatch, IdentityRecord,
    KeyId, KeyPatch, KeyRecord, KeyStore, NewKey, Permission, PermissionSet, PoolRecord,
    PreviousSecret, RatelimitOverride, RatelimitRule, Refill, RefillInterval, RootKeyId,
    RootKeyRecord, StoreError, WebhookDelivery, WebhookEndpoint, WebhookEvent, WorkspaceId,
};
use serde_json::{Map, Value};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};

use creditgate_limiter::rules::Account;

use crate::error::store_error;
use crate::SqlStore;

/// `SELECT` of live keys (`k`) joined with their API (`a`), followed by `$where`.
macro_rules! live_keys_where {
    ($where:literal) => {
        concat!(
            "SELECT k.id, k.workspace_id, k.api_id, k.hash, k.start, k.name, k.external_id, ",
            "k.meta, k.created_at, k.updated_at, k.expires, k.enabled, k.remaining, ",
            "k.refill_interval, k.refill_amount, k.refill_day, k.last_refill_at, k.ratelimits, ",
            "k.previous_hash, k.previous_hash_expires, k.credit_alerts, ",
            "i.id AS identity_id, i.meta AS identity_meta, i.ratelimits AS identity_ratelimits, ",
            "i.created_at AS identity_created_at, i.updated_at AS identity_updated_at, ",
            "p.id AS pool_id, p.refill_interval AS pool_refill_interval, ",
            "p.refill_amount AS pool_refill_amount, p.refill_day AS pool_refill_day, ",
            "p.last_refill_at AS pool_last_refill_at, p.credit_alerts AS pool_credit_alerts ",
            "FROM keys k JOIN apis a ON a.id = k.api_id ",
            "LEFT JOIN identities i ON i.workspace_id = k.workspace_id ",
            "AND i.external_id = k.external_id ",
            "LEFT JOIN pools p ON p.id = i.id AND p.deleted_at IS NULL ",
            "WHERE k.deleted_at IS NULL AND a.deleted_at IS NULL AND ",
            $where
        )
    };
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("corrupt {what} in the database: {detail}"))
}

/// A JSON object column (`meta`), or NULL.
fn meta_column(row: &AnyRow, column: &str) -> Result<Option<Map<String, Value>>, StoreError> {
    match row
        .try_get::<Option<String>, _>(column)
        .map_err(store_error)?
    {
        Some(text) => Ok(Some(
            serde_json::from_str::<Map<String, Value>>(&text).map_err(|e| corrupt(column, e))?,
        )),
        None => Ok(None),
    }
}

/// A JSON array of rate limits, or NULL for none.
fn ratelimits_column(row: &AnyRow, column: &str) -> Result<Vec<RatelimitRule>, StoreError> {
    match row
        .try_get::<Option<String>, _>(column)
        .map_err(store_error)?
    {
        Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(column, e)),
        None => Ok(Vec::new()),
    }
}

fn ratelimits_json(rules: &[RatelimitRule]) -> Result<Option<String>, StoreError> {
    if rules.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(rules)
        .map(Some)
        .map_err(|e| StoreError::Backend(format!("encoding rate limits: {e}")))
}

/// A JSON array of balance thresholds, or NULL for none.
fn alerts_column(row: &AnyRow, column: &str) -> Result<Vec<u64>, StoreError> {
    match row
        .try_get::<Option<String>, _>(column)
        .map_err(store_error)?
    {
        Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(column, e)),
        None => Ok(Vec::new()),
    }
}

fn alerts_json(alerts: &[u64]) -> Option<String> {
    (!alerts.is_empty()).then(|| {
        let items: Vec<String> = alerts.iter().map(u64::to_string).collect();
        format!("[{}]", items.join(","))
    })
}

const IDENTITY_COLUMNS: &str =
    "id, workspace_id, external_id, meta, created_at, updated_at, ratelimits";

/// `SELECT` of identities (`i`) with their live pool (`p`), followed by `$where`.
macro_rules! identities_where {
    ($where:literal) => {
        concat!(
            "SELECT i.id, i.workspace_id, i.external_id, i.meta, i.created_at, i.updated_at, ",
            "i.ratelimits, p.id AS pool_id, p.refill_interval AS pool_refill_interval, ",
            "p.refill_amount AS pool_refill_amount, p.refill_day AS pool_refill_day, ",
            "p.last_refill_at AS pool_last_refill_at, p.credit_alerts AS pool_credit_alerts ",
            "FROM identities i LEFT JOIN pools p ON p.id = i.id AND p.deleted_at IS NULL ",
            "WHERE ",
            $where
        )
    };
}

/// The workspace's (`$1`) identity whose id or external id is `$2`.
const IDENTITY_BY_HANDLE: &str =
    identities_where!("i.workspace_id = $1 AND (i.id = $2 OR i.external_id = $2)");

/// The live key `id` as the transaction `tx` left it, then commits.
async fn read_back(
    mut tx: sqlx::Transaction<'static, Any>,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StoreError> {
    let row = sqlx::query(live_keys_where!("k.id = $1"))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
    let key = row.as_ref().map(key_from_row).transpose()?;
    tx.commit().await.map_err(store_error)?;
    Ok(key)
}

/// Opens the ledger account of a pool (in the transaction `conn`).
pub(crate) async fn insert_pool(
    conn: &mut AnyConnection,
    identity: &IdentityId,
    workspace: &WorkspaceId,
    remaining: Option<Credits>,
    refill: Option<&Refill>,
    alerts: &[u64],
    now_ms: i64,
) -> Result<(), StoreError> {
    let (interval, amount, day) = refill_columns(refill);
    let account = Account::new(remaining.map(Credits::get), now_ms);
    sqlx::query(
        "INSERT INTO pools (id, workspace_id, remaining, refill_interval, refill_amount, \
         refill_day, last_refill_at, created_at, credit_alerts, booked, history_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10)",
    )
    .bind(identity.as_str())
    .bind(workspace.as_str())
    .bind(remaining.map(Credits::as_i64))
    .bind(interval)
    .bind(amount)
    .bind(day)
    .bind(now_ms)
    .bind(alerts_json(alerts))
    .bind(opened_i64(account.booked)?)
    .bind(opened_i64(account.history_seq)?)
    .execute(&mut *conn)
    .await
    .map_err(store_error)?;
    let pool = KeyId::from(identity.as_str());
    crate::ledger::insert_entries(conn, &pool, &account.entries)
        .await
        .map_err(store_error)
}

/// A column of a new account (its balance bounds it).
fn opened_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{v} does not fit a column")))
}

/// One page of `limit` records from `rows` (fetched with `LIMIT limit + 1`), and the
/// cursor of the next page (the last record's id) when there is one.
fn page<T>(
    rows: &[AnyRow],
    limit: u32,
    parse: fn(&AnyRow) -> Result<T, StoreError>,
    id: fn(&T) -> String,
) -> Result<(Vec<T>, Option<String>), StoreError> {
    let page_len = usize::try_from(limit).unwrap_or(usize::MAX);
    let records = rows
        .iter()
        .take(page_len)
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    let cursor = if rows.len() > page_len {
        records.last().map(id)
    } else {
        None
    };
    Ok((records, cursor))
}

const OVERRIDE_COLUMNS: &str =
    "id, workspace_id, namespace, identifier, limit_value, duration, created_at, updated_at";

fn override_from_row(row: &AnyRow) -> Result<RatelimitOverride, StoreError> {
    let get_text = |c: &str| row.try_get::<String, _>(c).map_err(store_error);
    let get_u64 = |c: &str| {
        let v = row.try_get::<i64, _>(c).map_err(store_error)?;
        u64::try_from(v).map_err(|e| corrupt(c, e))
    };
    Ok(RatelimitOverride {
        id: get_text("id")?,
        workspace_id: WorkspaceId::from(get_text("workspace_id")?),
        namespace: get_text("namespace")?,
        identifier: get_text("identifier")?,
        limit: get_u64("limit_value")?,
        duration_ms: get_u64("duration")?,
        created_at: row.try_get::<i64, _>("created_at").map_err(store_error)?,
        updated_at: row
            .try_get::<Option<i64>, _>("updated_at")
            .map_err(store_error)?,
    })
}

const WEBHOOK_COLUMNS: &str = "id, workspace_id, url, events, description, secret, created_at";

fn webhook_from_row(row: &AnyRow) -> Result<WebhookEndpoint, StoreError> {
    let get_text = |c: &str| row.try_get::<String, _>(c).map_err(store_error);
    let names: Vec<String> =
        serde_json::from_str(&get_text("events")?).map_err(|e| corrupt("events", e))?;
    let events = names
        .iter()
        .map(|n| WebhookEvent::parse(n).ok_or_else(|| corrupt("events", format!("unknown {n}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WebhookEndpoint {
        id: get_text("id")?,
        workspace_id: WorkspaceId::from(get_text("workspace_id")?),
        url: get_text("url")?,
        events,
        description: row
            .try_get::<Option<String>, _>("description")
            .map_err(store_error)?,
        secret: get_text("secret")?,
        created_at: row.try_get::<i64, _>("created_at").map_err(store_error)?,
    })
}

/// A refill from its three columns (`<prefix>refill_interval`, …), or none.
fn refill_from_row(row: &AnyRow, prefix: &str) -> Result<Option<Refill>, StoreError> {
    let get_opt_int = |c: &str| row.try_get::<Option<i64>, _>(c).map_err(store_error);
    let interval_col = format!("{prefix}refill_interval");
    let Some(interval) = row
        .try_get::<Option<String>, _>(interval_col.as_str())
        .map_err(store_error)?
    else {
        return Ok(None);
    };
    let interval =
        RefillInterval::parse(&interval).ok_or_else(|| corrupt(&interval_col, &interval))?;
    let amount_col = format!("{prefix}refill_amount");
    let amount = get_opt_int(&amount_col)?.ok_or_else(|| corrupt(&amount_col, "NULL"))?;
    let amount = Credits::from_i64(amount).map_err(|e| corrupt(&amount_col, e))?;
    let day = get_opt_int(&format!("{prefix}refill_day"))?;
    Refill::new(interval, amount, day)
        .map(Some)
        .map_err(|e| corrupt("refill", e))
}

/// The pool of an identity row joined with `pools` (columns `pool_…`).
fn pool_from_row(row: &AnyRow) -> Result<Option<PoolRecord>, StoreError> {
    let id: Option<String> = row.try_get("pool_id").map_err(store_error)?;
    if id.is_none() {
        return Ok(None);
    }
    Ok(Some(PoolRecord {
        refill: refill_from_row(row, "pool_")?,
        last_refill_at: row
            .try_get::<Option<i64>, _>("pool_last_refill_at")
            .map_err(store_error)?,
        credit_alerts: alerts_column(row, "pool_credit_alerts")?,
    }))
}

fn identity_from_row(row: &AnyRow) -> Result<IdentityRecord, StoreError> {
    let get_text = |c: &str| row.try_get::<String, _>(c).map_err(store_error);
    Ok(IdentityRecord {
        id: IdentityId::from(get_text("id")?),
        workspace_id: WorkspaceId::from(get_text("workspace_id")?),
        external_id: get_text("external_id")?,
        meta: meta_column(row, "meta")?,
        created_at: row.try_get::<i64, _>("created_at").map_err(store_error)?,
        updated_at: row
            .try_get::<Option<i64>, _>("updated_at")
            .map_err(store_error)?,
        ratelimits: ratelimits_column(row, "ratelimits")?,
        pool: pool_from_row(row)?,
    })
}

fn key_from_row(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    let get_text = |c: &str| row.try_get::<String, _>(c).map_err(store_error);
    let get_opt_text = |c: &str| row.try_get::<Option<String>, _>(c).map_err(store_error);
    let get_opt_int = |c: &str| row.try_get::<Option<i64>, _>(c).map_err(store_error);

    let meta = meta_column(row, "meta")?;
    let external_id = get_opt_text("external_id")?;
    let identity = match (get_opt_text("identity_id")?, &external_id) {
        (Some(id), Some(external_id)) => Some(Arc::new(IdentityRecord {
            id: IdentityId::from(id),
            workspace_id: WorkspaceId::from(get_text("workspace_id")?),
            external_id: external_id.clone(),
            meta: meta_column(row, "identity_meta")?,
            created_at: get_opt_int("identity_created_at")?
                .ok_or_else(|| corrupt("identities.created_at", "NULL"))?,
            updated_at: get_opt_int("identity_updated_at")?,
            ratelimits: ratelimits_column(row, "identity_ratelimits")?,
            pool: pool_from_row(row)?,
        })),
        _ => None,
    };
    let refill = refill_from_row(row, "")?;
    Ok(KeyRecord {
        id: KeyId::from(get_text("id")?),
        workspace_id: WorkspaceId::from(get_text("workspace_id")?),
        api_id: ApiId::from(get_text("api_id")?),
        hash: get_text("hash")?,
        start: get_text("start")?,
        name: get_opt_text("name")?,
        external_id,
        meta,
        created_at: row.try_get::<i64, _>("created_at").map_err(store_error)?,
        updated_at: get_opt_int("updated_at")?,
        expires: get_opt_int("expires")?,
        enabled: row.try_get::<i64, _>("enabled").map_err(store_error)? != 0,
        limited: get_opt_int("remaining")?.is_some(),
        refill,
        last_refill_at: get_opt_int("last_refill_at")?,
        identity,
        ratelimits: ratelimits_column(row, "ratelimits")?,
        previous: match (
            get_opt_text("previous_hash")?,
            get_opt_int("previous_hash_expires")?,
        ) {
            (Some(hash), Some(expires)) => Some(PreviousSecret { hash, expires }),
            _ => None,
        },
        credit_alerts: alerts_column(row, "credit_alerts")?,
    })
}

/// Creates the workspace's identity with `external_id` unless it exists (in the
/// transaction of the key that names it).
async fn ensure_identity(
    conn: &mut AnyConnection,
    workspace: &WorkspaceId,
    external_id: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO identities (id, workspace_id, external_id, meta, created_at, updated_at) \
         VALUES ($1, $2, $3, NULL, $4, NULL) ON CONFLICT (workspace_id, external_id) DO NOTHING",
    )
    .bind(IdentityId::generate().as_str())
    .bind(workspace.as_str())
    .bind(external_id)
    .bind(now_ms)
    .execute(conn)
    .await
    .map_err(store_error)?;
    Ok(())
}

fn api_from_row(row: &AnyRow) -> Result<ApiRecord, StoreError> {
    Ok(ApiRecord {
        id: ApiId::from(row.try_get::<String, _>("id").map_err(store_error)?),
        workspace_id: WorkspaceId::from(
            row.try_get::<String, _>("workspace_id")
                .map_err(store_error)?,
        ),
        name: row.try_get("name").map_err(store_error)?,
        created_at: row.try_get("created_at").map_err(store_error)?,
    })
}

fn root_key_from_row(row: &AnyRow) -> Result<RootKeyRecord, StoreError> {
    let id: String = row.try_get("id").map_err(store_error)?;
    let text: String = row.try_get("permissions").map_err(store_error)?;
    let strings: Vec<String> =
        serde_json::from_str(&text).map_err(|e| corrupt("root key permissions", e))?;
    // Permissions this version does not know grant nothing (least privilege), but are
    // worth a warning: they were written by something else.
    let permissions = strings
        .iter()
        .filter_map(|s| match Permission::parse(s) {
            Ok(p) => Some(p),
            Err(_) => {
                tracing::warn!(root_key_id = %id, permission = %s, "unknown permission ignored");
                None
            }
        })
        .collect();
    Ok(RootKeyRecord {
        id: RootKeyId::from(id),
        workspace_id: WorkspaceId::from(
            row.try_get::<String, _>("workspace_id")
                .map_err(store_error)?,
        ),
        hash: row.try_get("hash").map_err(store_error)?,
        name: row.try_get("name").map_err(store_error)?,
        permissions: PermissionSet(permissions),
        created_at: row.try_get("created_at").map_err(store_error)?,
    })
}

fn permissions_json(set: &PermissionSet) -> Result<String, StoreError> {
    let strings: Vec<String> = set.0.iter().map(ToString::to_string).collect();
    serde_json::to_string(&strings).map_err(|e| StoreError::Backend(e.to_string()))
}

fn meta_json(meta: Option<&Map<String, Value>>) -> Result<Option<String>, StoreError> {
    meta.map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Backend(e.to_string()))
}

/// The three refill columns of a refill configuration.
fn refill_columns(refill: Option<&Refill>) -> (Option<String>, Option<i64>, Option<i64>) {
    match refill {
        Some(r) => (
            Some(r.interval.as_str().to_owned()),
            Some(r.amount.as_i64()),
            r.refill_day.map(i64::from),
        ),
        None => (None, None, None),
    }
}

/// A value bound to a dynamically built statement.
enum Bind {
    Text(Option<String>),
    Int(Option<i64>),
}

fn bind_all<'q>(
    mut query: Query<'q, Any, AnyArguments<'q>>,
    binds: Vec<Bind>,
) -> Query<'q, Any, AnyArguments<'q>> {
    for b in binds {
        query = match b {
            Bind::Text(v) => query.bind(v),
            Bind::Int(v) => query.bind(v),
        };
    }
    query
}

/// The `SET` list and values of a patch; placeholders start at `$3` (`$1` is the key
/// id, `$2` the time of the update).
fn patch_assignments(patch: &KeyPatch) -> Result<(Vec<String>, Vec<Bind>), StoreError> {
    let mut sets: Vec<String> = vec!["updated_at = $2".to_owned()];
    let mut binds = Vec::new();
    let mut push = |sets: &mut Vec<String>, column: &str, value: Bind| {
        binds.push(value);
        sets.push(format!("{column} = ${}", binds.len() + 2));
    };
    if let Some(name) = &patch.name {
        push(&mut sets, "name", Bind::Text(name.clone()));
    }
    if let Some(external_id) = &patch.external_id {
        push(&mut sets, "external_id", Bind::Text(external_id.clone()));
    }
    if let Some(meta) = &patch.meta {
        push(&mut sets, "meta", Bind::Text(meta_json(meta.as_ref())?));
    }
    if let Some(expires) = patch.expires {
        push(&mut sets, "expires", Bind::Int(expires));
    }
    if let Some(enabled) = patch.enabled {
        push(&mut sets, "enabled", Bind::Int(Some(i64::from(enabled))));
    }
    if let Some(rules) = &patch.ratelimits {
        push(&mut sets, "ratelimits", Bind::Text(ratelimits_json(rules)?));
    }
    if let Some(alerts) = &patch.credit_alerts {
        push(&mut sets, "credit_alerts", Bind::Text(alerts_json(alerts)));
    }
    if let Some(refill) = &patch.refill {
        let (interval, amount, day) = refill_columns(refill.as_ref());
        push(&mut sets, "refill_interval", Bind::Text(interval));
        push(&mut sets, "refill_amount", Bind::Int(amount));
        push(&mut sets, "refill_day", Bind::Int(day));
        if refill.is_some() {
            // A key that never had a refill time starts its calendar now.
            sets.push("last_refill_at = COALESCE(last_refill_at, $2)".to_owned());
        }
    }
    Ok((sets, binds))
}

impl SqlStore {
    /// Inserts a root key and, if missing, its workspace (workspaces have no API of their
    /// own: a root key brings its workspace along). With `idempotent`, a root key whose
    /// hash already exists is left as it is; without, it is a conflict.
    async fn write_root_key(
        &self,
        root: &RootKeyRecord,
        idempotent: bool,
    ) -> Result<(), StoreError> {
        let permissions = permissions_json(&root.permissions)?;
        let mut tx = self.begin_write().await.map_err(store_error)?;
        sqlx::query(
            "INSERT INTO workspaces (id, name, created_at) VALUES ($1, NULL, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(root.workspace_id.as_str())
        .bind(root.created_at)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        let on_conflict = if idempotent {
            " ON CONFLICT DO NOTHING"
        } else {
            ""
        };
        sqlx::query(&format!(
            "INSERT INTO root_keys (id, workspace_id, hash, name, permissions, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6){on_conflict}"
        ))
        .bind(root.id.as_str())
        .bind(root.workspace_id.as_str())
        .bind(root.hash.as_str())
        .bind(root.name.as_deref())
        .bind(permissions)
        .bind(root.created_at)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn ensure_root_key(&self, root: &RootKeyRecord) -> Result<(), StoreError> {
        self.write_root_key(root, true).await
    }

    async fn insert_root_key(&self, root: &RootKeyRecord) -> Result<(), StoreError> {
        self.write_root_key(root, false).await
    }

    async fn root_key_by_hash(&self, hash: &str) -> Result<Option<RootKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, workspace_id, hash, name, permissions, created_at FROM root_keys \
             WHERE hash = $1 AND deleted_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        row.as_ref().map(root_key_from_row).transpose()
    }

    async fn has_root_keys(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT id FROM root_keys WHERE deleted_at IS NULL LIMIT 1")
            .fetch_optional(&self.read)
            .await
            .map_err(store_error)?;
        Ok(row.is_some())
    }

    async fn create_api(&self, api: &ApiRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO apis (id, workspace_id, name, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(api.id.as_str())
        .bind(api.workspace_id.as_str())
        .bind(api.name.as_str())
        .bind(api.created_at)
        .execute(&self.write)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn get_api(
        &self,
        workspace: &WorkspaceId,
        id: &ApiId,
    ) -> Result<Option<ApiRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, workspace_id, name, created_at FROM apis \
             WHERE id = $1 AND workspace_id = $2 AND deleted_at IS NULL",
        )
        .bind(id.as_str())
        .bind(workspace.as_str())
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        row.as_ref().map(api_from_row).transpose()
    }

    async fn delete_api(&self, workspace: &WorkspaceId, id: &ApiId) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        let mut tx = self.begin_write().await.map_err(store_error)?;
        let deleted = sqlx::query(
            "UPDATE apis SET deleted_at = $3 \
             WHERE id = $1 AND workspace_id = $2 AND deleted_at IS NULL",
        )
        .bind(id.as_str())
        .bind(workspace.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE keys SET deleted_at = $2, updated_at = $2 \
             WHERE api_id = $1 AND deleted_at IS NULL",
        )
        .bind(id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(true)
    }

    async fn create_key(&self, key: &NewKey) -> Result<(), StoreError> {
        let r = &key.record;
        let (interval, amount, day) = refill_columns(r.refill.as_ref());
        let mut tx = self.begin_write().await.map_err(store_error)?;
        if let Some(external_id) = &r.external_id {
            ensure_identity(&mut tx, &r.workspace_id, external_id, r.created_at).await?;
        }
        // The account opens with its `create` history entry, in this transaction.
        let account = Account::new(key.remaining.map(Credits::get), r.created_at);
        sqlx::query(
            "INSERT INTO keys (id, workspace_id, api_id, hash, start, name, external_id, meta, \
             created_at, updated_at, expires, enabled, remaining, hot_allocated, generation, \
             version, refill_interval, refill_amount, refill_day, last_refill_at, ratelimits, \
             credit_alerts, booked, history_seq) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 0, 0, 0, \
             $14, $15, $16, $17, $18, $19, $20, $21)",
        )
        .bind(r.id.as_str())
        .bind(r.workspace_id.as_str())
        .bind(r.api_id.as_str())
        .bind(r.hash.as_str())
        .bind(r.start.as_str())
        .bind(r.name.as_deref())
        .bind(r.external_id.as_deref())
        .bind(meta_json(r.meta.as_ref())?)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(r.expires)
        .bind(i64::from(r.enabled))
        .bind(key.remaining.map(Credits::as_i64))
        .bind(interval)
        .bind(amount)
        .bind(day)
        .bind(r.last_refill_at)
        .bind(ratelimits_json(&r.ratelimits)?)
        .bind(alerts_json(&r.credit_alerts))
        .bind(opened_i64(account.booked)?)
        .bind(opened_i64(account.history_seq)?)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        crate::ledger::insert_entries(&mut tx, &r.id, &account.entries)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        // The current secret, or the one before the last reroll (the caller checks
        // whether that one still verifies).
        let row = sqlx::query(live_keys_where!("(k.hash = $1 OR k.previous_hash = $1)"))
            .bind(hash)
            .fetch_optional(&self.read)
            .await
            .map_err(store_error)?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(live_keys_where!("k.id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(store_error)?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Keys ordered by id; the cursor is the last id of the page. A `limit` of 0 is
    /// treated as 1.
    async fn list_keys(
        &self,
        api: &ApiId,
        limit: u32,
        cursor: Option<&str>,
        external_id: Option<&str>,
    ) -> Result<KeyPage, StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(live_keys_where!(
            "k.api_id = $1 AND k.id > $2 AND ($3 IS NULL OR k.external_id = $3) \
             ORDER BY k.id LIMIT $4"
        ))
        .bind(api.as_str())
        .bind(cursor.unwrap_or(""))
        .bind(external_id)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        let (keys, cursor) = page(&rows, limit, key_from_row, |k| k.id.0.to_string())?;
        Ok(KeyPage { keys, cursor })
    }

    async fn update_key(
        &self,
        id: &KeyId,
        patch: &KeyPatch,
        now_ms: i64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        if patch.is_empty() {
            return self.key_by_id(id).await;
        }
        let (sets, binds) = patch_assignments(patch)?;
        let sql = format!(
            "UPDATE keys SET {} WHERE id = $1 AND deleted_at IS NULL \
             AND api_id IN (SELECT id FROM apis WHERE deleted_at IS NULL)",
            sets.join(", ")
        );
        let mut tx = self.begin_write().await.map_err(store_error)?;
        let query = sqlx::query(&sql).bind(id.as_str()).bind(now_ms);
        let updated = bind_all(query, binds)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
        if updated == 0 {
            return Ok(None);
        }
        if let Some(Some(external_id)) = &patch.external_id {
            let workspace: String =
                sqlx::query_scalar("SELECT workspace_id FROM keys WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(store_error)?;
            ensure_identity(&mut tx, &WorkspaceId::from(workspace), external_id, now_ms).await?;
        }
        read_back(tx, id).await
    }

    async fn reroll_key(
        &self,
        id: &KeyId,
        hash: &str,
        start: &str,
        previous_expires: Option<i64>,
        now_ms: i64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut tx = self.begin_write().await.map_err(store_error)?;
        let updated = sqlx::query(
            "UPDATE keys SET \
             previous_hash = CASE WHEN $4 = 1 THEN hash ELSE NULL END, \
             previous_hash_expires = CASE WHEN $4 = 1 THEN $5 ELSE NULL END, \
             hash = $2, start = $3, updated_at = $6 \
             WHERE id = $1 AND deleted_at IS NULL \
             AND api_id IN (SELECT id FROM apis WHERE deleted_at IS NULL)",
        )
        .bind(id.as_str())
        .bind(hash)
        .bind(start)
        .bind(i64::from(previous_expires.is_some()))
        .bind(previous_expires.unwrap_or(0))
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        if updated == 0 {
            return Ok(None);
        }
        read_back(tx, id).await
    }

    async fn delete_key(&self, id: &KeyId, now_ms: i64) -> Result<bool, StoreError> {
        let deleted = sqlx::query(
            "UPDATE keys SET deleted_at = $2, updated_at = $2 \
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id.as_str())
        .bind(now_ms)
        .execute(&self.write)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(deleted > 0)
    }

    async fn create_identity(
        &self,
        identity: &IdentityRecord,
        pool: Option<Credits>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(store_error)?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO identities ({IDENTITY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (workspace_id, external_id) DO NOTHING"
        ))
        .bind(identity.id.as_str())
        .bind(identity.workspace_id.as_str())
        .bind(identity.external_id.as_str())
        .bind(meta_json(identity.meta.as_ref())?)
        .bind(identity.created_at)
        .bind(identity.updated_at)
        .bind(ratelimits_json(&identity.ratelimits)?)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "an identity with externalId '{}' already exists in this workspace",
                identity.external_id
            )));
        }
        if let Some(p) = &identity.pool {
            insert_pool(
                &mut tx,
                &identity.id,
                &identity.workspace_id,
                pool,
                p.refill.as_ref(),
                &p.credit_alerts,
                identity.created_at,
            )
            .await?;
        }
        tx.commit().await.map_err(store_error)
    }

    async fn open_pool(
        &self,
        identity: &IdentityRecord,
        remaining: Credits,
        refill: Option<&Refill>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(store_error)?;
        insert_pool(
            &mut tx,
            &identity.id,
            &identity.workspace_id,
            Some(remaining),
            refill,
            &[],
            now_ms,
        )
        .await?;
        tx.commit().await.map_err(store_error)
    }

    async fn identity(
        &self,
        workspace: &WorkspaceId,
        identity: &str,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let row = sqlx::query(IDENTITY_BY_HANDLE)
            .bind(workspace.as_str())
            .bind(identity)
            .fetch_optional(&self.read)
            .await
            .map_err(store_error)?;
        row.as_ref().map(identity_from_row).transpose()
    }

    async fn list_identities(
        &self,
        workspace: &WorkspaceId,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<IdentityPage, StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(identities_where!(
            "i.workspace_id = $1 AND i.id > $2 ORDER BY i.id LIMIT $3"
        ))
        .bind(workspace.as_str())
        .bind(cursor.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        let (identities, cursor) = page(&rows, limit, identity_from_row, |i| i.id.0.to_string())?;
        Ok(IdentityPage { identities, cursor })
    }

    async fn update_identity(
        &self,
        workspace: &WorkspaceId,
        identity: &str,
        patch: &IdentityPatch,
        now_ms: i64,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let mut tx = self.begin_write().await.map_err(store_error)?;
        // Absent fields keep their column (a flag per field says which to set).
        let updated = sqlx::query(
            "UPDATE identities SET \
             meta = CASE WHEN $3 = 1 THEN $4 ELSE meta END, \
             ratelimits = CASE WHEN $5 = 1 THEN $6 ELSE ratelimits END, updated_at = $7 \
             WHERE workspace_id = $1 AND (id = $2 OR external_id = $2)",
        )
        .bind(workspace.as_str())
        .bind(identity)
        .bind(i64::from(patch.meta.is_some()))
        .bind(meta_json(patch.meta.as_ref().and_then(Option::as_ref))?)
        .bind(i64::from(patch.ratelimits.is_some()))
        .bind(ratelimits_json(
            patch.ratelimits.as_deref().unwrap_or_default(),
        )?)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?
        .rows_affected();
        if updated == 0 {
            return Ok(None);
        }
        if let Some(alerts) = &patch.credit_alerts {
            sqlx::query(
                "UPDATE pools SET credit_alerts = $3 WHERE deleted_at IS NULL AND id = \
                 (SELECT id FROM identities WHERE workspace_id = $1 AND (id = $2 OR external_id = $2))",
            )
            .bind(workspace.as_str())
            .bind(identity)
            .bind(alerts_json(alerts))
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        }
        let row = sqlx::query(IDENTITY_BY_HANDLE)
            .bind(workspace.as_str())
            .bind(identity)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        let record = row.as_ref().map(identity_from_row).transpose()?;
        tx.commit().await.map_err(store_error)?;
        Ok(record)
    }

    async fn delete_identity(
        &self,
        workspace: &WorkspaceId,
        identity: &str,
        now_ms: i64,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let mut tx = self.begin_write().await.map_err(store_error)?;
        let row = sqlx::query(IDENTITY_BY_HANDLE)
            .bind(workspace.as_str())
            .bind(identity)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store_error)?;
        let Some(record) = row.as_ref().map(identity_from_row).transpose()? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM identities WHERE id = $1")
            .bind(record.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        // Its pool's row stays, deleted: credits the hot store holds can still return.
        sqlx::query("UPDATE pools SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL")
            .bind(record.id.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        sqlx::query(
            "UPDATE keys SET external_id = NULL, updated_at = $3 \
             WHERE workspace_id = $1 AND external_id = $2",
        )
        .bind(workspace.as_str())
        .bind(record.external_id.as_str())
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(Some(record))
    }

    async fn set_override(
        &self,
        wanted: &RatelimitOverride,
    ) -> Result<RatelimitOverride, StoreError> {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let row = sqlx::query(&format!(
            "INSERT INTO ratelimit_overrides ({OVERRIDE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) \
             ON CONFLICT (workspace_id, namespace, identifier) DO UPDATE SET \
             limit_value = excluded.limit_value, duration = excluded.duration, \
             updated_at = excluded.created_at \
             RETURNING {OVERRIDE_COLUMNS}"
        ))
        .bind(wanted.id.as_str())
        .bind(wanted.workspace_id.as_str())
        .bind(wanted.namespace.as_str())
        .bind(wanted.identifier.as_str())
        .bind(int(wanted.limit))
        .bind(int(wanted.duration_ms))
        .bind(wanted.created_at)
        .fetch_one(&self.write)
        .await
        .map_err(store_error)?;
        override_from_row(&row)
    }

    async fn overrides(
        &self,
        workspace: &WorkspaceId,
        namespace: &str,
    ) -> Result<Vec<RatelimitOverride>, StoreError> {
        sqlx::query(&format!(
            "SELECT {OVERRIDE_COLUMNS} FROM ratelimit_overrides \
             WHERE workspace_id = $1 AND namespace = $2 ORDER BY id"
        ))
        .bind(workspace.as_str())
        .bind(namespace)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?
        .iter()
        .map(override_from_row)
        .collect()
    }

    async fn list_overrides(
        &self,
        workspace: &WorkspaceId,
        namespace: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<RatelimitOverride>, Option<String>), StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(&format!(
            "SELECT {OVERRIDE_COLUMNS} FROM ratelimit_overrides \
             WHERE workspace_id = $1 AND namespace = $2 AND id > $3 ORDER BY id LIMIT $4"
        ))
        .bind(workspace.as_str())
        .bind(namespace)
        .bind(cursor.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        page(&rows, limit, override_from_row, |o| o.id.clone())
    }

    async fn delete_override(
        &self,
        workspace: &WorkspaceId,
        namespace: &str,
        identifier: &str,
    ) -> Result<bool, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM ratelimit_overrides \
             WHERE workspace_id = $1 AND namespace = $2 AND identifier = $3",
        )
        .bind(workspace.as_str())
        .bind(namespace)
        .bind(identifier)
        .execute(&self.write)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(deleted > 0)
    }

    async fn create_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> Result<(), StoreError> {
        let events: Vec<&str> = endpoint.events.iter().map(|e| e.as_str()).collect();
        let events =
            serde_json::to_string(&events).map_err(|e| StoreError::Backend(e.to_string()))?;
        sqlx::query(&format!(
            "INSERT INTO webhook_endpoints ({WEBHOOK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(endpoint.id.as_str())
        .bind(endpoint.workspace_id.as_str())
        .bind(endpoint.url.as_str())
        .bind(events)
        .bind(endpoint.description.as_deref())
        .bind(endpoint.secret.as_str())
        .bind(endpoint.created_at)
        .execute(&self.write)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn list_webhook_endpoints(
        &self,
        workspace: &WorkspaceId,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<WebhookEndpoint>, Option<String>), StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(&format!(
            "SELECT {WEBHOOK_COLUMNS} FROM webhook_endpoints \
             WHERE workspace_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(workspace.as_str())
        .bind(cursor.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        page(&rows, limit, webhook_from_row, |w| w.id.clone())
    }

    async fn delete_webhook_endpoint(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> Result<bool, StoreError> {
        let deleted =
            sqlx::query("DELETE FROM webhook_endpoints WHERE workspace_id = $1 AND id = $2")
                .bind(workspace.as_str())
                .bind(id)
                .execute(&self.write)
                .await
                .map_err(store_error)?
                .rows_affected();
        Ok(deleted > 0)
    }

    async fn record_crossings(
        &self,
        account: &KeyId,
        crossings: &[Crossing],
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        self.record_crossings_now(account, crossings, now_ms).await
    }

    async fn list_webhook_deliveries(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Option<(Vec<WebhookDelivery>, Option<String>)>, StoreError> {
        let exists: Option<String> = sqlx::query_scalar(
            "SELECT id FROM webhook_endpoints WHERE workspace_id = $1 AND id = $2",
        )
        .bind(workspace.as_str())
        .bind(id)
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        if exists.is_none() {
            return Ok(None);
        }
        self.deliveries_page(workspace, id, limit, cursor)
            .await
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_placeholders_follow_id_and_time() {
        let patch = KeyPatch {
            name: Some(None),
            enabled: Some(false),
            ..KeyPatch::default()
        };
        let (sets, binds) = patch_assignments(&patch).unwrap();
        assert_eq!(sets, ["updated_at = $2", "name = $3", "enabled = $4"]);
        assert_eq!(binds.len(), 2);
    }
}
