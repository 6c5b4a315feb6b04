//! Running a [`Plan`]: the open-loop pacer, the closed-loop workers, sending one
//! verification and classifying its answer, and the statistics of the run.
//!
//! Every wait is bounded: nothing new is sent past [`Plan::time_bound`] (the rest of a
//! [`Stop::Requests`] run counts as `not sent` errors), and answers still missing
//! `request_timeout` after the last send count as `unfinished` errors. So `requests`
//! always equals the planned count for [`Stop::Requests`].
//!
//! Latency is recorded for answered requests (any HTTP status), in microseconds, from
//! the *intended* send time in open mode (no coordinated omission) and from the send
//! time in closed mode. Timeouts, transport errors and client-side drops have no latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::report::LatencyMs;
use crate::{Mode, NodeChoice, Plan, Report, Second, Stop};

/// Live figures while a run goes (for progress bars).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub elapsed_s: f64,
    pub requests: u64,
    pub valid: u64,
    pub errors: u64,
    /// Answers per second over the last second.
    pub rps: f64,
    /// p99 over the last second, in ms.
    pub p99_ms: f64,
}

/// Error kinds in [`Report::errors`] that this module produces besides `http <status>`.
/// [`AMBIGUOUS`] lists the kinds after which the request may or may not have been spent;
/// after every other kind nothing was spent.
pub mod error_kind {
    /// The request did not complete within `Plan::request_timeout` (ambiguous).
    pub const TIMEOUT: &str = "timeout";
    /// No connection to the node (refused, unreachable): the request never reached it.
    pub const CONNECT: &str = "connect";
    /// Connected, but sending or reading failed (reset, closed mid-answer): ambiguous.
    pub const TRANSPORT: &str = "transport";
    /// HTTP 503 whose detail says the outcome is unknown (a backend did not answer in
    /// time after the spend may have happened): ambiguous. A plain `http 503` means
    /// nothing was spent.
    pub const OUTCOME_UNKNOWN: &str = "http 503 outcome unknown";
    /// An HTTP 200 whose body is not a verification answer.
    pub const BAD_BODY: &str = "bad body";
    /// Open mode: `max_in_flight` requests were already in flight at the send time.
    pub const DROPPED_BY_CLIENT: &str = "dropped_by_client";
    /// Planned but never sent: the run hit [`crate::Plan::time_bound`].
    pub const NOT_SENT: &str = "not sent";
    /// Sent, but still unanswered when the run gave up waiting.
    pub const UNFINISHED: &str = "unfinished";
    /// The plan cannot run (no nodes, no keys, a rate that is not a positive number).
    pub const INVALID_PLAN: &str = "invalid plan";
    /// The HTTP client could not be built.
    pub const CLIENT_SETUP: &str = "client setup";

    /// The kinds after which a request may have been spent without the client knowing.
    pub const AMBIGUOUS: [&str; 4] = [TIMEOUT, TRANSPORT, OUTCOME_UNKNOWN, UNFINISHED];
}

/// What the server writes in the `detail` of a 503 whose outcome is unknown.
const OUTCOME_UNKNOWN_DETAIL: &str = "the outcome is unknown";

/// Largest latency the histograms hold (larger values are clamped): one hour.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
/// Buckets of [`Report::histogram_ms`].
const PLOT_BUCKETS: usize = 40;
/// Progress updates per second.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Slots of the one-second window behind [`Progress::rps`] and [`Progress::p99_ms`].
const WINDOW_SLOTS: u64 = 10;
const WINDOW_SLOT_MS: u64 = 100;
/// Extra wait for in-flight answers beyond `request_timeout`.
const DRAIN_SLACK: Duration = Duration::from_secs(2);

/// Runs `plan` to the end and reports. `progress` (if given) is updated about 10 times
/// a second, and once more with the final totals.
pub async fn run(plan: &Plan, progress: Option<watch::Sender<Progress>>) -> Report {
    let start = Instant::now();
    let planned = plan.planned_requests();
    if let Some(problem) = invalid(plan) {
        tracing::error!(problem, "load plan cannot run");
        return failed_report(planned, error_kind::INVALID_PLAN);
    }
    let pool = match plan.mode {
        Mode::Open { .. } => plan.max_in_flight,
        Mode::Closed { concurrency, .. } => concurrency,
    };
    let client = match reqwest::Client::builder()
        .timeout(plan.request_timeout)
        .pool_max_idle_per_host(pool.max(1))
        .tcp_nodelay(true)
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "building the HTTP client failed");
            return failed_report(planned, error_kind::CLIENT_SETUP);
        }
    };
    let ctx = Arc::new(Ctx::new(plan, client, start));
    tracing::debug!(mode = ?plan.mode, stop = ?plan.stop, nodes = plan.nodes.len(), "load run starts");

    let (ticker_stop, ticker) = match progress.clone() {
        Some(tx) => {
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(report_progress(ctx.clone(), tx, stop_rx));
            (Some(stop_tx), Some(task))
        }
        None => (None, None),
    };

    let not_sent = match plan.mode {
        Mode::Open { rate_per_sec } => run_open(&ctx, plan, rate_per_sec).await,
        Mode::Closed {
            concurrency,
            think_time,
        } => run_closed(&ctx, plan, concurrency, think_time).await,
    };

    if let Some(stop) = ticker_stop {
        let _ = stop.send(true);
    }
    if let Some(task) = ticker {
        let _ = task.await;
    }
    let report = ctx.finish(not_sent);
    if let Some(tx) = progress {
        tx.send_replace(Progress {
            elapsed_s: start.elapsed().as_secs_f64(),
            requests: report.requests,
            valid: report.valid,
            errors: report.error_count(),
            rps: report.rps,
            p99_ms: report.latency_ms.p99,
        });
    }
    tracing::debug!(
        requests = report.requests,
        valid = report.valid,
        errors = report.error_count(),
        duration_s = report.duration_s,
        "load run done"
    );
    report
}

fn invalid(plan: &Plan) -> Option<&'static str> {
    if plan.nodes.is_empty() {
        return Some("no nodes");
    }
    if plan.keys.is_empty() {
        return Some("no keys");
    }
    match plan.mode {
        Mode::Open { rate_per_sec } if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) => {
            Some("the open-loop rate must be a positive number")
        }
        Mode::Closed { concurrency: 0, .. } => Some("closed loop needs at least one worker"),
        _ => None,
    }
}

/// A run that could not start: every planned request is an error of `kind`.
fn failed_report(planned: Option<u64>, kind: &str) -> Report {
    let requests = planned.unwrap_or(0);
    Report {
        requests,
        errors: BTreeMap::from([(kind.to_owned(), requests)]),
        ..Report::default()
    }
}

/// Open loop: request `i` is due at `start + i / rate`, sent on its own task unless
/// `max_in_flight` requests are in flight (then it is dropped and counted). Returns
/// the number of requests never sent.
async fn run_open(ctx: &Arc<Ctx>, plan: &Plan, rate: f64) -> u64 {
    let total = plan.planned_requests().unwrap_or(0);
    let start = ctx.start;
    let bound = start
        .checked_add(plan.time_bound())
        .unwrap_or_else(far_future);
    let permits =
        u32::try_from(plan.max_in_flight.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    let in_flight = Arc::new(Semaphore::new(usize::try_from(permits).unwrap_or(1)));
    let mut not_sent = 0;
    for i in 0..total {
        let intended = Duration::try_from_secs_f64(i as f64 / rate)
            .ok()
            .and_then(|offset| start.checked_add(offset));
        let intended = match intended {
            Some(at) if at <= bound => at,
            _ => {
                not_sent = total - i;
                break;
            }
        };
        sleep_until(intended).await;
        if Instant::now() > bound {
            not_sent = total - i;
            break;
        }
        let Some((i, node)) = ctx.dispatch() else {
            not_sent = total - i;
            break;
        };
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                ctx.mark_sent(node);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let done = ctx.send(i, node, intended).await;
                    ctx.record(done, true);
                    drop(permit);
                });
            }
            Err(_) => ctx.record(Done::error(error_kind::DROPPED_BY_CLIENT.to_owned()), false),
        }
    }
    // Every request task holds a permit: holding them all means all answers are in.
    let drain = plan.request_timeout.saturating_add(DRAIN_SLACK);
    let _ = tokio::time::timeout(drain, in_flight.acquire_many(permits)).await;
    not_sent
}

/// Closed loop: `concurrency` workers, each sending its next request when the previous
/// one is answered, after an optional uniformly random think time. Returns the number
/// of requests never sent.
async fn run_closed(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    concurrency: usize,
    think_time: Option<(Duration, Duration)>,
) -> u64 {
    let stop_at = ctx
        .start
        .checked_add(plan.time_bound())
        .unwrap_or_else(far_future);
    let base_seed = match plan.node_choice {
        NodeChoice::Random { seed } => seed,
        NodeChoice::RoundRobin => 0,
    };
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let ctx = ctx.clone();
        let worker_seed = u64::try_from(worker).unwrap_or(u64::MAX);
        let mut rng = StdRng::seed_from_u64(base_seed.wrapping_add(worker_seed).rotate_left(17));
        workers.spawn(async move {
            while Instant::now() < stop_at {
                let Some((i, node)) = ctx.dispatch() else {
                    return;
                };
                ctx.mark_sent(node);
                let done = ctx.send(i, node, Instant::now()).await;
                ctx.record(done, true);
                if let Some((lo, hi)) = think_time {
                    let think = if hi > lo {
                        rng.random_range(lo..=hi)
                    } else {
                        lo
                    };
                    let wake = Instant::now().checked_add(think).unwrap_or(stop_at);
                    sleep_until(wake.min(stop_at)).await;
                }
            }
        });
    }
    let drain = plan.request_timeout.saturating_add(DRAIN_SLACK);
    let give_up = stop_at.checked_add(drain).unwrap_or_else(far_future);
    let joined = tokio::time::timeout_at(give_up, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!("closed-loop workers still busy at the time bound; aborting them");
        workers.abort_all();
    }
    match plan.stop {
        Stop::Requests(n) => n.saturating_sub(ctx.dispatched()),
        Stop::After(_) => 0,
    }
}

/// A point in time no run reaches (for bounds that overflow `Instant`).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// What every task of a run shares.
struct Ctx {
    start: Instant,
    client: reqwest::Client,
    /// `<node>/v2/keys.verifyKey`, by node index.
    urls: Vec<String>,
    /// The request body for each key, serialised once.
    bodies: Vec<Vec<u8>>,
    auth: HeaderValue,
    keep_request_ids: bool,
    dispatcher: Mutex<Dispatcher>,
    /// Requests sent to each node, by node index.
    node_counts: Vec<AtomicU64>,
    /// Requests really sent (not dropped by the client).
    sent: AtomicU64,
    recorder: Mutex<Recorder>,
}

impl Ctx {
    fn new(plan: &Plan, client: reqwest::Client, start: Instant) -> Self {
        let urls = plan
            .nodes
            .iter()
            .map(|n| format!("{}/v2/keys.verifyKey", n.trim_end_matches('/')))
            .collect();
        let bodies = plan
            .keys
            .iter()
            .map(|key| {
                serde_json::to_vec(&serde_json::json!({"key": key, "credits": {"cost": plan.cost}}))
                    .unwrap_or_default()
            })
            .collect();
        let auth = HeaderValue::from_str(&format!("Bearer {}", plan.root_key))
            .map(|mut v| {
                v.set_sensitive(true);
                v
            })
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid-root-key"));
        let rng = match plan.node_choice {
            NodeChoice::Random { seed } => StdRng::seed_from_u64(seed),
            NodeChoice::RoundRobin => StdRng::seed_from_u64(0),
        };
        let limit = match plan.stop {
            Stop::Requests(n) => Some(n),
            Stop::After(_) => plan.planned_requests(),
        };
        Self {
            start,
            client,
            urls,
            bodies,
            auth,
            keep_request_ids: plan.keep_request_ids,
            dispatcher: Mutex::new(Dispatcher {
                next: 0,
                limit,
                choice: plan.node_choice,
                rng,
                nodes: plan.nodes.len(),
            }),
            node_counts: plan.nodes.iter().map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            recorder: Mutex::new(Recorder::new(
                start,
                plan.keep_request_ids,
                plan.nodes.clone(),
            )),
        }
    }

    /// The next request's index and node.
    fn dispatch(&self) -> Option<(u64, usize)> {
        lock(&self.dispatcher).next()
    }

    /// Counts a request as sent to `node`; from here on it either completes or counts
    /// as `unfinished`.
    fn mark_sent(&self, node: usize) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = self.node_counts.get(node) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests handed out so far.
    fn dispatched(&self) -> u64 {
        lock(&self.dispatcher).next
    }

    /// Sends request `i` to `node`; latency counts from `intended`.
    async fn send(&self, i: u64, node: usize, intended: Instant) -> Done {
        let key = u64::try_from(self.bodies.len())
            .ok()
            .and_then(|n| usize::try_from(i % n.max(1)).ok())
            .unwrap_or(0);
        let (Some(url), Some(body)) = (self.urls.get(node), self.bodies.get(key)) else {
            return Done::error(error_kind::INVALID_PLAN.to_owned());
        };
        let sent = self
            .client
            .post(url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e) => return Done::error(transport_kind(&e).to_owned()),
        };
        let status = answer.status();
        let body = match answer.bytes().await {
            Ok(body) => body,
            Err(e) => return Done::error(transport_kind(&e).to_owned()),
        };
        let latency_us = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX);
        classify(status.as_u16(), &body, self.keep_request_ids, latency_us)
    }

    fn record(&self, done: Done, was_sent: bool) {
        lock(&self.recorder).record(Instant::now(), done, was_sent);
    }

    /// Closes the books: later answers are ignored, sent-but-unanswered requests count
    /// as `unfinished`.
    fn finish(&self, not_sent: u64) -> Report {
        let mut rec = lock(&self.recorder);
        let sent = self.sent.load(Ordering::Relaxed);
        let counts: Vec<u64> = self
            .node_counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        rec.finish(sent, not_sent, &counts)
    }

    fn progress(&self) -> Progress {
        lock(&self.recorder).progress(Instant::now())
    }
}

/// A poisoned lock only means another task panicked mid-update of counters; the
/// counters are still the best figures there are.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn transport_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        error_kind::TIMEOUT
    } else if e.is_connect() {
        error_kind::CONNECT
    } else {
        error_kind::TRANSPORT
    }
}

/// Hands out request indices and nodes in order, so request `i` always goes to the same
/// node for a given seed.
struct Dispatcher {
    next: u64,
    limit: Option<u64>,
    choice: NodeChoice,
    rng: StdRng,
    nodes: usize,
}

impl Dispatcher {
    fn next(&mut self) -> Option<(u64, usize)> {
        if self.limit.is_some_and(|limit| self.next >= limit) || self.nodes == 0 {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let node = match self.choice {
            NodeChoice::Random { .. } => self.rng.random_range(0..self.nodes),
            NodeChoice::RoundRobin => u64::try_from(self.nodes)
                .ok()
                .and_then(|n| usize::try_from(i % n).ok())
                .unwrap_or(0),
        };
        Some((i, node))
    }
}

/// The result of one request.
#[derive(Debug, Clone, PartialEq)]
struct Done {
    outcome: Outcome,
    /// Present when an HTTP answer arrived.
    latency_us: Option<u64>,
    request_id: Option<String>,
}

impl Done {
    fn error(kind: String) -> Self {
        Self {
            outcome: Outcome::Error(kind),
            latency_us: None,
            request_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// VALID, with the `credits` remaining after it (if the key is limited).
    Valid(Option<u64>),
    UsageExceeded,
    /// Another verification code.
    Other(String),
    /// No verification answer, by kind.
    Error(String),
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    meta: Option<Meta>,
    #[serde(default)]
    data: Option<VerifyData>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    detail: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    request_id: String,
}

#[derive(Deserialize)]
struct VerifyData {
    valid: bool,
    code: String,
    #[serde(default)]
    credits: Option<u64>,
}

/// Classifies an HTTP answer to `keys.verifyKey`.
fn classify(status: u16, body: &[u8], keep_request_id: bool, latency_us: u64) -> Done {
    let parsed = serde_json::from_slice::<Envelope>(body).ok();
    let request_id = if keep_request_id {
        parsed
            .as_ref()
            .and_then(|e| e.meta.as_ref())
            .map(|m| m.request_id.clone())
    } else {
        None
    };
    let outcome = if status == 503
        && parsed
            .as_ref()
            .and_then(|e| e.error.as_ref())
            .is_some_and(|e| e.detail.contains(OUTCOME_UNKNOWN_DETAIL))
    {
        Outcome::Error(error_kind::OUTCOME_UNKNOWN.to_owned())
    } else if status != 200 {
        Outcome::Error(format!("http {status}"))
    } else {
        match parsed.and_then(|e| e.data) {
            Some(data) if data.code == "VALID" && data.valid => Outcome::Valid(data.credits),
            Some(data) if data.code == "USAGE_EXCEEDED" && !data.valid => Outcome::UsageExceeded,
            // `valid` must agree with the code.
            Some(data) if data.code != "VALID" && !data.valid => Outcome::Other(data.code),
            _ => Outcome::Error(error_kind::BAD_BODY.to_owned()),
        }
    };
    Done {
        outcome,
        latency_us: Some(latency_us),
        request_id,
    }
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, sigfig)
        .expect("constant histogram bounds are valid")
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn p99_ms(h: &Histogram<u64>) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        us_to_ms(h.value_at_quantile(0.99))
    }
}

/// The second being filled in.
struct SecondAcc {
    second: Second,
    latency: Histogram<u64>,
}

/// One 100 ms slot of the progress window.
struct Slot {
    /// `elapsed_ms / 100` of the answers in it.
    epoch: u64,
    answered: u64,
    latency: Histogram<u64>,
}

/// The statistics of a run, fed one answer at a time.
struct Recorder {
    start: Instant,
    keep_request_ids: bool,
    node_names: Vec<String>,
    /// Set by `finish`: later answers are ignored (they were counted as unfinished).
    closed: bool,
    report: Report,
    /// Answers that came back from the network (any HTTP status).
    answered: u64,
    /// Completions of requests that were actually sent.
    completed_sent: u64,
    last_answer: Option<Instant>,
    latency: Histogram<u64>,
    current: SecondAcc,
    window: Vec<Slot>,
}

impl Recorder {
    fn new(start: Instant, keep_request_ids: bool, node_names: Vec<String>) -> Self {
        Self {
            start,
            keep_request_ids,
            node_names,
            closed: false,
            report: Report::default(),
            answered: 0,
            completed_sent: 0,
            last_answer: None,
            latency: histogram(3),
            current: SecondAcc {
                second: Second::default(),
                latency: histogram(2),
            },
            window: (0..WINDOW_SLOTS)
                .map(|_| Slot {
                    epoch: u64::MAX,
                    answered: 0,
                    latency: histogram(2),
                })
                .collect(),
        }
    }

    fn record(&mut self, now: Instant, done: Done, was_sent: bool) {
        if self.closed {
            return;
        }
        let since_start = now.saturating_duration_since(self.start);
        self.roll_to(since_start.as_secs());
        let report = &mut self.report;
        let second = &mut self.current.second;
        report.requests += 1;
        second.requests += 1;
        if was_sent {
            self.completed_sent += 1;
        }
        match done.outcome {
            Outcome::Valid(remaining) => {
                report.valid += 1;
                second.valid += 1;
                if let Some(r) = remaining {
                    report.valid_remaining.push(r);
                    report.min_remaining = Some(report.min_remaining.map_or(r, |m| m.min(r)));
                    second.min_remaining = Some(second.min_remaining.map_or(r, |m| m.min(r)));
                }
            }
            Outcome::UsageExceeded => report.usage_exceeded += 1,
            Outcome::Other(code) => *report.other_outcomes.entry(code).or_default() += 1,
            Outcome::Error(kind) => {
                *report.errors.entry(kind).or_default() += 1;
                second.errors += 1;
            }
        }
        if let Some(id) = done.request_id.filter(|_| self.keep_request_ids) {
            report.request_ids.push(id);
        }
        if let Some(us) = done.latency_us {
            self.answered += 1;
            self.last_answer = Some(now);
            self.latency.saturating_record(us);
            self.current.latency.saturating_record(us);
            let epoch = u64::try_from(since_start.as_millis() / u128::from(WINDOW_SLOT_MS))
                .unwrap_or(u64::MAX);
            if let Some(slot) = usize::try_from(epoch % WINDOW_SLOTS)
                .ok()
                .and_then(|i| self.window.get_mut(i))
            {
                if slot.epoch != epoch {
                    slot.epoch = epoch;
                    slot.answered = 0;
                    slot.latency.reset();
                }
                slot.answered += 1;
                slot.latency.saturating_record(us);
            }
        }
    }

    /// Closes the seconds before `t` (including empty ones, so stalls show).
    fn roll_to(&mut self, t: u64) {
        while self.current.second.t < t {
            self.close_second();
            self.current.second.t += 1;
        }
    }

    fn close_second(&mut self) {
        let mut second = std::mem::take(&mut self.current.second);
        second.p99_ms = p99_ms(&self.current.latency);
        self.current.latency.reset();
        self.current.second.t = second.t;
        self.report.timeline.push(second);
    }

    fn progress(&self, now: Instant) -> Progress {
        let since_start = now.saturating_duration_since(self.start);
        let epoch =
            u64::try_from(since_start.as_millis() / u128::from(WINDOW_SLOT_MS)).unwrap_or(0);
        let oldest = epoch.saturating_sub(WINDOW_SLOTS - 1);
        let mut merged = histogram(2);
        let mut answered = 0;
        for slot in &self.window {
            if (oldest..=epoch).contains(&slot.epoch) {
                answered += slot.answered;
                let _ = merged.add(&slot.latency);
            }
        }
        // The window spans full slots plus the current, partly filled one: divide by the
        // time it really covers (shorter than a second early on).
        let window_start = Duration::from_millis(oldest.saturating_mul(WINDOW_SLOT_MS));
        let window_s = since_start
            .saturating_sub(window_start)
            .as_secs_f64()
            .max(0.1);
        Progress {
            elapsed_s: since_start.as_secs_f64(),
            requests: self.report.requests,
            valid: self.report.valid,
            errors: self.report.error_count(),
            rps: answered as f64 / window_s,
            p99_ms: p99_ms(&merged),
        }
    }

    /// `sent`: requests really sent; those without a recorded completion are `unfinished`.
    fn finish(&mut self, sent: u64, not_sent: u64, node_counts: &[u64]) -> Report {
        self.closed = true;
        if self.current.second.requests > 0 {
            self.close_second();
        }
        let mut report = std::mem::take(&mut self.report);
        let unfinished = sent.saturating_sub(self.completed_sent);
        for (kind, n) in [
            (error_kind::NOT_SENT, not_sent),
            (error_kind::UNFINISHED, unfinished),
        ] {
            if n > 0 {
                report.requests += n;
                *report.errors.entry(kind.to_owned()).or_default() += n;
            }
        }
        for (name, count) in self.node_names.iter().zip(node_counts) {
            *report.nodes.entry(name.clone()).or_default() += count;
        }
        report.duration_s = self.last_answer.map_or(0.0, |t| {
            t.saturating_duration_since(self.start).as_secs_f64()
        });
        report.rps = if report.duration_s > 0.0 {
            self.answered as f64 / report.duration_s
        } else {
            0.0
        };
        if !self.latency.is_empty() {
            report.latency_ms = LatencyMs {
                p50: us_to_ms(self.latency.value_at_quantile(0.50)),
                p95: us_to_ms(self.latency.value_at_quantile(0.95)),
                p99: us_to_ms(self.latency.value_at_quantile(0.99)),
                max: us_to_ms(self.latency.max()),
                mean: self.latency.mean() / 1000.0,
            };
        }
        report.histogram_ms = plot_buckets(&self.latency);
        report
    }
}

/// [`PLOT_BUCKETS`] log-spaced buckets from the lowest to the highest latency:
/// (upper bound in ms, count), ascending, empty buckets included.
fn plot_buckets(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let lo = h.min().max(1) as f64;
    let hi = h.max().max(1) as f64;
    if hi <= lo {
        return vec![(us_to_ms(h.max()), h.len())];
    }
    let steps = PLOT_BUCKETS as f64;
    let ratio = (hi / lo).powf(1.0 / steps);
    let mut upper: Vec<f64> = (1..=PLOT_BUCKETS)
        .scan(lo, |edge, _| {
            *edge *= ratio;
            Some(*edge)
        })
        .collect();
    // The last edge is the maximum itself, whatever the rounding.
    if let Some(last) = upper.last_mut() {
        *last = hi;
    }
    let mut counts = vec![0_u64; PLOT_BUCKETS];
    for v in h.iter_recorded() {
        // The histogram's value for a bucket is its highest equivalent value; clamp it
        // into the observed range.
        let value = (v.value_iterated_to() as f64).clamp(lo, hi);
        let idx = upper
            .partition_point(|edge| *edge < value)
            .min(PLOT_BUCKETS - 1);
        counts[idx] += v.count_at_value();
    }
    upper
        .into_iter()
        .map(|edge_us| edge_us / 1000.0)
        .zip(counts)
        .collect()
}

/// Sends progress every [`PROGRESS_INTERVAL`] until `stop` turns true.
async fn report_progress(
    ctx: Arc<Ctx>,
    tx: watch::Sender<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {
                tx.send_replace(ctx.progress());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: u16, body: &str) -> Outcome {
        classify(status, body.as_bytes(), false, 1).outcome
    }

    #[test]
    fn answers_are_classified() {
        let ok =
            r#"{"meta":{"requestId":"req_1"},"data":{"valid":true,"code":"VALID","credits":7}}"#;
        assert_eq!(outcome(200, ok), Outcome::Valid(Some(7)));
        let unlimited = r#"{"meta":{"requestId":"r"},"data":{"valid":true,"code":"VALID"}}"#;
        assert_eq!(outcome(200, unlimited), Outcome::Valid(None));
        let spent = r#"{"meta":{"requestId":"r"},"data":{"valid":false,"code":"USAGE_EXCEEDED","credits":0}}"#;
        assert_eq!(outcome(200, spent), Outcome::UsageExceeded);
        let missing = r#"{"meta":{"requestId":"r"},"data":{"valid":false,"code":"NOT_FOUND"}}"#;
        assert_eq!(outcome(200, missing), Outcome::Other("NOT_FOUND".into()));
        assert_eq!(outcome(503, "{}"), Outcome::Error("http 503".into()));
        let unavailable = r#"{"meta":{"requestId":"r"},"error":{"title":"Service Unavailable","detail":"A storage backend is unavailable; nothing was spent.","status":503,"type":"t"}}"#;
        assert_eq!(outcome(503, unavailable), Outcome::Error("http 503".into()));
        let unknown = r#"{"meta":{"requestId":"r"},"error":{"title":"Service Unavailable","detail":"A storage backend did not answer in time; the outcome is unknown: this request may have been spent.","status":503,"type":"t"}}"#;
        assert_eq!(
            outcome(503, unknown),
            Outcome::Error(error_kind::OUTCOME_UNKNOWN.into())
        );
        assert_eq!(outcome(200, "nope"), Outcome::Error("bad body".into()));
        let liar = r#"{"meta":{"requestId":"r"},"data":{"valid":false,"code":"VALID"}}"#;
        assert_eq!(outcome(200, liar), Outcome::Error("bad body".into()));
    }

    #[test]
    fn request_ids_only_when_asked() {
        let ok = br#"{"meta":{"requestId":"req_1"},"data":{"valid":true,"code":"VALID"}}"#;
        assert_eq!(
            classify(200, ok, true, 1).request_id.as_deref(),
            Some("req_1")
        );
        assert_eq!(classify(200, ok, false, 1).request_id, None);
    }

    #[test]
    fn round_robin_and_seeded_random_dispatch() {
        let mut rr = Dispatcher {
            next: 0,
            limit: Some(5),
            choice: NodeChoice::RoundRobin,
            rng: StdRng::seed_from_u64(0),
            nodes: 3,
        };
        let got: Vec<_> = std::iter::from_fn(|| rr.next()).collect();
        assert_eq!(got, vec![(0, 0), (1, 1), (2, 2), (3, 0), (4, 1)]);

        let draw = |seed| {
            let mut d = Dispatcher {
                next: 0,
                limit: Some(50),
                choice: NodeChoice::Random { seed },
                rng: StdRng::seed_from_u64(seed),
                nodes: 4,
            };
            std::iter::from_fn(move || d.next())
                .map(|(_, n)| n)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(
            (0..4).all(|n| draw(7).contains(&n)),
            "50 draws cover 4 nodes"
        );
    }

    #[test]
    fn timeline_closes_empty_seconds_and_buckets_cover_every_answer() {
        let start = Instant::now();
        let mut rec = Recorder::new(start, false, vec!["a".into()]);
        let answer = |us| Done {
            outcome: Outcome::Valid(Some(us)),
            latency_us: Some(us),
            request_id: None,
        };
        rec.record(start + Duration::from_millis(10), answer(1_000), true);
        rec.record(start + Duration::from_millis(2_500), answer(50_000), true);
        rec.record(
            start + Duration::from_millis(2_600),
            Done::error("timeout".into()),
            true,
        );
        let report = rec.finish(4, 2, &[4]);
        let seconds: Vec<_> = report.timeline.iter().map(|s| (s.t, s.requests)).collect();
        assert_eq!(seconds, vec![(0, 1), (1, 0), (2, 2)]);
        assert_eq!(report.timeline[2].errors, 1);
        assert_eq!(report.timeline[2].min_remaining, Some(50_000));
        assert_eq!(
            report.requests,
            3 + 2 + 1,
            "answers + not sent + unfinished"
        );
        assert_eq!(report.errors.get("not sent"), Some(&2));
        assert_eq!(report.errors.get("unfinished"), Some(&1));
        assert_eq!(report.histogram_ms.len(), PLOT_BUCKETS);
        assert_eq!(report.histogram_ms.iter().map(|b| b.1).sum::<u64>(), 2);
        assert!(report.histogram_ms.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(report.histogram_ms[0].1, 1);
        assert_eq!(report.histogram_ms[PLOT_BUCKETS - 1].1, 1);
        assert!((report.duration_s - 2.5).abs() < 1e-9);
        assert!((report.rps - 0.8).abs() < 1e-9);
        assert_eq!(report.min_remaining, Some(1_000));
    }
}
