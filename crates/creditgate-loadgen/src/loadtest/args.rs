//! The arguments of `creditgate loadtest` and the [`Plan`] and [`Scenario`] they make.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use super::summary::Scenario;
use crate::{Mode, NodeChoice, Plan, Stop};

/// Workers of a closed-loop run without `--concurrency`.
pub const DEFAULT_CLOSED_CONCURRENCY: usize = 32;
/// Requests in flight at most in an open-loop run without `--concurrency`.
pub const DEFAULT_OPEN_MAX_IN_FLIGHT: usize = 1024;
/// Upper bound of `--keys`.
pub const MAX_KEYS: usize = 100_000;
/// Upper bound of `--spawn`.
pub const MAX_SPAWNED_NODES: usize = 32;

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

/// The plan of a run and the scenario it reports, from validated arguments.
pub(super) fn plan_for(
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
