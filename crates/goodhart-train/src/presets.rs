//! The presets embedded in the binary (`cargo xtask run <name>`); their files are in
//! `docs/presets/`, where each one explains its choices.

/// `(name, one-line description, TOML)` of every preset.
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "lab",
        "the default: small tomato, overopt and mitigations together (< 10 min on 2 cores)",
        include_str!("../../../docs/presets/lab.toml"),
    ),
    (
        "tomato",
        "ORPO's tomato gridworld: base policy, proxy PPO, action-KL vs chi-squared over 5 seeds",
        include_str!("../../../docs/presets/tomato.toml"),
    ),
    (
        "overopt",
        "Gao et al.: proxies from more and more pairs, RL and best-of-n, gold vs sqrt(KL) fits",
        include_str!("../../../docs/presets/overopt.toml"),
    ),
    (
        "mitigations",
        "none, KL, ensemble UWO, PAR and sequence chi-squared on the overopt task, 3 seeds",
        include_str!("../../../docs/presets/mitigations.toml"),
    ),
    (
        "daa",
        "DPO, IPO, SLiC and RPO at five betas on the synthetic language: gold and KL without a reward model, 3 seeds",
        include_str!("../../../docs/presets/daa.toml"),
    ),
    (
        "detector-corpus",
        "RL traces with gold known (8 settings, 3 of them controls, 4 seeds): detectors calibrated on 2 seeds, lead, false alarms and stopping regret on the other 2",
        include_str!("../../../docs/presets/detector-corpus.toml"),
    ),
    (
        "rubric",
        "the rubric-hacking lab: GRPO against weak and strong rubric verifiers, exploitation rate by failure mode, self-internalisation gap, 3 seeds",
        include_str!("../../../docs/presets/rubric.toml"),
    ),
    (
        "multiturn",
        "the multi-turn agentic lab: a tool-use world, outcome-only GRPO, ungated dense step rewards, G-RA gating, IGPO and A2TGPO, 3 seeds",
        include_str!("../../../docs/presets/multiturn.toml"),
    ),
    (
        "daa-full",
        "the daa lab at a larger budget: 4,000 pairs, 3 epochs, seven betas, cDPO too, 5 seeds",
        include_str!("../../../docs/presets/daa-full.toml"),
    ),
    (
        "tomato-full",
        "the tomato lab at ORPO's budget: ORPO's base policy (3 PPO iterations of 30 environments), PPO for 500 iterations of 30 environments (1.5M steps), 10 seeds",
        include_str!("../../../docs/presets/tomato-full.toml"),
    ),
    (
        "overopt-full",
        "the overopt lab at more scales: five pair counts, three reward-model sizes, 5 seeds, coefficient trends with intervals",
        include_str!("../../../docs/presets/overopt-full.toml"),
    ),
    (
        "mitigations-full",
        "the mitigations lab with ensembles of 5 pretrained or fine-tuned reward models (mean, WCO, UWO), PAR, KL, chi-squared; RL and best-of-n, 5 seeds",
        include_str!("../../../docs/presets/mitigations-full.toml"),
    ),
    (
        "daa-hf",
        "DPO and IPO on a Hugging Face model directory (the Qwen2 fixture) and a JSONL preference set, proxy and gold measured, saved as model directories",
        include_str!("../../../docs/presets/daa-hf.toml"),
    ),
    (
        "grpo-hf",
        "GRPO on a Hugging Face model directory (the Qwen2 fixture) and a JSONL prompt set, saved as a model directory",
        include_str!("../../../docs/presets/grpo-hf.toml"),
    ),
];

/// The TOML of preset `name`.
pub fn preset(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|p| p.0 == name).map(|p| p.2)
}

/// Every preset's name.
pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExperimentConfig;

    #[test]
    fn every_preset_parses_and_validates() {
        // Presets' paths are the repository's (as `cargo xtask run` resolves them).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for (name, _, text) in PRESETS {
            let c = ExperimentConfig::parse_at(text, &[], &root)
                .unwrap_or_else(|e| panic!("preset `{name}`: {e}"));
            assert_eq!(&c.name, name);
        }
    }
}
