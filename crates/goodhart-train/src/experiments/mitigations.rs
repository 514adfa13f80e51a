//! Mitigations compared on the overoptimisation task: for each arm (the `[rl]` algorithm
//! with the arm's overrides, against a proxy of `ensemble` reward models combined by the
//! arm's aggregation) and each seed, one RL run from that seed's base policy. The table
//! gives peak and final gold per arm, mean and standard deviation over seeds.
//!
//! Stages: `lm/sft/s{seed}` and `lm/proxy/p{pairs}/k{k}/s{seed}` (shared with
//! [`super::overopt`]), then `mitigations/{arm}/s{seed}`.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    mean_sd,
    overopt::{base_policy, proxies, rl_stage, Trace},
    table,
};
use crate::{
    config::{ExperimentConfig, MitigationsExperiment},
    runner::{Result, Runner},
};

/// One RL run of one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmRun {
    /// The arm's name.
    pub arm: String,
    /// The seed.
    pub seed: u64,
    /// The trace.
    pub trace: Trace,
}

/// Runs every arm over every seed.
pub fn run<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &MitigationsExperiment,
    device: &B::Device,
) -> Result<Vec<ArmRun>> {
    let mut out = Vec::new();
    for i in 0..cfg.seeds {
        let seed = config.seed + i as u64;
        base_policy::<B>(runner, config, seed, device)?;
        for (a, arm) in cfg.arms.iter().enumerate() {
            proxies::<B>(runner, config, cfg.pairs, arm.ensemble, seed, device)?;
            let pg = arm.rl_config(&config.rl, a)?;
            let trace = rl_stage::<B>(
                runner,
                config,
                &format!("mitigations/{}/s{seed}", arm.name),
                "mitigations",
                &format!("{}/s{seed}", arm.name),
                &pg,
                seed,
                (cfg.pairs, arm.ensemble, arm.aggregation),
                device,
            )?;
            out.push(ArmRun {
                arm: arm.name.clone(),
                seed,
                trace,
            });
        }
    }
    Ok(out)
}

/// Figures and the table of peak and final gold per arm.
pub fn summarize(cfg: &MitigationsExperiment, runs: &[ArmRun]) -> (Value, Value) {
    let mut figures = serde_json::Map::new();
    let mut rows = Vec::new();
    for arm in &cfg.arms {
        let mine: Vec<&ArmRun> = runs.iter().filter(|r| r.arm == arm.name).collect();
        let peak = mean_sd(mine.iter().filter_map(|r| r.trace.peak()).map(|p| p.gold));
        let fin = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.last())
                .map(|p| p.gold),
        );
        let proxy = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.last())
                .map(|p| p.proxy),
        );
        let d = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.last())
                .map(|p| p.d),
        );
        let initial = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.first())
                .map(|p| p.gold),
        );
        figures.insert(
            arm.name.clone(),
            json!({"gold_peak": peak.0, "gold_peak_sd": peak.1, "gold_final": fin.0,
                   "gold_final_sd": fin.1, "proxy_final": proxy.0, "d_final": d.0}),
        );
        rows.push(json!([
            arm.name,
            initial.0,
            peak.0,
            peak.1,
            fin.0,
            fin.1,
            proxy.0,
            d.0,
            mine.len()
        ]));
    }
    let table = table(
        &format!(
            "Mitigations: gold per method ({} seeds, proxy from {} pairs)",
            cfg.seeds, cfg.pairs
        ),
        &[
            "method",
            "gold initial",
            "gold peak",
            "sd",
            "gold final",
            "sd",
            "proxy final",
            "d final",
            "seeds",
        ],
        rows,
    );
    (Value::Object(figures), table)
}
