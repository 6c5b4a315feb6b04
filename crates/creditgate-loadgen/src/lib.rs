//! Load generation against creditgate (or any Unkey-v2-compatible) nodes, shared by the
//! multi-node suite and `creditgate loadtest`: open loop (paced arrivals, latency measured
//! from the intended send time, so no coordinated omission) or closed loop (a fixed
//! number of busy workers), node balancing, and the statistics of a run.

pub mod admin;
pub mod html;
pub mod loadtest;
pub mod plan;
pub mod report;
pub mod run;

pub use admin::{Admin, AdminError};
pub use plan::{Mode, NodeChoice, Plan, Stop};
pub use report::{LatencyMs, Report, Second};
pub use run::{run, Progress};
