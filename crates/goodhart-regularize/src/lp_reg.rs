//! Lp-Reg: low-probability token regularisation (Huang et al. 2025, "Low-probability
//! Tokens Sustain Exploration in Reinforcement Learning with Verifiable Reward").
//!
//! A proxy distribution filters presumed noise out of the policy and renormalises:
//! `pi_proxy(o) = pi(o) 1[pi(o) > tau] / Z`, `Z = sum_{pi(o') > tau} pi(o')`, with `tau`
//! fixed or `kappa * max_o pi(o)` ([`LpThreshold`]). The regulariser is the forward
//! `KL(pi_proxy || pi)` (proxy detached, a target), applied on low-probability tokens
//! only; its value is `-log Z`, and its gradient moves `pi` towards `pi_proxy`: mass off
//! the noise tokens onto the meaningful ones, which protects low-probability but
//! meaningful "reasoning sparks" from being squeezed out.
//!
//! **Selection rule *(unverified)*.** A position is regularised when its sampled token
//! (a) survives the filter (`pi(o) > tau`) and (b) is among the lowest fraction `rho`
//! of valid positions by sampled-token probability ([`crate::entropy::top_fraction_mask`]
//! on `-log pi(o)`). Lp-Reg's exact selection (percentile, sign of the advantage) was
//! read from a summary; treat this rule and its defaults as goodhart's.

use burn::tensor::{activation::log_softmax, backend::Backend, cast::ToElement, Int, Tensor};
use goodhart_core::{
    ops::{check_finite_masked, masked_mean},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::{entropy::top_fraction_mask, kl::check_coef};

/// The filter threshold `tau`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum LpThreshold {
    /// A fixed probability `tau`.
    Fixed {
        /// Threshold.
        tau: f64,
    },
    /// `tau = kappa * max_o pi(o)` per position (default `kappa = 0.02`, goodhart's
    /// choice, unverified).
    Relative {
        /// Fraction of the largest probability.
        kappa: f64,
    },
}

impl Default for LpThreshold {
    fn default() -> Self {
        Self::Relative { kappa: 0.02 }
    }
}

impl LpThreshold {
    fn validate(&self) -> Result<()> {
        let (name, v) = match *self {
            Self::Fixed { tau } => ("tau", tau),
            Self::Relative { kappa } => ("kappa", kappa),
        };
        if (0.0..1.0).contains(&v) {
            Ok(())
        } else {
            Err(GoodhartError::invalid(
                name,
                format!("must be in [0, 1), got {v}"),
            ))
        }
    }

    /// `tau` per row of `probs [N, V]`, as `[N, 1]`.
    fn tau<B: Backend>(&self, probs: &Tensor<B, 2>) -> Tensor<B, 2> {
        match *self {
            Self::Fixed { tau } => probs.zeros_like().slice([0..probs.dims()[0], 0..1]) + tau,
            Self::Relative { kappa } => probs.clone().max_dim(1) * kappa,
        }
    }
}

/// The proxy distribution `[N, V]` (detached) from `logits [N, V]`.
pub fn proxy_distribution<B: Backend>(
    logits: Tensor<B, 2>,
    threshold: LpThreshold,
) -> Tensor<B, 2> {
    let probs = log_softmax(logits.detach(), 1).exp();
    let [n, v] = probs.dims();
    let keep = probs
        .clone()
        .greater(threshold.tau(&probs).expand([n, v]))
        .float();
    let kept = probs * keep;
    kept.clone() / kept.sum_dim(1).expand([n, v])
}

/// Per-position `KL(pi_proxy || pi)` `[N]` (value `-log Z`, gradient towards the proxy).
pub fn lp_kl_per_position<B: Backend>(
    logits: Tensor<B, 2>,
    threshold: LpThreshold,
) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    let proxy = proxy_distribution(logits.clone(), threshold);
    let logp = log_softmax(logits, 1);
    // proxy log proxy is a constant; masked where the proxy is 0 to avoid 0 * -inf.
    let log_proxy = proxy.clone().clamp_min(1e-30).log();
    let terms = (proxy.clone() * (log_proxy - logp)).mask_fill(proxy.equal_elem(0.0), 0.0);
    terms.sum_dim(1).reshape([n])
}

/// The Lp-Reg loss `coef * mean over selected positions of KL(pi_proxy || pi)` from
/// `logits [N, V]`, sampled `tokens [N]` and `mask [N]`, with the selection of the module
/// doc (fraction `rho` in `(0, 1]`). Errors on shape mismatch, token ids out of range or
/// non-finite logits at valid positions. 0 when nothing is selected.
pub fn lp_reg_loss<B: Backend>(
    logits: Tensor<B, 2>,
    tokens: Tensor<B, 1, Int>,
    mask: &Tensor<B, 1>,
    threshold: LpThreshold,
    rho: f64,
    coef: f64,
) -> Result<Tensor<B, 1>> {
    let [n, v] = logits.dims();
    if tokens.dims() != [n] {
        return Err(GoodhartError::shape("tokens", &[n], &tokens.dims()));
    }
    if mask.dims() != [n] {
        return Err(GoodhartError::shape("mask", &[n], &mask.dims()));
    }
    threshold.validate()?;
    check_coef("coef", coef)?;
    let row_mask = mask.clone().reshape([n, 1]).expand([n, v]);
    check_finite_masked(&logits, &row_mask, "logits")?;
    let in_range = tokens
        .clone()
        .greater_equal_elem(0)
        .bool_and(tokens.clone().lower_elem(v as i64));
    if !in_range.all().into_scalar().to_bool() {
        return Err(GoodhartError::invalid(
            "tokens",
            format!("token ids must lie in [0, {v})"),
        ));
    }
    let logits = logits.mask_fill(row_mask.equal_elem(0.0), 0.0);
    let probs = log_softmax(logits.clone().detach(), 1).exp();
    let idx = tokens.reshape([n, 1]);
    let p_tok = probs.clone().gather(1, idx);
    let survives = p_tok
        .clone()
        .greater(threshold.tau(&probs))
        .float()
        .reshape([1, n]);
    let low = top_fraction_mask(
        p_tok.log().neg().reshape([1, n]),
        &mask.clone().reshape([1, n]),
        rho,
    )?;
    let selected = (low * survives).reshape([n]);
    Ok(masked_mean(lp_kl_per_position(logits, threshold), &selected) * coef)
}

/// Config of the `lp_reg` regulariser (*unverified defaults*: relative threshold
/// `kappa = 0.02`, `rho = 0.01`, coefficient 1.0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LpRegConfig {
    /// Filter threshold.
    #[serde(default)]
    pub threshold: LpThreshold,
    /// Fraction of valid positions (lowest sampled-token probability) regularised.
    #[serde(default = "default_rho")]
    pub rho: f64,
    /// Coefficient.
    #[serde(default = "default_coef")]
    pub coef: f64,
}

fn default_rho() -> f64 {
    0.01
}
fn default_coef() -> f64 {
    1.0
}

impl Default for LpRegConfig {
    fn default() -> Self {
        Self {
            threshold: LpThreshold::default(),
            rho: default_rho(),
            coef: default_coef(),
        }
    }
}

impl LpRegConfig {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<LpRegRegularizer> {
        self.threshold.validate()?;
        check_coef("coef", self.coef)?;
        if !(self.rho > 0.0 && self.rho <= 1.0) {
            return Err(GoodhartError::invalid("rho", "must be in (0, 1]"));
        }
        Ok(LpRegRegularizer {
            config: self.clone(),
        })
    }
}

/// The `lp_reg` regulariser over `logits [N, T, V]`, `tokens [N, T]` and `mask`.
#[derive(Debug, Clone)]
pub struct LpRegRegularizer {
    config: LpRegConfig,
}

impl<B: Backend> crate::Regularizer<B> for LpRegRegularizer {
    fn name(&self) -> &'static str {
        "lp_reg"
    }

    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        let logits = crate::need(&x.logits, "logits", "lp_reg")?;
        let tokens = crate::need(&x.tokens, "tokens", "lp_reg")?;
        let mask = crate::need(&x.mask, "mask", "lp_reg")?;
        let [n, t, v] = logits.dims();
        if tokens.dims() != [n, t] {
            return Err(GoodhartError::shape("tokens", &[n, t], &tokens.dims()));
        }
        if mask.dims() != [n, t] {
            return Err(GoodhartError::shape("mask", &[n, t], &mask.dims()));
        }
        let c = &self.config;
        lp_reg_loss(
            logits.reshape([n * t, v]),
            tokens.reshape([n * t]),
            &mask.reshape([n * t]),
            c.threshold,
            c.rho,
            c.coef,
        )
        .map(Some)
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        std::collections::BTreeMap::from([("lp_reg/coef".to_string(), self.config.coef)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn proxy_kl_and_selection_by_hand<B>(device) {
            // probs row 0: (0.5, 0.3, 0.15, 0.05); tau fixed 0.1 drops the last: Z = 0.95,
            // proxy (0.5, 0.3, 0.15, 0)/0.95, KL = -ln 0.95 = 0.0512933
            let p0 = [0.5f32, 0.3, 0.15, 0.05];
            // row 1: (0.7, 0.1, 0.1, 0.1): nothing above 0.1 except 0.7 (strict >) -> Z 0.7, KL 0.3566749
            let p1 = [0.7f32, 0.1, 0.1, 0.1];
            let logits = Tensor::<B, 2>::from_floats([p0.map(f32::ln), p1.map(f32::ln)], device);
            let th = LpThreshold::Fixed { tau: 0.1 };
            let kl = values(lp_kl_per_position(logits.clone(), th));
            assert_close(&kl, &[0.051_293_3, 0.356_674_9], tolerance(1e-5));
            let proxy = values(proxy_distribution(logits.clone(), th));
            assert_close(&proxy[..4], &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], tolerance(1e-5));
            // relative kappa 0.5 on row 0: tau = 0.25 keeps 0.5, 0.3 -> Z 0.8
            let rel = values(lp_kl_per_position(logits.clone(), LpThreshold::Relative { kappa: 0.5 }));
            assert_close(&rel[..1], &[-(0.8f32.ln())], tolerance(1e-5));
            // Selection, rho 0.5 of 2 -> 1 position, the lower sampled probability:
            // tokens (2, 0): p = 0.15 (survives 0.1) and 0.7 -> row 0 only.
            let mask = Tensor::<B, 1>::ones([2], device);
            let tokens = Tensor::<B, 1, Int>::from_ints([2, 0], device);
            let loss = lp_reg_loss(logits.clone(), tokens, &mask, th, 0.5, 2.0).unwrap();
            assert_close(&values(loss), &[2.0 * 0.051_293_3], tolerance(1e-5));
            // The sampled token 3 of row 0 (p 0.05) is noise: not selected, loss 0.
            let tokens = Tensor::<B, 1, Int>::from_ints([3, 0], device);
            let loss = lp_reg_loss(logits.clone(), tokens, &mask, th, 0.5, 2.0).unwrap();
            assert_close(&values(loss), &[0.0], 0.0);
            let bad = Tensor::<B, 1, Int>::from_ints([4, 0], device);
            assert!(matches!(lp_reg_loss(logits, bad, &mask, th, 0.5, 1.0), Err(GoodhartError::InvalidArgument { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn gradient_pulls_mass_off_noise_tokens<B>(device) {
            let p0 = [0.5f32, 0.3, 0.15, 0.05];
            let x = Tensor::<Autodiff<B>, 2>::from_floats([p0.map(f32::ln)], device).require_grad();
            let g = lp_kl_per_position(x.clone(), LpThreshold::Fixed { tau: 0.1 }).sum().backward();
            // d/dlogits = pi - proxy: (0.5 - 0.5263158, 0.3 - 0.3157895, 0.15 - 0.1578947, 0.05)
            let want = [0.5 - 0.5 / 0.95, 0.3 - 0.3 / 0.95, 0.15 - 0.15 / 0.95, 0.05];
            assert_close(&values(x.grad(&g).unwrap()), &want, tolerance(1e-5));
        }
    }
}
