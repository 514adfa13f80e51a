//! `cargo xtask list`: presets and every registered method, by family.

use goodhart_core::{aggregate::LossAggregation, device::compiled_backends, registry::MethodInfo};

/// Every registry: (family, its key for `experiments::accepting`, where it lives, its
/// methods).
const FAMILIES: &[(&str, &str, &str, &[MethodInfo])] = &[
    (
        "advantage estimators",
        "advantage",
        "goodhart-advantage",
        goodhart_advantage::REGISTRY,
    ),
    (
        "policy losses",
        "policy loss",
        "goodhart-objective::policy",
        goodhart_objective::policy::REGISTRY,
    ),
    (
        "sample filters",
        "sample filter",
        "goodhart-objective::nsr",
        goodhart_objective::nsr::REGISTRY,
    ),
    (
        "preference losses",
        "preference loss",
        "goodhart-objective::preference",
        goodhart_objective::preference::REGISTRY,
    ),
    (
        "regularisers",
        "regularizer",
        "goodhart-regularize",
        goodhart_regularize::REGISTRY,
    ),
    (
        "reward transforms and aggregators",
        "reward",
        "goodhart-reward",
        goodhart_reward::REGISTRY,
    ),
    (
        "metrics, fits and detectors",
        "metric",
        "goodhart-metrics",
        goodhart_metrics::REGISTRY,
    ),
];

/// `    -> overopt (rl.advantage), ...`, or that no experiment takes it yet.
fn accepted(family: &str, name: &str) -> String {
    let by = goodhart_train::experiments::accepting(family, name);
    let refused = (family == "advantage")
        .then(|| goodhart_train::policy_gradient::unsupported_estimator_name(name))
        .flatten();
    if let Some(why) = refused {
        format!("    -> refused by [rl] when the file is parsed: needs {why}")
    } else if by.is_empty() {
        "    -> no experiment takes it yet (library only)".into()
    } else {
        format!("    -> {}", by.join(", "))
    }
}

/// Prints every family's names with a one-line description and source.
pub fn print() {
    println!("backends compiled in: {}", compiled_backends().join(", "));
    println!("\npresets (cargo xtask run <name>; files in docs/presets/)");
    for (name, summary, _) in goodhart_train::presets::PRESETS {
        println!("  {name:<12}  {summary}");
    }
    println!("\nexperiments (a [section] of the config each)");
    for (name, summary) in goodhart_train::experiments::EXPERIMENTS {
        println!("  {name:<12}  {summary}");
    }
    println!("\nloss aggregation (goodhart-core::aggregate)");
    for (name, _) in LossAggregation::ALL {
        println!("  {name}\n{}", accepted("aggregation", name));
    }
    for (family, key, home, methods) in FAMILIES {
        println!("\n{family} ({home})");
        let width = methods.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for m in *methods {
            println!("  {:<width$}  {}  [{}]", m.name, m.summary, m.source);
            println!("{}", accepted(key, m.name));
        }
    }
}
