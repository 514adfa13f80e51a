//! The responses that show what a policy learned to do: from `samples.jsonl`, per
//! experiment, the distinct responses the proxy rated furthest above the gold
//! (`proxy - gold`, largest first). The file is streamed: a run's samples can be far
//! larger than its metrics.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use goodhart_metrics::step::{GOLD, PROXY};
use serde::Deserialize;
use serde_json::Value;

use super::{ReportError, Result};

/// How many responses the report shows per experiment.
pub const SHOWN: usize = 10;

/// One response the proxy overrated.
#[derive(Debug, Clone, PartialEq)]
pub struct Hack {
    /// Its series.
    pub series: String,
    /// The step it was sampled at.
    pub step: u64,
    /// The prompt (its id or text, as the sample gives it).
    pub prompt: String,
    /// The response.
    pub text: String,
    /// Its proxy reward.
    pub proxy: f64,
    /// Its gold reward.
    pub gold: f64,
}

impl Hack {
    /// `proxy - gold`.
    pub fn gap(&self) -> f64 {
        self.proxy - self.gold
    }

    /// Largest gap first; ties by earlier step, then series, then text.
    fn rank(&self, other: &Self) -> std::cmp::Ordering {
        other
            .gap()
            .total_cmp(&self.gap())
            .then(self.step.cmp(&other.step))
            .then_with(|| self.series.cmp(&other.series))
            .then_with(|| self.text.cmp(&other.text))
    }
}

/// The overrated responses of one experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Hacks {
    /// The experiment, if the samples name one.
    pub group: Option<String>,
    /// Samples read with both a proxy and a gold reward.
    pub scored: usize,
    /// The distinct responses (by series and text) with the largest gaps, largest first.
    pub top: Vec<Hack>,
}

#[derive(Deserialize)]
struct SampleLine {
    step: u64,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    rewards: BTreeMap<String, Option<f64>>,
    #[serde(default)]
    series: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    experiment: Option<String>,
}

/// Keeps `hack` among the `k` best of `top` (sorted by [`Hack::rank`]), one per series
/// and text.
fn keep(top: &mut Vec<Hack>, hack: Hack, k: usize) {
    if let Some(i) = top
        .iter()
        .position(|h| h.series == hack.series && h.text == hack.text)
    {
        if hack.rank(&top[i]).is_lt() {
            top.remove(i);
        } else {
            return;
        }
    }
    let at = top.partition_point(|h| h.rank(&hack).is_lt());
    if at < k {
        top.insert(at, hack);
        top.truncate(k);
    }
}

/// Reads `samples.jsonl` and returns, per experiment (in order of first appearance), the
/// `k` distinct responses with the largest `proxy - gold`. Samples without a finite
/// proxy and gold reward are skipped. No file: no experiments. A line that is not a
/// sample object is an error naming it.
pub fn read_hacks(path: &Path, k: usize) -> Result<Vec<Hacks>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ReportError::Io {
                path: path.into(),
                source,
            })
        }
    };
    let mut out: Vec<Hacks> = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| ReportError::Io {
            path: path.into(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let s: SampleLine = serde_json::from_str(&line).map_err(|e| ReportError::Samples {
            path: path.into(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        let group = s.experiment.clone();
        let at = match out.iter().position(|h| h.group == group) {
            Some(at) => at,
            None => {
                out.push(Hacks {
                    group: group.clone(),
                    scored: 0,
                    top: Vec::new(),
                });
                out.len() - 1
            }
        };
        let reward = |key: &str| s.rewards.get(key).copied().flatten();
        let (Some(proxy), Some(gold)) = (reward(PROXY), reward(GOLD)) else {
            continue;
        };
        if !(proxy.is_finite() && gold.is_finite()) {
            continue;
        }
        out[at].scored += 1;
        // The labels the metrics use (`series`, else `method`, else `run`).
        let series = s
            .series
            .clone()
            .or_else(|| s.method.clone())
            .unwrap_or_else(|| super::DEFAULT_SERIES.into());
        let prompt = match &s.prompt {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(p)) => p.clone(),
            Some(other) => other.to_string(),
        };
        let hack = Hack {
            series,
            step: s.step,
            prompt,
            text: s.text.clone().unwrap_or_default(),
            proxy,
            gold,
        };
        keep(&mut out[at].top, hack, k);
    }
    out.retain(|h| h.scored > 0);
    Ok(out)
}
