//! `creditgate`: the binary. Parses the command line, sets up logging, and hands over to
//! the server crate (`serve`, `root-key`), the testkit (`cluster`) or the load generator
//! (`loadtest`). No logic lives here.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use creditgate_server::{LogFormat, ServeConfig, DEFAULT_WORKSPACE};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "creditgate",
    version,
    about = "API keys with exact credit balances, Unkey v2 compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node (embedded default: SQLite in --data-dir, in-process hot store).
    Serve(ServeConfig),
    /// Manage root keys.
    #[command(subcommand)]
    RootKey(RootKeyCommand),
    /// Start a local cluster of N nodes (child processes of this binary) with its own
    /// Redis, Postgres and ClickHouse; print the node URLs and the root key; stop
    /// everything on Ctrl-C.
    Cluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Root key of the cluster (default: a fresh one, printed).
        #[arg(long, env = "CREDITGATE_ROOT_KEY", hide_env_values = true)]
        root_key: Option<String>,
    },
    /// Drive nodes (--nodes, or a local --spawn N cluster) with verifications of keys with
    /// credits; print a table, write JSON and an HTML report; exit 1 on over-spend or too
    /// many errors.
    Loadtest(creditgate_loadgen::loadtest::LoadtestArgs),
}

#[derive(Debug, Subcommand)]
enum RootKeyCommand {
    /// Create a root key with the given permissions and print its secret once.
    Create {
        /// A permission such as api.*.verify_key or api.<apiId>.read_key (repeatable).
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
        /// Workspace of the new key.
        #[arg(long, default_value = DEFAULT_WORKSPACE)]
        workspace: String,
        /// A name for the key.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: ServeConfig,
    },
}

/// Logs to stderr; `CREDITGATE_LOG` overrides `default_filter`.
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_env("CREDITGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            init_logging(config.log_format, "info,sqlx=warn");
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            creditgate_server::serve(listener, config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RootKey(RootKeyCommand::Create {
            permissions,
            workspace,
            name,
            store,
        }) => {
            init_logging(store.log_format, "info,sqlx=warn");
            let permissions = permissions
                .iter()
                .map(|p| creditgate_server::parse_permission(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let secret =
                creditgate_server::create_root_key(&store, &workspace, permissions, name).await?;
            println!("{secret}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster { nodes, root_key } => {
            init_logging(LogFormat::Pretty, "warn");
            eprintln!("starting {nodes} node(s) with their own Redis, Postgres and ClickHouse…");
            let cluster = creditgate_loadgen::loadtest::start_cluster(nodes, root_key).await?;
            for node in &cluster.nodes {
                println!("{}  {}", node.node_id, node.url);
            }
            println!("root key  {}", cluster.root_key);
            println!(
                "try: creditgate loadtest --nodes {} --root-key {}",
                cluster.urls().join(","),
                cluster.root_key
            );
            eprintln!("Ctrl-C stops the cluster");
            shutdown_signal().await;
            cluster.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadtest(args) => {
            init_logging(LogFormat::Pretty, "warn");
            creditgate_loadgen::loadtest::run_cli(args).await
        }
    }
}
