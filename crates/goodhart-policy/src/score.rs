//! Teacher-forced scoring: per-token log-probabilities and entropies of given sequences in
//! one forward pass.
//!
//! Alignment follows [`goodhart_core::batch`]: position `t` holds
//! `log pi(token_t | token_<t)` and the entropy `H_t = -sum_v p_t(v) log p_t(v)` of the
//! distribution that produced token `t`, where `p_t = softmax(logits_{t-1} / tau)`.
//! Position 0 (no context) and padding positions hold 0. The caller multiplies by its
//! response mask to keep only generated tokens.
//!
//! The temperature `tau` divides the logits before the softmax, as verl's actor and TRL's
//! `GRPOTrainer` do when they recompute log-probs of samples drawn at temperature `tau`;
//! score with the temperature you sampled at, so that the PPO ratio compares like with like.
//! Used for the current policy, the old policy and the reference alike.

use burn::tensor::{activation::log_softmax, backend::Backend, Int, Tensor};
use goodhart_core::{ops::zero_masked, GoodhartError, Result};

use crate::transformer::TransformerLm;

/// Per-token log-probabilities and entropies, `[B, T]`, aligned to the tokens.
#[derive(Debug, Clone)]
pub struct TokenScores<B: Backend> {
    /// `log pi(token_t | token_<t)`; 0 at position 0 and on padding.
    pub logprobs: Tensor<B, 2>,
    /// Entropy of the next-token distribution that produced token `t`; 0 at position 0
    /// and on padding.
    pub entropy: Tensor<B, 2>,
}

/// Error unless `temperature` is finite and positive.
pub(crate) fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            "temperature",
            format!("must be finite and positive, got {temperature}"),
        ))
    }
}

/// `log softmax(logits / tau)` gathered at `targets`, and the entropy of
/// `softmax(logits / tau)`: `logits [B, T, V]`, `targets [B, T]` -> two `[B, T]`.
///
/// The one formula both generation and scoring use, so their log-probs agree.
pub fn logprobs_from_logits<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    temperature: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [b, t, _] = logits.dims();
    // Dividing by 1 would be a pass over `[B, T, V]` for nothing.
    let logits = if temperature == 1.0 {
        logits
    } else {
        logits / temperature
    };
    let lp = log_softmax(logits, 2);
    let entropy = -(lp.clone().exp() * lp.clone()).sum_dim(2).reshape([b, t]);
    let chosen = lp.gather(2, targets.unsqueeze_dim(2)).reshape([b, t]);
    (chosen, entropy)
}

/// Scores `tokens [B, T]` (mask `[B, T]`, 1 on real tokens) under `model` at temperature
/// `temperature` (1 for the policy itself). See the module docs for the alignment.
pub fn score<B: Backend>(
    model: &TransformerLm<B>,
    tokens: Tensor<B, 2, Int>,
    attention_mask: Tensor<B, 2>,
    temperature: f64,
) -> Result<TokenScores<B>> {
    let [b, t] = tokens.dims();
    let logits = predicting_logits(model, tokens.clone(), &attention_mask, temperature)?;
    let (lp, ent) = logprobs_from_logits(logits, tokens.narrow(1, 1, t - 1), temperature);
    let zero = Tensor::<B, 2>::zeros([b, 1], &lp.device());
    let align =
        |x: Tensor<B, 2>| zero_masked(Tensor::cat(vec![zero.clone(), x], 1), &attention_mask);
    Ok(TokenScores {
        logprobs: align(lp),
        entropy: align(ent),
    })
}

/// The logits `[B, T - 1, V]` that predict tokens `1..T`, after checking the temperature
/// and that there are two positions. The last position predicts nothing here: its hidden
/// state skips the LM head.
fn predicting_logits<B: Backend>(
    model: &TransformerLm<B>,
    tokens: Tensor<B, 2, Int>,
    attention_mask: &Tensor<B, 2>,
    temperature: f64,
) -> Result<Tensor<B, 3>> {
    check_temperature(temperature)?;
    let [_, t] = tokens.dims();
    if t < 2 {
        return Err(GoodhartError::invalid(
            "tokens",
            "scoring needs at least two positions (a context and a token)",
        ));
    }
    let hidden = model.trunk.forward(tokens, attention_mask.clone())?;
    Ok(model.logits(hidden.narrow(1, 0, t - 1)))
}

/// `sum_v pi(v | token_<t)^2` of the next-token distribution at temperature
/// `temperature` that produced each token, `[B, T]` aligned as [`score`]'s log-probs (0 at
/// position 0 and on padding): the collision probability, which the optimal token
/// baseline reads. A forward of its own, so plain scoring does not pay for it.
pub fn sum_pi_squared<B: Backend>(
    model: &TransformerLm<B>,
    tokens: Tensor<B, 2, Int>,
    attention_mask: Tensor<B, 2>,
    temperature: f64,
) -> Result<Tensor<B, 2>> {
    let [b, t] = tokens.dims();
    let logits = predicting_logits(model, tokens, &attention_mask, temperature)? / temperature;
    let p = log_softmax(logits, 2).exp();
    let sp = (p.clone() * p).sum_dim(2).reshape([b, t - 1]);
    let zero = Tensor::<B, 2>::zeros([b, 1], &sp.device());
    Ok(zero_masked(Tensor::cat(vec![zero, sp], 1), &attention_mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::{
        tests::{floats, ints, tiny},
        Positions,
    };
    use burn::nn::Linear;
    use goodhart_core::testing::{assert_close, tolerance, values};

    #[test]
    fn logprobs_from_logits_by_hand() {
        use goodhart_core::device::{cpu, Dispatch as Cpu};
        let device = cpu();
        // One position, logits (0, ln 2, ln 3) -> p = (1, 2, 3)/6; target 2: log(1/2).
        // At tau = 2 the logits halve: weights (1, sqrt 2, sqrt 3) / 4.146264.
        let logits = Tensor::<Cpu, 3>::from_floats([[[0.0, 2f32.ln(), 3f32.ln()]]], &device);
        let target = Tensor::<Cpu, 2, Int>::from_ints([[2]], &device);
        let (lp, h) = logprobs_from_logits(logits.clone(), target.clone(), 1.0);
        assert_close(&values(lp), &[0.5f32.ln()], 1e-6);
        // H = -(1/6 ln 1/6 + 1/3 ln 1/3 + 1/2 ln 1/2) = 1.011404
        assert_close(&values(h), &[1.011_404], 1e-5);
        let (lp, _) = logprobs_from_logits(logits, target, 2.0);
        let z = 1.0 + 2f32.sqrt() + 3f32.sqrt();
        assert_close(&values(lp), &[(3f32.sqrt() / z).ln()], 1e-6);
    }

    goodhart_core::backend_test! {
        fn scores_are_aligned_to_tokens<B>(device) {
            // Uniform next-token distribution over V = 11 (zero output projection):
            // log p = -ln 11 = -2.397895, entropy ln 11, at every real position but the first.
            let mut model = tiny(Positions::Rotary).with_tie_embeddings(false).init::<B>(device).unwrap();
            let proj = model.head.proj.take().unwrap();
            model.head.proj = Some(Linear { weight: proj.weight.map(|w| w.zeros_like()), bias: None });
            let tokens = ints::<B>(&[&[1, 2, 3, 4], &[0, 5, 6, 0]], device);
            let mask = floats::<B>(&[&[1.0; 4], &[0.0, 1.0, 1.0, 0.0]], device);
            let s = score(&model, tokens, mask, 1.0).unwrap();
            let l = -(11f32).ln();
            let tol = tolerance(1e-5);
            assert_close(&values(s.logprobs), &[0.0, l, l, l, 0.0, l, l, 0.0], tol);
            assert_close(&values(s.entropy), &[0.0, -l, -l, -l, 0.0, -l, -l, 0.0], tol);
        }
    }

    goodhart_core::backend_test! {
        fn score_equals_log_softmax_of_forward<B>(device) {
            B::seed(device, 2);
            let model = tiny(Positions::Learned).init::<B>(device).unwrap();
            let tokens = ints::<B>(&[&[4, 7, 1]], device);
            let mask = floats::<B>(&[&[1.0; 3]], device);
            let logits = model.forward(tokens.clone(), mask.clone()).unwrap();
            let lp = values(log_softmax(logits, 2));
            let s = values(score(&model, tokens, mask, 1.0).unwrap().logprobs);
            // position 1 = log p(7 | 4) from logits row 0; position 2 = log p(1 | 4 7) from row 1.
            assert_close(&s, &[0.0, lp[7], lp[11 + 1]], tolerance(1e-6));
            assert!(score(&model, ints::<B>(&[&[4]], device), floats::<B>(&[&[1.0]], device), 1.0).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn sum_pi_squared_of_the_forward_distribution<B>(device) {
            B::seed(device, 3);
            let model = tiny(Positions::Learned).init::<B>(device).unwrap();
            let tokens = ints::<B>(&[&[4, 7, 1], &[0, 2, 5]], device);
            let mask = floats::<B>(&[&[1.0; 3], &[0.0, 1.0, 1.0]], device);
            for tau in [1.0, 0.5] {
                let logits = model.forward(tokens.clone(), mask.clone()).unwrap() / tau;
                let p = values(log_softmax(logits, 2).exp());
                let sq = |row: usize, pos: usize| -> f32 {
                    let o = (row * 3 + pos) * 11;
                    p[o..o + 11].iter().map(|x| x * x).sum()
                };
                let got = values(sum_pi_squared(&model, tokens.clone(), mask.clone(), tau).unwrap());
                // Position t holds the distribution that produced token t (logits row t - 1).
                assert_close(&got, &[0.0, sq(0, 0), sq(0, 1), 0.0, sq(1, 0), sq(1, 1)], tolerance(1e-6));
                assert!(got.iter().all(|&x| x == 0.0 || (1.0 / 11.0 - 1e-6..=1.0).contains(&x)));
            }
        }
    }
}
