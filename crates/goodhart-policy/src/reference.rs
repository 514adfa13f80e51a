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

use burn::{module::Module, tensor::backend::Backend};
use goodhart_core::{params, Result};

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

    /// A frozen copy of `policy` ([`goodhart_core::params::snapshot`]).
    pub fn snapshot<B: Backend>(policy: &M) -> Self
    where
        M: Module<B>,
    {
        Self {
            module: params::snapshot(policy),
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
        self.module = params::ema_update(self.module.clone(), policy, decay)?;
        Ok(())
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
    use burn::nn::{Linear, LinearConfig};
    use burn::{module::Param, tensor::Tensor};
    use goodhart_core::device::Autodiff;
    use goodhart_core::{
        testing::{assert_close, tolerance, values},
        GoodhartError,
    };

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
