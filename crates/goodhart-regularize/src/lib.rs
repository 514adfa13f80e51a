//! Regularisers: KL estimators and controllers, entropy, chi-squared occupancy, GARDO, constraints.

pub mod controller;
pub mod entropy;
pub mod kl;
pub mod occupancy;
