//! The generated matrix: one test per row of `src/cases.rs` (see `build.rs`).

include!(concat!(env!("OUT_DIR"), "/generated.rs"));
