//! `creditgate`: the binary. Parses the command line, sets up logging, and hands over to
//! the server crate. No logic lives here.

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

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CREDITGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
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
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            init_logging(config.log_format);
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            creditgate_server::serve(listener, config, shutdown_signal()).await
        }
        Command::RootKey(RootKeyCommand::Create {
            permissions,
            workspace,
            name,
            store,
        }) => {
            init_logging(store.log_format);
            let permissions = permissions
                .iter()
                .map(|p| creditgate_server::parse_permission(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let secret =
                creditgate_server::create_root_key(&store, &workspace, permissions, name).await?;
            println!("{secret}");
            Ok(())
        }
    }
}
