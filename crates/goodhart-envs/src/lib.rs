//! # goodhart-envs
//!
//! Tasks with a known gold reward and a hackable proxy.
//!
//! - [`tomato`]: the tomato-watering gridworld of "Correlated Proxies" (ORPO).

pub mod tomato;
