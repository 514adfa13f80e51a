//! Reference-policy management over any burn [`Module`]: a frozen snapshot, an EMA
//! reference, and resets (periodic or on a KL threshold).
//!
//! - Frozen (verl / TRL / OpenRLHF default): the reference is the initial policy, a
//!   copy without gradients ([`snapshot`], or [`AutodiffModule::valid`] for the inner
//!   backend).
//! - EMA: `p_ref <- tau p_ref + (1 - tau) p` after each step ([`ema_update`]; TRL's
//!   `sync_ref_model` uses `ref_model_mixup_alpha` = `1 - tau` = 0.6 every 512 steps;
//!   TR-DPO, Gorbatovski et al. 2024).
//! - Reset: the reference becomes a copy of the current policy every `period` steps or
//!   when the KL to it exceeds a threshold (GARDO; TRL's hard sync).

use burn::{
    module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param},
    tensor::{backend::Backend, Bool, Int, Tensor},
};
use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

/// A frozen copy of `module`: same parameters, no gradient tracking.
///
/// burn initialises parameters lazily, and each clone of a not-yet-initialised parameter
/// would draw its own values; the module's parameters are therefore materialised first,
/// so the copy always equals the original.
pub fn snapshot<B: Backend, M: Module<B>>(module: &M) -> M {
    materialize(module);
    module.clone().no_grad()
}

/// Forces burn's lazy parameter initialisation of `module` in place.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
            let _ = param.val();
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// The frozen reference on the inner (non-autodiff) backend: cheaper forward passes.
pub fn frozen_inner<B: burn::tensor::backend::AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
) -> M::InnerModule {
    module.valid()
}

struct Collect<B: Backend> {
    params: Vec<(Vec<usize>, Tensor<B, 1>)>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val().detach();
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        self.params.push((shape, t.reshape([n])));
    }
}

struct Blend<B: Backend> {
    online: std::vec::IntoIter<(Vec<usize>, Tensor<B, 1>)>,
    tau: f64,
    error: Option<GoodhartError>,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, reference, mapper) = param.consume();
        let dims = reference.dims();
        let value = match self.online.next() {
            Some((shape, p)) if shape == dims => {
                reference.detach() * self.tau + p.reshape(dims) * (1.0 - self.tau)
            }
            Some((shape, _)) => {
                self.error
                    .get_or_insert(GoodhartError::shape("online parameter", &dims, &shape));
                reference
            }
            None => {
                self.error.get_or_insert(GoodhartError::invalid(
                    "online module",
                    "has fewer parameters than the reference",
                ));
                reference
            }
        };
        Param::from_mapped_value(id, value, mapper)
    }
}

/// `p_ref <- tau p_ref + (1 - tau) p` for every float parameter, matched in visiting
/// order (the modules must share an architecture). `tau` in `[0, 1]`: 1 keeps the
/// reference, 0 copies the policy. The result carries no gradient.
pub fn ema_update<B: Backend, M: Module<B>>(reference: M, online: &M, tau: f64) -> Result<M> {
    if !(0.0..=1.0).contains(&tau) {
        return Err(GoodhartError::invalid(
            "tau",
            format!("must be in [0, 1], got {tau}"),
        ));
    }
    let mut collect = Collect { params: Vec::new() };
    online.visit(&mut collect);
    let mut blend = Blend {
        online: collect.params.into_iter(),
        tau,
        error: None,
    };
    let out = reference.map(&mut blend);
    if blend.online.next().is_some() {
        blend.error.get_or_insert(GoodhartError::invalid(
            "online module",
            "has more parameters than the reference",
        ));
    }
    match blend.error {
        Some(e) => Err(e),
        None => Ok(out.no_grad()),
    }
}

/// When to reset the reference to the current policy.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRule {
    /// Reset when the KL to the reference exceeds this.
    #[serde(default)]
    pub kl_threshold: Option<f64>,
    /// Reset every `period` steps (since the last reset).
    #[serde(default)]
    pub period: Option<usize>,
}

impl ResetRule {
    /// Whether to reset at `steps_since_reset` with the current `kl`.
    pub fn should_reset(&self, steps_since_reset: usize, kl: f64) -> bool {
        self.kl_threshold.is_some_and(|t| kl > t)
            || self.period.is_some_and(|p| p > 0 && steps_since_reset >= p)
    }
}

/// How the reference evolves.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReferenceMode {
    /// Never changes.
    #[default]
    Frozen,
    /// EMA with weight `tau` on the old reference.
    Ema {
        /// Weight of the old reference.
        tau: f64,
    },
    /// Copy of the policy on a [`ResetRule`].
    Reset {
        /// Reset when the KL to the reference exceeds this.
        #[serde(default)]
        kl_threshold: Option<f64>,
        /// Reset every `period` steps.
        #[serde(default)]
        period: Option<usize>,
    },
}

/// A reference policy and its update rule.
#[derive(Debug, Clone)]
pub struct ReferencePolicy<M> {
    module: M,
    mode: ReferenceMode,
    steps_since_reset: usize,
    resets: usize,
}

impl<M> ReferencePolicy<M> {
    /// The reference module.
    pub fn module(&self) -> &M {
        &self.module
    }

    /// Number of resets so far.
    pub fn resets(&self) -> usize {
        self.resets
    }

    /// A frozen snapshot of `policy` as the reference, updated by `mode`.
    pub fn new<B: Backend>(policy: &M, mode: ReferenceMode) -> Self
    where
        M: Module<B>,
    {
        Self {
            module: snapshot(policy),
            mode,
            steps_since_reset: 0,
            resets: 0,
        }
    }

    /// After one optimiser step: applies the mode (EMA blend, or reset on the rule given
    /// the batch `kl` to the reference). Returns whether the reference was reset.
    pub fn step<B: Backend>(&mut self, policy: &M, kl: f64) -> Result<bool>
    where
        M: Module<B>,
    {
        if !kl.is_finite() {
            return Err(GoodhartError::NonFinite {
                what: "kl to the reference".into(),
            });
        }
        self.steps_since_reset += 1;
        match self.mode {
            ReferenceMode::Frozen => Ok(false),
            ReferenceMode::Ema { tau } => {
                self.module = ema_update(self.module.clone(), policy, tau)?;
                Ok(false)
            }
            ReferenceMode::Reset {
                kl_threshold,
                period,
            } => {
                let rule = ResetRule {
                    kl_threshold,
                    period,
                };
                if rule.should_reset(self.steps_since_reset, kl) {
                    self.module = snapshot(policy);
                    self.steps_since_reset = 0;
                    self.resets += 1;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::{
        backend::Autodiff,
        nn::{Linear, LinearConfig},
    };
    use goodhart_core::testing::{assert_close, tolerance, values};

    fn weights<B: Backend>(l: &Linear<B>) -> Vec<f32> {
        let mut v = values(l.weight.val());
        v.extend(values(l.bias.as_ref().unwrap().val()));
        v
    }

    goodhart_core::backend_test! {
        fn ema_snapshot_and_reset<B>(device) {
            type A<B> = Autodiff<B>;
            let policy: Linear<A<B>> = LinearConfig::new(2, 2).init(device);
            let frozen = snapshot(&policy);
            assert!(!frozen.weight.val().is_require_grad());
            assert_close(&weights(&frozen), &weights(&policy), 0.0);
            // a "trained" policy: every parameter + 1
            let moved = Linear { weight: policy.weight.clone().map(|w| w + 1.0), bias: policy.bias.clone().map(|b| b.map(|b| b + 1.0)) };
            let ema = ema_update(frozen.clone(), &moved, 0.75).unwrap();
            // 0.75 p + 0.25 (p + 1) = p + 0.25
            let want: Vec<f32> = weights(&frozen).iter().map(|p| p + 0.25).collect();
            assert_close(&weights(&ema), &want, tolerance(1e-6));
            assert!(ema_update(frozen.clone(), &moved, 1.5).is_err());
            let other: Linear<A<B>> = LinearConfig::new(3, 2).init(device);
            assert!(matches!(ema_update(frozen.clone(), &other, 0.5), Err(GoodhartError::ShapeMismatch { .. })));

            let mut r = ReferencePolicy::new(&policy, ReferenceMode::Reset { kl_threshold: Some(0.5), period: Some(3) });
            assert!(!r.step(&moved, 0.1).unwrap());
            assert!(r.step(&moved, 0.9).unwrap()); // over the KL threshold
            assert_close(&weights(r.module()), &weights(&moved), 0.0);
            assert!(!r.step(&moved, 0.0).unwrap());
            assert!(!r.step(&moved, 0.0).unwrap());
            assert!(r.step(&moved, 0.0).unwrap()); // period 3
            assert_eq!(r.resets(), 2);
            let mut e = ReferencePolicy::new(&policy, ReferenceMode::Ema { tau: 0.5 });
            e.step(&moved, 0.0).unwrap();
            let want: Vec<f32> = weights(&frozen).iter().map(|p| p + 0.5).collect();
            assert_close(&weights(e.module()), &want, tolerance(1e-6));
            assert!(e.step(&moved, f64::NAN).is_err());
        }
    }
}
