//! `cargo xtask detect LOG`: a hacking detector on a training log from anywhere
//! (`goodhart_metrics::training_log`), with the lead and stopping regret when the log
//! has gold (`goodhart_metrics::evaluate::detect_run`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use goodhart_metrics::{
    detect::DetectorConfig,
    evaluate::{detect_run, GoldPeakRule},
    training_log::{columns_for, proxy_only_for, read_log, LogFormat, LogSpec},
};

pub const USAGE: &str = "usage: cargo xtask detect LOG [--format jsonl|csv] [--step-key KEY]
    --map SIGNAL[=COLUMN]... [--gold COLUMN] [--where COLUMN=VALUE] [--config FILE.toml]
    [--json]

  LOG            a training log as JSON lines or CSV (TRL's `log_history`, a W&B or
                 TensorBoard export, goodhart's metrics.jsonl)
  --map          the log's COLUMN holds the detector's SIGNAL (COLUMN defaults to SIGNAL);
                 without --config the proxy-only detector reads the mapped signals of
                 its defaults: kl/ref, entropy, reward/ensemble/disagreement, length/mean,
                 advantage/skew
  --config       a detector as TOML (`kind = \"proxy-only\"` or `\"gold-aware\"` and its
                 settings, as under [overopt] detectors); the signals it reads and no
                 --map are read from columns of their own names
  --gold         the log's gold column: the smoothed gold peak, the lead (peak step minus
                 firing step) and the stopping regret (the share of the gold gain given up
                 by stopping at the firing)
  --step-key     the step column (default `step`)
  --where        read only the rows whose COLUMN holds VALUE (one series of a log)
  --json         one JSON object: `fired_step` (null if none), `signals` (each signal's
                 part at the firing), `score`, `reason`, `steps`, and with --gold
                 `gold_peak_step`, `lead`, `stopping_regret`

example: cargo xtask detect trainer_log.csv --map kl/ref=kl --map entropy \\
    --map length/mean=completions/mean_length --gold eval_reward --json";

/// Runs the command.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut log = None;
    let mut format = None;
    let mut step_key = "step".to_string();
    let mut maps: Vec<(String, String)> = Vec::new();
    let mut gold = None;
    let mut filter = None;
    let mut config_path = None;
    let mut json = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .filter(|v| !v.starts_with("--"))
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            "--format" => format = Some(value(a)?.parse::<LogFormat>().map_err(|e| anyhow!(e))?),
            "--step-key" => step_key = value(a)?,
            "--map" => {
                let v = value(a)?;
                let (signal, column) = v.split_once('=').unwrap_or((&v, &v));
                if signal.is_empty() || column.is_empty() {
                    bail!("--map `{v}`: give SIGNAL=COLUMN or SIGNAL");
                }
                maps.push((signal.into(), column.into()));
            }
            "--gold" => gold = Some(value(a)?),
            "--where" => {
                let v = value(a)?;
                let (c, x) = v
                    .split_once('=')
                    .with_context(|| format!("--where `{v}`: give COLUMN=VALUE"))?;
                filter = Some((c.to_string(), x.to_string()));
            }
            "--config" => config_path = Some(PathBuf::from(value(a)?)),
            "--json" => json = true,
            flag if flag.starts_with("--") => bail!("unknown flag `{flag}`\n{USAGE}"),
            path if log.is_none() => log = Some(PathBuf::from(path)),
            extra => bail!("one log at a time: `{extra}` is a second\n{USAGE}"),
        }
    }
    let log = log.with_context(|| format!("no log given\n{USAGE}"))?;
    let config = match &config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading `{}`", path.display()))?;
            toml::from_str::<DetectorConfig>(&text)
                .map_err(|e| anyhow!("`{}`: {e}", path.display()))?
        }
        None => proxy_only_for(&maps).map_err(|e| anyhow!("--map: {e}"))?,
    };
    let mut columns = columns_for(&config, &maps).map_err(|e| anyhow!("--map: {e}"))?;
    let rule = GoldPeakRule::default();
    if let Some(g) = &gold {
        columns.retain(|c| c.0 != rule.gold_key);
        columns.push((rule.gold_key.clone(), g.clone()));
    }
    let spec = LogSpec {
        format,
        step_key,
        columns,
        filter,
    };
    let run = read_log(&log, &spec).map_err(|e| anyhow!("{e}"))?;
    let det = config.build().map_err(|e| anyhow!("the detector: {e}"))?;
    let out = detect_run(&run, det, &rule).map_err(|e| anyhow!("`{}`: {e}", log.display()))?;
    let firing = out.firing.as_ref();
    if json {
        let mut obj = serde_json::json!({
            "detector": out.detector,
            "steps": out.steps,
            "fired_step": firing.map(|f| f.step),
            "score": firing.map(|f| f.score),
            "signals": firing.map(|f| f.signals.clone()).unwrap_or_default(),
            "reason": firing.map(|f| f.reason.clone()),
        });
        if gold.is_some() {
            obj["gold_peak_step"] = serde_json::json!(out.gold_peak.map(|p| p.step));
            obj["lead"] = serde_json::json!(out.lead);
            obj["stopping_regret"] = serde_json::json!(out.stopping_regret);
        }
        println!("{obj}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {} steps read", log.display(), out.steps);
    match firing {
        Some(f) => {
            println!("{} fired at step {}: {}", out.detector, f.step, f.reason);
            for (k, z) in &f.signals {
                println!("  {k}: {z:.3}");
            }
        }
        None => println!("{} did not fire", out.detector),
    }
    if let Some(p) = out.gold_peak {
        println!(
            "smoothed gold peak {:.4} at step {} (final {:.4}, {})",
            p.value,
            p.step,
            p.final_value,
            if p.hacked {
                "hacked"
            } else {
                "no drop past the rule"
            }
        );
        if let Some(lead) = out.lead {
            println!("lead: {lead} steps before the peak (negative: after it)");
        }
        match out.stopping_regret {
            Some(r) => println!(
                "stopping regret: {:.2}% of the gold gain ({})",
                100.0 * r,
                if firing.is_some() {
                    "stopping at the firing"
                } else {
                    "training to the end"
                }
            ),
            None => println!("stopping regret: none (gold never rose)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
