//! The suite's one test binary: the generated matrix, accuracy and decrement tables,
//! performance.

mod accuracy;
mod generated;
mod performance;
