//! `creditgate loadtest`: options, setup, the live progress line, the final table, JSON and HTML outputs, exit status.
//!
//! One run: pick the nodes (`--nodes` of an existing deployment, or `--spawn N` local
//! nodes on their own Redis, Postgres and ClickHouse), create an API and `--keys` keys of
//! `--credits` each through the public API, drive them with [`crate::run`] while a
//! progress line redraws on stderr, read every key's balance back with `keys.getKey`,
//! delete the API (unless `--keep`), print the table on stdout and write `--json` /
//! `--report`. The exit status is 1 when credits were over-spent, the error rate is above
//! `--max-error-rate`, or nothing was sent.

mod args;
mod cluster;
mod progress;
mod setup;
mod summary;

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;

pub use args::{
    LoadtestArgs, ModeArg, DEFAULT_CLOSED_CONCURRENCY, DEFAULT_OPEN_MAX_IN_FLIGHT, MAX_KEYS,
    MAX_SPAWNED_NODES,
};
pub use cluster::start_cluster;
pub use progress::progress_line;
pub use summary::{expected_valid, format_table, table_rows, Scenario, Summary};

use args::plan_for;
use progress::drive;
use setup::{final_remaining, setup, teardown};

use crate::{html, Report};

/// Exit status when the run was interrupted by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

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
