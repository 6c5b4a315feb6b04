//! Running a [`Plan`].

use tokio::sync::watch;

use crate::{Plan, Report};

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

/// Runs `plan` to the end and reports. `progress` (if given) is updated about 10 times
/// a second.
pub async fn run(plan: &Plan, progress: Option<watch::Sender<Progress>>) -> Report {
    let _ = (plan, progress);
    Report::default()
}
