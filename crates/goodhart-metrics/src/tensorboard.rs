//! TensorBoard event files mirroring `metrics.jsonl`, written with `syntaxdot-summary`.
//!
//! `metrics.jsonl` stays the record: [`export`] rewrites the event files from its lines,
//! so a resumed or repaired run's files match its record. Each series (label `series`,
//! else `method`, else `run`), under its `experiment` label when there is one, becomes a
//! TensorBoard run: the directory `<dir>/<experiment>/<series>/` with one file
//! `events.out.tfevents.goodhart`. Every finite metric of a line is a scalar at its step,
//! tagged by its key (`reward/gold/mean`, ...); missing values (`null`) are left out.
//! TensorBoard stores scalars as `f32`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write},
    path::{Component, Path, PathBuf},
};

use syntaxdot_summary::SummaryWriter;

use crate::sink::{Line, SinkError};

/// The event file's name in each run directory.
pub const EVENT_FILE: &str = "events.out.tfevents.goodhart";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A label as a relative path: `/` separates directories (so `weak/s0` nests as
/// TensorBoard shows it); characters other than ASCII letters, digits, `.`, `_`, `-`,
/// `=` and `+` become `_`, and components that would leave the directory (`.`, `..`,
/// empty) become `_`.
///
/// ```
/// use goodhart_metrics::tensorboard::run_path;
/// assert_eq!(run_path("weak/s0"), std::path::Path::new("weak/s0"));
/// assert_eq!(run_path("../kl 0.1"), std::path::Path::new("_/kl_0.1"));
/// ```
pub fn run_path(label: &str) -> PathBuf {
    label
        .split('/')
        .map(|part| {
            let clean: String = part
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-=+".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            match Path::new(&clean).components().next() {
                Some(Component::Normal(_)) if clean != "." && clean != ".." => clean,
                _ => "_".to_string(),
            }
        })
        .collect()
}

/// The run a line belongs to: `<experiment>/<series>`, or `<series>` alone.
fn run_of(line: &Line) -> PathBuf {
    let series = line
        .labels
        .get("series")
        .or_else(|| line.labels.get("method"))
        .map_or("run", String::as_str);
    match line.labels.get("experiment") {
        Some(e) => run_path(e).join(run_path(series)),
        None => run_path(series),
    }
}

/// Writes one event file per run of `lines` under `dir` (created if needed), replacing
/// what an earlier export wrote; returns the files written, in run order. Each file is
/// written beside its place and renamed over it, so a reader never sees half a file.
pub fn export(lines: &[Line], dir: &Path) -> Result<Vec<PathBuf>, SinkError> {
    let mut runs: BTreeMap<PathBuf, Vec<&Line>> = BTreeMap::new();
    for line in lines {
        runs.entry(run_of(line)).or_default().push(line);
    }
    let mut written = Vec::with_capacity(runs.len());
    for (run, lines) in runs {
        let run_dir = dir.join(run);
        fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
        let path = run_dir.join(EVENT_FILE);
        let tmp = run_dir.join(format!(".{EVENT_FILE}.tmp"));
        let mut out = BufWriter::new(fs::File::create(&tmp).map_err(io(&tmp))?);
        {
            // The writer writes each record straight through to `out`.
            let mut writer = SummaryWriter::new(&mut out).map_err(io(&tmp))?;
            for line in lines {
                for (tag, &value) in &line.metrics {
                    if value.is_finite() {
                        writer
                            .write_scalar(tag.as_str(), line.step as i64, value as f32)
                            .map_err(io(&tmp))?;
                    }
                }
            }
        }
        out.flush().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_paths_inside_the_directory() {
        assert_eq!(run_path("weak/s0"), PathBuf::from("weak/s0"));
        assert_eq!(run_path("kl=0.1 <x>"), PathBuf::from("kl=0.1__x_"));
        assert_eq!(run_path("../../etc"), PathBuf::from("_/_/etc"));
        assert_eq!(run_path("/abs//x"), PathBuf::from("_/abs/_/x"));
        let line = Line::new(0, BTreeMap::new())
            .with_label("experiment", "rubric")
            .with_label("series", "weak/s0");
        assert_eq!(run_of(&line), PathBuf::from("rubric/weak/s0"));
        assert_eq!(run_of(&Line::new(0, BTreeMap::new())), PathBuf::from("run"));
    }

    /// The TFRecord framing by hand: each record is `len (u64 LE)`, `masked crc32c of
    /// len`, the `Event` protobuf, `masked crc32c of the data`; the first event is the
    /// file version. Two lines of one run with 2 and 1 finite values (one NaN left out):
    /// 1 + 3 records.
    #[test]
    fn an_event_file_holds_one_record_per_finite_scalar() {
        let dir = std::env::temp_dir().join(format!("goodhart-tb-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let m = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let lines = vec![
            Line::new(0, m(&[("a", 1.0), ("b", 2.0)])).with_label("series", "x"),
            Line::new(1, m(&[("a", 1.5), ("b", f64::NAN)])).with_label("series", "x"),
        ];
        let files = export(&lines, &dir).unwrap();
        assert_eq!(files, [dir.join("x").join(EVENT_FILE)]);
        let bytes = fs::read(&files[0]).unwrap();
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            at += 8 + 4 + len + 4;
            records += 1;
        }
        assert_eq!((at, records), (bytes.len(), 4));
        // Exporting again replaces the file (no temporary left behind).
        export(&lines, &dir).unwrap();
        assert_eq!(fs::read_dir(dir.join("x")).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
