//! The binary's integration tests, one test binary: the real `creditgate` as child
//! processes (embedded default, restarts, CLI, SDK), `creditgate loadtest`, and the
//! multi-node tests with faults.

mod alerts;
mod faults;
mod history;
mod holds;
mod idempotency;
mod loadtest;
mod multinode;
mod pools;
mod process;
mod ratelimit;
mod rediscluster;
mod support;
mod usage;
