//! # goodhart-metrics
//!
//! Metrics and diagnostics: measure the proxy-gold gap, fit the known overoptimisation
//! laws to it, and detect its onset.
//!
//! - [`step`]: per-step metrics of a batch (KL, entropy, rewards per source, gap,
//!   correlations, lengths, zero-std groups, ensemble disagreement), as a flat map.
//! - [`stats`]: summaries and Pearson / Spearman correlation on plain series.
//! - [`overopt`]: Gao et al.'s best-of-n and RL laws, best-of-n KL, unbiased best-of-n.

pub mod detect;
pub mod effective_rank;
pub mod evaluate;
pub mod hacking;
pub mod ope;
pub mod overopt;
pub mod pass_at_k;
pub mod stats;
pub mod step;
pub mod win_rate;

#[cfg(test)]
mod testing;
