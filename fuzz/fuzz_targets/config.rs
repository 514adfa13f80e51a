//! The experiment config parser with `--set` overrides: the input is TOML, then, after a
//! NUL byte, one override per line. Any input gives a config or a typed error.
#![no_main]

use goodhart_train::config::ExperimentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (toml, sets) = text.split_once('\0').unwrap_or((&text, ""));
    let sets: Vec<String> = sets.lines().map(str::to_string).collect();
    let _ = ExperimentConfig::parse(toml, &sets);
});
