//! # goodhart-objective
//!
//! Surrogate losses, generic over the burn backend, each a file named as the field names
//! it:
//!
//! - policy-gradient surrogates over `[B, T]` log-probs ([`policy::PolicyInputs`]):
//!   [`ppo_clip`] (asymmetric clip, dual-clip), [`gspo`] (sequence-level ratio),
//!   [`cispo`] (truncated detached IS weight); one [`policy::PolicyLossConfig`] picks one
//!   by `kind`, [`policy::REGISTRY`] lists them;
//! - [`nsr`]: negative / positive sample reinforcement as a mask transform usable with
//!   any policy loss;
//! - [`value`]: the critic loss with value clipping;
//! - [`preference`]: DPO, IPO, SLiC, RPO over per-sequence log-probs of (chosen,
//!   rejected) pairs, picked by [`preference::PreferenceLossConfig`], listed in
//!   [`preference::REGISTRY`].
//!
//! Every loss returns a differentiable one-element tensor and detached metrics; bad input
//! (shape mismatch, NaN at a counted position, out-of-range parameter) is a
//! [`goodhart_core::GoodhartError`], never a panic. Formulas, defaults and the library
//! each default follows: `docs/objective.md`.

pub mod cispo;
pub mod gspo;
pub mod nsr;
pub mod policy;
pub mod ppo_clip;
pub mod preference;
pub mod value;

pub use cispo::CispoConfig;
pub use gspo::GspoConfig;
pub use nsr::SampleFilter;
pub use policy::{PolicyInputs, PolicyLoss, PolicyLossConfig, PolicyMetrics};
pub use ppo_clip::PpoClipConfig;
pub use preference::{
    DpoConfig, IpoConfig, PreferenceInputs, PreferenceLoss, PreferenceLossConfig, RpoConfig,
    SlicConfig,
};
pub use value::{ValueLoss, ValueLossConfig};

#[cfg(test)]
mod testutil;
