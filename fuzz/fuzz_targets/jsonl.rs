//! The readers of a run directory's JSON files: `metrics.jsonl` lines, JSON-lines objects
//! (`samples.jsonl`), the report's metrics table and `summary.json`.
#![no_main]

use std::path::Path;

use goodhart_metrics::sink::{parse_lines, parse_objects};
use goodhart_train::report::{Metrics, Summary};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.jsonl");
    let _ = parse_lines(text, path);
    let _ = parse_objects(text, path);
    let _ = Metrics::parse(text, path);
    let _ = Summary::parse(text, path);
});
