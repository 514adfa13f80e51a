//! The checkpoint loader: the input is written as `model.mpk` and loaded into a small
//! transformer; any bytes give the model or a typed error (`CheckpointError`).
#![no_main]

use goodhart_core::device::{cpu, Dispatch};
use goodhart_policy::{checkpoint::load_module, transformer::Positions, TransformerConfig, TransformerLm};
use libfuzzer_sys::fuzz_target;

thread_local! {
    // The architecture of the seed checkpoint in fuzz/corpus/checkpoint.
    static TEMPLATE: TransformerLm<Dispatch> = TransformerConfig::new(11, 16, 2, 2, 32)
        .with_positions(Positions::Learned)
        .init(&cpu())
        .unwrap();
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("goodhart-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.mpk");
    std::fs::write(&path, data).unwrap();
    let template = TEMPLATE.with(|t| t.clone());
    let _ = load_module(template, &dir.join("model"), &cpu());
});
