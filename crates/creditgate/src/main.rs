//! `creditgate`: the binary. Parses the command line, sets up logging, and hands over to
//! the server crate (`serve`, `root-key`), the local-process supervisor (`cluster`,
//! `loadtest --spawn`) or the load generator (`loadtest`). No logic lives here.

use std::process::ExitCode;

use anyhow::{ensure, Context};
use clap::{Parser, Subcommand};
use creditgate_loadgen::loadtest::{Target, MAX_SPAWNED_NODES};
use creditgate_local::{LocalCluster, LocalClusterOptions};
use creditgate_server::{LogFormat, ServeConfig, DEFAULT_WORKSPACE};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: the request path allocates and frees many small
/// buffers across worker threads, where glibc spent about a fifth of a verification's
/// instructions (callgrind) and mimalloc's thread-local free lists cost a fraction.
/// With the `override` feature mimalloc also answers C's `malloc`/`free` in this binary,
/// so SQLite's allocations (the analytics row writer binds thousands of values per
/// batch, each copied into a buffer of its own) take the same fast path: embedded on one
/// key, the node's CPU per verification fell 6–11 % (three alternated runs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Run the hot store on a local Redis Cluster of this many masters (3 to 16),
        /// each with one replica, instead of one Redis.
        #[arg(long)]
        redis_cluster_shards: Option<usize>,
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

/// Starts a local `nodes`-node cluster with its own Redis, Postgres and ClickHouse; the
/// nodes are child processes of this executable. `root_key`: default a fresh one.
async fn start_local_cluster(
    nodes: usize,
    root_key: Option<String>,
    redis_cluster_shards: Option<usize>,
) -> anyhow::Result<LocalCluster> {
    ensure!(
        (1..=MAX_SPAWNED_NODES).contains(&nodes),
        "the node count must be between 1 and {MAX_SPAWNED_NODES}, not {nodes}"
    );
    if let Some(shards) = redis_cluster_shards {
        ensure!(
            (3..=16).contains(&shards),
            "--redis-cluster-shards must be between 3 and 16 (Redis Cluster needs 3 masters), not {shards}"
        );
    }
    let binary = std::env::current_exe().context("locating the creditgate binary")?;
    let mut options = LocalClusterOptions::new(nodes, binary);
    options.redis_cluster_shards = redis_cluster_shards;
    if let Some(key) = root_key.filter(|k| !k.is_empty()) {
        options.root_key = key;
    }
    tokio::task::spawn_blocking(move || LocalCluster::start(options))
        .await
        .context("the cluster start task failed")?
        .context("starting the local cluster")
}

/// Stops the nodes gracefully (bounded), then the services.
async fn stop_local_cluster(cluster: LocalCluster) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .context("the cluster stop task failed")?
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let workers = match &cli.command {
        Command::Serve(config) => config.workers,
        _ => None,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        ensure!(
            (1..=256).contains(&n),
            "--workers must be between 1 and 256, not {n}"
        );
        runtime.worker_threads(n);
    }
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
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
        Command::Cluster {
            nodes,
            root_key,
            redis_cluster_shards,
        } => {
            init_logging(LogFormat::Pretty, "warn");
            let redis = match redis_cluster_shards {
                Some(n) => format!("a Redis Cluster of {n} masters and {n} replicas"),
                None => "Redis".to_owned(),
            };
            eprintln!("starting {nodes} node(s) with their own {redis}, Postgres and ClickHouse…");
            let cluster = start_local_cluster(nodes, root_key, redis_cluster_shards).await?;
            if let Some(rc) = cluster.redis_cluster() {
                println!("redis cluster  {}", rc.seeds().join(","));
            }
            for node in cluster.nodes() {
                println!("{}  {}", node.node_id().unwrap_or("node"), node.url());
            }
            println!("root key  {}", cluster.root_key());
            println!(
                "try: creditgate loadtest --nodes {} --root-key {}",
                cluster.urls().join(","),
                cluster.root_key()
            );
            eprintln!("Ctrl-C stops the cluster");
            shutdown_signal().await;
            stop_local_cluster(cluster).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadtest(args) => {
            init_logging(LogFormat::Pretty, "warn");
            let Some(n) = args.spawn else {
                let target = Target::from_args(&args)?;
                return creditgate_loadgen::loadtest::run_cli(args, target).await;
            };
            eprintln!("starting a local {n}-node cluster (own Redis, Postgres, ClickHouse)…");
            let cluster = start_local_cluster(n, args.root_key.clone(), None).await?;
            let target = Target {
                nodes: cluster.urls(),
                root_key: cluster.root_key().to_owned(),
                spawned: true,
            };
            let result = creditgate_loadgen::loadtest::run_cli(args, target).await;
            eprintln!("stopping the local cluster…");
            if let Err(e) = stop_local_cluster(cluster).await {
                eprintln!("warning: stopping the local cluster: {e:#}");
            }
            result
        }
    }
}
