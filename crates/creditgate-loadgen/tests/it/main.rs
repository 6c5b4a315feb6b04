//! The load generator's one test binary: runs against real in-process nodes, and the
//! HTML report.

mod loadgen;
mod report;
