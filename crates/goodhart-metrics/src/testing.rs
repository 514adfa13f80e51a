//! Test helpers (compiled only for tests).

use goodhart_core::seed::ChaCha8Rng;
use rand::RngExt as _;

/// A standard normal draw (Box-Muller), for synthetic data with seeded noise.
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
