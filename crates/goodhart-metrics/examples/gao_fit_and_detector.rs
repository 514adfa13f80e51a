//! Gao et al.'s RL law fitted to a training log of your own, and a hacking detector
//! replayed over it: here a CSV written by this example (as TRL or a W&B export would
//! hold it), with gold known, so the detector's lead and stopping regret are measured.
//!
//! ```text
//! cargo build --workspace --examples && target/debug/examples/gao_fit_and_detector
//! ```

use std::fmt::Write as _;

use goodhart_metrics::{
    cusum::CusumConfig,
    detect::DetectorConfig,
    evaluate::{detect_run, GoldPeakRule},
    overopt::fit_rl,
    step::{KEY_GOLD_MEAN, KEY_KL},
    training_log::{read_log, LogSpec},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A log of 80 steps: KL to the reference grows as 0.01 step^1.5 (faster and faster),
    // gold follows the RL law d (alpha - beta ln d) with d = sqrt(KL), and the proxy keeps
    // rising. Columns are named as another trainer names them.
    let (alpha, beta) = (1.0, 0.6);
    let mut csv = String::from("step,kl,eval_reward,rewards/mean\n");
    for step in 0..80u32 {
        let kl = 0.01 * f64::from(step).powf(1.5);
        let d: f64 = kl.sqrt();
        let gold = if d > 0.0 {
            d * (alpha - beta * d.ln())
        } else {
            0.0
        };
        writeln!(csv, "{step},{kl},{gold},{}", 0.1 * f64::from(step))?;
    }
    let path = std::env::temp_dir().join(format!("goodhart-example-{}.csv", std::process::id()));
    std::fs::write(&path, csv)?;

    // Read the columns under goodhart's metric keys.
    let spec = LogSpec {
        format: None,
        step_key: "step".into(),
        columns: vec![
            (KEY_KL.into(), "kl".into()),
            (KEY_GOLD_MEAN.into(), "eval_reward".into()),
        ],
        filter: None,
    };
    let run = read_log(&path, &spec)?;
    std::fs::remove_file(&path)?;

    // Gao's RL law on (sqrt KL, gold), without an intercept (gold is 0 at d = 0).
    let (d, gold): (Vec<f64>, Vec<f64>) = run
        .steps
        .iter()
        .map(|(_, m)| (m[KEY_KL].sqrt(), m[KEY_GOLD_MEAN]))
        .unzip();
    let fit = fit_rl(&d, &gold)?;
    let peak = fit.peak().ok_or("the law has no peak")?;
    println!(
        "RL law: alpha {:.4}, beta {:.4}, R^2 {:.4}; gold peaks at d = {:.3} (KL {:.3})",
        fit.alpha, fit.beta, fit.r_squared, peak.d, peak.kl
    );
    // The log was written from the law: the fit recovers it.
    assert!(
        (fit.alpha - alpha).abs() < 1e-6 && (fit.beta - beta).abs() < 1e-6,
        "{fit:?}"
    );
    assert!((peak.d - (alpha / beta - 1.0f64).exp()).abs() < 1e-6);

    // Page's CUSUM on the growth of KL (no gold), replayed over the log; the gold column
    // gives its lead (peak step minus firing step) and stopping regret.
    let detector = DetectorConfig::Cusum(CusumConfig::default());
    let out = detect_run(&run, detector.build()?, &GoldPeakRule::default())?;
    match &out.firing {
        Some(f) => println!("{} fired at step {}: {}", out.detector, f.step, f.reason),
        None => println!("{} did not fire", out.detector),
    }
    let gold_peak = out.gold_peak.ok_or("the log has gold")?;
    println!(
        "smoothed gold peak at step {}; lead {:?} steps; stopping regret {:?}",
        gold_peak.step, out.lead, out.stopping_regret
    );
    // The law peaks where d = exp(alpha / beta - 1): KL = 0.01 step^1.5 reaches it near
    // step 52, and the smoothed gold peaks within a few steps of it.
    let at = (peak.kl / 0.01).powf(1.0 / 1.5);
    assert!(
        (gold_peak.step as f64 - at).abs() <= 3.0,
        "{} vs {at}",
        gold_peak.step
    );
    // KL grows ever faster from the start: the detector fires, long before the peak.
    assert!(out.lead.is_some_and(|lead| lead > 0), "{:?}", out.lead);
    Ok(())
}
