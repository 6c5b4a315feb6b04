//! Integration tests of `creditgate-sql`: the key store, the analytics sink and the
//! ledger (the limiter's conformance suite plus multi-process races), each against
//! SQLite in a temporary directory and, when `CREDITGATE_TEST_POSTGRES_URL` is set
//! (e.g. `postgres://postgres@127.0.0.1:5432/test`), against a fresh Postgres database
//! `cg_test_<random>` that is dropped afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use creditgate_analytics::{Batch, RequestEvent, Sink, VerificationEvent};
use creditgate_domain::store::KeyPage;
use creditgate_domain::{
    ApiId, ApiRecord, Cost, Credits, IdentityId, IdentityPatch, IdentityRecord, KeyId, KeyPatch,
    KeyRecord, KeyStore, NewKey, Permission, PermissionSet, PoolRecord, PreviousSecret,
    RatelimitOverride, RatelimitRule, Refill, RefillInterval, RootKeyId, RootKeyRecord, StoreError,
    WorkspaceId,
};
use creditgate_limiter::conformance::{self, LedgerFixture};
use creditgate_limiter::ports::{AllocateOutcome, AllocateRequest, DirectSpend, Ledger};
use creditgate_sql::{Backend, SqlStore};
use serde_json::json;
use sqlx::Connection;

const PG_ENV: &str = "CREDITGATE_TEST_POSTGRES_URL";

// ---------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------

/// One isolated database and a store on it.
struct Db {
    store: SqlStore,
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// Postgres: (admin URL, database name) to drop on drop.
    pg: Option<(String, String)>,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite:{}",
            dir.path().join("nested").join("cg.db").display()
        );
        let store = SqlStore::connect(&url).await.expect("connect sqlite");
        Db {
            store,
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// `None` (and a note on stderr) when no Postgres is configured.
    async fn postgres() -> Option<Db> {
        let Ok(admin) = std::env::var(PG_ENV) else {
            eprintln!("skipped: set {PG_ENV} to run the Postgres variant");
            return None;
        };
        sqlx::any::install_default_drivers();
        let name = format!("cg_test_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::AnyConnection::connect(&admin)
            .await
            .expect("connect to the Postgres admin database");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let url = with_database(&admin, &name);
        let store = SqlStore::connect(&url).await.expect("connect postgres");
        Some(Db {
            store,
            url,
            _dir: None,
            pg: Some((admin, name)),
        })
    }

    /// Another store on the same database: what a second node process would hold.
    async fn second_store(&self) -> SqlStore {
        SqlStore::connect(&self.url).await.expect("second store")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop runs outside any async context we may block: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut conn = sqlx::AnyConnection::connect(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop a test database: {dropped:?}");
        }
    }
}

/// The admin URL with its database replaced by `name`.
fn with_database(admin: &str, name: &str) -> String {
    let (main, query) = admin.split_once('?').unwrap_or((admin, ""));
    let authority_start = main.find("://").map_or(0, |i| i + 3);
    let host_end = main[authority_start..]
        .find('/')
        .map_or(main.len(), |i| authority_start + i);
    let mut url = format!("{}/{name}", &main[..host_end]);
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Runs each listed test on SQLite and (when configured) on Postgres.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::sqlite().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = super::Db::postgres().await else { return };
                    super::$name(&db).await;
                }
            )*
        }
    };
}

on_both_backends!(
    schema_has_the_documented_columns,
    root_keys_are_idempotent,
    apis_and_keys_round_trip,
    list_keys_paginates_by_id,
    update_key_applies_patches,
    identities_link_keys_by_external_id,
    ratelimit_overrides_are_set_listed_and_deleted,
    ledger_conformance_on_pools,
    rerolled_keys_answer_to_both_secrets_until_told,
    deleting_hides_keys,
    sink_writes_every_row,
    sink_is_all_or_nothing,
    ledger_conformance,
    direct_spends_from_two_processes_never_overspend,
    allocations_from_two_processes_never_overspend,
    deleted_keys_get_no_new_credits,
);

// ---------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------

fn ws(id: &str) -> WorkspaceId {
    WorkspaceId::from(id)
}

fn root(workspace: &str, hash: &str) -> RootKeyRecord {
    RootKeyRecord {
        id: RootKeyId::generate(),
        workspace_id: ws(workspace),
        hash: hash.to_owned(),
        name: Some("bootstrap".to_owned()),
        permissions: PermissionSet(Permission::all()),
        created_at: 1_000,
    }
}

fn api(workspace: &str, id: &str) -> ApiRecord {
    ApiRecord {
        id: ApiId::from(id),
        workspace_id: ws(workspace),
        name: format!("name of {id}"),
        created_at: 2_000,
    }
}

fn key(api: &ApiRecord, id: &str) -> KeyRecord {
    KeyRecord {
        id: KeyId::from(id),
        workspace_id: api.workspace_id.clone(),
        api_id: api.id.clone(),
        hash: format!("hash-of-{id}"),
        start: "sk_ab".to_owned(),
        name: None,
        external_id: None,
        meta: None,
        created_at: 3_000,
        updated_at: None,
        expires: None,
        enabled: true,
        limited: false,
        refill: None,
        last_refill_at: Some(3_000),
        identity: None,
        ratelimits: Vec::new(),
        previous: None,
        credit_alerts: Vec::new(),
    }
}

fn rule(id: &str, name: &str, limit: u64, auto_apply: bool) -> RatelimitRule {
    RatelimitRule {
        id: id.to_owned(),
        name: name.to_owned(),
        limit,
        duration_ms: 60_000,
        auto_apply,
    }
}

fn credits(n: u64) -> Credits {
    Credits::new(n).expect("credits")
}

/// Creates `record` with balance `remaining`; returns it as the store reports it.
async fn create(store: &SqlStore, mut record: KeyRecord, remaining: Option<u64>) -> KeyRecord {
    record.limited = remaining.is_some();
    store
        .create_key(&NewKey {
            record: record.clone(),
            remaining: remaining.map(credits),
        })
        .await
        .expect("create key");
    let stored = store
        .key_by_id(&record.id)
        .await
        .expect("read the key")
        .expect("the key just created");
    // The store adds the identity of the key's external id, created with the key.
    match (&record.external_id, &stored.identity) {
        (Some(external_id), Some(i)) => {
            assert_eq!(&i.external_id, external_id);
            assert_eq!(i.workspace_id, record.workspace_id);
            assert!(i.id.as_str().starts_with("id_"), "{i:?}");
        }
        (None, None) => {}
        other => panic!("identity of {:?}: {other:?}", record.id),
    }
    let mut expected = record;
    expected.identity = stored.identity.clone();
    assert_eq!(stored, expected);
    stored
}

async fn count(store: &SqlStore, table: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(store.pool())
        .await
        .expect("count")
}

// ---------------------------------------------------------------------------------
// Schema and key store
// ---------------------------------------------------------------------------------

async fn schema_has_the_documented_columns(db: &Db) {
    // Other crates' tests query these columns by name.
    for (table, columns) in [
        (
            "keys",
            "id, workspace_id, api_id, hash, start, name, external_id, meta, created_at, \
             updated_at, expires, enabled, remaining, hot_allocated, generation, version, \
             hot_epoch, refill_interval, refill_amount, refill_day, last_refill_at, deleted_at",
        ),
        ("workspaces", "id, name, created_at"),
        (
            "root_keys",
            "id, workspace_id, hash, name, permissions, created_at, deleted_at",
        ),
        ("apis", "id, workspace_id, name, created_at, deleted_at"),
        (
            "transfers",
            "id, key_id, kind, amount, generation, state, created_at",
        ),
        (
            "fences",
            "op_id, key_id, kind, value, period_start, generation, state, created_at",
        ),
        (
            "key_verifications",
            "request_id, time, workspace_id, api_id, key_id, node_id, region, outcome, cost, \
             spent_credits, remaining, latency_us, tags, identity_id, exceeded_ratelimits",
        ),
        (
            "api_requests",
            "request_id, time, workspace_id, method, path, status, latency_us, node_id",
        ),
    ] {
        sqlx::query(&format!("SELECT {columns} FROM {table} LIMIT 1"))
            .fetch_optional(db.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{table} lacks a documented column: {e}"));
    }
    if db.store.backend() == Backend::Sqlite {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(db.store.pool())
            .await
            .expect("journal mode");
        assert_eq!(mode, "wal");
    }
    // Connecting again to a migrated database is fine.
    let again = db.second_store().await;
    assert_eq!(again.backend(), db.store.backend());
}

async fn root_keys_are_idempotent(db: &Db) {
    let s = &db.store;
    assert!(!s.has_root_keys().await.expect("has"));
    let r = root("ws_1", "root-hash-1");
    s.ensure_root_key(&r).await.expect("ensure");
    // Same hash again, even with another id: nothing new.
    let mut again = r.clone();
    again.id = RootKeyId::generate();
    s.ensure_root_key(&again).await.expect("ensure twice");
    assert_eq!(count(s, "root_keys").await, 1);
    assert_eq!(count(s, "workspaces").await, 1);
    assert!(s.has_root_keys().await.expect("has"));
    assert_eq!(
        s.root_key_by_hash("root-hash-1").await.expect("get"),
        Some(r.clone())
    );
    assert_eq!(s.root_key_by_hash("nope").await.expect("get"), None);

    // Another root key, in a workspace of its own; a duplicate hash is a conflict.
    let other = root("ws_2", "root-hash-2");
    s.insert_root_key(&other).await.expect("insert");
    assert_eq!(count(s, "workspaces").await, 2);
    let dup = root("ws_2", "root-hash-2");
    assert!(matches!(
        s.insert_root_key(&dup).await,
        Err(StoreError::Conflict(_))
    ));

    // Permissions this version does not know grant nothing, and do not break the key.
    sqlx::query(
        "INSERT INTO root_keys (id, workspace_id, hash, permissions, created_at) \
         VALUES ('rk_raw', 'ws_1', 'raw-hash', $1, 5)",
    )
    .bind(json!(["api.*.verify_key", "api.*.launch_rockets"]).to_string())
    .execute(s.pool())
    .await
    .expect("raw insert");
    let raw = s
        .root_key_by_hash("raw-hash")
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        raw.permissions,
        PermissionSet(vec![Permission::parse("api.*.verify_key").expect("perm")])
    );
}

async fn apis_and_keys_round_trip(db: &Db) {
    let s = &db.store;
    let a = api("ws_1", "api_1");
    s.create_api(&a).await.expect("create api");
    assert!(matches!(
        s.create_api(&a).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.get_api(&ws("ws_1"), &a.id).await.expect("get"),
        Some(a.clone())
    );
    assert_eq!(
        s.get_api(&ws("ws_other"), &a.id).await.expect("get"),
        None,
        "an API of another workspace is not found"
    );

    let mut full = key(&a, "key_full");
    full.name = Some("full".to_owned());
    full.external_id = Some("user_1".to_owned());
    full.meta = json!({"plan": "pro", "seats": 3, "nested": {"a": [1, 2]}})
        .as_object()
        .cloned();
    full.expires = Some(9_999_999_999_999);
    full.enabled = false;
    full.refill =
        Some(Refill::new(RefillInterval::Monthly, credits(50), Some(31)).expect("refill"));
    let full = create(s, full, Some(100)).await;
    assert_eq!(
        s.key_by_id(&full.id).await.expect("get"),
        Some(full.clone())
    );
    assert_eq!(
        s.key_by_hash(&full.hash).await.expect("get"),
        Some(full.clone())
    );
    let unlimited = create(s, key(&a, "key_unlimited"), None).await;
    let got = s
        .key_by_id(&unlimited.id)
        .await
        .expect("get")
        .expect("some");
    assert!(!got.limited);
    assert_eq!(got, unlimited);

    // The ledger columns start where the ledger expects them.
    let row: (Option<i64>, i64, i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT remaining, hot_allocated, generation, version, last_refill_at \
         FROM keys WHERE id = $1",
    )
    .bind("key_full")
    .fetch_one(s.pool())
    .await
    .expect("row");
    assert_eq!(row, (Some(100), 0, 0, 0, Some(3_000)));
    let remaining: Option<i64> = sqlx::query_scalar("SELECT remaining FROM keys WHERE id = $1")
        .bind("key_unlimited")
        .fetch_one(s.pool())
        .await
        .expect("row");
    assert_eq!(remaining, None);

    // Same hash or same id again: conflict. Unknown API: refused.
    let mut dup = key(&a, "key_other");
    dup.hash = full.hash.clone();
    let err = s
        .create_key(&NewKey {
            record: dup,
            remaining: None,
        })
        .await;
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    let err = s
        .create_key(&NewKey {
            record: key(&a, "key_full"),
            remaining: None,
        })
        .await;
    assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
    let err = s
        .create_key(&NewKey {
            record: key(&api("ws_1", "api_missing"), "key_orphan"),
            remaining: None,
        })
        .await;
    assert!(err.is_err(), "a key needs its API: {err:?}");
    assert_eq!(s.key_by_id(&KeyId::from("nope")).await.expect("get"), None);
}

async fn list_keys_paginates_by_id(db: &Db) {
    let s = &db.store;
    let a = api("ws_1", "api_list");
    let b = api("ws_1", "api_else");
    s.create_api(&a).await.expect("api");
    s.create_api(&b).await.expect("api");
    // Mixed case ids: the order is bytewise on both backends.
    let ids = ["key_B", "key_a", "key_C", "key_d", "key_E"];
    for id in ids {
        let mut k = key(&a, id);
        if id == "key_a" || id == "key_E" {
            k.external_id = Some("user_x".to_owned());
        }
        create(s, k, Some(1)).await;
    }
    create(s, key(&b, "key_0_elsewhere"), None).await;
    let deleted = create(s, key(&a, "key_b_deleted"), None).await;
    assert!(s.delete_key(&deleted.id, 10).await.expect("delete"));

    let mut expected: Vec<&str> = ids.to_vec();
    expected.sort_unstable();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let KeyPage { keys, cursor: next } = s
            .list_keys(&a.id, 2, cursor.as_deref(), None)
            .await
            .expect("list");
        pages += 1;
        assert!(keys.len() <= 2);
        seen.extend(keys.iter().map(|k| k.id.0.to_string()));
        match next {
            Some(c) => {
                assert_eq!(
                    Some(c.as_str()),
                    keys.last().map(|k| k.id.as_str()),
                    "cursor = last id"
                );
                cursor = Some(c);
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);

    // Exactly one full page: no cursor.
    let page = s.list_keys(&a.id, 5, None, None).await.expect("list");
    assert_eq!(page.keys.len(), 5);
    assert_eq!(page.cursor, None);
    let page = s.list_keys(&a.id, 4, None, None).await.expect("list");
    assert_eq!(page.cursor.as_deref(), Some(expected[3]));

    let page = s
        .list_keys(&a.id, 10, None, Some("user_x"))
        .await
        .expect("list");
    let got: Vec<&str> = page.keys.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(got, ["key_E", "key_a"]);
    assert_eq!(page.cursor, None);
    let page = s
        .list_keys(&a.id, 1, None, Some("user_x"))
        .await
        .expect("list");
    assert_eq!(page.cursor.as_deref(), Some("key_E"));

    let empty = s
        .list_keys(&ApiId::from("api_none"), 10, None, None)
        .await
        .expect("list");
    assert!(empty.keys.is_empty() && empty.cursor.is_none());
    // A limit of 0 does not fail.
    let one = s.list_keys(&a.id, 0, None, None).await.expect("list");
    assert_eq!(one.keys.len(), 1);
}

async fn rerolled_keys_answer_to_both_secrets_until_told(db: &Db) {
    let s = &db.store;
    let a = api("ws_1", "api_reroll");
    s.create_api(&a).await.expect("api");
    let k = create(s, key(&a, "key_reroll"), Some(10)).await;
    let old = k.hash.clone();
    let rolled = s
        .reroll_key(&k.id, "hash-new", "sk_new1", Some(5_000), 4_000)
        .await
        .expect("reroll")
        .expect("live");
    assert_eq!(
        (rolled.hash.as_str(), rolled.start.as_str()),
        ("hash-new", "sk_new1")
    );
    assert_eq!(
        rolled.previous,
        Some(PreviousSecret {
            hash: old.clone(),
            expires: 5_000
        })
    );
    assert_eq!(rolled.updated_at, Some(4_000));
    // Both hashes find the key; whether the old one still opens it is the caller's call.
    for h in ["hash-new", old.as_str()] {
        let found = s.key_by_hash(h).await.expect("get").expect("found");
        assert_eq!(found.id, k.id);
        assert!(found.opens_with(h, 4_999));
    }
    assert!(!rolled.opens_with(&old, 5_000));
    // Rerolled again without a grace period: only the newest hash is known.
    let again = s
        .reroll_key(&k.id, "hash-newer", "sk_new2", None, 6_000)
        .await
        .expect("reroll")
        .expect("live");
    assert_eq!(again.previous, None);
    for gone in [old.as_str(), "hash-new"] {
        assert_eq!(s.key_by_hash(gone).await.expect("get"), None);
    }
    assert!(s.delete_key(&k.id, 7_000).await.expect("delete"));
    assert_eq!(
        s.reroll_key(&k.id, "hash-x", "sk_x", None, 8_000)
            .await
            .expect("reroll"),
        None
    );
}

fn ovr(id: &str, workspace: &str, identifier: &str, limit: u64, at: i64) -> RatelimitOverride {
    RatelimitOverride {
        id: id.to_owned(),
        workspace_id: ws(workspace),
        namespace: "api".to_owned(),
        identifier: identifier.to_owned(),
        limit,
        duration_ms: 60_000,
        created_at: at,
        updated_at: None,
    }
}

async fn ratelimit_overrides_are_set_listed_and_deleted(db: &Db) {
    let s = &db.store;
    let a = ovr("rlo_a", "ws_1", "user_1", 5, 1_000);
    assert_eq!(s.set_override(&a).await.expect("set"), a);
    // Set again: same id and creation, the new limit, an update time.
    let again = ovr("rlo_ignored", "ws_1", "user_1", 50, 2_000);
    let stored = s.set_override(&again).await.expect("set again");
    assert_eq!(
        stored,
        RatelimitOverride {
            limit: 50,
            updated_at: Some(2_000),
            ..a.clone()
        }
    );
    let b = ovr("rlo_b", "ws_1", "*@acme.com", 7, 3_000);
    let c = ovr("rlo_c", "ws_1", "user_3", 9, 3_000);
    let elsewhere = ovr("rlo_d", "ws_2", "user_1", 1, 3_000);
    for o in [&b, &c, &elsewhere] {
        s.set_override(o).await.expect("set");
    }
    assert_eq!(
        s.overrides(&ws("ws_1"), "api").await.expect("all"),
        vec![stored.clone(), b.clone(), c.clone()]
    );
    assert!(s
        .overrides(&ws("ws_1"), "other")
        .await
        .expect("none")
        .is_empty());
    let (first, cursor) = s
        .list_overrides(&ws("ws_1"), "api", 2, None)
        .await
        .expect("page 1");
    assert_eq!(first, vec![stored.clone(), b.clone()]);
    let (second, cursor) = s
        .list_overrides(&ws("ws_1"), "api", 2, cursor.as_deref())
        .await
        .expect("page 2");
    assert_eq!((second, cursor), (vec![c.clone()], None));
    assert!(s
        .delete_override(&ws("ws_1"), "api", "*@acme.com")
        .await
        .expect("delete"));
    assert!(!s
        .delete_override(&ws("ws_1"), "api", "*@acme.com")
        .await
        .expect("delete again"));
    assert_eq!(
        s.overrides(&ws("ws_2"), "api").await.expect("ws_2"),
        vec![elsewhere]
    );
    assert_eq!(
        s.overrides(&ws("ws_1"), "api").await.expect("ws_1"),
        vec![stored, c]
    );
}

async fn identities_link_keys_by_external_id(db: &Db) {
    let s = &db.store;
    let a = api("ws_1", "api_ident");
    s.create_api(&a).await.expect("api");
    let acme = IdentityRecord {
        id: IdentityId::from("id_acme"),
        workspace_id: ws("ws_1"),
        external_id: "acme".to_owned(),
        meta: json!({"plan": "pro"}).as_object().cloned(),
        created_at: 1_000,
        updated_at: None,
        ratelimits: vec![rule("rl_a", "requests", 10, true)],
        pool: Some(PoolRecord {
            refill: Some(Refill::new(RefillInterval::Daily, credits(100), None).expect("refill")),
            last_refill_at: Some(1_000),
            credit_alerts: vec![50, 10],
        }),
    };
    s.create_identity(&acme, Some(credits(100)))
        .await
        .expect("create identity");
    // The pool is a ledger account named by the identity's id.
    let pool_state = Ledger::state(s, &KeyId::from("id_acme"))
        .await
        .expect("state")
        .expect("the pool's account");
    assert_eq!(pool_state.remaining, Some(100));
    // The external id is taken in this workspace, not in another.
    let again = IdentityRecord {
        id: IdentityId::from("id_acme_2"),
        ..acme.clone()
    };
    assert!(matches!(
        s.create_identity(&again, Some(credits(5))).await,
        Err(StoreError::Conflict(_))
    ));
    let elsewhere = IdentityRecord {
        workspace_id: ws("ws_2"),
        ..again.clone()
    };
    s.create_identity(&elsewhere, Some(credits(5)))
        .await
        .expect("another workspace");
    for handle in ["id_acme", "acme"] {
        assert_eq!(
            s.identity(&ws("ws_1"), handle).await.expect("get"),
            Some(acme.clone())
        );
    }
    assert_eq!(s.identity(&ws("ws_3"), "acme").await.expect("get"), None);

    // A key with the external id carries the identity; one with a new external id
    // creates its identity.
    let mut k = key(&a, "key_ident");
    k.external_id = Some("acme".to_owned());
    k.ratelimits = vec![rule("rl_own", "requests", 2, false)];
    let k = create(s, k, None).await;
    assert_eq!(k.identity.as_deref(), Some(&acme));
    assert_eq!(k.ratelimits, vec![rule("rl_own", "requests", 2, false)]);
    let mut n = key(&a, "key_new_ident");
    n.external_id = Some("newco".to_owned());
    let n = create(s, n, None).await;
    let newco = n.identity.clone().expect("created with the key");
    assert_eq!(newco.external_id, "newco");
    assert_eq!(newco.pool, None, "an identity made with a key has no pool");
    s.open_pool(&newco, credits(7), None, 1_500)
        .await
        .expect("open a pool");
    assert!(matches!(
        s.open_pool(&newco, credits(7), None, 1_500).await,
        Err(StoreError::Conflict(_))
    ));
    let n_again = s.key_by_id(&n.id).await.expect("get").expect("key");
    assert_eq!(
        n_again.identity.and_then(|i| i.pool.clone()),
        Some(PoolRecord {
            refill: None,
            last_refill_at: Some(1_500),
            credit_alerts: Vec::new(),
        })
    );

    // Pages of one, by id, each identity once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = s
            .list_identities(&ws("ws_1"), 1, cursor.as_deref())
            .await
            .expect("list");
        seen.extend(page.identities.iter().map(|i| i.id.clone()));
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut want = vec![acme.id.clone(), newco.id.clone()];
    want.sort();
    assert_eq!(seen, want);

    // New rate limits keep the meta; a new meta keeps the rate limits; both are what
    // the key's reads answer.
    let limits = vec![rule("rl_b", "tokens", 500, false)];
    let only_limits = IdentityPatch {
        ratelimits: Some(limits.clone()),
        ..IdentityPatch::default()
    };
    let updated = s
        .update_identity(&ws("ws_1"), "acme", &only_limits, 1_500)
        .await
        .expect("update")
        .expect("found");
    assert_eq!((&updated.meta, &updated.ratelimits), (&acme.meta, &limits));
    let clear_meta = IdentityPatch {
        meta: Some(None),
        ..IdentityPatch::default()
    };
    let updated = s
        .update_identity(&ws("ws_1"), "acme", &clear_meta, 2_000)
        .await
        .expect("update")
        .expect("found");
    assert_eq!(
        (
            updated.meta.clone(),
            updated.updated_at,
            &updated.ratelimits
        ),
        (None, Some(2_000), &limits)
    );
    let read = s.key_by_hash(&k.hash).await.expect("get").expect("key");
    assert_eq!(read.identity.as_deref(), Some(&updated));
    assert_eq!(
        s.update_identity(&ws("ws_2"), "id_acme", &clear_meta, 2_000)
            .await
            .expect("update"),
        None,
        "another workspace's identity is not found by id"
    );

    // Deleting it keeps the key, without an external id or identity.
    let deleted = s
        .delete_identity(&ws("ws_1"), "id_acme", 3_000)
        .await
        .expect("delete");
    assert_eq!(deleted.map(|i| i.id), Some(acme.id.clone()));
    let deleted_at: Option<i64> = sqlx::query_scalar("SELECT deleted_at FROM pools WHERE id = $1")
        .bind("id_acme")
        .fetch_one(s.pool())
        .await
        .expect("the pool's row stays");
    assert_eq!(deleted_at, Some(3_000));
    let read = s.key_by_id(&k.id).await.expect("get").expect("key");
    assert_eq!((read.external_id, read.identity), (None, None));
    assert_eq!(s.identity(&ws("ws_1"), "acme").await.expect("get"), None);
    assert_eq!(
        s.delete_identity(&ws("ws_1"), "acme", 3_000)
            .await
            .expect("delete"),
        None
    );
    // The other workspace's identity of the same external id is untouched.
    assert!(s
        .identity(&ws("ws_2"), "acme")
        .await
        .expect("get")
        .is_some());
}

async fn update_key_applies_patches(db: &Db) {
    let s = &db.store;
    let a = api("ws_1", "api_upd");
    s.create_api(&a).await.expect("api");
    let mut k = key(&a, "key_upd");
    k.name = Some("before".to_owned());
    k.external_id = Some("ext".to_owned());
    k.meta = json!({"a": 1}).as_object().cloned();
    k.expires = Some(5_000_000);
    let k = create(s, k, Some(10)).await;

    // An empty patch changes nothing.
    let same = s
        .update_key(&k.id, &KeyPatch::default(), 7_000)
        .await
        .expect("update");
    assert_eq!(same, Some(k.clone()));

    // Set some fields; the others stay.
    let daily = Refill::new(RefillInterval::Daily, credits(5), None).expect("refill");
    let patch = KeyPatch {
        name: Some(Some("after".to_owned())),
        meta: Some(json!({"b": [true, null]}).as_object().cloned()),
        enabled: Some(false),
        refill: Some(Some(daily)),
        ratelimits: Some(vec![rule("rl_k", "requests", 3, true)]),
        credit_alerts: Some(vec![500, 100]),
        ..KeyPatch::default()
    };
    let got = s
        .update_key(&k.id, &patch, 8_000)
        .await
        .expect("update")
        .expect("key");
    let mut want = k.clone();
    want.name = Some("after".to_owned());
    want.meta = json!({"b": [true, null]}).as_object().cloned();
    want.enabled = false;
    want.refill = Some(daily);
    want.ratelimits = vec![rule("rl_k", "requests", 3, true)];
    want.credit_alerts = vec![500, 100];
    want.updated_at = Some(8_000);
    assert_eq!(got, want);
    assert_eq!(s.key_by_id(&k.id).await.expect("get"), Some(want.clone()));

    // `Some(None)` clears.
    let clear = KeyPatch {
        name: Some(None),
        external_id: Some(None),
        meta: Some(None),
        expires: Some(None),
        refill: Some(None),
        enabled: Some(true),
        ratelimits: Some(Vec::new()),
        credit_alerts: Some(Vec::new()),
    };
    let got = s
        .update_key(&k.id, &clear, 9_000)
        .await
        .expect("update")
        .expect("key");
    want.name = None;
    want.external_id = None;
    // Without an external id the key belongs to no identity.
    want.identity = None;
    want.meta = None;
    want.expires = None;
    want.refill = None;
    want.enabled = true;
    want.ratelimits = Vec::new();
    want.credit_alerts = Vec::new();
    want.updated_at = Some(9_000);
    assert_eq!(got, want);
    // The ledger columns are not the key store's business.
    let row: (Option<i64>, i64) =
        sqlx::query_as("SELECT remaining, version FROM keys WHERE id = $1")
            .bind("key_upd")
            .fetch_one(s.pool())
            .await
            .expect("row");
    assert_eq!(row, (Some(10), 0));

    // Unknown and deleted keys.
    let patch = KeyPatch {
        name: Some(Some("x".to_owned())),
        ..KeyPatch::default()
    };
    assert_eq!(
        s.update_key(&KeyId::from("nope"), &patch, 1)
            .await
            .expect("update"),
        None
    );
    assert!(s.delete_key(&k.id, 10_000).await.expect("delete"));
    assert_eq!(s.update_key(&k.id, &patch, 1).await.expect("update"), None);
    assert_eq!(
        s.update_key(&k.id, &KeyPatch::default(), 1)
            .await
            .expect("update"),
        None
    );
}

async fn deleting_hides_keys(db: &Db) {
    let s = &db.store;
    let a = api("ws_1", "api_del");
    s.create_api(&a).await.expect("api");
    let k1 = create(s, key(&a, "key_del_1"), Some(1)).await;
    let k2 = create(s, key(&a, "key_del_2"), Some(1)).await;

    assert!(s.delete_key(&k1.id, 50).await.expect("delete"));
    assert!(!s.delete_key(&k1.id, 60).await.expect("delete twice"));
    assert!(!s
        .delete_key(&KeyId::from("nope"), 60)
        .await
        .expect("delete"));
    assert_eq!(s.key_by_id(&k1.id).await.expect("get"), None);
    assert_eq!(s.key_by_hash(&k1.hash).await.expect("get"), None);
    let deleted_at: Option<i64> = sqlx::query_scalar("SELECT deleted_at FROM keys WHERE id = $1")
        .bind("key_del_1")
        .fetch_one(s.pool())
        .await
        .expect("soft-deleted row stays");
    assert_eq!(deleted_at, Some(50));

    // Deleting the API of another workspace does nothing.
    assert!(!s
        .delete_api(&ws("ws_other"), &a.id)
        .await
        .expect("delete api"));
    assert!(s.key_by_id(&k2.id).await.expect("get").is_some());

    assert!(s.delete_api(&ws("ws_1"), &a.id).await.expect("delete api"));
    assert!(!s
        .delete_api(&ws("ws_1"), &a.id)
        .await
        .expect("delete api twice"));
    assert_eq!(s.get_api(&ws("ws_1"), &a.id).await.expect("get"), None);
    assert_eq!(s.key_by_id(&k2.id).await.expect("get"), None);
    assert_eq!(s.key_by_hash(&k2.hash).await.expect("get"), None);
    assert!(s
        .list_keys(&a.id, 10, None, None)
        .await
        .expect("list")
        .keys
        .is_empty());
    let live: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM keys WHERE api_id = $1 AND deleted_at IS NULL")
            .bind("api_del")
            .fetch_one(s.pool())
            .await
            .expect("count");
    assert_eq!(live, 0, "deleting an API soft-deletes its keys");
}

// ---------------------------------------------------------------------------------
// Analytics sink
// ---------------------------------------------------------------------------------

fn verification(i: usize) -> VerificationEvent {
    // Every other one exceeded; every third one of an unlimited key.
    let valid = matches!(i % 2, 0);
    VerificationEvent {
        request_id: format!("req_v{i}").into(),
        time: 1_700_000_000_000,
        workspace_id: "ws_1".into(),
        api_id: "api_1".into(),
        key_id: format!("key_{}", i % 7).into(),
        node_id: "node-a".into(),
        region: "local".into(),
        outcome: if valid { "VALID" } else { "USAGE_EXCEEDED" },
        cost: 2,
        spent_credits: if valid { 2 } else { 0 },
        remaining: match i % 3 {
            0 => None,
            _ => Some(40),
        },
        latency_us: 123,
        tags: vec!["a".to_owned(), format!("t{i}")],
        identity_id: if i.is_multiple_of(5) {
            "id_1".into()
        } else {
            "".into()
        },
        exceeded_ratelimits: if i.is_multiple_of(4) {
            vec!["requests".to_owned()]
        } else {
            Vec::new()
        },
    }
}

fn request(i: usize) -> RequestEvent {
    RequestEvent {
        request_id: format!("req_r{i}").into(),
        time: 1_700_000_000_001,
        workspace_id: "ws_1".into(),
        method: "POST".into(),
        path: "/v2/keys.verifyKey".into(),
        status: 200,
        latency_us: u64::MAX,
        node_id: "node-a".into(),
    }
}

async fn sink_writes_every_row(db: &Db) {
    let s = &db.store;
    s.write(&Batch::default()).await.expect("empty batch");
    // More rows than one INSERT holds, to cross chunk boundaries.
    let batch = Batch {
        verifications: (0..1_234).map(verification).collect(),
        requests: (0..777).map(request).collect(),
    };
    s.write(&batch).await.expect("write");
    assert_eq!(count(s, "key_verifications").await, 1_234);
    assert_eq!(count(s, "api_requests").await, 777);
    // The batcher's way in: a shared batch.
    let shared = Batch {
        verifications: (1_234..1_300).map(verification).collect(),
        requests: vec![request(777)],
    };
    s.write_shared(std::sync::Arc::new(shared))
        .await
        .expect("write shared");
    assert_eq!(count(s, "key_verifications").await, 1_300);
    assert_eq!(count(s, "api_requests").await, 778);

    let row: (String, String, i64, i64, Option<i64>, String) = sqlx::query_as(
        "SELECT key_id, outcome, cost, spent_credits, remaining, tags FROM key_verifications \
         WHERE request_id = $1",
    )
    .bind("req_v3")
    .fetch_one(s.pool())
    .await
    .expect("row");
    assert_eq!(
        row,
        (
            "key_3".to_owned(),
            "USAGE_EXCEEDED".to_owned(),
            2,
            0,
            None,
            r#"["a","t3"]"#.to_owned()
        )
    );
    // The identity and the limits that refused: req_v20 has both, req_v3 neither.
    for (id, want) in [
        ("req_v20", ("id_1".to_owned(), r#"["requests"]"#.to_owned())),
        ("req_v3", (String::new(), "[]".to_owned())),
    ] {
        let got: (String, String) = sqlx::query_as(
            "SELECT identity_id, exceeded_ratelimits FROM key_verifications \
             WHERE request_id = $1",
        )
        .bind(id)
        .fetch_one(s.pool())
        .await
        .expect("row");
        assert_eq!(got, want, "{id}");
    }
    let remaining: Option<i64> =
        sqlx::query_scalar("SELECT remaining FROM key_verifications WHERE request_id = $1")
            .bind("req_v4")
            .fetch_one(s.pool())
            .await
            .expect("row");
    assert_eq!(remaining, Some(40));
    let row: (i64, i64, String) =
        sqlx::query_as("SELECT status, latency_us, path FROM api_requests WHERE request_id = $1")
            .bind("req_r776")
            .fetch_one(s.pool())
            .await
            .expect("row");
    assert_eq!(row, (200, i64::MAX, "/v2/keys.verifyKey".to_owned()));
}

async fn sink_is_all_or_nothing(db: &Db) {
    let s = &db.store;
    // Break the second table: the verifications of the same batch must not land.
    sqlx::query("DROP TABLE api_requests")
        .execute(s.pool())
        .await
        .expect("drop");
    let batch = Batch {
        verifications: (0..600).map(verification).collect(),
        requests: vec![request(0)],
    };
    assert!(s.write(&batch).await.is_err());
    assert_eq!(count(s, "key_verifications").await, 0);
}

// ---------------------------------------------------------------------------------
// Ledger
// ---------------------------------------------------------------------------------

/// Creates ledger rows through the key store, as `keys.createKey` does.
struct Fixture {
    store: SqlStore,
    api: ApiRecord,
    next: AtomicU64,
}

impl Fixture {
    async fn new(store: SqlStore) -> Fixture {
        let api = api("ws_ledger", "api_ledger");
        store.create_api(&api).await.expect("api");
        Fixture {
            store,
            api,
            next: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl LedgerFixture for Fixture {
    fn ledger(&self) -> Arc<dyn Ledger> {
        Arc::new(self.store.clone())
    }

    async fn create_key(&self, remaining: Option<u64>) -> KeyId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let record = create(
            &self.store,
            key(&self.api, &format!("key_l{n:04}")),
            remaining,
        )
        .await;
        record.id
    }
}

async fn ledger_conformance(db: &Db) {
    let fixture = Fixture::new(db.store.clone()).await;
    conformance::run_all(&fixture).await;
}

/// Opens ledger accounts of identities' shared pools (`pools` rows, ids of identities).
struct PoolFixture {
    store: SqlStore,
    next: AtomicU64,
}

#[async_trait]
impl LedgerFixture for PoolFixture {
    fn ledger(&self) -> Arc<dyn Ledger> {
        Arc::new(self.store.clone())
    }

    async fn create_key(&self, remaining: Option<u64>) -> KeyId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = IdentityId::from(format!("id_pool{n:04}"));
        self.store
            .create_pool(&id, "ws_ledger", remaining, 1_000)
            .await
            .expect("create pool");
        KeyId::from(id.as_str())
    }
}

/// Every rule of the ledger holds for pool accounts as for keys.
async fn ledger_conformance_on_pools(db: &Db) {
    let fixture = PoolFixture {
        store: db.store.clone(),
        next: AtomicU64::new(0),
    };
    conformance::run_all(&fixture).await;
    // The rows are in `pools`, not in `keys`.
    let pools: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pools")
        .fetch_one(db.store.pool())
        .await
        .expect("count");
    assert!(pools > 0);
    let in_keys: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys WHERE id LIKE 'id_%'")
        .fetch_one(db.store.pool())
        .await
        .expect("count");
    assert_eq!(in_keys, 0);
}

async fn direct_spends_from_two_processes_never_overspend(db: &Db) {
    let fixture = Fixture::new(db.store.clone()).await;
    let key = fixture.create_key(Some(100)).await;
    let stores = [db.store.clone(), db.second_store().await];
    let mut tasks = Vec::new();
    for i in 0..300 {
        let store = stores[i % 2].clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store.spend_direct(&key, Cost::DEFAULT, None).await
        }));
    }
    let mut remainders = Vec::new();
    let mut exceeded = 0;
    for t in tasks {
        match t.await.expect("task").expect("spend") {
            DirectSpend::Valid { remaining } => remainders.push(remaining),
            DirectSpend::Exceeded { remaining } => {
                assert_eq!(remaining, 0);
                exceeded += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    remainders.sort_unstable();
    assert_eq!(
        remainders,
        (0..100).collect::<Vec<u64>>(),
        "each balance seen once"
    );
    assert_eq!(exceeded, 200);
    let state = db.store.state(&key).await.expect("state").expect("row");
    assert_eq!((state.remaining, state.version), (Some(0), 100));
}

async fn allocations_from_two_processes_never_overspend(db: &Db) {
    let fixture = Fixture::new(db.store.clone()).await;
    let key = fixture.create_key(Some(1_000)).await;
    let stores = [db.store.clone(), db.second_store().await];
    let mut tasks = Vec::new();
    for i in 0..60 {
        let store = stores[i % 2].clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let tid = format!("race-{i}");
            let req = AllocateRequest {
                key: &key,
                transfer_id: &tid,
                generation: Some(0),
                epoch: "epoch-1",
                need: 1,
                chunk: 37,
                now_ms: 1,
            };
            store.allocate(&req).await
        }));
    }
    let mut granted = 0;
    for t in tasks {
        match t.await.expect("task").expect("allocate") {
            AllocateOutcome::Granted { amount, lost, .. } => {
                assert_eq!(lost, 0);
                granted += amount;
            }
            AllocateOutcome::Insufficient { remaining, .. } => assert_eq!(remaining, 0),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(granted, 1_000, "everything handed out exactly once");
    let state = db.store.state(&key).await.expect("state").expect("row");
    assert_eq!((state.remaining, state.hot_allocated), (Some(0), 1_000));
    let pending = db
        .store
        .pending_allocations(Some(&key), i64::MAX, 1_000)
        .await
        .expect("pending");
    assert_eq!(pending.iter().map(|p| p.amount).sum::<u64>(), 1_000);
}

async fn deleted_keys_get_no_new_credits(db: &Db) {
    let fixture = Fixture::new(db.store.clone()).await;
    let key = fixture.create_key(Some(10)).await;
    assert!(db.store.delete_key(&key, 5).await.expect("delete"));
    assert_eq!(
        db.store
            .spend_direct(&key, Cost::DEFAULT, None)
            .await
            .expect("spend"),
        DirectSpend::NotFound
    );
    let req = AllocateRequest {
        key: &key,
        transfer_id: "after-delete",
        generation: None,
        epoch: "e",
        need: 1,
        chunk: 5,
        now_ms: 1,
    };
    assert_eq!(
        db.store.allocate(&req).await.expect("allocate"),
        AllocateOutcome::NotFound
    );
    // The balance stays readable (for the reconciler and for reports).
    let state = db.store.state(&key).await.expect("state").expect("row");
    assert_eq!(state.remaining, Some(10));
}

#[tokio::test]
async fn sqlite_url_forms_open_the_same_kind_of_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a").join("b.db");
    // `sqlite://` + absolute path creates the file and its directories.
    let s = SqlStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    s.create_api(&api("ws_1", "api_file")).await.expect("api");
    s.close().await;
    assert!(path.is_file());
    // Reopening keeps the data (and does not re-run the migrations).
    let s = SqlStore::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("reconnect");
    assert!(matches!(
        s.get_api(&ws("ws_1"), &ApiId::from("api_file")).await,
        Ok(Some(_))
    ));
    s.close().await;
    assert!(
        matches!(
            s.key_by_id(&KeyId::from("key_x")).await,
            Err(StoreError::Unavailable(_))
        ),
        "a closed pool is unavailable, not a backend error"
    );

    // In memory: one connection, kept for the life of the store.
    let mem = SqlStore::connect("sqlite::memory:").await.expect("memory");
    let a = api("ws_1", "api_mem");
    mem.create_api(&a).await.expect("api");
    create(&mem, key(&a, "key_mem"), Some(3)).await;
    assert_eq!(
        mem.spend_direct(&KeyId::from("key_mem"), Cost::DEFAULT, None)
            .await
            .expect("spend"),
        DirectSpend::Valid { remaining: 2 }
    );
    assert!(mem
        .key_by_id(&KeyId::from("key_mem"))
        .await
        .expect("get")
        .is_some());
}

#[test]
fn postgres_urls_get_their_database_replaced() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/test", "cg_x"),
        "postgres://postgres@127.0.0.1:5432/cg_x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/db?sslmode=disable", "cg_x"),
        "postgres://u:p@h/cg_x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "cg_x"), "postgres://h/cg_x");
}
