//! `cargo xtask list`: presets and every registered method, by family.

use goodhart_core::{aggregate::LossAggregation, device::compiled_backends, registry::MethodInfo};

/// Every registry: (family, where it lives, its methods).
const FAMILIES: &[(&str, &str, &[MethodInfo])] = &[
    (
        "advantage estimators",
        "goodhart-advantage",
        goodhart_advantage::REGISTRY,
    ),
    (
        "policy losses",
        "goodhart-objective::policy",
        goodhart_objective::policy::REGISTRY,
    ),
    (
        "sample filters",
        "goodhart-objective::nsr",
        goodhart_objective::nsr::REGISTRY,
    ),
    (
        "preference losses",
        "goodhart-objective::preference",
        goodhart_objective::preference::REGISTRY,
    ),
    (
        "regularisers",
        "goodhart-regularize",
        goodhart_regularize::REGISTRY,
    ),
    (
        "reward transforms and aggregators",
        "goodhart-reward",
        goodhart_reward::REGISTRY,
    ),
    (
        "metrics, fits and detectors",
        "goodhart-metrics",
        goodhart_metrics::REGISTRY,
    ),
];

/// Prints every family's names with a one-line description and source.
pub fn print() {
    println!("backends compiled in: {}", compiled_backends().join(", "));
    println!("\npresets (cargo xtask run <name>; files in docs/presets/)");
    for (name, summary, _) in goodhart_train::presets::PRESETS {
        println!("  {name:<12}  {summary}");
    }
    println!("\nloss aggregation (goodhart-core::aggregate)");
    for (name, _) in LossAggregation::ALL {
        println!("  {name}");
    }
    for (family, home, methods) in FAMILIES {
        println!("\n{family} ({home})");
        let width = methods.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for m in *methods {
            println!("  {:<width$}  {}  [{}]", m.name, m.summary, m.source);
        }
    }
}
