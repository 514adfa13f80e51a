//! Reference policies: a frozen copy of a policy that holds no gradients.
//!
//! KL-regularised RLHF (Ziegler et al. 2019; Ouyang et al. 2022) measures the policy
//! against a reference `pi_ref`, usually the SFT policy at the start of RL. A
//! [`Reference`] is a snapshot of the policy's parameters with `require_grad` off (burn's
//! `Module::no_grad`), so no backward pass reaches it. Two updates are common:
//!
//! - **reset** to the current policy (GARDO's periodic reference reset; "hard" reference
//!   updates in TR-DPO, Gorbatovski et al. 2024);
//! - **EMA** `theta_ref <- alpha theta_ref + (1 - alpha) theta` ("soft" updates, TR-DPO's
//!   `tau = 1 - alpha`; TRL's `sync_ref_model` with `ref_model_mixup_alpha`, where TRL's
//!   `alpha` weighs the *policy*: TRL `alpha` = our `1 - alpha`).
//!
//! For a policy on an autodiff backend, snapshot its inner module (`policy.valid()`): the
//! reference then lives on the plain backend and builds no graph when it scores.

use burn::{
    module::{Module, ModuleMapper, ModuleVisitor, Param},
    tensor::{backend::Backend, Tensor},
};
use goodhart_core::{GoodhartError, Result};

use crate::transformer::materialize;

/// A frozen snapshot of a module.
#[derive(Debug, Clone)]
pub struct Reference<M> {
    module: M,
}

impl<M> Reference<M> {
    /// The frozen module, e.g. to [`crate::score::score`] with it.
    pub fn module(&self) -> &M {
        &self.module
    }
}

impl<M> Reference<M> {
    /// A frozen copy of `policy`.
    pub fn snapshot<B: Backend>(policy: &M) -> Self
    where
        M: Module<B>,
    {
        Self {
            module: materialize(policy.clone()).no_grad(),
        }
    }

    /// Replaces the reference by a frozen copy of `policy`.
    pub fn reset<B: Backend>(&mut self, policy: &M)
    where
        M: Module<B>,
    {
        *self = Self::snapshot(policy);
    }

    /// `theta_ref <- decay * theta_ref + (1 - decay) * theta_policy`, parameter by
    /// parameter (in module order). `decay` in `[0, 1]`: 1 keeps the reference, 0 resets it.
    /// Errors if the two modules do not have the same parameters and shapes.
    pub fn ema_update<B: Backend>(&mut self, policy: &M, decay: f64) -> Result<()>
    where
        M: Module<B>,
    {
        if !(0.0..=1.0).contains(&decay) {
            return Err(GoodhartError::invalid("decay", "must lie in [0, 1]"));
        }
        let mut collect = Collect::<B>(Vec::new());
        policy.visit(&mut collect);
        let mut count = Count(Vec::new());
        self.module.visit(&mut count);
        let got: Vec<Vec<usize>> = collect.0.iter().map(|t| t.1.clone()).collect();
        if got.len() != count.0.len() {
            return Err(GoodhartError::shape(
                "policy parameter count (to match the reference)",
                &[count.0.len()],
                &[got.len()],
            ));
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i] != count.0[i]) {
            return Err(GoodhartError::shape(
                format!("policy parameter {i} (to match the reference)"),
                &count.0[i],
                &got[i],
            ));
        }
        let mut ema = Ema {
            source: collect.0.into_iter().map(|t| t.0),
            decay,
        };
        self.module = self.module.clone().map(&mut ema);
        Ok(())
    }
}

/// Flattened parameter values and shapes, in visiting order.
struct Collect<B: Backend>(Vec<(Tensor<B, 1>, Vec<usize>)>);

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val().detach();
        let dims = t.dims().to_vec();
        let n: usize = dims.iter().product();
        self.0.push((t.reshape([n]), dims));
    }
}

/// Parameter shapes in visiting order.
struct Count(Vec<Vec<usize>>);

impl<B: Backend> ModuleVisitor<B> for Count {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.val().dims().to_vec());
    }
}

struct Ema<I> {
    source: I,
    decay: f64,
}

impl<B: Backend, I: Iterator<Item = Tensor<B, 1>>> ModuleMapper<B> for Ema<I> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        // Shapes were checked before mapping, so every parameter has its source.
        let new = match self.source.next() {
            Some(src) => {
                let src = src.reshape(t.dims());
                (t * self.decay + src * (1.0 - self.decay))
                    .detach()
                    .set_require_grad(false)
            }
            None => t,
        };
        Param::from_mapped_value(id, new, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        score::score,
        transformer::{
            tests::{floats, ints, tiny},
            Positions,
        },
    };
    use burn::{
        backend::Autodiff,
        nn::{Linear, LinearConfig},
    };
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn reference_is_frozen_and_equal_to_the_policy<B>(device) {
            type A<B> = Autodiff<B>;
            B::seed(device, 4);
            let policy = tiny(Positions::Rotary).init::<A<B>>(device).unwrap();
            let reference = Reference::snapshot(&policy);
            let tokens = ints::<A<B>>(&[&[1, 2, 3, 4]], device);
            let mask = floats::<A<B>>(&[&[1.0; 4]], device);
            let lp = score(&policy, tokens.clone(), mask.clone(), 1.0).unwrap().logprobs;
            let lr = score(reference.module(), tokens, mask, 1.0).unwrap().logprobs;
            assert_close(&values(lp.clone()), &values(lr.clone()), 0.0);
            // A KL-like loss through both: gradients reach the policy only.
            let grads = (lp - lr).sum().backward();
            let pw = &policy.trunk.tok_emb.weight;
            let rw = &reference.module().trunk.tok_emb.weight;
            assert!(pw.grad(&grads).is_some());
            assert!(rw.grad(&grads).is_none());
            assert!(!rw.is_require_grad());
        }
    }

    goodhart_core::backend_test! {
        fn ema_and_reset_by_hand<B>(device) {
            let ones = |v: f32| -> Linear<B> {
                let mut l = LinearConfig::new(2, 3).init::<B>(device);
                l.weight = Param::from_tensor(Tensor::full([2, 3], v, device));
                l.bias = Some(Param::from_tensor(Tensor::full([3], v, device)));
                l
            };
            let mut reference = Reference::snapshot(&ones(0.0));
            let policy = ones(1.0);
            // 0.9 * 0 + 0.1 * 1 = 0.1, then 0.9 * 0.1 + 0.1 * 1 = 0.19.
            reference.ema_update(&policy, 0.9).unwrap();
            assert_close(&values(reference.module().weight.val()), &[0.1; 6], tolerance(1e-7));
            reference.ema_update(&policy, 0.9).unwrap();
            assert_close(&values(reference.module().bias.as_ref().unwrap().val()), &[0.19; 3], tolerance(1e-6));
            assert!(!reference.module().weight.is_require_grad());
            reference.reset(&policy);
            assert_close(&values(reference.module().weight.val()), &[1.0; 6], 0.0);
            assert!(reference.ema_update(&policy, 1.5).is_err());
            let wider = LinearConfig::new(2, 4).init::<B>(device);
            let mut r2 = Reference::snapshot(&wider);
            assert!(matches!(r2.ema_update(&policy, 0.5), Err(GoodhartError::ShapeMismatch { .. })));
        }
    }
}
