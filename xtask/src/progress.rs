//! `cargo xtask run`'s progress on a terminal (indicatif): a bar for the running stage
//! (its step out of the steps it expects, the rate, the ETA and the latest proxy and gold
//! rewards), the run's own lines printed above it, and a line for the whole run (elapsed
//! time, stages done). Not on a terminal, the runner's plain lines
//! (`goodhart_train::runner::Lines`); with `--quiet`, nothing.

use std::time::Duration;

use goodhart_metrics::{
    sink::Line,
    step::{KEY_GOLD_MEAN, KEY_PROXY_MEAN},
};
use goodhart_train::runner::Reporter;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// The bars (see the module docs).
pub struct Bars {
    multi: MultiProgress,
    run: ProgressBar,
    stage: Option<ProgressBar>,
    done: usize,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("the templates are valid")
}

impl Bars {
    /// Bars on stderr.
    pub fn new() -> Self {
        let multi = MultiProgress::new();
        let run = multi.add(ProgressBar::new_spinner());
        run.set_style(style("{spinner} run {elapsed_precise}  {msg}"));
        run.set_message("0 stages done");
        run.enable_steady_tick(Duration::from_millis(200));
        Self {
            multi,
            run,
            stage: None,
            done: 0,
        }
    }
}

impl Reporter for Bars {
    fn say(&mut self, line: &str) {
        // Above the bars; a write error on stderr leaves the bars as they are.
        let _ = self.multi.println(line);
    }

    fn stage_started(&mut self, stage: &str) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(style("  {prefix}  step {pos}  {per_sec}  {msg}"));
        bar.set_prefix(stage.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        self.stage = Some(bar);
    }

    fn stage_total(&mut self, _stage: &str, total: u64) {
        if let Some(bar) = &self.stage {
            bar.set_length(total);
            bar.set_style(style(
                "  {prefix}  [{bar:30}] {pos}/{len}  {per_sec}  ETA {eta}  {msg}",
            ));
        }
    }

    fn line(&mut self, _stage: &str, line: &Line) {
        let Some(bar) = &self.stage else { return };
        // Steps count from 0; a stage may log more than one line per step.
        bar.set_position(bar.position().max(line.step + 1));
        let show = |k: &str| line.metrics.get(k).map(|v| format!("{v:.3}"));
        if let (Some(p), g) = (show(KEY_PROXY_MEAN), show(KEY_GOLD_MEAN)) {
            bar.set_message(format!(
                "proxy {p}  gold {}",
                g.unwrap_or_else(|| "-".into())
            ));
        }
    }

    fn stage_finished(&mut self, _stage: &str, _seconds: f64) {
        if let Some(bar) = self.stage.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        self.done += 1;
        self.run.set_message(format!("{} stages done", self.done));
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.run.finish_and_clear();
    }
}
