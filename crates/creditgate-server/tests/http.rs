//! HTTP-level integration tests of one creditgate node: every route over real HTTP, the
//! verification contract of DESIGN.md §2, refills across days and months, bad input,
//! exact balances under concurrency and across a graceful restart, and analytics rows.
//! Each test runs its own `TestApp` (see `http/support.rs`), so tests run in parallel.

#[path = "http/support.rs"]
mod support;

#[path = "http/alerts.rs"]
mod alerts;
#[path = "http/analytics.rs"]
mod analytics;
#[path = "http/bad_input.rs"]
mod bad_input;
#[path = "http/exactness.rs"]
mod exactness;
#[path = "http/fuzz.rs"]
mod fuzz;
#[path = "http/history.rs"]
mod history;
#[path = "http/holds.rs"]
mod holds;
#[path = "http/idempotency.rs"]
mod idempotency;
#[path = "http/identities.rs"]
mod identities;
#[path = "http/key_ratelimits.rs"]
mod key_ratelimits;
#[path = "http/limits.rs"]
mod limits;
#[path = "http/pools.rs"]
mod pools;
#[path = "http/ratelimit.rs"]
mod ratelimit;
#[path = "http/refill.rs"]
mod refill;
#[path = "http/reroll_migrate.rs"]
mod reroll_migrate;
#[path = "http/routes.rs"]
mod routes;
#[path = "http/usage.rs"]
mod usage;
#[path = "http/verify.rs"]
mod verify;
#[path = "http/webhooks.rs"]
mod webhooks;
