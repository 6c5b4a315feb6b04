//! `TestApp`: one creditgate node on a free port with its own data directory, driven over
//! real HTTP. Every response goes through the checks a client of Unkey's v2 API relies
//! on (JSON content type, `meta.requestId`, the error envelope, no `null` for optional
//! fields), and a graceful `stop()` checks that every hot balance went back to the ledger.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use creditgate_domain::{Clock, ManualClock, Permission, SystemClock};
use creditgate_limiter::MemoryHotStore;
use creditgate_server::{App, ServeConfig};
use creditgate_sql::SqlStore;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The node id every `TestApp` runs as (analytics rows carry it).
pub const NODE_ID: &str = "node-test";

/// One HTTP exchange as the client saw it: what `api_requests` must record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Exchange {
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// A client of one running node: cheap to clone into concurrent tasks.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    pub root_key: String,
    log: Arc<Mutex<Vec<Exchange>>>,
}

impl Client {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POST a JSON body with the bootstrap root key.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let key = self.root_key.clone();
        self.post_as(Some(&key), path, body).await
    }

    /// POST a JSON body as `root_key` (`None`: no Authorization header).
    pub async fn post_as(&self, root_key: Option<&str>, path: &str, body: Value) -> (u16, Value) {
        let bytes = serde_json::to_vec(&body).expect("serialising a request body");
        self.send(root_key, path, "application/json", bytes).await
    }

    /// POST raw bytes with a given content type and the bootstrap root key.
    pub async fn post_raw(&self, path: &str, content_type: &str, bytes: Vec<u8>) -> (u16, Value) {
        let key = self.root_key.clone();
        self.send(Some(&key), path, content_type, bytes).await
    }

    /// POST with a literal Authorization header value.
    pub async fn post_with_authorization(
        &self,
        authorization: &str,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let bytes = serde_json::to_vec(&body).expect("serialising a request body");
        let req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("authorization", authorization)
            .body(bytes);
        self.finish("POST", path, req).await
    }

    async fn send(
        &self,
        root_key: Option<&str>,
        path: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(bytes);
        if let Some(k) = root_key {
            req = req.bearer_auth(k);
        }
        self.finish("POST", path, req).await
    }

    /// POST a JSON body with an `Idempotency-Key` header; returns the status, the body
    /// and the `Idempotent-Replayed` header.
    pub async fn post_idem(
        &self,
        path: &str,
        idempotency_key: &str,
        body: Value,
    ) -> (u16, Value, Option<String>) {
        let bytes = serde_json::to_vec(&body).expect("serialising a request body");
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .bearer_auth(&self.root_key)
            .body(bytes)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status().as_u16();
        let replayed = resp
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await.expect("reading a response body");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path} -> {status}: not JSON ({e}): {text}"));
        check_envelope(path, status, &body);
        (status, body, replayed)
    }

    /// GET a path; returns status, content type and the raw body.
    pub async fn get(&self, path: &str) -> (u16, String, String) {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let ctype = content_type(&resp);
        let text = resp.text().await.expect("reading a response body");
        (status, ctype, text)
    }

    /// GET a JSON route, checked like every POST.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let req = self.http.get(self.url(path));
        self.finish("GET", path, req).await
    }

    async fn finish(&self, method: &str, path: &str, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let ctype = content_type(&resp);
        let text = resp.text().await.expect("reading a response body");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{method} {path} -> {status}: body is not JSON ({e}): {text}")
        });
        let media = ctype
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        assert_eq!(
            media, "application/json",
            "{method} {path} -> {status}: content type {ctype:?}, body {body}"
        );
        check_envelope(path, status, &body);
        let request_id = body["meta"]["requestId"].as_str().unwrap_or("").to_owned();
        self.log.lock().expect("exchange log").push(Exchange {
            request_id,
            method: method.to_owned(),
            path: path.to_owned(),
            status,
        });
        (status, body)
    }

    /// Every exchange this client (and its clones) made so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.log.lock().expect("exchange log").clone()
    }

    /// Every item of a paged list route, `limit` per page: each page within the limit,
    /// `hasMore` exactly when there is a cursor.
    pub async fn list_all(&self, path: &str, limit: u64) -> Vec<Value> {
        self.list_all_of(path, json!({}), limit).await
    }

    /// [`Client::list_all`] of a route whose request names what to list (`body`).
    pub async fn list_all_of(&self, path: &str, body: Value, limit: u64) -> Vec<Value> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut body = body.clone();
            body["limit"] = json!(limit);
            if let Some(cur) = &cursor {
                body["cursor"] = json!(cur);
            }
            let (status, page) = self.post(path, body).await;
            assert_eq!(status, 200, "{page}");
            let items = page["data"].as_array().expect("data is a list").clone();
            assert!(
                items.len() <= usize::try_from(limit).expect("small"),
                "{page}"
            );
            all.extend(items);
            if page["pagination"]["hasMore"] != json!(true) {
                assert!(page["pagination"].get("cursor").is_none(), "{page}");
                return all;
            }
            cursor = Some(
                page["pagination"]["cursor"]
                    .as_str()
                    .expect("a cursor when hasMore")
                    .to_owned(),
            );
        }
    }

    /// POST expecting 200; returns `data`.
    pub async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, resp) = self.post(path, body.clone()).await;
        assert_eq!(status, 200, "{path} {body} -> {resp}");
        resp["data"].clone()
    }

    /// A new API; returns its id.
    pub async fn create_api(&self) -> String {
        let data = self
            .ok("/v2/apis.createApi", json!({ "name": "test-api" }))
            .await;
        let id = data["apiId"].as_str().expect("apiId").to_owned();
        assert!(id.starts_with("api_"), "apiId {id}");
        id
    }

    /// A new key in `api` with `credits` (`null`: unlimited); returns (keyId, key).
    pub async fn create_key(&self, api: &str, credits: Value) -> (String, String) {
        let mut body = json!({ "apiId": api });
        if !credits.is_null() {
            body["credits"] = credits;
        }
        self.create_key_with(body).await
    }

    /// A key with `remaining` credits and no refill.
    pub async fn create_limited(&self, api: &str, remaining: i64) -> (String, String) {
        self.create_key(api, json!({ "remaining": remaining }))
            .await
    }

    /// `keys.createKey` with a full body, expecting 200; returns (keyId, key).
    pub async fn create_key_with(&self, body: Value) -> (String, String) {
        let data = self.ok("/v2/keys.createKey", body).await;
        let id = data["keyId"].as_str().expect("keyId").to_owned();
        let key = data["key"].as_str().expect("key").to_owned();
        assert!(id.starts_with("key_"), "keyId {id}");
        (id, key)
    }

    /// `keys.verifyKey` (cost `None`: default), expecting HTTP 200; returns `data`.
    pub async fn verify(&self, key: &str, cost: Option<u64>) -> Value {
        self.verify_as(&self.root_key.clone(), key, cost).await
    }

    pub async fn verify_as(&self, root_key: &str, key: &str, cost: Option<u64>) -> Value {
        let mut body = json!({ "key": key });
        if let Some(c) = cost {
            body["credits"] = json!({ "cost": c });
        }
        let (status, resp) = self
            .post_as(Some(root_key), "/v2/keys.verifyKey", body)
            .await;
        assert_eq!(status, 200, "verifyKey -> {resp}");
        resp["data"].clone()
    }

    /// `keys.getKey`, expecting 200; returns `data`.
    pub async fn get_key(&self, key_id: &str) -> Value {
        self.ok("/v2/keys.getKey", json!({ "keyId": key_id })).await
    }

    /// The exact balance getKey reports: `None` for an unlimited key (no `credits`).
    pub async fn balance(&self, key_id: &str) -> Option<i64> {
        let data = self.get_key(key_id).await;
        match data.get("credits") {
            None => None,
            Some(c) => {
                let r = &c["remaining"];
                assert!(r.is_i64(), "credits.remaining of a limited key: {data}");
                r.as_i64()
            }
        }
    }

    pub async fn liveness_ok(&self) {
        let (status, body) = self.get_json("/v2/liveness").await;
        assert_eq!(status, 200, "liveness -> {body}");
        assert_eq!(body["data"]["message"], "OK");
    }
}

fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The envelope every response carries (success: `data`; error: Unkey's error body).
pub fn check_envelope(path: &str, status: u16, body: &Value) {
    let rid = body["meta"]["requestId"].as_str();
    assert!(
        rid.is_some_and(|r| r.starts_with("req_") && r.len() > 4),
        "{path} -> {status}: meta.requestId missing: {body}"
    );
    if status == 200 {
        assert!(
            body.get("data").is_some(),
            "{path} -> 200 without data: {body}"
        );
        assert!(
            body.get("error").is_none(),
            "{path} -> 200 with error: {body}"
        );
        let mut nulls = Vec::new();
        find_nulls(body, "", &mut nulls);
        // Only KeyCreditsData.remaining is nullable; updateCredits returns it as `data`.
        nulls.retain(|p| {
            !(p.ends_with(".credits.remaining")
                || (path == "/v2/keys.updateCredits" && p == ".data.remaining"))
        });
        assert!(
            nulls.is_empty(),
            "{path}: null for optional fields {nulls:?}: {body}"
        );
        return;
    }
    let err = &body["error"];
    assert!(
        err.is_object() && body.get("data").is_none(),
        "{path} -> {status}: no error envelope: {body}"
    );
    for field in ["title", "detail", "type"] {
        assert!(
            err[field].as_str().is_some_and(|s| !s.is_empty()),
            "{path} -> {status}: error.{field} missing: {body}"
        );
    }
    assert!(
        err["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("https://")),
        "{path} -> {status}: error.type is not a URI: {body}"
    );
    assert_eq!(
        err["status"].as_u64(),
        Some(u64::from(status)),
        "{path}: error.status differs from the HTTP status: {body}"
    );
    if status == 400 {
        let errors = err["errors"].as_array();
        assert!(
            errors.is_some(),
            "{path} -> 400 without error.errors: {body}"
        );
        for e in errors.into_iter().flatten() {
            assert!(
                e["location"].as_str().is_some() && e["message"].as_str().is_some(),
                "{path}: error.errors[] needs location and message: {body}"
            );
        }
    }
}

fn find_nulls(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Null => out.push(at.to_owned()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_nulls(item, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                find_nulls(item, &format!("{at}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// A 400 naming `location` first, with a fix.
#[track_caller]
pub fn assert_bad_request(status: u16, body: &Value, location: &str) {
    if let Some(problem) = bad_request_problem(status, body, location) {
        panic!("{problem}");
    }
}

/// What is wrong with a response that should be a 400 naming `location` (`None`: ok).
pub fn bad_request_problem(status: u16, body: &Value, location: &str) -> Option<String> {
    let first = &body["error"]["errors"][0];
    let problem = if status != 400 {
        format!("status {status}, expected 400")
    } else if first["location"].as_str() != Some(location) {
        format!(
            "errors[0].location {}, expected {location:?}",
            first["location"]
        )
    } else if first["fix"].as_str().is_none_or(str::is_empty) {
        "errors[0].fix missing".to_owned()
    } else if body["error"]["title"] != "Bad Request"
        || body["error"]["type"] != "https://unkey.com/docs/errors/unkey/application/invalid_input"
    {
        "title/type of a 400".to_owned()
    } else {
        return None;
    };
    Some(format!("{problem}: {body}"))
}

/// Collects the failures of a table of cases, to report them all at once.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    pub fn check(&mut self, case: &str, problem: Option<String>) {
        if let Some(p) = problem {
            self.0.push(format!("{case}: {p}"));
        }
    }

    #[track_caller]
    pub fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// An error of `status` whose `type` ends with `type_suffix`.
#[track_caller]
pub fn assert_error(status: u16, body: &Value, want: u16, type_suffix: &str) {
    assert_eq!(status, want, "{body}");
    let t = body["error"]["type"].as_str().unwrap_or("");
    assert!(
        t.ends_with(type_suffix),
        "error.type {t:?} should end with {type_suffix:?}: {body}"
    );
}

/// A verification answer: `credits: None` means the field must be absent.
#[track_caller]
pub fn assert_verdict(data: &Value, code: &str, credits: Option<i64>) {
    assert_eq!(data["code"], code, "{data}");
    assert_eq!(data["valid"], json!(code == "VALID"), "{data}");
    match credits {
        Some(c) => assert_eq!(data.get("credits"), Some(&json!(c)), "credits: {data}"),
        None => assert!(data.get("credits").is_none(), "no credits expected: {data}"),
    }
}

/// A running node plus what it needs to restart on the same data.
pub struct TestApp {
    client: Client,
    pub config: ServeConfig,
    pub clock: Option<Arc<ManualClock>>,
    /// The node's hot store, when the test holds it (to wipe it: a lost hot store).
    pub hot: Option<Arc<MemoryHotStore>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    // Last: removed after the node stopped using it.
    _dir: TempDir,
}

impl Deref for TestApp {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl TestApp {
    /// A node on the wall clock.
    pub async fn start() -> TestApp {
        Self::start_inner(None).await
    }

    /// A node whose time only moves when the test says so.
    pub async fn start_with_clock(clock: Arc<ManualClock>) -> TestApp {
        Self::start_inner(Some(clock)).await
    }

    /// A node on a manual clock with some settings changed.
    pub async fn start_with_clock_configured(
        clock: Arc<ManualClock>,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> TestApp {
        Self::start_inner_with(Some(clock), configure).await
    }

    /// A node on a manual clock whose in-process hot store the test holds
    /// ([`TestApp::hot`]: `wipe()` it to lose its data as a crash would).
    pub async fn start_with_hot_store(
        clock: Arc<ManualClock>,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> TestApp {
        let mut app = Self::build_unstarted(Some(clock), configure);
        app.hot = Some(Arc::new(MemoryHotStore::new()));
        app.boot().await;
        app
    }

    /// A node on the wall clock with some settings changed.
    pub async fn start_configured(configure: impl FnOnce(&mut ServeConfig)) -> TestApp {
        Self::start_inner_with(None, configure).await
    }

    async fn start_inner(clock: Option<Arc<ManualClock>>) -> TestApp {
        Self::start_inner_with(clock, |_| {}).await
    }

    async fn start_inner_with(
        clock: Option<Arc<ManualClock>>,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> TestApp {
        let mut app = Self::build_unstarted(clock, configure);
        app.boot().await;
        app
    }

    fn build_unstarted(
        clock: Option<Arc<ManualClock>>,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> TestApp {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut config = ServeConfig::for_data_dir(dir.path());
        configure(&mut config);
        config.root_key = Some(creditgate_domain::new_secret(Some("cg_root"), 24));
        config.node_id = Some(NODE_ID.into());
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client");
        let client = Client {
            http,
            base: String::new(),
            root_key: config.root_key.clone().unwrap_or_default(),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        TestApp {
            client,
            config,
            clock,
            hot: None,
            shutdown: None,
            task: None,
            _dir: dir,
        }
    }

    async fn boot(&mut self) {
        assert!(self.task.is_none(), "already running");
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(c) => c.clone(),
            None => Arc::new(SystemClock),
        };
        let app = match &self.hot {
            Some(hot) => {
                App::build_with_hot_store(self.config.clone(), NODE_ID.into(), clock, hot.clone())
                    .await
            }
            None => App::build_with_clock(self.config.clone(), NODE_ID.into(), clock).await,
        }
        .expect("building the node");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async {
            let _ = rx.await;
        }));
        self.client.base = format!("http://{addr}");
        self.shutdown = Some(tx);
        self.task = Some(task);
    }

    /// A fresh client of this node (for concurrent tasks).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Graceful stop: stop accepting, finish in-flight requests, return hot balances,
    /// flush analytics. Then checks the ledger holds every credit (nothing left hot).
    pub async fn stop(&mut self) {
        let tx = self.shutdown.take().expect("node is running");
        let _ = tx.send(());
        let task = self.task.take().expect("node is running");
        let served = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("graceful stop within 30 s")
            .expect("serve task panicked");
        served.expect("serve returned an error");
        let sql = self.sql().await;
        let hot: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, hot_allocated FROM keys WHERE hot_allocated <> 0")
                .fetch_all(sql.pool())
                .await
                .expect("reading keys");
        sql.close().await;
        assert!(
            hot.is_empty(),
            "after a graceful stop, credits are still allocated to the hot store: {hot:?}"
        );
    }

    /// Stops (if running) and starts a new node on the same data dir and root key.
    pub async fn restart(&mut self) {
        if self.task.is_some() {
            self.stop().await;
        }
        self.boot().await;
    }

    /// The node's SQLite database, opened separately.
    pub async fn sql(&self) -> SqlStore {
        SqlStore::connect(&self.config.database_url())
            .await
            .expect("opening the node's database")
    }

    /// The node's analytics database (`analytics.db` beside the SQLite ledger).
    pub async fn analytics_sql(&self) -> SqlStore {
        let url = self
            .config
            .analytics_sqlite_url()
            .unwrap_or_else(|| self.config.database_url());
        SqlStore::connect(&url)
            .await
            .expect("opening the node's analytics database")
    }

    /// The ledger balance of a key as stored (`None`: unlimited).
    pub async fn sql_remaining(&self, key_id: &str) -> Option<i64> {
        let sql = self.sql().await;
        let r: Option<i64> = sqlx::query_scalar("SELECT remaining FROM keys WHERE id = $1")
            .bind(key_id)
            .fetch_one(sql.pool())
            .await
            .expect("reading a key's remaining");
        sql.close().await;
        r
    }

    /// Counts rows of a table.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = self.sql().await;
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(sql.pool())
            .await
            .expect("counting rows");
        sql.close().await;
        n
    }

    /// A root key of `workspace` with `permissions` (`api.*.verify_key`, …).
    pub async fn root_key(&self, workspace: &str, permissions: &[&str]) -> String {
        let perms = permissions
            .iter()
            .map(|p| Permission::parse(p).expect("a permission"))
            .collect();
        creditgate_server::create_root_key(&self.config, workspace, perms, None)
            .await
            .expect("creating a root key")
    }
}

/// Groups exchanges by request id (for comparing with `api_requests`).
pub fn by_request_id(exchanges: &[Exchange]) -> BTreeMap<String, Exchange> {
    exchanges
        .iter()
        .map(|e| (e.request_id.clone(), e.clone()))
        .collect()
}
