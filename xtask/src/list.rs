//! `cargo xtask list`: presets and every registered method, by family.

use goodhart_core::{aggregate::LossAggregation, device::compiled_backends};

/// Prints every family's names with a one-line description and source.
pub fn print() {
    println!("backends compiled in: {}", compiled_backends().join(", "));
    println!("\npresets: none yet (the experiment runner is still to be written)");
    println!("\nloss aggregation (goodhart-core::aggregate)");
    for (name, _) in LossAggregation::ALL {
        println!("  {name}");
    }
}
