//! `creditgate loadtest`: options, setup, the live progress line, the final table, JSON and HTML outputs, exit status.
//!
//! One run: pick the nodes (`--nodes` of an existing deployment, or `--spawn N` local
//! nodes on their own Redis, Postgres and ClickHouse), create an API and `--keys` keys of
//! `--credits` each through the public API, drive them with [`crate::run`] while a
//! progress line redraws on stderr, read every key's balance back with `keys.getKey`,
//! delete the API (unless `--keep`), print the table on stdout and write `--json` /
//! `--report`. The exit status is 1 when credits were over-spent, the error rate is above
//! `--max-error-rate`, or nothing was sent.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use creditgate_testkit::{Backends, Cluster, ClusterOptions, NodeKind};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::{html, Admin, AdminError, Mode, NodeChoice, Plan, Progress, Report, Stop};

/// Workers of a closed-loop run without `--concurrency`.
pub const DEFAULT_CLOSED_CONCURRENCY: usize = 32;
/// Requests in flight at most in an open-loop run without `--concurrency`.
pub const DEFAULT_OPEN_MAX_IN_FLIGHT: usize = 1024;
/// Upper bound of `--keys`.
pub const MAX_KEYS: usize = 100_000;
/// Upper bound of `--spawn`.
pub const MAX_SPAWNED_NODES: usize = 32;
/// Bound on each setup and teardown call (create, `keys.getKey`, delete).
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Setup and teardown calls in flight at once.
const ADMIN_PARALLELISM: usize = 16;
/// Redraw interval of the progress line on a terminal.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Without a terminal, one progress line per this many intervals (one a second).
const PROGRESS_LINES_EVERY: u64 = 10;
/// Cells of the progress bar.
const PROGRESS_BAR_CELLS: usize = 24;
/// Exit status when the run was interrupted by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

/// Arrival model of `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    /// Paced arrivals at --rate (or the rate derived from --credits, --duration, --load),
    /// whatever the latency; latency counts from each request's intended send time.
    Open,
    /// --concurrency workers, each sending its next request when the previous is answered.
    Closed,
}

/// `creditgate loadtest`: drive creditgate nodes with verifications of keys that have a
/// credit balance, and check that no credit is over-spent.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["nodes", "spawn"])))]
pub struct LoadtestArgs {
    /// Base URLs of the nodes of an existing deployment, comma-separated
    /// (e.g. http://10.0.0.1:7070,http://10.0.0.2:7070).
    #[arg(long, value_delimiter = ',', value_name = "URL[,URL…]")]
    pub nodes: Vec<String>,

    /// Root key allowed to create and delete APIs and keys and to verify keys (needed with
    /// --nodes; with --spawn it becomes the local cluster's root key).
    #[arg(long, env = "CREDITGATE_ROOT_KEY", hide_env_values = true)]
    pub root_key: Option<String>,

    /// Start a local cluster of N nodes (child processes of this binary, with their own
    /// Redis, Postgres and ClickHouse) instead of --nodes, and stop it afterwards.
    #[arg(long, value_name = "N", conflicts_with = "nodes")]
    pub spawn: Option<usize>,

    /// Credits of each key.
    #[arg(long, default_value_t = 1000)]
    pub credits: u64,

    /// `credits.cost` of every verification.
    #[arg(long, default_value_t = 1)]
    pub cost: u64,

    /// Open loop: factor over the rate that would spend all credits (keys × credits) in
    /// --duration. Ignored when --rate is given.
    #[arg(long, default_value_t = 1.0)]
    pub load: f64,

    /// How long to send, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub duration: u64,

    /// Open loop: arrivals per second (overrides --load).
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,

    /// Closed loop: number of workers (default 32). Open loop: requests in flight at most
    /// (default 1024; arrivals beyond it count as `dropped_by_client` errors).
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Number of keys to spread the load over (request i uses key i mod N), each with
    /// --credits.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub keys: usize,

    /// Arrival model.
    #[arg(long, value_enum, default_value_t = ModeArg::Open)]
    pub mode: ModeArg,

    /// Seed of the node choice (each request goes to a node picked at random); printed,
    /// so a run can be repeated. Default: a random seed.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Bound on one verification, in milliseconds (beyond it: a `timeout` error).
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub timeout_ms: u64,

    /// Keep the API and keys afterwards (default: deleted).
    #[arg(long)]
    pub keep: bool,

    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write a self-contained HTML report with plots to FILE.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,

    /// Highest acceptable share of requests without a verification answer (0.01 = 1 %);
    /// above it the exit status is 1.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.01)]
    pub max_error_rate: f64,
}

/// What a run was asked to do (the heading of the outputs, `scenario` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub nodes: Vec<String>,
    /// Whether the nodes were started by `--spawn`.
    pub spawned: bool,
    pub keys: u64,
    pub credits_per_key: u64,
    pub cost: u64,
    pub mode: ModeArg,
    /// Open loop: arrivals per second.
    pub rate_per_sec: Option<f64>,
    /// Open loop without `--rate`: the factor the rate was derived with.
    pub load: Option<f64>,
    /// Closed loop: workers; open loop: requests in flight at most.
    pub concurrency: usize,
    pub duration_s: u64,
    pub seed: u64,
    pub timeout_ms: u64,
    pub max_error_rate: f64,
}

impl Scenario {
    /// `keys × credits_per_key`, the credits granted to the run.
    pub fn credits_granted(&self) -> u64 {
        self.keys.saturating_mul(self.credits_per_key)
    }

    /// One line saying what ran.
    pub fn title(&self) -> String {
        let nodes = match self.nodes.len() {
            1 => "1 node".to_owned(),
            n => format!("{n} nodes"),
        };
        let spawned = if self.spawned { " (spawned)" } else { "" };
        let keys = match self.keys {
            1 => "1 key".to_owned(),
            n => format!("{n} keys"),
        };
        let mode = match (self.mode, self.rate_per_sec, self.load) {
            (ModeArg::Open, Some(rate), Some(load)) => {
                format!("open loop {rate} req/s (load {load:?})")
            }
            (ModeArg::Open, Some(rate), None) => format!("open loop {rate} req/s"),
            _ => format!("closed loop, {} workers", self.concurrency),
        };
        format!(
            "creditgate loadtest: {nodes}{spawned}, {keys} × {} credits, cost {}, {mode}, {} s, seed {}",
            self.credits_per_key, self.cost, self.duration_s, self.seed
        )
    }
}

/// The verdict on a run's [`Report`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// `keys × credits`.
    pub credits_granted: u64,
    /// VALID answers a correct service gives: per key `min(requests to it, credits / cost)`,
    /// summed (request i uses key i mod keys).
    pub expected_valid: u64,
    /// `valid / expected_valid` (`None` when nothing was expected).
    pub credit_accuracy: Option<f64>,
    /// `valid − expected_valid`.
    pub valid_minus_expected: i64,
    /// Credits granted by VALID answers beyond those the keys had: `max(0, valid × cost −
    /// credits_granted)`. Must be 0.
    pub over_spend: u64,
    pub error_count: u64,
    pub error_rate: f64,
    /// Sum of `credits.remaining` of the keys via `keys.getKey` after the run (`None`:
    /// not known).
    pub final_remaining: Option<u64>,
    /// Why the run failed (empty: it passed).
    pub failures: Vec<String>,
    pub passed: bool,
}

impl Summary {
    pub fn new(report: &Report, scenario: &Scenario, final_remaining: Option<u64>) -> Summary {
        let credits_granted = scenario.credits_granted();
        let expected = expected_valid(
            report.requests,
            scenario.keys,
            scenario.credits_per_key,
            scenario.cost,
        );
        let diff = i128::from(report.valid) - i128::from(expected);
        let valid_minus_expected =
            i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX });
        let credit_accuracy = (expected > 0).then(|| report.valid as f64 / expected as f64);
        let over_spend = report
            .valid
            .saturating_mul(scenario.cost)
            .saturating_sub(credits_granted);
        let error_count = report.error_count();
        let error_rate = report.error_rate();

        let mut failures = Vec::new();
        if over_spend > 0 {
            failures.push(format!(
                "over-spend: {over_spend} credits beyond the {credits_granted} granted"
            ));
        }
        if error_rate > scenario.max_error_rate {
            failures.push(format!(
                "error rate {} above --max-error-rate {}",
                percent(error_rate),
                percent(scenario.max_error_rate)
            ));
        }
        if report.requests == 0 {
            failures.push("no request was sent".to_owned());
        }
        Summary {
            credits_granted,
            expected_valid: expected,
            credit_accuracy,
            valid_minus_expected,
            over_spend,
            error_count,
            error_rate,
            final_remaining,
            passed: failures.is_empty(),
            failures,
        }
    }
}

/// VALID answers a correct service gives to `requests` verifications spread over `keys`
/// keys (request i uses key i mod keys) of `credits` each at `cost`: per key
/// `min(its requests, credits / cost)`, summed.
pub fn expected_valid(requests: u64, keys: u64, credits: u64, cost: u64) -> u64 {
    if keys == 0 {
        return 0;
    }
    let per_key_cap = credits / cost.max(1);
    let base = requests / keys;
    let extra = requests % keys;
    let with_extra = extra.saturating_mul(base.saturating_add(1).min(per_key_cap));
    let without = (keys - extra).saturating_mul(base.min(per_key_cap));
    with_extra.saturating_add(without)
}

/// `0.0123` → `1.23 %`.
fn percent(fraction: f64) -> String {
    format!("{:.2} %", fraction * 100.0)
}

/// The rows of the final table (also the summary table of the HTML report).
pub fn table_rows(
    report: &Report,
    scenario: &Scenario,
    summary: &Summary,
) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |label: &str, value: String| rows.push((label.to_owned(), value));
    row("requests", report.requests.to_string());
    row("VALID", report.valid.to_string());
    row("USAGE_EXCEEDED", report.usage_exceeded.to_string());
    row(
        "other outcomes",
        if report.other_outcomes.is_empty() {
            "none".to_owned()
        } else {
            join_counts(&report.other_outcomes)
        },
    );
    row(
        "errors",
        format!(
            "{} ({} of requests; limit {})",
            summary.error_count,
            percent(summary.error_rate),
            percent(scenario.max_error_rate)
        ),
    );
    for (kind, n) in &report.errors {
        row(&format!("  error: {kind}"), n.to_string());
    }
    row(
        "expected VALID",
        format!(
            "{} ({} key(s) × {} credits / cost {})",
            summary.expected_valid, scenario.keys, scenario.credits_per_key, scenario.cost
        ),
    );
    row(
        "credit accuracy",
        match summary.credit_accuracy {
            Some(ratio) => format!(
                "{ratio:.4} (VALID − expected: {:+})",
                summary.valid_minus_expected
            ),
            None => format!("n/a (VALID − expected: {:+})", summary.valid_minus_expected),
        },
    );
    row(
        "over-spend",
        format!(
            "{} credits ({} × cost {} = {} of {} granted){}",
            summary.over_spend,
            report.valid,
            scenario.cost,
            report.valid.saturating_mul(scenario.cost),
            summary.credits_granted,
            if summary.over_spend > 0 {
                "  OVER-SPENT"
            } else {
                ""
            }
        ),
    );
    row(
        "throughput",
        format!(
            "{:.1} answers/s over {:.2} s",
            report.rps, report.duration_s
        ),
    );
    let l = &report.latency_ms;
    row(
        "latency p50 / p95 / p99 / max",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} ms",
            l.p50, l.p95, l.p99, l.max
        ),
    );
    let sent: u64 = report.nodes.values().sum();
    for (url, n) in &report.nodes {
        let share = if sent > 0 {
            *n as f64 / sent as f64
        } else {
            0.0
        };
        row(
            &format!("requests to {url}"),
            format!("{n} ({})", percent(share)),
        );
    }
    let reported = report
        .min_remaining
        .map_or_else(|| "– (no VALID answer)".to_owned(), |r| r.to_string());
    let via_get = summary
        .final_remaining
        .map_or_else(|| "unknown".to_owned(), |r| r.to_string());
    row(
        "final remaining",
        format!("reported {reported} · keys.getKey {via_get}"),
    );
    row(
        "result",
        if summary.passed {
            "PASS".to_owned()
        } else {
            format!("FAIL: {}", summary.failures.join("; "))
        },
    );
    rows
}

fn join_counts(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `title`, then the rows as two aligned columns.
pub fn format_table(title: &str, rows: &[(String, String)]) -> String {
    let width = rows
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!("{title}\n");
    let rule = "─".repeat(width + 2 + 24);
    out.push_str(&rule);
    out.push('\n');
    for (label, value) in rows {
        let pad = width - label.chars().count();
        out.push_str(&format!("{label}{}  {value}\n", " ".repeat(pad)));
    }
    out.push_str(&rule);
    out.push('\n');
    out
}

/// The progress line: bar of elapsed over the duration, live RPS, successes, errors, P99.
pub fn progress_line(p: &Progress, duration_s: f64) -> String {
    let fraction = if duration_s > 0.0 {
        (p.elapsed_s / duration_s).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let filled_cells = (fraction * PROGRESS_BAR_CELLS as f64).round();
    let filled = (0..PROGRESS_BAR_CELLS)
        .filter(|i| (*i as f64) < filled_cells)
        .count();
    format!(
        "[{}{}] {:>5.1}/{duration_s:.0} s  {:>7.1} req/s  VALID {:>7}  errors {:>5}  p99 {:>7.2} ms",
        "█".repeat(filled),
        "░".repeat(PROGRESS_BAR_CELLS - filled),
        p.elapsed_s,
        p.rps,
        p.valid,
        p.errors,
        p.p99_ms
    )
}

/// Starts a local `nodes`-node cluster with its own Redis, Postgres and ClickHouse; the
/// nodes are child processes of the running executable, which must be the `creditgate`
/// binary. `root_key`: the cluster's root key (default: a fresh one).
pub async fn start_cluster(nodes: usize, root_key: Option<String>) -> Result<Cluster> {
    ensure!(
        (1..=MAX_SPAWNED_NODES).contains(&nodes),
        "the node count must be between 1 and {MAX_SPAWNED_NODES}, not {nodes}"
    );
    let binary = std::env::current_exe().context("locating the creditgate binary")?;
    let mut options = ClusterOptions::new(nodes, Backends::Own);
    options.kind = NodeKind::Process { binary };
    if let Some(key) = root_key {
        options.root_key = key;
    }
    Cluster::start(options)
        .await
        .context("starting the local cluster")
}

/// The plan of a run and the scenario it reports, from validated arguments.
fn plan_for(
    args: &LoadtestArgs,
    nodes: Vec<String>,
    root_key: String,
    seed: u64,
    spawned: bool,
) -> Result<(Plan, Scenario)> {
    ensure!(!nodes.is_empty(), "--nodes needs at least one URL");
    ensure!(args.cost >= 1, "--cost must be at least 1");
    ensure!(args.duration >= 1, "--duration must be at least 1 second");
    ensure!(
        (1..=MAX_KEYS).contains(&args.keys),
        "--keys must be between 1 and {MAX_KEYS}"
    );
    ensure!(
        args.max_error_rate.is_finite() && (0.0..=1.0).contains(&args.max_error_rate),
        "--max-error-rate is a fraction between 0 and 1 (0.01 = 1 %)"
    );
    ensure!(args.timeout_ms >= 1, "--timeout-ms must be at least 1");
    let keys = u64::try_from(args.keys).context("--keys")?;
    let granted = keys
        .checked_mul(args.credits)
        .context("--keys × --credits is too large")?;
    let (mode, rate, load, concurrency) = match args.mode {
        ModeArg::Open => {
            let (rate, load) = match args.rate {
                Some(rate) => (rate, None),
                None => {
                    ensure!(
                        args.load.is_finite() && args.load > 0.0,
                        "--load must be a positive number"
                    );
                    let rate = Plan::rate_for(granted, args.cost, args.duration, args.load);
                    (rate as f64, Some(args.load))
                }
            };
            ensure!(
                rate.is_finite() && rate > 0.0,
                "--rate must be a positive number of requests per second"
            );
            let in_flight = args.concurrency.unwrap_or(DEFAULT_OPEN_MAX_IN_FLIGHT);
            ensure!(in_flight >= 1, "--concurrency must be at least 1");
            (
                Mode::Open { rate_per_sec: rate },
                Some(rate),
                load,
                in_flight,
            )
        }
        ModeArg::Closed => {
            let workers = args.concurrency.unwrap_or(DEFAULT_CLOSED_CONCURRENCY);
            ensure!(workers >= 1, "--concurrency must be at least 1");
            (
                Mode::Closed {
                    concurrency: workers,
                    think_time: None,
                },
                None,
                None,
                workers,
            )
        }
    };
    let plan = Plan {
        nodes: nodes.clone(),
        root_key,
        keys: Vec::new(),
        cost: args.cost,
        mode,
        stop: Stop::After(Duration::from_secs(args.duration)),
        node_choice: NodeChoice::Random { seed },
        request_timeout: Duration::from_millis(args.timeout_ms),
        max_in_flight: concurrency,
        keep_request_ids: false,
    };
    let scenario = Scenario {
        nodes,
        spawned,
        keys,
        credits_per_key: args.credits,
        cost: args.cost,
        mode: args.mode,
        rate_per_sec: rate,
        load,
        concurrency,
        duration_s: args.duration,
        seed,
        timeout_ms: args.timeout_ms,
        max_error_rate: args.max_error_rate,
    };
    Ok((plan, scenario))
}

/// Runs `creditgate loadtest`; returns the exit status (1: the run failed its checks,
/// 130: interrupted). Setup errors are errors.
pub async fn run_cli(args: LoadtestArgs) -> Result<ExitCode> {
    // A short random default seed is easy to type back in.
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let cluster = match args.spawn {
        Some(n) => {
            eprintln!("starting a local {n}-node cluster (own Redis, Postgres, ClickHouse)…");
            Some(start_cluster(n, args.root_key.clone()).await?)
        }
        None => None,
    };
    let (nodes, root_key) = match &cluster {
        Some(c) => (c.urls(), c.root_key.clone()),
        None => {
            let nodes = args
                .nodes
                .iter()
                .map(|u| u.trim().trim_end_matches('/').to_owned())
                .filter(|u| !u.is_empty())
                .collect();
            let root = args
                .root_key
                .clone()
                .filter(|k| !k.is_empty())
                .context("--nodes needs --root-key (or CREDITGATE_ROOT_KEY)")?;
            (nodes, root)
        }
    };

    let result = session(&args, nodes, root_key, seed, cluster.is_some()).await;

    if let Some(cluster) = cluster {
        eprintln!("stopping the local cluster…");
        if let Err(e) = cluster.shutdown().await {
            eprintln!("warning: stopping the local cluster: {e:#}");
        }
    }
    match result? {
        Finished::Interrupted => Ok(ExitCode::from(EXIT_INTERRUPTED)),
        Finished::Done { passed: true } => Ok(ExitCode::SUCCESS),
        Finished::Done { passed: false } => Ok(ExitCode::FAILURE),
    }
}

enum Finished {
    Done { passed: bool },
    Interrupted,
}

/// The API and keys a run created.
struct Setup {
    admin: Admin,
    api_id: String,
    key_ids: Vec<String>,
    secrets: Vec<String>,
}

/// Setup, run, read-back, teardown and outputs.
async fn session(
    args: &LoadtestArgs,
    nodes: Vec<String>,
    root_key: String,
    seed: u64,
    spawned: bool,
) -> Result<Finished> {
    let (mut plan, scenario) = plan_for(args, nodes, root_key, seed, spawned)?;
    eprintln!("{}", scenario.title());
    let api_name = format!("creditgate-loadtest-{seed:016x}");
    let setup = setup(
        &plan.nodes,
        &plan.root_key,
        &api_name,
        args.keys,
        args.credits,
    )
    .await?;
    eprintln!(
        "created API {} and {} key(s) through {}",
        setup.api_id,
        setup.key_ids.len(),
        setup.admin.base_url
    );
    plan.keys = setup.secrets.clone();

    let report = drive(&plan, scenario.duration_s as f64).await;
    let Some(report) = report else {
        eprintln!("interrupted");
        teardown(&setup, args.keep).await;
        return Ok(Finished::Interrupted);
    };
    let final_remaining = final_remaining(&setup).await;
    teardown(&setup, args.keep).await;

    let summary = Summary::new(&report, &scenario, final_remaining);
    let rows = table_rows(&report, &scenario, &summary);
    let title = scenario.title();
    print!("{}", format_table(&title, &rows));
    let _ = std::io::stdout().flush();

    if let Some(path) = &args.json {
        write_json(path, &report, &summary, &scenario)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.report {
        std::fs::write(path, html::render(&title, &report, &rows))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    for failure in &summary.failures {
        eprintln!("FAIL: {failure}");
    }
    Ok(Finished::Done {
        passed: summary.passed,
    })
}

/// The `--json` document: the [`Report`] and the [`Summary`] side by side at the top
/// level, and the scenario.
#[derive(Serialize)]
struct JsonOutput<'a> {
    #[serde(flatten)]
    report: &'a Report,
    #[serde(flatten)]
    summary: &'a Summary,
    scenario: &'a Scenario,
}

fn write_json(path: &Path, report: &Report, summary: &Summary, scenario: &Scenario) -> Result<()> {
    let doc = JsonOutput {
        report,
        summary,
        scenario,
    };
    let text = serde_json::to_string_pretty(&doc).context("serialising the report")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// An admin call bounded by [`ADMIN_CALL_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = Result<T, AdminError>>) -> Result<T> {
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("no answer within {ADMIN_CALL_TIMEOUT:?}"),
    }
}

/// Creates the API on the first node that accepts it, then the keys there.
async fn setup(
    nodes: &[String],
    root_key: &str,
    name: &str,
    keys: usize,
    credits: u64,
) -> Result<Setup> {
    let mut refused = Vec::new();
    for url in nodes {
        let admin = Admin::new(url, root_key);
        let api_id = match bounded(admin.create_api(name)).await {
            Ok(id) => id,
            Err(e) => {
                refused.push(format!("{url}: {e:#}"));
                continue;
            }
        };
        let mut setup = Setup {
            admin,
            api_id,
            key_ids: Vec::with_capacity(keys),
            secrets: Vec::with_capacity(keys),
        };
        match create_keys(&setup.admin, &setup.api_id, keys, credits).await {
            Ok(created) => {
                (setup.key_ids, setup.secrets) = created.into_iter().unzip();
                return Ok(setup);
            }
            Err(e) => {
                teardown(&setup, false).await;
                return Err(e.context(format!("creating keys through {url}")));
            }
        }
    }
    bail!("no node created the API:\n  {}", refused.join("\n  "))
}

async fn create_keys(
    admin: &Admin,
    api_id: &str,
    keys: usize,
    credits: u64,
) -> Result<Vec<(String, String)>> {
    let mut created = Vec::with_capacity(keys);
    let mut tasks = JoinSet::new();
    for i in 0..keys {
        if tasks.len() >= ADMIN_PARALLELISM {
            if let Some(done) = tasks.join_next().await {
                created.push(done??);
            }
        }
        let (admin, api_id) = (admin.clone(), api_id.to_owned());
        tasks.spawn(async move {
            bounded(admin.create_key(&api_id, Some(credits)))
                .await
                .with_context(|| format!("key {i}"))
        });
    }
    while let Some(done) = tasks.join_next().await {
        created.push(done??);
    }
    Ok(created)
}

/// Runs the plan with the progress line; `None` when interrupted by Ctrl-C.
async fn drive(plan: &Plan, duration_s: f64) -> Option<Report> {
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let painter = spawn_progress(progress_rx, stop_rx, duration_s);
    let report = tokio::select! {
        report = crate::run(plan, Some(progress_tx)) => Some(report),
        _ = tokio::signal::ctrl_c() => None,
    };
    let _ = stop_tx.send(());
    let _ = painter.await;
    report
}

/// Redraws the progress line on stderr: in place ~10 times a second on a terminal, one
/// line a second otherwise.
fn spawn_progress(
    progress: watch::Receiver<Progress>,
    mut stop: oneshot::Receiver<()>,
    duration_s: f64,
) -> JoinHandle<()> {
    let terminal = std::io::stderr().is_terminal();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Ticks until the next plain line (without a terminal).
        let mut until_line = 0u64;
        loop {
            let stopping = tokio::select! {
                _ = &mut stop => true,
                _ = tick.tick() => false,
            };
            let line = progress_line(&progress.borrow(), duration_s);
            let mut err = std::io::stderr().lock();
            if terminal {
                let _ = write!(err, "\r\x1b[2K{line}");
                if stopping {
                    let _ = writeln!(err);
                }
                let _ = err.flush();
            } else if stopping || until_line == 0 {
                let _ = writeln!(err, "{line}");
                until_line = PROGRESS_LINES_EVERY;
            }
            if stopping {
                break;
            }
            until_line -= 1;
        }
    })
}

/// Sum of the keys' `credits.remaining` via `keys.getKey` (`None` if any is unknown).
async fn final_remaining(setup: &Setup) -> Option<u64> {
    let mut tasks = JoinSet::new();
    let mut sum = Some(0u64);
    let mut add = |r: Result<Result<Option<u64>>, tokio::task::JoinError>| match r {
        Ok(Ok(Some(remaining))) => sum = sum.and_then(|s| s.checked_add(remaining)),
        Ok(Ok(None)) => sum = None,
        Ok(Err(e)) => {
            eprintln!("warning: keys.getKey: {e:#}");
            sum = None;
        }
        Err(e) => {
            eprintln!("warning: keys.getKey: {e}");
            sum = None;
        }
    };
    for key_id in &setup.key_ids {
        if tasks.len() >= ADMIN_PARALLELISM {
            if let Some(done) = tasks.join_next().await {
                add(done);
            }
        }
        let (admin, key_id) = (setup.admin.clone(), key_id.clone());
        tasks.spawn(async move {
            bounded(admin.remaining(&key_id))
                .await
                .with_context(|| format!("key {key_id}"))
        });
    }
    while let Some(done) = tasks.join_next().await {
        add(done);
    }
    sum
}

/// Deletes the API (and with it the keys) unless `keep`; failures are warnings.
async fn teardown(setup: &Setup, keep: bool) {
    if keep {
        eprintln!(
            "kept API {} and its {} key(s): {}",
            setup.api_id,
            setup.key_ids.len(),
            setup.key_ids.join(", ")
        );
        return;
    }
    if let Err(e) = bounded(setup.admin.delete_api(&setup.api_id)).await {
        eprintln!("warning: deleting API {}: {e:#}", setup.api_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadtestArgs,
    }

    fn parse(argv: &[&str]) -> Result<LoadtestArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadtest").chain(argv.iter().copied())).map(|c| c.args)
    }

    fn scenario(keys: u64, credits: u64, cost: u64) -> Scenario {
        Scenario {
            nodes: vec!["http://a".into()],
            spawned: false,
            keys,
            credits_per_key: credits,
            cost,
            mode: ModeArg::Open,
            rate_per_sec: Some(200.0),
            load: Some(2.0),
            concurrency: 1024,
            duration_s: 10,
            seed: 7,
            timeout_ms: 5000,
            max_error_rate: 0.01,
        }
    }

    #[test]
    fn expected_valid_caps_each_key() {
        assert_eq!(expected_valid(2000, 1, 1000, 1), 1000);
        assert_eq!(expected_valid(500, 1, 1000, 1), 500);
        assert_eq!(expected_valid(2000, 1, 1000, 3), 333);
        // 7 requests over 3 keys: 3, 2, 2 requests; cap 2 each.
        assert_eq!(expected_valid(7, 3, 2, 1), 6);
        // Cap 3: 3 + 2 + 2.
        assert_eq!(expected_valid(7, 3, 3, 1), 7);
        assert_eq!(expected_valid(0, 3, 3, 1), 0);
        assert_eq!(expected_valid(5, 0, 3, 1), 0);
    }

    #[test]
    fn over_spend_and_error_rate_fail_the_run() {
        let mut report = Report {
            requests: 2000,
            valid: 1000,
            usage_exceeded: 1000,
            ..Report::default()
        };
        let s = Summary::new(&report, &scenario(1, 1000, 1), Some(0));
        assert!(s.passed, "{s:?}");
        assert_eq!((s.expected_valid, s.over_spend), (1000, 0));
        assert_eq!(s.credit_accuracy, Some(1.0));

        report.valid = 1003;
        report.usage_exceeded = 997;
        let s = Summary::new(&report, &scenario(1, 1000, 1), Some(0));
        assert_eq!((s.over_spend, s.valid_minus_expected), (3, 3));
        assert!(!s.passed);
        assert!(s.failures[0].contains("over-spend: 3"), "{:?}", s.failures);

        report.valid = 1000;
        report.usage_exceeded = 979;
        report.errors.insert("timeout".into(), 21);
        let s = Summary::new(&report, &scenario(1, 1000, 1), Some(0));
        assert!(!s.passed);
        assert!(
            s.failures[0].contains("error rate 1.05 %"),
            "{:?}",
            s.failures
        );

        let s = Summary::new(&Report::default(), &scenario(1, 1000, 1), None);
        assert_eq!(s.failures, vec!["no request was sent".to_owned()]);
    }

    #[test]
    fn table_has_every_figure() {
        let mut report = Report {
            requests: 2000,
            valid: 1000,
            usage_exceeded: 999,
            min_remaining: Some(0),
            ..Report::default()
        };
        report.errors.insert("http 503".into(), 1);
        report.nodes.insert("http://a".into(), 2000);
        let sc = scenario(1, 1000, 1);
        let s = Summary::new(&report, &sc, Some(0));
        let rows = table_rows(&report, &sc, &s);
        let labels: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        for want in [
            "requests",
            "VALID",
            "USAGE_EXCEEDED",
            "other outcomes",
            "errors",
            "  error: http 503",
            "expected VALID",
            "credit accuracy",
            "over-spend",
            "throughput",
            "latency p50 / p95 / p99 / max",
            "requests to http://a",
            "final remaining",
            "result",
        ] {
            assert!(labels.contains(&want), "{want} missing from {labels:?}");
        }
        let table = format_table(&sc.title(), &rows);
        assert!(table.contains("reported 0 · keys.getKey 0"), "{table}");
        assert!(table.contains("PASS"), "{table}");
    }

    #[test]
    fn progress_line_shows_the_figures() {
        let p = Progress {
            elapsed_s: 5.0,
            requests: 1000,
            valid: 900,
            errors: 2,
            rps: 200.0,
            p99_ms: 3.25,
        };
        let line = progress_line(&p, 10.0);
        assert!(
            line.starts_with(&format!("[{}{}]", "█".repeat(12), "░".repeat(12))),
            "{line}"
        );
        for part in [
            "5.0/10 s",
            "200.0 req/s",
            "VALID     900",
            "errors     2",
            "p99    3.25 ms",
        ] {
            assert!(line.contains(part), "{part:?} in {line:?}");
        }
        // Past the end (waiting for the last answers) the bar stays full.
        let line = progress_line(
            &Progress {
                elapsed_s: 12.0,
                ..p
            },
            10.0,
        );
        assert!(line.starts_with(&format!("[{}]", "█".repeat(24))), "{line}");
    }

    #[test]
    fn arguments_parse_and_derive_the_plan() {
        let args = parse(&[
            "--nodes",
            "http://a:1/,http://b:2",
            "--root-key",
            "k",
            "--load",
            "2.0",
        ])
        .unwrap();
        assert_eq!(args.nodes, vec!["http://a:1/", "http://b:2"]);
        let (plan, sc) = plan_for(&args, args.nodes.clone(), "k".into(), 1, false).unwrap();
        assert_eq!(
            plan.mode,
            Mode::Open {
                rate_per_sec: 200.0
            }
        );
        assert_eq!(plan.stop, Stop::After(Duration::from_secs(10)));
        assert_eq!(plan.max_in_flight, DEFAULT_OPEN_MAX_IN_FLIGHT);
        assert_eq!(sc.rate_per_sec, Some(200.0));

        // The rate spends all keys' credits: 4 keys × 1000 in 10 s at load 1 → 400/s.
        let args = parse(&["--spawn", "3", "--keys", "4"]).unwrap();
        let (plan, _) = plan_for(&args, vec!["http://a".into()], "k".into(), 1, true).unwrap();
        assert_eq!(
            plan.mode,
            Mode::Open {
                rate_per_sec: 400.0
            }
        );

        let args = parse(&["--spawn", "1", "--rate", "50", "--load", "9"]).unwrap();
        let (plan, sc) = plan_for(&args, vec!["http://a".into()], "k".into(), 1, true).unwrap();
        assert_eq!(plan.mode, Mode::Open { rate_per_sec: 50.0 });
        assert_eq!(sc.load, None);

        let args = parse(&["--spawn", "1", "--mode", "closed"]).unwrap();
        let (plan, _) = plan_for(&args, vec!["http://a".into()], "k".into(), 1, true).unwrap();
        assert_eq!(
            plan.mode,
            Mode::Closed {
                concurrency: DEFAULT_CLOSED_CONCURRENCY,
                think_time: None
            }
        );

        assert!(
            parse(&["--credits", "5"]).is_err(),
            "--nodes or --spawn is required"
        );
        assert!(parse(&["--spawn", "2", "--nodes", "http://a"]).is_err());
        let args = parse(&["--spawn", "1", "--max-error-rate", "5"]).unwrap();
        assert!(plan_for(&args, vec!["http://a".into()], "k".into(), 1, true).is_err());
        let args = parse(&["--spawn", "1", "--cost", "0"]).unwrap();
        assert!(plan_for(&args, vec!["http://a".into()], "k".into(), 1, true).is_err());
    }
}
