//! # goodhart-train
//!
//! Algorithms that tie the crates together, experiment configuration and run
//! directories.
//!
//! - [`run_dir`]: `runs/<name>/<id>/` with atomically written files.

pub mod run_dir;
