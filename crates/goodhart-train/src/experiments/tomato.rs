//! ORPO's tomato experiment ("Correlated Proxies", Laidlaw et al.): does optimising the
//! proxy lower the true return below the base policy's (hacking), and does chi-squared
//! occupancy regularisation hold it back better than action-distribution KL?
//!
//! Stages, per seed `s`:
//! - `tomato/s{s}/base`: PPO on the **true** reward in the environment with random actions
//!   (`base_eps`, 0.1 in the paper); the base policy is saved and evaluated in the
//!   experiment's environment;
//! - `tomato/s{s}/proxy`: PPO on the **proxy**, no regularisation, from a fresh agent
//!   (`proxy_init = "random"`, as ORPO's tomato runs) or from the base policy;
//! - `tomato/s{s}/action_kl={c}` and `tomato/s{s}/chi2={c}`: the same with each
//!   coefficient of the sweep, toward the base policy (whatever the starting point).
//!
//! Every policy is evaluated on `eval_episodes` evaluation episodes (`tomato/eval`), which
//! give every reported figure; a regularised policy whose sweep has more than one
//! coefficient also plays as many selection episodes (`tomato/select`), which pick the
//! sweep's best coefficient (the highest mean true return over seeds), so no figure is
//! measured on the episodes that chose it. The summary table gives the mean and standard
//! deviation over seeds of the true return, the proxy return and how often episodes visit
//! the bucket; a second one, the chosen coefficients and the paired chi-squared minus
//! action-KL difference per seed, with a percentile-bootstrap interval of its mean and
//! Wilcoxon's signed-rank test (`goodhart_metrics::stats::wilcoxon_signed_rank`).

use std::collections::BTreeMap;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::seed;
use goodhart_envs::tomato::{Board, TomatoConfig, NUM_ACTIONS};
use goodhart_metrics::step::{KEY_GOLD_MEAN, KEY_PROXY_MEAN};
use goodhart_policy::checkpoint::{load_module, save_module};
use goodhart_regularize::{
    action_kl::ActionKlConfig, occupancy::OccupancyConfig, RegularizerConfig,
};

use super::{checkpoint_error, mean_sd, seed_mean, stage_error, table, Experiment, Logger, Part};
use crate::{
    config::{coefficients, positive, section, ConfigError, ExperimentConfig},
    ppo::{self, Agent, IterationMetrics, PpoConfig, Returns, TrainReward},
    runner::{Result, Runner},
};

/// ORPO's tomato experiment: a base policy trained on the true reward (with random
/// actions), then PPO on the proxy from it without regularisation, with action-distribution
/// KL and with chi-squared occupancy regularisation at each coefficient, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TomatoExperiment {
    /// Seeds per arm.
    pub seeds: usize,
    /// The environment the proxy is optimised and every policy is evaluated in.
    pub env: TomatoConfig,
    /// Random-action probability of the base policy's training environment (0.1, ORPO).
    pub base_eps: f64,
    /// PPO for the base policy (true reward).
    pub base: PpoConfig,
    /// PPO on the proxy (and its regularised arms).
    pub ppo: PpoConfig,
    /// Where proxy PPO starts: a freshly initialised agent (ORPO's tomato runs) or the
    /// base policy. Either way the regularisers pull toward the base policy.
    pub proxy_init: ProxyInit,
    /// Action-distribution KL coefficients.
    pub action_kl: Vec<f64>,
    /// Chi-squared occupancy coefficients.
    pub chi2: Vec<f64>,
    /// Evaluation episodes per policy.
    pub eval_episodes: usize,
}

impl Default for TomatoExperiment {
    /// ORPO's protocol at about 1/12 of its budget, measured on ndarray (the `tomato`
    /// preset, figures in `docs/lab.md`): a base policy of 5 PPO iterations of 16
    /// environments on the true reward (8000 steps; ORPO's base checkpoint is 3 iterations
    /// of 3000), then proxy PPO of 40 iterations of 32 environments (128 000 steps; ORPO
    /// 500 of 3000) from a fresh agent, with the other [`PpoConfig`] defaults. Started
    /// from a 2-iteration base policy instead, proxy PPO of 16 environments found the
    /// bucket in 2 of 5 seeds after 40 and after 80 iterations, and watered tomatoes in
    /// the others; from a fresh agent, in 4 of 5 with 16 environments and 5 of 5 with 32.
    fn default() -> Self {
        Self {
            seeds: 5,
            env: TomatoConfig::default(),
            base_eps: 0.1,
            base: PpoConfig {
                iterations: 5,
                ..PpoConfig::default()
            },
            ppo: PpoConfig {
                iterations: 40,
                envs: 32,
                ..PpoConfig::default()
            },
            proxy_init: ProxyInit::Random,
            action_kl: vec![0.01, 0.1, 1.0],
            chi2: vec![0.01, 0.1, 1.0],
            eval_episodes: 200,
        }
    }
}

/// The starting point of PPO on the proxy in [`TomatoExperiment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyInit {
    /// A freshly initialised policy and value network (seeded per stage), as ORPO's
    /// tomato experiments do ("we start from a randomly initialized policy").
    Random,
    /// The base policy and its value network.
    Base,
}

impl Experiment for TomatoExperiment {
    const NAME: &'static str = "tomato";
    const SUMMARY: &'static str = "base policy, proxy PPO, action-KL and chi-squared sweeps (ORPO)";
    type Output = Vec<Evaluated>;

    fn validate(&self, _: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        let t = self;
        positive("tomato.seeds", t.seeds)?;
        section("tomato.base", t.base.validate())?;
        section("tomato.ppo", t.ppo.validate())?;
        positive("tomato.eval_episodes", t.eval_episodes)?;
        section("tomato.env", t.env.validate())?;
        if !(0.0..=1.0).contains(&t.base_eps) {
            return Err(ConfigError::invalid(
                "tomato.base_eps",
                format!("{} is not a probability", t.base_eps),
            ));
        }
        coefficients("tomato.action_kl", &t.action_kl)?;
        coefficients("tomato.chi2", &t.chi2)?;
        if t.proxy_init == ProxyInit::Base && t.ppo.hidden != t.base.hidden {
            return Err(ConfigError::invalid(
                "tomato.ppo.hidden",
                format!(
                    "{:?} differs from tomato.base.hidden {:?}: proxy_init = \"base\" \
                     starts proxy PPO from the base policy, so the networks must match",
                    t.ppo.hidden, t.base.hidden
                ),
            ));
        }
        // The board parses, and every arm's regulariser fits it.
        for (method, coef) in arms(t) {
            regularizer(t, &method, coef, 0)
                .map_err(|e| ConfigError::invalid("tomato.env.board", e.to_string()))?;
        }
        Ok(())
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Vec<Evaluated>> {
        run::<B>(runner, self, config.seed, device)
    }

    fn summarize(&self, evals: &Vec<Evaluated>) -> Part {
        let (figures, tables) = summarize(self, evals);
        Part {
            figures,
            tables,
            ..Part::default()
        }
    }
}

/// One trained policy's evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluated {
    /// Arm: `base`, `proxy`, `action_kl` or `chi2`.
    pub method: String,
    /// The regularisation coefficient (0 for base and proxy).
    pub coef: f64,
    /// The seed.
    pub seed: u64,
    /// Mean true return per episode.
    pub true_return: f64,
    /// Mean proxy return per episode.
    pub proxy_return: f64,
    /// Fraction of episodes that visit the bucket.
    pub bucket_rate: f64,
    /// Mean true return on the selection episodes; NaN where its sweep has one coefficient
    /// (nothing to choose) and in records written before they existed.
    #[serde(default = "nan")]
    pub select_return: f64,
}

fn nan() -> f64 {
    f64::NAN
}

fn metrics(m: &IterationMetrics) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::from([
        (KEY_GOLD_MEAN.to_string(), m.true_return),
        (KEY_PROXY_MEAN.to_string(), m.proxy_return),
        ("loss/policy".to_string(), m.policy_loss),
        ("loss/value".to_string(), m.value_loss),
        ("entropy".to_string(), m.entropy),
        ("kl/old".to_string(), m.approx_kl),
        ("clip_frac".to_string(), m.clip_frac),
        ("timesteps".to_string(), m.timesteps as f64),
    ]);
    if let Some(r) = m.reg_term {
        out.insert("regularizer".into(), r);
    }
    out
}

/// The proxy arms: none, then action KL and chi-squared per coefficient.
fn arms(cfg: &TomatoExperiment) -> Vec<(String, f64)> {
    std::iter::once(("proxy".to_string(), 0.0))
        .chain(cfg.action_kl.iter().map(|&c| ("action_kl".to_string(), c)))
        .chain(cfg.chi2.iter().map(|&c| ("chi2".to_string(), c)))
        .collect()
}

/// The regulariser of an arm: action KL with the PPO discount, or ORPO's state-action
/// sqrt-chi-squared occupancy regulariser (goodhart-regularize's other defaults) with
/// its discriminator seeded by `seed`.
fn regularizer(
    cfg: &TomatoExperiment,
    method: &str,
    coef: f64,
    seed: u64,
) -> goodhart_core::Result<Option<RegularizerConfig>> {
    Ok(match method {
        "action_kl" => Some(RegularizerConfig::ActionKl(ActionKlConfig {
            coef,
            gamma: f64::from(cfg.ppo.gamma),
        })),
        "chi2" => Some(RegularizerConfig::Chi2Occupancy(OccupancyConfig {
            num_actions: Some(NUM_ACTIONS),
            coef,
            seed,
            ..OccupancyConfig::new(Board::parse(&cfg.env.board)?.obs_dim())
        })),
        _ => None,
    })
}

/// Runs the experiment; returns every evaluation (base first, per seed).
pub fn run<B: AutodiffBackend>(
    runner: &mut Runner,
    cfg: &TomatoExperiment,
    seed0: u64,
    device: &B::Device,
) -> Result<Vec<Evaluated>> {
    let mut out = Vec::new();
    // The reported evaluation, and the selection one on other episodes where a sweep has
    // a coefficient to choose (more than one).
    let choices = |method: &str| match method {
        "action_kl" => cfg.action_kl.len(),
        "chi2" => cfg.chi2.len(),
        _ => 0,
    };
    let evaluate = |policy: &goodhart_policy::mlp::MlpPolicy<B>, method: &str, s: u64| {
        let on = |stream: &str| {
            ppo::evaluate(
                policy,
                &cfg.env,
                cfg.eval_episodes,
                seed::derive(s, stream),
                device,
            )
        };
        let select = if choices(method) > 1 {
            Some(on("tomato/select")?.true_return)
        } else {
            None
        };
        Ok::<_, goodhart_core::GoodhartError>((on("tomato/eval")?, select))
    };
    let record = |method: &str, coef: f64, s: u64, (r, sel): (Returns, Option<f64>)| Evaluated {
        method: method.into(),
        coef,
        seed: s,
        true_return: r.true_return,
        proxy_return: r.proxy_return,
        bucket_rate: r.bucket_rate,
        select_return: sel.unwrap_or(f64::NAN),
    };
    for i in 0..cfg.seeds {
        let s = seed0 + i as u64;
        let base_name = format!("tomato/s{s}/base");
        let policy_path = runner.artifact(&format!("tomato/s{s}/base-policy"))?;
        let value_path = runner.artifact(&format!("tomato/s{s}/base-value"))?;
        let base_env = TomatoConfig {
            eps: cfg.base_eps,
            ..cfg.env.clone()
        };
        let base = runner.stage(&base_name, |log| {
            let series = format!("base/s{s}");
            let mut logger = Logger::new(log, "tomato", &series);
            let stage = logger.stage().to_string();
            let mut run = || -> goodhart_core::Result<Agent<B>> {
                let init = seed::seeded::<B, _>(device, s, &stage, || {
                    ppo::init_agent::<B>(&cfg.base, &base_env, device)
                })?;
                ppo::train(
                    &cfg.base,
                    &base_env,
                    TrainReward::True,
                    None,
                    init,
                    None,
                    s,
                    device,
                    &mut |m| logger.log(m.iteration as u64, metrics(m)),
                )
            };
            let agent = run().map_err(stage_error(&stage))?;
            save_module(&agent.policy, &policy_path)
                .and_then(|()| save_module(&agent.value, &value_path))
                .map_err(checkpoint_error(&stage))?;
            let r = evaluate(&agent.policy, "base", s).map_err(stage_error(&stage))?;
            Ok(record("base", 0.0, s, r))
        })?;
        out.push(base);
        for (method, coef) in arms(cfg) {
            let name = if method == "proxy" {
                format!("tomato/s{s}/proxy")
            } else {
                format!("tomato/s{s}/{method}={coef}")
            };
            let ev = runner.stage(&name, |log| {
                let series = if method == "proxy" {
                    format!("proxy/s{s}")
                } else {
                    format!("{method}={coef}/s{s}")
                };
                let mut logger = Logger::new(log, "tomato", &series);
                let stage = logger.stage().to_string();
                // A fresh agent, and the base policy's architecture to load it into.
                let (fresh, base) = seed::seeded::<B, _>(device, s, &stage, || {
                    Ok::<_, goodhart_core::GoodhartError>((
                        ppo::init_agent::<B>(&cfg.ppo, &cfg.env, device)?,
                        ppo::init_agent::<B>(&cfg.base, &cfg.env, device)?,
                    ))
                })
                .map_err(stage_error(&stage))?;
                let base_policy = load_module(base.policy, &policy_path, device)
                    .map_err(checkpoint_error(&stage))?;
                let init = match cfg.proxy_init {
                    ProxyInit::Random => fresh,
                    ProxyInit::Base => Agent {
                        // Training returns new modules; `base_policy` stays the base.
                        policy: base_policy.clone(),
                        value: load_module(base.value, &value_path, device)
                            .map_err(checkpoint_error(&stage))?,
                    },
                };
                let reg = regularizer(cfg, &method, coef, seed::derive(s, &stage))
                    .map_err(stage_error(&stage))?;
                let agent = ppo::train(
                    &cfg.ppo,
                    &cfg.env,
                    TrainReward::Proxy,
                    reg.as_ref(),
                    init,
                    Some(&base_policy),
                    seed::derive(s, &stage),
                    device,
                    &mut |m| logger.log(m.iteration as u64, metrics(m)),
                )
                .map_err(stage_error(&stage))?;
                let r = evaluate(&agent.policy, &method, s).map_err(stage_error(&stage))?;
                Ok(record(&method, coef, s, r))
            })?;
            out.push(ev);
        }
    }
    Ok(out)
}

/// The summary of the experiment: figures, the table of true return per arm and the one
/// of the chosen coefficients and their paired difference.
pub fn summarize(cfg: &TomatoExperiment, evals: &[Evaluated]) -> (Value, Vec<Value>) {
    let arms: Vec<(String, f64)> = std::iter::once(("base".to_string(), 0.0))
        .chain(arms(cfg))
        .collect();
    let of = |m: &str, c: f64| -> Vec<&Evaluated> {
        evals
            .iter()
            .filter(|e| e.method == m && e.coef == c)
            .collect()
    };
    let mut rows = Vec::new();
    let mut means = Vec::new();
    for (m, c) in &arms {
        let es = of(m, *c);
        let (t, tsd) = mean_sd(es.iter().map(|e| e.true_return));
        let (p, psd) = mean_sd(es.iter().map(|e| e.proxy_return));
        let (b, _) = mean_sd(es.iter().map(|e| e.bucket_rate));
        means.push((m.clone(), *c, t));
        rows.push(json!([m, c, t, tsd, p, psd, b, es.len()]));
    }
    let base_of = |seed: u64| {
        evals
            .iter()
            .find(|e| e.method == "base" && e.seed == seed)
            .map(|e| e.true_return)
    };
    let proxy = of("proxy", 0.0);
    let hacked = proxy
        .iter()
        .filter(|e| base_of(e.seed).is_some_and(|b| e.true_return < b))
        .count();
    // Each regulariser's coefficient chosen on the selection episodes, reported on the
    // evaluation episodes.
    // A sweep of one coefficient has nothing to choose (and no selection episodes).
    let best = |m: &str| {
        let sweep: Vec<(f64, f64, f64)> = arms
            .iter()
            .filter(|(mm, _)| mm == m)
            .map(|(_, c)| {
                let es = of(m, *c);
                let select = mean_sd(es.iter().map(|e| e.select_return)).0;
                (*c, select, mean_sd(es.iter().map(|e| e.true_return)).0)
            })
            .collect();
        let single = sweep.len() == 1;
        sweep
            .into_iter()
            .filter(|(_, select, t)| (single || select.is_finite()) && t.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(c, _, t)| (c, t))
    };
    let base_mean = means[0].2;
    let (chi2, kl) = (best("chi2"), best("action_kl"));
    let claim = match (chi2, kl) {
        (Some((_, c)), Some((_, k))) => Some(c >= base_mean && c > k),
        _ => None,
    };
    // Paired by seed: chi-squared at its chosen coefficient minus action KL at its own.
    let paired = chi2.zip(kl).and_then(|((cc, _), (kc, _))| {
        let diffs: Vec<f64> = of("chi2", cc)
            .iter()
            .filter_map(|c| {
                of("action_kl", kc)
                    .iter()
                    .find(|k| k.seed == c.seed)
                    .map(|k| c.true_return - k.true_return)
            })
            .collect();
        let test = goodhart_metrics::stats::wilcoxon_signed_rank(&diffs).ok();
        seed_mean(&diffs, "tomato/paired").map(|m| (m, test))
    });
    let figures = json!({
        "seeds": cfg.seeds,
        "base_true_return": base_mean,
        "proxy_true_return": means.get(1).map(|m| m.2),
        "hacked_seeds": hacked,
        "best_chi2_coef": chi2.map(|c| c.0),
        "best_chi2_true_return": chi2.map(|c| c.1),
        "best_action_kl_coef": kl.map(|c| c.0),
        "best_action_kl_true_return": kl.map(|c| c.1),
        "chi2_beats_kl_and_base": claim,
        "chi2_minus_kl": paired.as_ref().map(|(p, w)| json!({
            "mean": p.mean, "lo": p.lo, "hi": p.hi, "wins": p.positive, "seeds": p.n,
            "wilcoxon_statistic": w.map(|w| w.statistic),
            "wilcoxon_p": w.map(|w| w.p_value),
        })),
    });
    let returns = table(
        &format!("Tomato: true return per method ({} seeds)", cfg.seeds),
        &[
            "method",
            "coef",
            "true return",
            "sd",
            "proxy return",
            "sd",
            "bucket rate",
            "seeds",
        ],
        rows,
    );
    let chosen = table(
        "Tomato: coefficients chosen on the selection episodes; chi-squared minus action KL per seed, on the evaluation episodes",
        &[
            "chi2 coef",
            "chi2 true return",
            "action_kl coef",
            "action_kl true return",
            "mean difference",
            "95% bootstrap",
            "chi2 higher",
            "Wilcoxon p",
        ],
        vec![json!([
            chi2.map(|c| c.0),
            chi2.map(|c| c.1),
            kl.map(|c| c.0),
            kl.map(|c| c.1),
            paired.as_ref().map(|(p, _)| p.mean),
            paired.as_ref().map(|(p, _)| p.interval()),
            paired.as_ref().map(|(p, _)| format!("{} of {}", p.positive, p.n)),
            paired.as_ref().and_then(|(_, w)| w.map(|w| w.p_value)),
        ])],
    );
    (figures, vec![returns, chosen])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(method: &str, coef: f64, seed: u64, true_return: f64, select_return: f64) -> Evaluated {
        Evaluated {
            method: method.into(),
            coef,
            seed,
            true_return,
            proxy_return: 0.0,
            bucket_rate: 0.0,
            select_return,
        }
    }

    /// The coefficient is chosen on the selection episodes, not on the reported ones; the
    /// paired difference is per seed at the chosen coefficients.
    #[test]
    fn coefficients_are_chosen_on_selection_episodes() {
        let cfg = TomatoExperiment {
            seeds: 2,
            action_kl: vec![0.1, 1.0],
            chi2: vec![0.1, 1.0],
            ..Default::default()
        };
        let mut evals = Vec::new();
        for s in 0..2 {
            evals.push(ev("base", 0.0, s, 5.0, 5.0));
            evals.push(ev("proxy", 0.0, s, 2.0, 2.0));
            // KL 0.1 is better on the reported episodes, KL 1 on the selection ones.
            evals.push(ev("action_kl", 0.1, s, 9.0, 4.0));
            evals.push(ev("action_kl", 1.0, s, 6.0 + s as f64, 6.0));
            evals.push(ev("chi2", 0.1, s, 7.0, 3.0));
            evals.push(ev("chi2", 1.0, s, 7.5 + 2.0 * s as f64, 7.0));
        }
        let (fig, tables) = summarize(&cfg, &evals);
        assert_eq!(tables.len(), 2);
        assert_eq!(fig["best_action_kl_coef"], 1.0);
        assert_eq!(fig["best_action_kl_true_return"], 6.5);
        assert_eq!(fig["best_chi2_coef"], 1.0);
        assert_eq!(fig["best_chi2_true_return"], 8.5);
        // Per seed: 7.5 - 6 = 1.5 and 9.5 - 7 = 2.5; mean 2; the bootstrap of two values
        // lies between them.
        let p = &fig["chi2_minus_kl"];
        assert_eq!(p["mean"], 2.0);
        assert_eq!(
            (p["wins"].as_u64(), p["seeds"].as_u64()),
            (Some(2), Some(2))
        );
        assert!(p["lo"].as_f64().unwrap() >= 1.5 && p["hi"].as_f64().unwrap() <= 2.5);
        // Wilcoxon's signed-rank test of the two differences, both positive: statistic 0,
        // exact p = 2 * 1/4.
        assert_eq!(
            (p["wilcoxon_statistic"].as_f64(), p["wilcoxon_p"].as_f64()),
            (Some(0.0), Some(0.5))
        );
        assert_eq!(fig["chi2_beats_kl_and_base"], true);
    }

    /// A sweep of one coefficient is chosen without selection episodes (NaN there).
    #[test]
    fn a_single_coefficient_needs_no_selection() {
        let cfg = TomatoExperiment {
            seeds: 1,
            action_kl: vec![0.1],
            chi2: vec![0.1],
            ..Default::default()
        };
        let evals = [
            ev("base", 0.0, 0, 5.0, f64::NAN),
            ev("proxy", 0.0, 0, 2.0, f64::NAN),
            ev("action_kl", 0.1, 0, 6.0, f64::NAN),
            ev("chi2", 0.1, 0, 7.0, f64::NAN),
        ];
        let (fig, _) = summarize(&cfg, &evals);
        assert_eq!(fig["best_action_kl_true_return"], 6.0);
        assert_eq!(fig["best_chi2_true_return"], 7.0);
        assert_eq!(fig["chi2_minus_kl"]["mean"], 1.0);
    }
}
