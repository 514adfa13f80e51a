//! Best-of-n sampling against a proxy, with the gold reward measured on the same samples
//! (Gao, Schulman & Hilton 2022, section 3.2 and appendix).
//!
//! For each prompt, `N = samples_per_prompt` responses are drawn from the policy
//! (temperature 1, at most `max_len + 1` tokens: the generator's cap; stream
//! `seed::rng(seed, "bon/sample")`), scored by the proxy and by the gold reward. For each
//! `n` the best-of-n value is the *unbiased* estimate over all `C(N, n)` subsets
//! (goodhart-metrics [`bon_unbiased`]): with the samples sorted ascending by proxy,
//!
//! ```text
//! E[gold of best-of-n] = sum_{i=n}^{N} C(i-1, n-1) / C(N, n) * gold_(i)
//! ```
//!
//! averaged over prompts (and the same for the proxy itself). The KL of the best-of-n
//! policy from the sampling policy is the analytic `log n - (n-1)/n` ([`bon_kl`], an upper
//! bound), and `d = sqrt(KL)`: the x-axis of Gao et al.'s best-of-n law
//! `R(d) = d (alpha - beta d)`.
//!
//! Prompts cycle through the topics (`prompt i` is topic `i mod topics`).

use burn::tensor::backend::Backend;
use goodhart_core::{seed, GoodhartError, Result};
use goodhart_envs::language::{Language, EOS, PAD};
use goodhart_metrics::overopt::{bon_kl, bon_unbiased};
use goodhart_policy::{GenerationConfig, TransformerLm};
use serde::{Deserialize, Serialize};

use goodhart_reward::RewardSource;

use crate::{
    policy_gradient::{host, sample_and_score, Proxy},
    task::LanguageTask,
};

/// One point of the best-of-n curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BonPoint {
    /// `n`.
    pub n: usize,
    /// `KL(best-of-n || policy) = log n - (n - 1)/n` (nats).
    pub kl: f64,
    /// `sqrt(kl)`.
    pub d: f64,
    /// Unbiased best-of-n proxy reward, mean over prompts.
    pub proxy: f64,
    /// Unbiased best-of-n gold reward, mean over prompts.
    pub gold: f64,
}

/// The best-of-n curve from per-prompt samples: `proxy[p]` and `gold[p]` hold the `N`
/// samples of prompt `p`. Errors on no prompts, mismatched or empty rows, non-finite
/// values, `n = 0` or `n > N` of some prompt.
pub fn bon_points(proxy: &[Vec<f64>], gold: &[Vec<f64>], ns: &[usize]) -> Result<Vec<BonPoint>> {
    if proxy.is_empty() || ns.is_empty() {
        return Err(GoodhartError::Empty {
            what: "best-of-n prompts / ns".into(),
        });
    }
    if proxy.len() != gold.len() {
        return Err(GoodhartError::shape(
            "gold rows",
            &[proxy.len()],
            &[gold.len()],
        ));
    }
    ns.iter()
        .map(|&n| {
            let kl = bon_kl(n)?;
            let (mut p_sum, mut g_sum) = (0.0, 0.0);
            for (p, g) in proxy.iter().zip(gold) {
                p_sum += bon_unbiased(p, p, n)?;
                g_sum += bon_unbiased(p, g, n)?;
            }
            let k = proxy.len() as f64;
            Ok(BonPoint {
                n,
                kl,
                d: kl.max(0.0).sqrt(),
                proxy: p_sum / k,
                gold: g_sum / k,
            })
        })
        .collect()
}

/// Best-of-n of `policy` against `proxy` for every `n` in `ns` (see the module docs):
/// `samples_per_prompt` samples for each of `prompts` prompts. Deterministic in `seed`.
///
/// Errors on `prompts = 0`, an `n` outside `1..=samples_per_prompt`, or a policy whose
/// `max_seq_len` cannot hold a prompt and `max_len + 1` tokens.
#[allow(clippy::too_many_arguments)]
pub fn best_of_n<B: Backend>(
    policy: &TransformerLm<B>,
    lang: &Language,
    proxy: &Proxy<B>,
    gold: &dyn RewardSource<B>,
    ns: &[usize],
    samples_per_prompt: usize,
    prompts: usize,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<BonPoint>> {
    if prompts == 0 || ns.is_empty() {
        return Err(GoodhartError::Empty {
            what: "best-of-n prompts / ns".into(),
        });
    }
    if let Some(&bad) = ns.iter().find(|&&n| n == 0 || n > samples_per_prompt) {
        return Err(GoodhartError::invalid(
            "n",
            format!(
                "best-of-n needs 1 <= n <= samples_per_prompt = {samples_per_prompt}, got {bad}"
            ),
        ));
    }
    let generation = GenerationConfig::new(lang.config().max_len + 1)
        .with_eos_id(Some(EOS as usize))
        .with_pad_id(PAD as usize);
    let mut rng = seed::rng(seed, "bon/sample");
    let task = LanguageTask::new(lang, proxy, gold);
    let topics = lang.config().topics;
    let (mut proxy_rows, mut gold_rows) =
        (Vec::with_capacity(prompts), Vec::with_capacity(prompts));
    for i in 0..prompts {
        let rows = vec![i % topics; samples_per_prompt];
        let s = sample_and_score(policy, &task, &rows, &generation, &mut rng, device)?;
        proxy_rows.push(host(s.proxy)?);
        gold_rows.push(s.gold);
    }
    bon_points(&proxy_rows, &gold_rows, ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_model::ProxyConfig;
    use goodhart_core::testing::tolerance;
    use goodhart_envs::language::LanguageConfig;
    use goodhart_policy::TransformerConfig;

    #[test]
    fn unbiased_estimator_by_hand() {
        // One prompt, N = 3: proxy (1, 3, 2), gold (10, 30, 20); sorted by proxy the gold
        // is (10, 20, 30).
        //   n = 1: weights C(i-1,0)/C(3,1) = 1/3 each -> 20 (the mean)
        //   n = 2: i = 2: C(1,1)/C(3,2) = 1/3, i = 3: C(2,1)/3 = 2/3 -> 20/3 + 60/3 = 26.667
        //          (subsets {1,3},{1,2},{3,2}: best golds 30, 20, 30 -> mean 26.667)
        //   n = 3: the maximum -> 30
        // A second prompt, N = 3, proxy (0, 0, 1) gold (4, 8, 5): ties average to 6, 6, 5
        //   n = 1: 17/3; n = 2: 6/3 + 2 * 5/3 = 16/3; n = 3: 5.
        let proxy = vec![vec![1.0, 3.0, 2.0], vec![0.0, 0.0, 1.0]];
        let gold = vec![vec![10.0, 30.0, 20.0], vec![4.0, 8.0, 5.0]];
        let pts = bon_points(&proxy, &gold, &[1, 2, 3]).unwrap();
        let want_gold = [
            (20.0 + 17.0 / 3.0) / 2.0,
            (80.0 / 3.0 + 16.0 / 3.0) / 2.0,
            (30.0 + 5.0) / 2.0,
        ];
        // proxy of best-of-n: prompt 1 proxies (1,2,3): 2, 8/3, 3; prompt 2 (0,0,1): 1/3, 2/3, 1
        let want_proxy = [(2.0 + 1.0 / 3.0) / 2.0, (8.0 / 3.0 + 2.0 / 3.0) / 2.0, 2.0];
        // KL: 0, ln 2 - 1/2 = 0.193147, ln 3 - 2/3 = 0.431946
        let want_kl = [0.0, 2f64.ln() - 0.5, 3f64.ln() - 2.0 / 3.0];
        for (i, p) in pts.iter().enumerate() {
            assert_eq!(p.n, i + 1);
            assert!((p.gold - want_gold[i]).abs() < 1e-9, "{p:?}");
            assert!((p.proxy - want_proxy[i]).abs() < 1e-9, "{p:?}");
            assert!((p.kl - want_kl[i]).abs() < 1e-12, "{p:?}");
            assert!((p.d - want_kl[i].sqrt()).abs() < 1e-12);
        }
        assert!(bon_points(&proxy, &gold, &[4]).is_err());
        assert!(bon_points(&proxy, &gold, &[0]).is_err());
        assert!(bon_points(&proxy, &gold[..1], &[1]).is_err());
        assert!(bon_points(&[], &[], &[1]).is_err());
    }

    goodhart_core::backend_test! {
        fn best_of_n_is_deterministic_and_checks_n<B>(device) {
            let lang = Language::new(LanguageConfig::default()).unwrap();
            let (policy, rm) = goodhart_core::seed::seeded::<B, _>(device, 0, "test", || {
                let policy = TransformerConfig::new(lang.vocab_size(), 16, 1, 2, 32).init::<B>(device).unwrap();
                // A random proxy on the untrained policy: n = 1 is the plain sample mean.
                (policy, ProxyConfig::default().model(&lang).init::<B>(device).unwrap())
            });
            let proxy = crate::policy_gradient::proxy(vec![rm], goodhart_reward::Aggregator::Mean).unwrap();
            let gold = crate::policy_gradient::LanguageGold::new(&lang);
            let pts = best_of_n(&policy, &lang, &proxy, &gold, &[1, 4], 8, 2, 5, device).unwrap();
            let again = best_of_n(&policy, &lang, &proxy, &gold, &[1, 4], 8, 2, 5, device).unwrap();
            assert_eq!(pts, again, "same seed, same numbers");
            assert!((pts[1].kl - 0.636_294).abs() < 1e-6, "{:?}", pts[1]);
            assert!(pts[1].proxy >= pts[0].proxy - tolerance(1e-6) as f64);
            assert!(matches!(best_of_n(&policy, &lang, &proxy, &gold, &[9], 8, 2, 5, device), Err(GoodhartError::InvalidArgument { .. })));
            assert!(best_of_n(&policy, &lang, &proxy, &gold, &[1], 8, 0, 5, device).is_err());
        }
    }
}
