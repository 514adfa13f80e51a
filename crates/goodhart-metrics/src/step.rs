//! Per-step metrics of one batch: KL to the reference, entropy, clip fractions, reward
//! statistics per source, the proxy-gold gap and correlation, response lengths, the
//! fraction of zero-std groups, ensemble disagreement and advantage moments.
//!
//! Tensor inputs stay on the device; each function reads back a handful of scalars in
//! one transfer. The exception is the proxy-gold correlation, which reads back the two
//! per-response reward vectors (`N` values each): Spearman needs ranks, and ranking with
//! tie averaging is a host operation.
//!
//! [`batch_metrics`] gathers everything a batch allows into the flat map one line of
//! `metrics.jsonl` holds, with the keys of DESIGN.md (`reward/proxy/mean`,
//! `reward/gold/mean`, `kl/ref`, `entropy`, ...); the key constants below name them.

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, ElementConversion, Tensor};
use goodhart_core::{
    batch::RolloutBatch,
    groups::Groups,
    ops::{
        check_finite, check_finite_masked, check_same_shape, group_stats, masked_mean, zero_masked,
    },
    GoodhartError, Result,
};

use crate::stats::{self, Summary};

/// Name of the proxy reward source in a [`RolloutBatch`] (the reward that trains).
pub const PROXY: &str = "proxy";
/// Name of the gold reward source in a [`RolloutBatch`] (measured, not trained on).
pub const GOLD: &str = "gold";

/// Key of the mean proxy reward.
pub const KEY_PROXY_MEAN: &str = "reward/proxy/mean";
/// Key of the mean gold reward.
pub const KEY_GOLD_MEAN: &str = "reward/gold/mean";
/// Key of the sequence-level KL to the reference (k1, mean over sequences of the sum over
/// tokens).
pub const KEY_KL: &str = "kl/ref";
/// Key of `d = sqrt(KL)` (Gao et al.'s distance).
pub const KEY_KL_D: &str = "kl/d";
/// Key of the token-mean entropy.
pub const KEY_ENTROPY: &str = "entropy";
/// Key of the mean response length.
pub const KEY_LENGTH_MEAN: &str = "length/mean";
/// Key of the ensemble disagreement.
pub const KEY_DISAGREEMENT: &str = "reward/ensemble/disagreement";
/// Key of the advantage skewness.
pub const KEY_ADVANTAGE_SKEW: &str = "advantage/skew";
/// Key of the mean proxy-minus-gold gap.
pub const KEY_GAP: &str = "gap/proxy_gold";

/// Reads 1-element tensors back in one transfer.
fn read<B: Backend>(parts: Vec<Tensor<B, 1>>) -> Vec<f64> {
    Tensor::cat(parts, 0)
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap_or_default()
}

fn require_tokens<B: Backend>(mask: &Tensor<B, 2>) -> Result<()> {
    if mask.clone().sum().into_scalar().elem::<f64>() <= 0.0 {
        return Err(GoodhartError::Empty {
            what: "response tokens (mask is all zero)".into(),
        });
    }
    Ok(())
}

/// Sampled estimates of `KL(pi || pi_ref)` from the log-probabilities of the sampled tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlStats {
    /// k1 `= lp - lr`, mean over response tokens (token-mean).
    pub k1_token: f64,
    /// k1 summed over each sequence's tokens, mean over sequences: the unbiased estimate of
    /// the sequence-level KL that Gao et al.'s `d` uses.
    pub k1_seq: f64,
    /// k3 `= exp(-x) + x - 1` with `x = lp - lr` (Schulman's low-variance, non-negative
    /// estimator), token-mean.
    pub k3_token: f64,
    /// k3 summed per sequence, mean over sequences.
    pub k3_seq: f64,
    /// `d = sqrt(max(k1_seq, 0))`; a negative k1 estimate (possible with few samples)
    /// counts as distance 0.
    pub d: f64,
}

/// KL to the reference from sampled log-probs `logp`, `logp_ref` `[N, T]` under the
/// response mask. k3's input is clamped to `[-20, 20]` as verl does (its output is not
/// clamped: a metric should show a large value). Padding may hold anything.
///
/// Errors on shape mismatch, non-finite values under the mask, and an all-zero mask.
pub fn kl_to_ref<B: Backend>(
    logp: Tensor<B, 2>,
    logp_ref: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
) -> Result<KlStats> {
    check_same_shape(mask, "mask", &logp, "logp")?;
    check_same_shape(mask, "mask", &logp_ref, "logp_ref")?;
    check_finite_masked(&logp, mask, "logp")?;
    check_finite_masked(&logp_ref, mask, "logp_ref")?;
    require_tokens(mask)?;
    let x = zero_masked(logp - logp_ref, mask);
    let k3 = zero_masked(
        x.clone().clamp(-20.0, 20.0).neg().exp() + x.clone().clamp(-20.0, 20.0) - 1.0,
        mask,
    );
    let v = read(vec![
        masked_mean(x.clone(), mask),
        x.sum_dim(1).mean().reshape([1]),
        masked_mean(k3.clone(), mask),
        k3.sum_dim(1).mean().reshape([1]),
    ]);
    Ok(KlStats {
        k1_token: v[0],
        k1_seq: v[1],
        k3_token: v[2],
        k3_seq: v[3],
        d: v[1].max(0.0).sqrt(),
    })
}

/// Token-mean of per-token entropies `[N, T]` under the mask (verl's `actor/entropy`).
pub fn entropy_mean<B: Backend>(entropy: Tensor<B, 2>, mask: &Tensor<B, 2>) -> Result<f64> {
    check_same_shape(mask, "mask", &entropy, "entropy")?;
    check_finite_masked(&entropy, mask, "entropy")?;
    require_tokens(mask)?;
    Ok(read(vec![masked_mean(entropy, mask)])[0])
}

/// [`Summary`] (mean, sample std, min, max) of a vector on the device, e.g. one reward
/// source's values. Errors on an empty or non-finite vector.
pub fn summary<B: Backend>(x: Tensor<B, 1>, what: &str) -> Result<Summary> {
    let n = x.dims()[0];
    if n == 0 {
        return Err(GoodhartError::Empty { what: what.into() });
    }
    check_finite(&x, what)?;
    let mean = x.clone().mean();
    let ss = (x.clone() - mean.clone()).powi_scalar(2).sum();
    let v = read(vec![mean, ss, x.clone().min(), x.max()]);
    Ok(Summary {
        count: n,
        mean: v[0],
        std: if n > 1 {
            (v[1] / (n as f64 - 1.0)).sqrt()
        } else {
            0.0
        },
        min: v[2],
        max: v[3],
    })
}

/// Mean proxy-minus-gold gap `mean(proxy - gold)`: positive and growing when the proxy
/// over-reports. Both must be on the same scale for this to mean anything (the raw
/// difference is reported, no standardisation).
pub fn proxy_gold_gap<B: Backend>(proxy: Tensor<B, 1>, gold: Tensor<B, 1>) -> Result<f64> {
    check_same_shape(&proxy, "proxy", &gold, "gold")?;
    check_finite(&proxy, "proxy")?;
    check_finite(&gold, "gold")?;
    if proxy.dims()[0] == 0 {
        return Err(GoodhartError::Empty {
            what: "proxy".into(),
        });
    }
    Ok(read(vec![(proxy - gold).mean()])[0])
}

/// Pearson and Spearman (average ranks for ties) correlation of proxy and gold over a
/// batch; `None` when either is constant over the batch (undefined). Reads both vectors
/// back (see the module docs).
pub fn proxy_gold_correlation<B: Backend>(
    proxy: Tensor<B, 1>,
    gold: Tensor<B, 1>,
) -> Result<Option<(f64, f64)>> {
    check_same_shape(&proxy, "proxy", &gold, "gold")?;
    let to_vec = |t: Tensor<B, 1>| {
        t.into_data()
            .convert::<f64>()
            .into_vec()
            .unwrap_or_default()
    };
    let (p, g): (Vec<f64>, Vec<f64>) = (to_vec(proxy), to_vec(gold));
    stats::check_pair(&p, "proxy", &g, "gold")?;
    match (stats::pearson(&p, &g), stats::spearman(&p, &g)) {
        (Ok(r), Ok(s)) => Ok(Some((r, s))),
        (Err(GoodhartError::InvalidArgument { .. }), _) => Ok(None),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// Response-length statistics from the response mask `[N, T]` (length = masked-in tokens).
pub fn length_summary<B: Backend>(mask: &Tensor<B, 2>) -> Result<Summary> {
    summary(mask.clone().sum_dim(1).squeeze_dim(1), "response lengths")
}

/// Fraction of groups whose rewards all agree (population std `<= tol`): such groups
/// give GRPO / RLOO a zero advantage and no gradient (DAPO's dynamic sampling filters
/// them). A group of one counts as zero-std. `tol` absorbs f32 rounding; 1e-6 is a
/// sensible default.
pub fn zero_std_fraction<B: Backend>(
    rewards: Tensor<B, 1>,
    groups: &Groups,
    tol: f64,
) -> Result<f64> {
    if !(tol >= 0.0 && tol.is_finite()) {
        return Err(GoodhartError::invalid("tol", "must be finite and >= 0"));
    }
    check_finite(&rewards, "rewards")?;
    let s = group_stats(rewards, groups)?;
    let zero = s.std(false).lower_equal_elem(tol).float().mean();
    Ok(read(vec![zero])[0])
}

/// Ensemble disagreement: the variance across the `K` members of each response's reward,
/// averaged over responses. `members` is `[K, N]`; `unbiased` picks the `K - 1` divisor
/// (else `K`, the population variance that uncertainty-weighted optimisation uses).
/// Errors for fewer than two members.
pub fn ensemble_disagreement<B: Backend>(members: Tensor<B, 2>, unbiased: bool) -> Result<f64> {
    let [k, n] = members.dims();
    if k < 2 {
        return Err(GoodhartError::invalid(
            "members",
            format!("disagreement needs at least 2 ensemble members, got {k}"),
        ));
    }
    if n == 0 {
        return Err(GoodhartError::Empty {
            what: "members".into(),
        });
    }
    check_finite(&members, "members")?;
    let mean = members.clone().mean_dim(0);
    let ss = (members - mean).powi_scalar(2).sum_dim(0);
    let var = ss / if unbiased { k as f64 - 1.0 } else { k as f64 };
    Ok(read(vec![var.mean()])[0])
}

/// Fractions of response tokens where the PPO ratio is clipped (TRL's `clip_ratio/*`):
/// `low`: `ratio < 1 - eps_low` with `A < 0`; `high`: `ratio > 1 + eps_high` with `A > 0`;
/// `region`: either. `ratio = exp(lp - lp_old)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipStats {
    /// Token fraction clipped at the lower bound.
    pub low: f64,
    /// Token fraction clipped at the upper bound.
    pub high: f64,
    /// Token fraction clipped at either bound.
    pub region: f64,
}

/// [`ClipStats`] of a batch (`logp`, `logp_old`, `advantages`, `mask` all `[N, T]`).
pub fn clip_fractions<B: Backend>(
    logp: Tensor<B, 2>,
    logp_old: Tensor<B, 2>,
    advantages: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    eps_low: f64,
    eps_high: f64,
) -> Result<ClipStats> {
    for (t, name) in [
        (&logp, "logp"),
        (&logp_old, "logp_old"),
        (&advantages, "advantages"),
    ] {
        check_same_shape(mask, "mask", t, name)?;
        check_finite_masked(t, mask, name)?;
    }
    if !((0.0..1.0).contains(&eps_low) && eps_high >= 0.0 && eps_high.is_finite()) {
        return Err(GoodhartError::invalid(
            "eps_low/eps_high",
            "need 0 <= eps_low < 1 and 0 <= eps_high",
        ));
    }
    require_tokens(mask)?;
    let ratio = zero_masked(logp - logp_old, mask).clamp(-20.0, 20.0).exp();
    let low = ratio
        .clone()
        .lower_elem(1.0 - eps_low)
        .bool_and(advantages.clone().lower_elem(0.0))
        .float();
    let high = ratio
        .greater_elem(1.0 + eps_high)
        .bool_and(advantages.greater_elem(0.0))
        .float();
    let region = low.clone() + high.clone();
    let v = read(vec![
        masked_mean(low, mask),
        masked_mean(high, mask),
        masked_mean(region, mask),
    ]);
    Ok(ClipStats {
        low: v[0],
        high: v[1],
        region: v[2],
    })
}

/// Moments of the token advantages under the mask, for the proxy-only detector's
/// "advantage distribution shift" signal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdvantageStats {
    /// Token-mean advantage.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Skewness `m3 / m2^1.5` (population moments; 0 when the std is 0).
    pub skew: f64,
    /// Fraction of tokens with a positive advantage.
    pub pos_frac: f64,
}

/// [`AdvantageStats`] of token advantages `[N, T]`.
pub fn advantage_stats<B: Backend>(
    advantages: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
) -> Result<AdvantageStats> {
    check_same_shape(mask, "mask", &advantages, "advantages")?;
    check_finite_masked(&advantages, mask, "advantages")?;
    require_tokens(mask)?;
    let a = zero_masked(advantages, mask);
    let mean = masked_mean(a.clone(), mask);
    let c = a.clone() - mean.clone().unsqueeze();
    let m2 = masked_mean(c.clone().powi_scalar(2), mask);
    let m3 = masked_mean(c.powi_scalar(3), mask);
    let pos = masked_mean(a.greater_elem(0.0).float(), mask);
    let v = read(vec![mean, m2, m3, pos]);
    let std = v[1].max(0.0).sqrt();
    let skew = if v[1] > 1e-12 {
        v[2] / v[1].powf(1.5)
    } else {
        0.0
    };
    Ok(AdvantageStats {
        mean: v[0],
        std,
        skew,
        pos_frac: v[3],
    })
}

/// Optional per-step tensors that [`batch_metrics`] uses beyond the batch itself.
#[derive(Debug, Clone)]
pub struct StepInputs<B: Backend> {
    /// Log-probs of the sampled tokens under the current policy `[N, T]` (with the batch's
    /// `logp_ref`, gives the KL keys).
    pub logp: Option<Tensor<B, 2>>,
    /// Per-token entropy `[N, T]`.
    pub entropy: Option<Tensor<B, 2>>,
    /// Token advantages `[N, T]`.
    pub advantages: Option<Tensor<B, 2>>,
    /// Ensemble member rewards `[K, N]`.
    pub ensemble: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for StepInputs<B> {
    fn default() -> Self {
        Self {
            logp: None,
            entropy: None,
            advantages: None,
            ensemble: None,
        }
    }
}

fn insert_summary(out: &mut BTreeMap<String, f64>, prefix: &str, s: &Summary) {
    out.insert(format!("{prefix}/mean"), s.mean);
    out.insert(format!("{prefix}/std"), s.std);
    out.insert(format!("{prefix}/min"), s.min);
    out.insert(format!("{prefix}/max"), s.max);
}

/// Every metric the batch and `inputs` allow, as one flat map:
/// - `reward/<source>/{mean,std,min,max}` for each reward source of the batch;
/// - with `proxy` and `gold` sources: `gap/proxy_gold`, `corr/proxy_gold/pearson` and
///   `corr/proxy_gold/spearman` (absent when either reward is constant over the batch);
/// - `length/{mean,std,min,max}`; `groups/zero_std_frac` of the proxy (tol 1e-6);
/// - with `inputs.logp` and the batch's `logp_ref`: `kl/ref` (k1, sequence sum, mean over
///   sequences), `kl/ref/token`, `kl/ref/k3`, `kl/ref/k3_token`, `kl/d`;
/// - `entropy`; `advantage/{mean,std,skew,pos_frac}`; `reward/ensemble/disagreement`
///   (population variance), each when its input is given.
pub fn batch_metrics<B: Backend>(
    batch: &RolloutBatch<B>,
    inputs: &StepInputs<B>,
) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let mask = batch.response_mask();
    for (name, r) in batch.rewards() {
        insert_summary(
            &mut out,
            &format!("reward/{name}"),
            &summary(r.clone(), name)?,
        );
    }
    if let (Ok(p), Ok(g)) = (batch.reward(PROXY), batch.reward(GOLD)) {
        out.insert(KEY_GAP.into(), proxy_gold_gap(p.clone(), g.clone())?);
        if let Some((r, s)) = proxy_gold_correlation(p.clone(), g.clone())? {
            out.insert("corr/proxy_gold/pearson".into(), r);
            out.insert("corr/proxy_gold/spearman".into(), s);
        }
    }
    if let Ok(p) = batch.reward(PROXY) {
        out.insert(
            "groups/zero_std_frac".into(),
            zero_std_fraction(p.clone(), batch.groups(), 1e-6)?,
        );
    }
    insert_summary(&mut out, "length", &length_summary(mask)?);
    if let (Some(lp), Some(lr)) = (&inputs.logp, batch.logp_ref()) {
        let kl = kl_to_ref(lp.clone(), lr.clone(), mask)?;
        out.insert(KEY_KL.into(), kl.k1_seq);
        out.insert("kl/ref/token".into(), kl.k1_token);
        out.insert("kl/ref/k3".into(), kl.k3_seq);
        out.insert("kl/ref/k3_token".into(), kl.k3_token);
        out.insert(KEY_KL_D.into(), kl.d);
    }
    if let Some(h) = &inputs.entropy {
        out.insert(KEY_ENTROPY.into(), entropy_mean(h.clone(), mask)?);
    }
    if let Some(a) = &inputs.advantages {
        let s = advantage_stats(a.clone(), mask)?;
        out.insert("advantage/mean".into(), s.mean);
        out.insert("advantage/std".into(), s.std);
        out.insert(KEY_ADVANTAGE_SKEW.into(), s.skew);
        out.insert("advantage/pos_frac".into(), s.pos_frac);
    }
    if let Some(e) = &inputs.ensemble {
        let [_, n] = e.dims();
        if n != batch.len() {
            return Err(GoodhartError::shape(
                "ensemble (members, responses)",
                &[e.dims()[0], batch.len()],
                &e.dims(),
            ));
        }
        out.insert(
            KEY_DISAGREEMENT.into(),
            ensemble_disagreement(e.clone(), false)?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Int;
    use goodhart_core::testing::tolerance;

    fn close(a: f64, b: f64, tol: f32) {
        assert!((a - b).abs() <= tol as f64, "{a} vs {b} (tol {tol})");
    }

    goodhart_core::backend_test! {
        fn kl_entropy_and_clip_by_hand<B>(device) {
            let tol = tolerance(1e-5);
            // x = lp - lr on valid tokens: row 0: 0.5, -0.5 ; row 1: 1.0 (last token padding, NaN)
            let lp = Tensor::<B, 2>::from_floats([[-1.0, -2.0, 0.0], [-0.5, 0.0, f32::NAN]], device);
            let lr = Tensor::<B, 2>::from_floats([[-1.5, -1.5, 0.0], [-1.5, 0.0, 0.0]], device);
            let m = Tensor::<B, 2>::from_floats([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], device);
            let kl = kl_to_ref(lp.clone(), lr.clone(), &m).unwrap();
            // k1 token-mean (0.5 - 0.5 + 1)/3 = 1/3; per sequence sums 0 and 1 -> 0.5
            close(kl.k1_token, 1.0 / 3.0, tol);
            close(kl.k1_seq, 0.5, tol);
            close(kl.d, 0.5f64.sqrt(), tol);
            // k3(x) = e^-x + x - 1: k3(.5) = .1065307, k3(-.5) = .1487213, k3(1) = .3678794
            let (a, b, c) = ((-0.5f64).exp() - 0.5, 0.5f64.exp() - 1.5, (-1.0f64).exp());
            close(kl.k3_token, (a + b + c) / 3.0, tol);
            close(kl.k3_seq, (a + b + c) / 2.0, tol);
            assert!(kl_to_ref(lp.clone(), lr.clone(), &Tensor::zeros([2, 3], device)).is_err());
            assert!(kl_to_ref(lp.clone(), lr.clone().slice([0..2, 0..2]), &m).is_err());

            let h = Tensor::<B, 2>::from_floats([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], device);
            close(entropy_mean(h, &m).unwrap(), 2.0, tol);

            // ratios on valid tokens: e^.5 = 1.65 (A>0: high), e^-.5 = .61 (A<0: low), e^1 (A<0: none)
            let adv = Tensor::<B, 2>::from_floats([[1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]], device);
            let c = clip_fractions(lp, lr, adv, &m, 0.2, 0.28).unwrap();
            close(c.low, 1.0 / 3.0, tol);
            close(c.high, 1.0 / 3.0, tol);
            close(c.region, 2.0 / 3.0, tol);
        }
    }

    goodhart_core::backend_test! {
        fn batch_metrics_by_hand<B>(device) {
            let tol = tolerance(1e-5);
            let tokens = Tensor::<B, 2, Int>::zeros([4, 3], device);
            let mask = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], device);
            let groups = Groups::new(vec![0, 0, 1, 1]).unwrap();
            let batch = RolloutBatch::new(tokens, mask, groups).unwrap()
                .with_reward(PROXY, Tensor::from_floats([1.0, 2.0, 3.0, 3.0], device)).unwrap()
                .with_reward(GOLD, Tensor::from_floats([1.0, 3.0, 2.0, 4.0], device)).unwrap();
            let ens = Tensor::<B, 2>::from_floats([[0.0, 1.0, 2.0, 2.0], [2.0, 1.0, 2.0, 4.0]], device);
            let m = batch_metrics(&batch, &StepInputs { ensemble: Some(ens), ..Default::default() }).unwrap();
            // proxy 1,2,3,3: mean 2.25, ss = 1.5625+.0625+.5625+.5625 = 2.75, std sqrt(2.75/3)
            close(m["reward/proxy/mean"], 2.25, tol);
            close(m["reward/proxy/std"], (2.75f64 / 3.0).sqrt(), tol);
            close(m["reward/proxy/min"], 1.0, 0.0);
            close(m["reward/gold/max"], 4.0, 0.0);
            // gap: mean(0, -1, 1, -1) = -0.25
            close(m[KEY_GAP], -0.25, tol);
            // pearson: dp = -1.25,-.25,.75,.75; dg = -1.5,.5,-.5,1.5
            // sxy = 1.875 - .125 - .375 + 1.125 = 2.5; sxx = 2.75; syy = 5
            close(m["corr/proxy_gold/pearson"], 2.5 / (2.75f64 * 5.0).sqrt(), tol);
            // ranks p = 1,2,3.5,3.5 ; g = 1,3,2,4: dp = -1.5,-.5,1,1 ; dg = -1.5,.5,-.5,1.5
            // sxy = 2.25 - .25 - .5 + 1.5 = 3; sxx = 2.25+.25+1+1 = 4.5; syy = 5
            close(m["corr/proxy_gold/spearman"], 3.0 / (4.5f64 * 5.0).sqrt(), tol);
            // group 1 has proxy 3, 3: one of two groups has zero std
            close(m["groups/zero_std_frac"], 0.5, 0.0);
            // lengths 3,1,2,2
            close(m["length/mean"], 2.0, tol);
            close(m["length/max"], 3.0, 0.0);
            // member variances (population): 1, 0, 0, 1 -> 0.5
            close(m[KEY_DISAGREEMENT], 0.5, tol);
            assert!(!m.contains_key(KEY_KL));
        }
    }

    goodhart_core::backend_test! {
        fn step_inputs_are_validated<B>(device) {
            let groups = Groups::new(vec![0, 0, 1]).unwrap();
            assert!(matches!(zero_std_fraction(Tensor::<B, 1>::from_floats([1.0, 2.0], device), &groups, 1e-6),
                Err(GoodhartError::ShapeMismatch { .. })));
            assert!(matches!(ensemble_disagreement(Tensor::<B, 2>::zeros([1, 3], device), false),
                Err(GoodhartError::InvalidArgument { .. })));
            assert!(matches!(summary(Tensor::<B, 1>::from_floats([1.0, f32::INFINITY], device), "r"),
                Err(GoodhartError::NonFinite { .. })));
            assert!(proxy_gold_correlation(Tensor::<B, 1>::from_floats([1.0, 1.0], device),
                Tensor::<B, 1>::from_floats([1.0, 2.0], device)).unwrap().is_none());
            let a = Tensor::<B, 2>::from_floats([[3.0, 0.0, 0.0, 0.0]], device);
            let m = Tensor::<B, 2>::ones([1, 4], device);
            // values 3,0,0,0: mean .75, c = 2.25,-.75x3: m2 = (5.0625 + 3*.5625)/4 = 1.6875
            // m3 = (11.390625 - 3*.421875)/4 = 2.53125; skew = 2.53125/1.6875^1.5
            let s = advantage_stats(a, &m).unwrap();
            close(s.skew, 2.53125 / 1.6875f64.powf(1.5), tolerance(1e-5));
            close(s.pos_frac, 0.25, 0.0);
        }
    }
}
