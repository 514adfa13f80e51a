//! # goodhart-core
//!
//! What every goodhart crate speaks: the [`RolloutBatch`](batch::RolloutBatch) an RL step
//! passes along, explicit [`Groups`](groups::Groups), the [`GoodhartError`] type, the
//! seeding story ([`seed`]), masked and grouped statistics ([`ops`]), loss aggregation
//! ([`aggregate`]), run-time backend selection ([`device`]) and the backend test macro
//! ([`backend_test!`], [`testing`]).
//!
//! Backends are cargo features: `ndarray` (default), `wgpu`, `cuda`.

pub mod aggregate;
pub mod batch;
pub mod device;
pub mod error;
pub mod groups;
#[cfg(test)]
mod kernel_tests;
pub mod ops;
pub mod params;
pub mod registry;
pub mod seed;
#[cfg(any(feature = "ndarray", feature = "wgpu", feature = "cuda"))]
pub mod testing;

pub use burn;
pub use error::{GoodhartError, Result};
