//! # goodhart-train
//!
//! Algorithms that tie the crates together, experiment configuration and run
//! directories.
//!
//! Algorithms, one file each:
//! - [`ppo`]: PPO with a value head and GAE on the vectorised tomato gridworld.
//! - [`sft`]: supervised fine-tuning of the base language policy on the synthetic language.
//! - [`reward_model`]: a proxy reward model trained on gold-labelled preference pairs.
//! - [`policy_gradient`]: critic-free RL for language models with any goodhart-advantage
//!   estimator (GRPO, RLOO, REINFORCE++, BNPO, ...) and any regulariser.
//! - [`best_of_n`]: best-of-n sampling against a proxy, gold measured on the same samples.
//! - [`preference`]: the offline preference trainer (DPO, cDPO, IPO, SLiC, RPO) against a
//!   frozen reference.
//! - [`task`]: what an RL run samples and scores: the synthetic language, or a prompt set
//!   under a Hugging Face tokenizer with text rewards.
//! - [`rubric`]: rubric verifiers with failure modes, the rubric task, the exploitation
//!   rate and the self-internalisation gap on goodhart-envs' rubric world.
//! - [`multiturn`]: turn-by-turn rollouts of goodhart-envs' tool-use world, laid out with
//!   the tool's tokens masked from the loss, and the turn data of the turn-level
//!   estimators (IGPO's answer probabilities included).
//!
//! Experiments:
//! - [`config`]: the experiment TOML (`deny_unknown_fields`, `--set`, key-path errors, sweeps).
//! - [`presets`]: the embedded presets (`lab`, `tomato`, `overopt`, `mitigations`).
//! - [`experiments`]: each experiment as checkpointed stages, and its summary.
//! - [`runner`]: stages, checkpoints and `--resume`.
//!
//! Runs:
//! - [`run_dir`]: `runs/<name>/<id>/` with atomically written files.
//! - [`report`]: the self-contained `report.html` of a run (a verdict per experiment,
//!   uPlot charts, tables, the responses the proxy overrated most).

pub mod best_of_n;
pub mod config;
pub mod data;
pub mod experiments;
pub mod memory;
pub mod multiturn;
pub mod policy_gradient;
pub mod ppo;
pub mod preference;
pub mod presets;
pub mod report;
pub mod reward_model;
pub mod rubric;
pub mod run_dir;
pub mod runner;
pub mod sft;
pub mod task;
