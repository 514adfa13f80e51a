//! # goodhart-envs
//!
//! Tasks with a known gold reward and a hackable proxy.
//!
//! - [`tomato`]: the tomato-watering gridworld of "Correlated Proxies" (ORPO).
//! - [`language`]: a synthetic preference language with a known generator and gold reward
//!   (in the spirit of Gao et al.'s overoptimisation setting).

pub mod language;
pub mod tomato;
