//! Reward shaping: named transforms of a proxy reward before the RL step.
//!
//! Fu et al. (2025, "Reward Shaping to Mitigate Reward Hacking in RLHF") compare the
//! transforms below and derive three principles: the RL reward should be bounded, grow
//! fast at first and then converge, and be a function of a *centred* reward. Their
//! proposal, PAR ("Preference As Reward"), is the sigmoid of the gap to reference
//! responses' rewards. Conventions (running statistics, the LSC percentile, the ceiling)
//! follow the paper's public code (`PorUna-byte/PAR`, `reward_shaper.py`).
//!
//! | kind | shaped reward | needs |
//! |---|---|---|
//! | `par` | `(1/M) sum_m sigmoid(k (r - r_ref,m))` | references |
//! | `centred` | `mean_m (r - r_ref,m)` | references |
//! | `meanstd` | `(r - mu) / sigma`, running `mu`, `sigma` | state |
//! | `clip` | `clamp(r, mu - sigma, mu + sigma)`, running | state |
//! | `minmax` | `(r - min) / max(max - min, 1e-8)`, running | state |
//! | `ceil` | `min(r, value)` | |
//! | `lsc` | `log sigmoid(r - q)`, `q = mean_ref + 1.0364 std_ref` (85th percentile of a Normal fitted to the references) | references |
//! | `tanh` | `tanh(r)`, or `mean_m tanh(r - r_ref,m)` when `centred` | (references) |
//!
//! References are the rewards of `M` reference responses to each response's prompt
//! (e.g. from the SFT policy), `[N, M]`, one row per response. The running statistics
//! are updated with the batch *before* it is transformed (as the PAR code does), with
//! Chan et al.'s parallel merge and the population variance floored at `1e-8`.
//!
//! For environments, [`potential_shaping`] adds `gamma Phi(s') - Phi(s)` (Ng, Harada and
//! Russell 1999), which leaves optimal policies unchanged.

use burn::tensor::{
    activation::{log_sigmoid, sigmoid},
    backend::Backend,
    cast::ToElement,
    Tensor,
};
use goodhart_core::{
    ops::{check_finite, check_finite_masked, check_same_shape, zero_masked},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// The 85th percentile of the standard Normal, `Phi^{-1}(0.85)` (LSC's `q`).
pub const NORMAL_85TH_PERCENTILE: f64 = 1.036_433_389_493_789_8;

/// A shaping transform and its settings (TOML: `kind = "par"`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShapingConfig {
    /// PAR: `(1/M) sum_m sigmoid(k (r - r_ref,m))`, bounded in `(0, 1)` and increasing in
    /// `r` (Fu et al. 2025).
    Par {
        /// At most this many reference rewards per response are used (the first
        /// columns); the paper's default is 10 and finds one enough.
        #[serde(default = "default_m")]
        m: usize,
        /// Sigmoid slope `k` (paper default 1).
        #[serde(default = "default_k")]
        k: f32,
    },
    /// `mean_m (r - r_ref,m)`: the reward centred on the references' mean.
    Centred {
        /// At most this many reference rewards (default 10).
        #[serde(default = "default_m")]
        m: usize,
    },
    /// `(r - mu) / sigma` with running mean and population std.
    Meanstd,
    /// `clamp(r, mu - sigma, mu + sigma)` with running mean and population std.
    Clip,
    /// `(r - min) / max(max - min, 1e-8)` with the running minimum and maximum: the range
    /// seen so far maps to `[0, 1]`.
    Minmax,
    /// `min(r, value)`: a fixed ceiling (the PAR code's `reward_ceil`).
    Ceil {
        /// The ceiling.
        value: f32,
    },
    /// LSC: `log sigmoid(r - q)`, `q` the 85th percentile of a Normal fitted to the
    /// response's reference rewards (mean + 1.0364 population std).
    Lsc {
        /// At most this many reference rewards (default 10).
        #[serde(default = "default_m")]
        m: usize,
    },
    /// `tanh(r)`, or `mean_m tanh(r - r_ref,m)` when `centred`.
    Tanh {
        /// Centre on the references first (PAR code's `reward_centered`).
        #[serde(default)]
        centred: bool,
        /// At most this many reference rewards when centred (default 10).
        #[serde(default = "default_m")]
        m: usize,
    },
}

fn default_m() -> usize {
    10
}

fn default_k() -> f32 {
    1.0
}

impl ShapingConfig {
    /// PAR with the paper's defaults (`M = 10`, `k = 1`).
    pub fn par() -> Self {
        Self::Par {
            m: default_m(),
            k: default_k(),
        }
    }

    /// The registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Par { .. } => "par",
            Self::Centred { .. } => "centred",
            Self::Meanstd => "meanstd",
            Self::Clip => "clip",
            Self::Minmax => "minmax",
            Self::Ceil { .. } => "ceil",
            Self::Lsc { .. } => "lsc",
            Self::Tanh { .. } => "tanh",
        }
    }

    /// Whether the transform reads reference rewards.
    pub fn needs_references(&self) -> bool {
        matches!(
            self,
            Self::Par { .. }
                | Self::Centred { .. }
                | Self::Lsc { .. }
                | Self::Tanh { centred: true, .. }
        )
    }
}

/// Running count, mean and sum of squared deviations (Chan et al.'s parallel update).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningMeanStd {
    /// Values seen.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// Their sum of squared deviations from the mean.
    pub m2: f64,
}

impl RunningMeanStd {
    /// Merges a batch with `n` values, mean `mean` and population variance `var`.
    pub fn update(&mut self, n: u64, mean: f64, var: f64) {
        if n == 0 {
            return;
        }
        let total = self.count + n;
        let delta = mean - self.mean;
        self.m2 += var * n as f64 + delta * delta * (self.count as f64) * (n as f64) / total as f64;
        self.mean += delta * n as f64 / total as f64;
        self.count = total;
    }

    /// Population variance, floored at `1e-8`; 1 before any update (PAR code).
    pub fn var(&self) -> f64 {
        if self.count == 0 {
            1.0
        } else {
            (self.m2 / self.count as f64).max(1e-8)
        }
    }

    /// `sqrt(var())`.
    pub fn std(&self) -> f64 {
        self.var().sqrt()
    }
}

/// Running minimum and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningMinMax {
    /// Smallest value seen, if any.
    pub min: Option<f64>,
    /// Largest value seen, if any.
    pub max: Option<f64>,
}

/// A shaping transform with its running state (for `meanstd`, `clip`, `minmax`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shaper {
    /// The transform.
    pub config: ShapingConfig,
    /// Running mean / std (`meanstd`, `clip`).
    pub moments: RunningMeanStd,
    /// Running range (`minmax`).
    pub range: RunningMinMax,
}

impl Shaper {
    /// A shaper with fresh running state.
    pub fn new(config: ShapingConfig) -> Self {
        Self {
            config,
            moments: RunningMeanStd::default(),
            range: RunningMinMax::default(),
        }
    }

    /// Shapes `rewards [N]`; `references [N, M]` holds each response's reference rewards
    /// (required by `par`, `centred`, `lsc` and centred `tanh`, ignored otherwise).
    /// Updates the running state first for `meanstd`, `clip` and `minmax`.
    ///
    /// Errors on an empty batch, a non-finite reward or reference, missing or
    /// mismatched references, `m = 0` or a non-finite `k` / ceiling.
    pub fn apply<B: Backend>(
        &mut self,
        rewards: Tensor<B, 1>,
        references: Option<&Tensor<B, 2>>,
    ) -> Result<Tensor<B, 1>> {
        let n = rewards.dims()[0];
        if n == 0 {
            return Err(GoodhartError::Empty {
                what: "rewards".into(),
            });
        }
        check_finite(&rewards, "rewards")?;
        let refs = |m: usize| references_for(self.config.name(), references, n, m);
        Ok(match self.config {
            ShapingConfig::Par { m, k } => {
                if !k.is_finite() {
                    return Err(GoodhartError::invalid("par.k", "must be finite"));
                }
                let gaps = gaps(rewards, refs(m)?);
                sigmoid(gaps * k).mean_dim(1).reshape([n])
            }
            ShapingConfig::Centred { m } => gaps(rewards, refs(m)?).mean_dim(1).reshape([n]),
            ShapingConfig::Lsc { m } => {
                let r = refs(m)?;
                let m = r.dims()[1] as f32;
                let mean = r.clone().mean_dim(1);
                let var = (r - mean.clone()).powi_scalar(2).sum_dim(1) / m;
                let q = mean + var.sqrt() * NORMAL_85TH_PERCENTILE;
                log_sigmoid(rewards - q.reshape([n]))
            }
            ShapingConfig::Tanh { centred, m } => {
                if centred {
                    gaps(rewards, refs(m)?).tanh().mean_dim(1).reshape([n])
                } else {
                    rewards.tanh()
                }
            }
            ShapingConfig::Ceil { value } => {
                if !value.is_finite() {
                    return Err(GoodhartError::invalid("ceil.value", "must be finite"));
                }
                rewards.clamp_max(value)
            }
            ShapingConfig::Meanstd => {
                self.update_moments(&rewards);
                (rewards - self.moments.mean as f32) / self.moments.std() as f32
            }
            ShapingConfig::Clip => {
                self.update_moments(&rewards);
                let (mu, sd) = (self.moments.mean, self.moments.std());
                rewards.clamp((mu - sd) as f32, (mu + sd) as f32)
            }
            ShapingConfig::Minmax => {
                let lo = rewards.clone().min().into_scalar().to_f64();
                let hi = rewards.clone().max().into_scalar().to_f64();
                let min = self.range.min.map_or(lo, |m| m.min(lo));
                let max = self.range.max.map_or(hi, |m| m.max(hi));
                self.range = RunningMinMax {
                    min: Some(min),
                    max: Some(max),
                };
                (rewards - min as f32) / (max - min).max(1e-8) as f32
            }
        })
    }

    fn update_moments<B: Backend>(&mut self, rewards: &Tensor<B, 1>) {
        let n = rewards.dims()[0];
        let mean = rewards.clone().mean();
        let var = (rewards.clone() - mean.clone()).powi_scalar(2).mean();
        self.moments.update(
            n as u64,
            mean.into_scalar().to_f64(),
            var.into_scalar().to_f64(),
        );
    }
}

/// The first `min(m, M)` columns of the references, checked.
fn references_for<B: Backend>(
    method: &str,
    references: Option<&Tensor<B, 2>>,
    n: usize,
    m: usize,
) -> Result<Tensor<B, 2>> {
    let r = references.ok_or_else(|| {
        GoodhartError::invalid(
            "references",
            format!("`{method}` needs reference rewards [N, M]"),
        )
    })?;
    let [rn, rm] = r.dims();
    if rn != n {
        return Err(GoodhartError::shape(
            "references (one row per reward)",
            &[n, rm],
            &[rn, rm],
        ));
    }
    if rm == 0 || m == 0 {
        return Err(GoodhartError::Empty {
            what: format!("references of `{method}` (M = {rm}, m = {m})"),
        });
    }
    check_finite(r, "references")?;
    Ok(r.clone().narrow(1, 0, m.min(rm)))
}

/// `r - r_ref` as `[N, M]`.
fn gaps<B: Backend>(rewards: Tensor<B, 1>, refs: Tensor<B, 2>) -> Tensor<B, 2> {
    rewards.unsqueeze_dim(1) - refs
}

/// Potential-based shaping (Ng, Harada and Russell 1999):
/// `r'_t = r_t + gamma Phi(s_{t+1}) - Phi(s_t)` on valid steps, 0 elsewhere.
///
/// `rewards [N, T]`, `potentials [N, T + 1]` (`Phi(s_0) .. Phi(s_T)`; pass `Phi = 0`
/// for terminal states so the shaping telescopes to `-Phi(s_0)` plus discounting),
/// `mask [N, T]`. Optimal policies are unchanged by this shaping. Errors on mismatched
/// shapes or non-finite values on valid steps.
pub fn potential_shaping<B: Backend>(
    rewards: Tensor<B, 2>,
    potentials: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    gamma: f32,
) -> Result<Tensor<B, 2>> {
    check_same_shape(mask, "mask", &rewards, "rewards")?;
    let [n, t] = rewards.dims();
    if potentials.dims() != [n, t + 1] {
        return Err(GoodhartError::shape(
            "potentials",
            &[n, t + 1],
            &potentials.dims(),
        ));
    }
    if !(0.0..=1.0).contains(&gamma) {
        return Err(GoodhartError::invalid(
            "gamma",
            format!("must lie in [0, 1], got {gamma}"),
        ));
    }
    check_finite_masked(&rewards, mask, "rewards")?;
    let phi = potentials.clone().narrow(1, 0, t);
    let phi_next = potentials.narrow(1, 1, t);
    check_finite_masked(&phi, mask, "potentials")?;
    check_finite_masked(&phi_next, mask, "potentials")?;
    Ok(zero_masked(rewards + phi_next * gamma - phi, mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};
    use proptest::test_runner::{Config, TestRunner};

    fn sig(x: f32) -> f32 {
        1.0 / (1.0 + (-x).exp())
    }

    goodhart_core::backend_test! {
        fn reference_transforms_match_hand_values<B>(device) {
            let tol = tolerance(1e-5);
            let r = Tensor::<B, 1>::from_floats([1.0, -1.0], device);
            let refs = Tensor::<B, 2>::from_floats([[0.0, 2.0], [-1.0, 1.0]], device);
            // PAR k=1: (sig(1) + sig(-1))/2 = 0.5 ; (sig(0) + sig(-2))/2
            let par = Shaper::new(ShapingConfig::par()).apply(r.clone(), Some(&refs)).unwrap();
            assert_close(&values(par), &[0.5, (0.5 + sig(-2.0)) / 2.0], tol);
            // k = 2: (sig(2) + sig(-2))/2 = 0.5 ; (sig(0) + sig(-4))/2
            let par2 = Shaper::new(ShapingConfig::Par { m: 10, k: 2.0 }).apply(r.clone(), Some(&refs)).unwrap();
            assert_close(&values(par2), &[0.5, (0.5 + sig(-4.0)) / 2.0], tol);
            // m = 1 keeps only the first reference: sig(1 - 0), sig(-1 + 1)
            let par1 = Shaper::new(ShapingConfig::Par { m: 1, k: 1.0 }).apply(r.clone(), Some(&refs)).unwrap();
            assert_close(&values(par1), &[sig(1.0), 0.5], tol);
            // centred: 1 - mean(0, 2) = 0 ; -1 - mean(-1, 1) = -1
            let c = Shaper::new(ShapingConfig::Centred { m: 10 }).apply(r.clone(), Some(&refs)).unwrap();
            assert_close(&values(c), &[0.0, -1.0], tol);
            // LSC: refs (0,2): mean 1, population std 1, q = 2.0364; refs (-1, 1): q = 1.0364
            let lsc = Shaper::new(ShapingConfig::Lsc { m: 10 }).apply(r.clone(), Some(&refs)).unwrap();
            let q = NORMAL_85TH_PERCENTILE as f32;
            assert_close(&values(lsc), &[sig(1.0 - (1.0 + q)).ln(), sig(-1.0 - q).ln()], tol);
            // tanh: plain, and centred mean(tanh(1), tanh(-1)) = 0 ; mean(tanh(0), tanh(-2))
            let t = Shaper::new(ShapingConfig::Tanh { centred: false, m: 10 }).apply(r.clone(), None).unwrap();
            assert_close(&values(t), &[1f32.tanh(), (-1f32).tanh()], tol);
            let tc = Shaper::new(ShapingConfig::Tanh { centred: true, m: 10 }).apply(r.clone(), Some(&refs)).unwrap();
            assert_close(&values(tc), &[0.0, (-2f32).tanh() / 2.0], tol);
            // ceil 0: min(1, 0) = 0, min(-1, 0) = -1
            let ceil = Shaper::new(ShapingConfig::Ceil { value: 0.0 }).apply(r.clone(), None).unwrap();
            assert_close(&values(ceil), &[0.0, -1.0], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn running_transforms_use_running_statistics<B>(device) {
            let tol = tolerance(1e-5);
            let b1 = Tensor::<B, 1>::from_floats([1.0, 3.0], device);
            let b2 = Tensor::<B, 1>::from_floats([5.0, 7.0], device);
            // meanstd, batch 1: mean 2, population var 1 -> (-1, 1)
            let mut ms = Shaper::new(ShapingConfig::Meanstd);
            assert_close(&values(ms.apply(b1.clone(), None).unwrap()), &[-1.0, 1.0], tol);
            // after batch 2: {1,3,5,7}: mean 4, population var (9+1+1+9)/4 = 5
            let s5 = 5f32.sqrt();
            assert_close(&values(ms.apply(b2.clone(), None).unwrap()), &[1.0 / s5, 3.0 / s5], tol);
            assert_eq!(ms.moments.count, 4);
            assert!((ms.moments.var() - 5.0).abs() < 1e-9);
            // clip: batch 1 -> [1, 3] keeps (1, 3); batch 2 -> [4 - sqrt5, 4 + sqrt5] = [1.76, 6.24]
            let mut cl = Shaper::new(ShapingConfig::Clip);
            assert_close(&values(cl.apply(b1.clone(), None).unwrap()), &[1.0, 3.0], tol);
            assert_close(&values(cl.apply(b2.clone(), None).unwrap()), &[5.0, 4.0 + s5], tol);
            // minmax: batch 1 maps (1, 3) to (0, 1); batch 2 sees range [1, 7]: (4/6, 1)
            let mut mm = Shaper::new(ShapingConfig::Minmax);
            assert_close(&values(mm.apply(b1.clone(), None).unwrap()), &[0.0, 1.0], tol);
            assert_close(&values(mm.apply(b2, None).unwrap()), &[4.0 / 6.0, 1.0], tol);
            // ... and an earlier batch now maps inside [0, 1]: (0, 2/6)
            assert_close(&values(mm.apply(b1, None).unwrap()), &[0.0, 2.0 / 6.0], tol);
        }
    }

    goodhart_core::backend_test! {
        fn minmax_maps_the_seen_range_to_unit_interval<B>(device) {
            let mut runner = TestRunner::new(Config { cases: 32, ..Default::default() });
            let strat = proptest::collection::vec(-100.0f32..100.0, 2..20);
            runner.run(&strat, |xs| {
                let lo = xs.iter().cloned().fold(f32::INFINITY, f32::min);
                let hi = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let out = values(Shaper::new(ShapingConfig::Minmax)
                    .apply(Tensor::<B, 1>::from_floats(xs.as_slice(), device), None).unwrap());
                let tol = tolerance(1e-5);
                for (x, y) in xs.iter().zip(&out) {
                    proptest::prop_assert!(*y >= -tol && *y <= 1.0 + tol);
                    if hi - lo > 1e-3 {
                        if *x == lo { proptest::prop_assert!(y.abs() <= tol); }
                        if *x == hi { proptest::prop_assert!((y - 1.0).abs() <= tol); }
                    }
                }
                Ok(())
            }).unwrap();
        }
    }

    goodhart_core::backend_test! {
        fn par_is_bounded_and_monotone<B>(device) {
            let mut runner = TestRunner::new(Config { cases: 32, ..Default::default() });
            let strat = (
                proptest::collection::vec(-2.0f32..2.0, 1..8),
                -2.0f32..2.0,
                0.05f32..1.0,
                0.1f32..2.0,
            );
            runner.run(&strat, |(refs, r, dr, k)| {
                let m = refs.len();
                let refs_t = Tensor::<B, 1>::from_floats(refs.as_slice(), device).reshape([1, m]);
                let refs2 = Tensor::cat(vec![refs_t.clone(), refs_t], 0);
                let rs = Tensor::<B, 1>::from_floats([r, r + dr], device);
                let out = values(Shaper::new(ShapingConfig::Par { m: 10, k })
                    .apply(rs, Some(&refs2)).unwrap());
                proptest::prop_assert!(out[0] > 0.0 && out[0] < 1.0, "{out:?}");
                proptest::prop_assert!(out[1] > 0.0 && out[1] < 1.0, "{out:?}");
                // strictly increasing in r: |k (r - ref)| <= 10, where sigmoid' * k * dr >= 4e-6 is
                // far above f32 resolution near 1 (6e-8)
                proptest::prop_assert!(out[1] > out[0], "{out:?} for r {r}, r + {dr}");
                Ok(())
            }).unwrap();
        }
    }

    goodhart_core::backend_test! {
        fn potential_shaping_hand_values<B>(device) {
            let r = Tensor::<B, 2>::from_floats([[0.0, 1.0, 9.0]], device);
            let phi = Tensor::<B, 2>::from_floats([[1.0, 2.0, 0.0, 5.0]], device);
            let m = Tensor::<B, 2>::from_floats([[1.0, 1.0, 0.0]], device);
            // t0: 0 + 0.5*2 - 1 = 0 ; t1: 1 + 0.5*0 - 2 = -1 ; t2 masked
            let out = potential_shaping(r.clone(), phi, &m, 0.5).unwrap();
            assert_close(&values(out.reshape([3])), &[0.0, -1.0, 0.0], tolerance(1e-6));
            assert!(matches!(potential_shaping(r.clone(), Tensor::zeros([1, 3], device), &m, 0.5),
                Err(GoodhartError::ShapeMismatch { .. })));
            assert!(potential_shaping(r, Tensor::zeros([1, 4], device), &m, 1.5).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn shaping_rejects_bad_input<B>(device) {
            let r = Tensor::<B, 1>::from_floats([1.0, 2.0], device);
            assert!(matches!(Shaper::new(ShapingConfig::par()).apply(r.clone(), None),
                Err(GoodhartError::InvalidArgument { .. })));
            let short = Tensor::<B, 2>::zeros([1, 3], device);
            assert!(matches!(Shaper::new(ShapingConfig::par()).apply(r.clone(), Some(&short)),
                Err(GoodhartError::ShapeMismatch { .. })));
            let none = Tensor::<B, 2>::zeros([2, 0], device);
            assert!(matches!(Shaper::new(ShapingConfig::Lsc { m: 10 }).apply(r.clone(), Some(&none)),
                Err(GoodhartError::Empty { .. })));
            let nan = Tensor::<B, 1>::from_floats([1.0, f32::NAN], device);
            assert!(matches!(Shaper::new(ShapingConfig::Meanstd).apply(nan, None),
                Err(GoodhartError::NonFinite { .. })));
            assert!(matches!(Shaper::new(ShapingConfig::Minmax).apply(Tensor::<B, 1>::zeros([0], device), None),
                Err(GoodhartError::Empty { .. })));
        }
    }

    #[test]
    fn running_merge_equals_one_pass() {
        let mut s = RunningMeanStd::default();
        // batch {2, 4}: mean 3, var 1; batch {6}: mean 6, var 0 -> {2,4,6}: mean 4, var 8/3
        s.update(2, 3.0, 1.0);
        s.update(1, 6.0, 0.0);
        assert!((s.mean - 4.0).abs() < 1e-12 && (s.var() - 8.0 / 3.0).abs() < 1e-12);
        assert_eq!(RunningMeanStd::default().var(), 1.0);
    }
}
