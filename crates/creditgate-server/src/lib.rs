//! The HTTP API of creditgate, wire-compatible with Unkey's v2 key routes: routes, wire
//! types, root-key auth, configuration, telemetry and the node lifecycle.
//! `serve(listener, config, shutdown)` runs one node on an already-bound listener.

pub mod app;
pub mod auth;
pub mod config;
pub mod context;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod parse;
pub mod routes;
pub mod state;
pub mod telemetry;
pub mod webhook_delivery;
pub mod wire;

pub use app::{create_root_key, router, serve, App, DEFAULT_WORKSPACE};
pub use config::{BackendFailure, LogFormat, ServeConfig};

/// Parses `api.*.<action>` / `api.<apiId>.<action>`.
pub fn parse_permission(s: &str) -> Result<creditgate_domain::Permission, String> {
    creditgate_domain::Permission::parse(s)
}
