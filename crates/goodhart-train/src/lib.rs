//! # goodhart-train
//!
//! Algorithms that tie the crates together, experiment configuration and run
//! directories.
//!
//! - [`run_dir`]: `runs/<name>/<id>/` with atomically written files.
//! - [`report`]: the self-contained `report.html` of a run (inline SVG charts, tables).

pub mod report;
pub mod run_dir;
