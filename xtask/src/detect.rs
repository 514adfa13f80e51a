//! `cargo xtask detect LOG`: a hacking detector on a training log from anywhere
//! (`goodhart_metrics::training_log`), with the lead and stopping regret when the log
//! has gold (`goodhart_metrics::evaluate::detect_run`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use goodhart_metrics::{
    detect::DetectorConfig,
    evaluate::{detect_run, GoldPeakRule},
    training_log::{columns_for, proxy_only_for, read_log, LogFormat, LogSpec},
};

/// `cargo xtask detect`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Without --config the proxy-only detector reads the mapped signals of its \
defaults: kl/ref, entropy, reward/ensemble/disagreement, length/mean, advantage/skew.

Example:
  cargo xtask detect trainer_log.csv --map kl/ref=kl --map entropy \\
      --map length/mean=completions/mean_length --gold eval_reward --json"
)]
pub struct DetectArgs {
    /// A training log as JSON lines or CSV (TRL's `log_history`, a W&B or TensorBoard
    /// export, goodhart's metrics.jsonl)
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// The log's format [default: from the file name]
    #[arg(long, value_parser = parse_format)]
    format: Option<LogFormat>,
    /// The step column
    #[arg(long, default_value = "step", value_name = "KEY")]
    step_key: String,
    /// The log's COLUMN holds the detector's SIGNAL (COLUMN defaults to SIGNAL; repeatable)
    #[arg(long = "map", value_name = "SIGNAL[=COLUMN]", value_parser = parse_map)]
    maps: Vec<(String, String)>,
    /// The log's gold column: the smoothed gold peak, the lead (peak step minus firing
    /// step) and the stopping regret (the share of the gold gain given up)
    #[arg(long, value_name = "COLUMN")]
    gold: Option<String>,
    /// Read only the rows whose COLUMN holds VALUE (one series of a log)
    #[arg(long = "where", value_name = "COLUMN=VALUE", value_parser = parse_where)]
    filter: Option<(String, String)>,
    /// A detector as TOML (`kind = "proxy-only"`, `"gold-aware"`, `"cusum"`, `"shift"` or
    /// `"logistic"` and its settings, as under [overopt] detectors); its signals are read
    /// from columns of their own names unless mapped
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// One JSON object: `fired_step` (null if none), `signals`, `score`, `reason`, `steps`,
    /// and with --gold `gold_peak_step`, `lead`, `stopping_regret`
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> std::result::Result<LogFormat, String> {
    s.parse::<LogFormat>().map_err(|e| e.to_string())
}

fn parse_map(v: &str) -> std::result::Result<(String, String), String> {
    let (signal, column) = v.split_once('=').unwrap_or((v, v));
    if signal.is_empty() || column.is_empty() {
        return Err(format!("`{v}`: give SIGNAL=COLUMN or SIGNAL"));
    }
    Ok((signal.into(), column.into()))
}

fn parse_where(v: &str) -> std::result::Result<(String, String), String> {
    v.split_once('=')
        .map(|(c, x)| (c.to_string(), x.to_string()))
        .ok_or_else(|| format!("`{v}`: give COLUMN=VALUE"))
}

/// Runs the command.
pub fn run(args: DetectArgs) -> Result<ExitCode> {
    let DetectArgs {
        log,
        format,
        step_key,
        maps,
        gold,
        filter,
        config: config_path,
        json,
    } = args;
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
