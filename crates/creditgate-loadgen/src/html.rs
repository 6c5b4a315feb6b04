//! The self-contained HTML report of a run (inline SVG plots, no network).
