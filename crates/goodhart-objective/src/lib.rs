//! # goodhart-objective
//!
//! Surrogate losses, generic over the burn backend, each a file named as the field names
//! it:
//!
//! - policy-gradient surrogates over `[B, T]` log-probs ([`policy::PolicyInputs`]):
//!   [`ppo_clip`] (asymmetric clip, dual-clip), [`gspo`] (sequence-level ratio),
//!   [`cispo`] (truncated detached IS weight), [`sapo`] (soft gate), [`clip_cov`] and
//!   [`kl_cov`] (covariance-selected tokens), [`geo_mean`] (GMPO), [`dppo`] (divergence
//!   trust region, `dppo_tv` / `dppo_kl`), [`turn_clip`] (A2TGPO's turn-level ratio and
//!   per-turn clip range, `a2tgpo_clip`); one [`policy::PolicyLossConfig`] picks one by
//!   `kind`, [`policy::REGISTRY`] lists them;
//! - [`rollout_is`]: truncated importance weights between the rollout engine and the
//!   trainer, which every policy loss applies per token;
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
pub mod clip_cov;
pub mod dppo;
pub mod geo_mean;
pub mod gspo;
pub mod kl_cov;
pub mod nsr;
pub mod policy;
pub mod ppo_clip;
pub mod preference;
pub mod rollout_is;
pub mod sapo;
pub mod turn_clip;
pub mod value;

pub use cispo::CispoConfig;
pub use clip_cov::ClipCovConfig;
pub use dppo::DppoConfig;
pub use geo_mean::GeoMeanConfig;
pub use gspo::GspoConfig;
pub use kl_cov::KlCovConfig;
pub use nsr::SampleFilter;
pub use policy::{PolicyInputs, PolicyLoss, PolicyLossConfig, PolicyMetrics};
pub use ppo_clip::PpoClipConfig;
pub use preference::{
    DpoConfig, IpoConfig, PreferenceInputs, PreferenceLoss, PreferenceLossConfig, RpoConfig,
    SlicConfig,
};
pub use rollout_is::{IsLevel, RolloutIsConfig, RolloutIsWeights};
pub use sapo::SapoConfig;
pub use value::{ValueLoss, ValueLossConfig};

#[cfg(test)]
mod testutil;
#[cfg(test)]
mod verl_parity;
