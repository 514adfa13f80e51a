//! Lipschitz (gradient) penalty for a learned reward or discriminator.
//!
//! With `g_i = d score(x_i) / d x_i` the input gradient of each row (burn autodiff), the
//! penalty is the batch mean of
//! - `two_sided`: `(||g_i|| - target)^2` (WGAN-GP, Gulrajani et al. 2017; target 1), or
//! - `one_sided`: `max(0, ||g_i|| - L)^2` (Petzka et al. 2018), which only caps the slope.
//!
//! Keeping a learned reward smooth in its input bounds how much a policy can gain by
//! small, adversarial moves in input space, a standard guard against reward hacking of
//! discriminator-style rewards (e.g. the ORPO discriminator, GAIL-type rewards).
//!
//! Training through the penalty needs the gradient of a gradient. [`input_gradient`]
//! returns `g` on `B::InnerBackend`; when the scored module lives on
//! `Autodiff<Autodiff<B>>`, that inner backend is itself `Autodiff<B>` and `g` carries
//! its graph, so the penalty can be back-propagated to the module's parameters (tested
//! below on a closed form).

use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    Tensor,
};
use goodhart_core::{ops::check_finite, GoodhartError, Result};
use serde::{Deserialize, Serialize};

/// The input gradient `[N, D]` of `score [N]` with respect to `inputs [N, D]` (the
/// gradient of `sum_i score(x_i)`: row `i` is `d score_i / d x_i` when rows are scored
/// independently). Errors on non-finite inputs or a score of the wrong length.
pub fn input_gradient<B: AutodiffBackend>(
    score: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 1>,
    inputs: Tensor<B, 2>,
) -> Result<Tensor<B::InnerBackend, 2>> {
    check_finite(&inputs, "inputs")?;
    let n = inputs.dims()[0];
    let x = inputs.detach().require_grad();
    let s = score(x.clone());
    if s.dims() != [n] {
        return Err(GoodhartError::shape("score", &[n], &s.dims()));
    }
    let grads = s.sum().backward();
    x.grad(&grads)
        .ok_or_else(|| GoodhartError::invalid("score", "does not depend on its input"))
}

/// Which gradient penalty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum GradientPenalty {
    /// `(||g|| - target)^2`.
    TwoSided {
        /// Target norm (WGAN-GP: 1).
        target: f64,
    },
    /// `max(0, ||g|| - lipschitz)^2`.
    OneSided {
        /// Allowed slope `L`.
        lipschitz: f64,
    },
}

impl Default for GradientPenalty {
    fn default() -> Self {
        Self::TwoSided { target: 1.0 }
    }
}

impl GradientPenalty {
    /// Mean penalty over the rows of the input gradient `g [N, D]`.
    pub fn penalty<B: Backend>(&self, g: Tensor<B, 2>) -> Result<Tensor<B, 1>> {
        let n = g.dims()[0];
        if n == 0 {
            return Err(GoodhartError::Empty {
                what: "input gradient".into(),
            });
        }
        // sqrt(sum g^2 + 1e-12): finite gradient at g = 0.
        let norm = (g.powi_scalar(2).sum_dim(1).reshape([n]) + 1e-12).sqrt();
        let excess = match *self {
            Self::TwoSided { target } => norm - target,
            Self::OneSided { lipschitz } => (norm - lipschitz).clamp_min(0.0),
        };
        Ok(excess.powi_scalar(2).mean())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn penalty_by_hand<B>(device) {
            type A<B> = Autodiff<B>;
            // score(x) = 0.5 * sum_j x_j^2 * c_j: gradient c * x.
            let c = Tensor::<A<B>, 2>::from_floats([[3.0, 4.0]], device);
            let x = Tensor::<A<B>, 2>::from_floats([[1.0, 1.0], [0.2, 0.1]], device);
            let g = input_gradient(|x| (x.powi_scalar(2) * c.clone().expand([2, 2])).sum_dim(1).reshape([2]) * 0.5, x).unwrap();
            assert_close(&values(g.clone()), &[3.0, 4.0, 0.6, 0.4], tolerance(1e-6));
            // norms 5 and sqrt(0.52) = 0.7211103
            let two = values(GradientPenalty::TwoSided { target: 1.0 }.penalty(g.clone()).unwrap());
            assert_close(&two, &[(16.0 + (0.721_110_3f32 - 1.0).powi(2)) / 2.0], tolerance(1e-5));
            let one = values(GradientPenalty::OneSided { lipschitz: 1.0 }.penalty(g).unwrap());
            assert_close(&one, &[8.0], tolerance(1e-5));
            let nan = Tensor::<A<B>, 2>::from_floats([[f32::NAN, 0.0]], device);
            assert!(matches!(input_gradient(|x| x.sum_dim(1).reshape([1]), nan), Err(GoodhartError::NonFinite { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn penalty_backpropagates_to_parameters<B>(device) {
            // score(x) = w * sum_j x_j with a parameter w: g = w * (1, 1), ||g|| = sqrt(2) |w|.
            // Two-sided penalty (sqrt(2) w - 1)^2 has d/dw = 2 sqrt(2) (sqrt(2) w - 1).
            type Inner<B> = Autodiff<B>;
            type Outer<B> = Autodiff<Autodiff<B>>;
            let w_inner = Tensor::<Inner<B>, 1>::from_floats([2.0], device).require_grad();
            let w = Tensor::<Outer<B>, 1>::from_inner(w_inner.clone());
            let x = Tensor::<Outer<B>, 2>::from_floats([[0.5, -1.0]], device);
            let g = input_gradient(|x| x.sum_dim(1).reshape([1]) * w.clone(), x).unwrap();
            let p = GradientPenalty::TwoSided { target: 1.0 }.penalty(g).unwrap();
            let grads = p.backward();
            let dw = values(w_inner.grad(&grads).expect("penalty depends on w"));
            let s2 = 2.0f32.sqrt();
            assert_close(&dw, &[2.0 * s2 * (s2 * 2.0 - 1.0)], tolerance(1e-4));
        }
    }
}
