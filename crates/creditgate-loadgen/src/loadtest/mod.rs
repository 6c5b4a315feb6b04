//! `creditgate loadtest`: options, setup, the live progress line, the final table, JSON and HTML outputs, exit status.
//!
//! One run: take the node URLs ([`Target`]: `--nodes` of an existing deployment, or the
//! local cluster the binary started for `--spawn N`; this crate never starts processes),
//! create an API and `--keys` keys of
//! `--credits` each through the public API, drive them with [`crate::run`] while a
//! progress line redraws on stderr, read every key's balance back with `keys.getKey`,
//! delete the API (unless `--keep`), print the table on stdout and write `--json` /
//! `--report`. The exit status is 1 when credits were over-spent, the error rate is above
//! `--max-error-rate`, or nothing was sent.

mod args;
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
pub use progress::progress_line;
pub use summary::{expected_valid, format_table, table_rows, Scenario, Summary};

use args::plan_for;
use progress::drive;
use setup::{final_remaining, setup, teardown};

use crate::{html, Report};

/// Exit status when the run was interrupted by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

/// The nodes a run drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Base URLs of the nodes.
    pub nodes: Vec<String>,
    /// A root key with permission to create APIs and keys and to verify.
    pub root_key: String,
    /// The nodes are a local cluster started for this run (`--spawn`).
    pub spawned: bool,
}

impl Target {
    /// The `--nodes` and `--root-key` of an existing deployment.
    pub fn from_args(args: &LoadtestArgs) -> Result<Self> {
        let nodes = args
            .nodes
            .iter()
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let root_key = args
            .root_key
            .clone()
            .filter(|k| !k.is_empty())
            .context("--nodes needs --root-key (or CREDITGATE_ROOT_KEY)")?;
        Ok(Self {
            nodes,
            root_key,
            spawned: false,
        })
    }
}

/// Runs `creditgate loadtest` against `target`; returns the exit status (1: the run
/// failed its checks, 130: interrupted). Setup errors are errors.
pub async fn run_cli(args: LoadtestArgs, target: Target) -> Result<ExitCode> {
    // A short random default seed is easy to type back in.
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    let result = session(&args, target.nodes, target.root_key, seed, target.spawned).await;
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
