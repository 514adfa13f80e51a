//! The command line as a user meets it: `cargo xtask` (the binary beside this test's, built
//! by `cargo build -p xtask`, which `cargo xtask test` and CI do first) prints usage with
//! examples, suggests a misspelt flag, and refuses bad values before any work.

use std::{path::PathBuf, process::Command};

/// The xtask binary of this build (`target/<profile>/xtask`).
fn xtask() -> Command {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin: PathBuf = dir.join(format!("xtask{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p xtask`",
        bin.display()
    );
    Command::new(bin)
}

/// Exit code, stdout and stderr of `xtask args`.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = xtask().args(args).output().expect("xtask runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_prints_its_usage_with_an_example() {
    for (cmd, example) in [
        (&["run", "--help"][..], "cargo xtask run rubric --seed 3"),
        (&["sweep", "--help"], "cargo xtask sweep my.toml"),
        (&["bench", "--help"], "cargo xtask bench grpo rloo"),
        (
            &["bench", "policy", "--help"],
            "cargo xtask bench policy --vs-torch",
        ),
        (
            &["generate", "--help"],
            "cargo xtask generate crates/goodhart-policy",
        ),
        (&["detect", "--help"], "cargo xtask detect trainer_log.csv"),
        (
            &["serve", "--help"],
            "cargo xtask serve crates/goodhart-policy",
        ),
        (&["report", "--help"], "cargo xtask report runs/lab/s0"),
        (&["test", "--help"], "cargo xtask test -- tiny_rubric"),
        (&["--help"], "cargo xtask list"),
    ] {
        let (code, out, err) = run(cmd);
        assert_eq!(code, 0, "{cmd:?}: {err}");
        assert!(out.contains("Usage: cargo xtask"), "{cmd:?}: {out}");
        assert!(out.contains(example), "{cmd:?} lacks `{example}`: {out}");
    }
    let (code, out, _) = run(&["--version"]);
    assert_eq!((code, out.trim()), (0, "xtask 0.1.0"));
}

#[test]
fn usage_errors_say_what_is_wrong_in_clap_style() {
    // A misspelt flag: clap's suggestion, exit code 2, before any work.
    let (code, _, err) = run(&["run", "--sed", "3"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unexpected argument '--sed'") && err.contains("'--seed'"),
        "{err}"
    );
    let (code, _, err) = run(&["rnu"]);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand 'rnu'"), "{err}");
    // Typed values are checked when parsed.
    for (args, says) in [
        (&["run", "--device", "tpu"][..], "--device <DEVICE>"),
        (
            &["run", "--on-nan", "ignore"],
            "[possible values: error, skip-batch]",
        ),
        (
            &["run", "--max-memory", "0"],
            "not a positive number of GiB",
        ),
        (
            &["generate", "m", "--prompt", "x", "--max-new-tokens", "0"],
            "not a positive integer",
        ),
        (
            &["generate", "m", "--prompt", "x", "--greedy", "--top-k", "5"],
            "cannot be used with",
        ),
        (
            &["detect", "log.csv", "--where", "series"],
            "give COLUMN=VALUE",
        ),
        (
            &["bench", "policy", "--positions", "alibi"],
            "learned, rotary",
        ),
        (
            &["run", "--resume", "runs/x", "--seed", "1"],
            "cannot be used with",
        ),
        (&["run", "--no-repair"], "--resume <RUN_DIR>"),
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A value clap cannot check (a preset that does not exist) is the command's error.
    let (code, _, err) = run(&["run", "no-such-preset"]);
    assert_eq!(code, 1);
    assert!(err.contains("neither a preset"), "{err}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for sub in ["run", "sweep", "bench", "detect", "generate"] {
            assert!(out.contains(sub), "{shell} completions lack `{sub}`");
        }
    }
}

#[test]
fn piped_progress_is_plain_lines_and_quiet_is_silent() {
    let out = std::env::temp_dir().join(format!("goodhart-cli-{}", std::process::id()));
    let tiny = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "rubric",
            "--set",
            "rubric.seeds=1",
            "--set",
            "rl.steps=3",
            "--set",
            "sft.steps=2",
            "--set",
            "rubric.eval_every=3",
            "--set",
            "rubric.verifiers=[{name = \"weak\"}]",
            "--out",
        ];
        let dir = out.to_str().expect("a UTF-8 temp dir");
        args.push(dir);
        args.extend(extra);
        run(&args)
    };
    // Stderr is a pipe here: one plain line per finished stage, no bars or escapes.
    let (code, stdout, stderr) = tiny(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("rubric/sft/s0") && stderr.contains("rubric/weak/s0"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
    assert!(stdout.contains("Rubric lab: verifier"), "{stdout}");
    // --quiet: no progress at all, the tables still print.
    let (code, stdout, stderr) = tiny(&["--quiet"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("rubric/weak/s0"), "{stderr}");
    assert!(stdout.contains("Rubric lab: verifier"), "{stdout}");
    // -v: the runner's tracing events (stages), -vv every metrics line; plain when piped.
    let (code, _, stderr) = tiny(&["--quiet", "-v"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("stage finished") && stderr.contains("stage=\"rubric/weak/s0\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("metrics line") && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
    let (_, _, stderr) = tiny(&["--quiet", "-vv"]);
    assert_eq!(stderr.matches("metrics line").count(), 3 + 2, "{stderr}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `bench policy --vs-torch --runs 2 --json` of a tiny model against the stand-in twin
/// `twin`, with the flags `extra`.
fn bench_against(twin: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let twin = twin.to_str().expect("a UTF-8 temp dir");
    let mut args = vec!["bench", "policy", "--vs-torch", "--runs", "2", "--json"];
    args.extend_from_slice(extra);
    args.extend([
        "--twin",
        twin,
        "--batch",
        "2",
        "--prompt",
        "4",
        "--response",
        "4",
        "--layers",
        "1",
        "--width",
        "16",
        "--heads",
        "2",
        "--vocab",
        "11",
        "--reps",
        "1",
    ]);
    run(&args)
}

#[test]
fn vs_torch_reports_the_ratio_of_medians_and_each_runs_ratio() {
    // A stand-in twin (same JSON keys as benches/torch_twin.py) that reports 100 / 200 /
    // 300 tokens/s on its first run and 400 / 800 / 1200 on its second.
    let dir = std::env::temp_dir().join(format!("goodhart-twin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let twin = dir.join("twin.py");
    std::fs::write(
        &twin,
        "import json, os, sys\n\
         p = os.path.join(os.path.dirname(sys.argv[0]), 'count')\n\
         n = int(open(p).read()) if os.path.exists(p) else 0\n\
         open(p, 'w').write(str(n + 1))\n\
         f = [100.0, 400.0][n]\n\
         print(json.dumps({'gen_tok_s': f, 'score_tok_s': 2 * f, 'train_tok_s': 3 * f}))\n",
    )
    .expect("the twin is written");
    let (code, out, err) = bench_against(&twin, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_pair_ratios(&json, &logged_figures(&err));
}

/// goodhart's figures of each run or round, as it logged them (one decimal).
fn logged_figures(err: &str) -> Vec<Vec<f64>> {
    let ours: Vec<Vec<f64>> = err
        .lines()
        .filter_map(|l| l.split("goodhart:").nth(1))
        .map(|figures| {
            let figures = figures.split("tokens/s").next().expect("figures");
            figures
                .split('/')
                .map(|x| x.trim().parse().expect("a number"))
                .collect()
        })
        .collect();
    assert_eq!(ours.len(), 2, "{err}");
    ours
}

/// The report of two runs or rounds against a stand-in twin whose figures are 100 / 200 /
/// 300 tokens/s in the first and 400 / 800 / 1200 in the second, given goodhart's figures
/// of each (`ours[run][figure]`).
fn assert_pair_ratios(json: &serde_json::Value, ours: &[Vec<f64>]) {
    for (i, key) in ["gen", "score", "train"].into_iter().enumerate() {
        let scale = (i + 1) as f64;
        // Each run's ratio against that run of the twin.
        let r = [ours[0][i] / (100.0 * scale), ours[1][i] / (400.0 * scale)];
        let (lo, hi) = (r[0].min(r[1]), r[0].max(r[1]));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1e-9) + 1e-3;
        let range = &json["pair_ratio"][key];
        assert!(close(range["min"].as_f64().unwrap(), lo), "{key}: {json}");
        assert!(close(range["max"].as_f64().unwrap(), hi), "{key}: {json}");
        // Their median (of two, the mean), inside its bootstrap interval, whose ends are
        // resampled medians: the ratios or their mean.
        let (m, mlo, mhi) = (
            range["median"].as_f64().unwrap(),
            range["median_lo"].as_f64().unwrap(),
            range["median_hi"].as_f64().unwrap(),
        );
        assert!(close(m, (r[0] + r[1]) / 2.0), "{key}: {json}");
        assert!(mlo <= m && m <= mhi, "{key}: {json}");
        for end in [mlo, mhi] {
            assert!([lo, m, hi].iter().any(|&v| close(end, v)), "{key}: {json}");
        }
        // The ratio of the medians: of two runs, the median is the larger figure.
        let median_ours = ours[0][i].max(ours[1][i]);
        let ratio = json["ratio"][key].as_f64().unwrap();
        assert!(close(ratio, median_ours / (400.0 * scale)), "{key}: {json}");
    }
}

#[test]
fn interleave_alternates_single_measurements_with_a_long_lived_twin() {
    // A stand-in for benches/twin_calls.py: ready at once, then 100 / 200 / 300 tokens/s
    // for the first request of each figure and 400 / 800 / 1200 for the second. It logs
    // its flags and every request.
    let dir = std::env::temp_dir().join(format!("goodhart-calls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let twin = dir.join("twin.py");
    std::fs::write(&twin, "raise SystemExit('only imported by the server')\n").expect("written");
    std::fs::write(
        dir.join("twin_calls.py"),
        "import os, sys\n\
         log = open(os.path.join(os.path.dirname(sys.argv[0]), 'log'), 'w')\n\
         log.write(' '.join(sys.argv[1:]) + '\\n'); log.flush()\n\
         print('ready', flush=True)\n\
         base = {'gen_tok_s': 100.0, 'score_tok_s': 200.0, 'train_tok_s': 300.0}\n\
         seen = {}\n\
         for line in sys.stdin:\n\
         \x20   f = line.strip(); log.write(f + '\\n'); log.flush()\n\
         \x20   if f == 'quit': break\n\
         \x20   seen[f] = seen.get(f, 0) + 1\n\
         \x20   print(base[f] * [1, 4][seen[f] - 1], flush=True)\n",
    )
    .expect("the server is written");
    let (code, out, err) = bench_against(&twin, &["--interleave"]);
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = log.lines().collect();
    // One process: the twin's script and flags, then the figures in order, round by
    // round, and `quit`.
    assert!(
        lines[0].starts_with(&format!("--twin {}", twin.display()))
            && lines[0].contains("--reps 1"),
        "{log}"
    );
    let figures = ["gen_tok_s", "score_tok_s", "train_tok_s"];
    let expected: Vec<&str> = figures
        .iter()
        .chain(&figures)
        .copied()
        .chain(["quit"])
        .collect();
    assert_eq!(lines[1..], expected[..], "{log}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(json["interleave"], true, "{json}");
    assert_eq!(json["torch"]["gen_tok_s"], 400.0, "{json}");
    assert_pair_ratios(&json, &logged_figures(&err));
}
