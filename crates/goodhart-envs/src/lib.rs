//! # goodhart-envs
//!
//! Tasks with a known gold reward and a hackable proxy.
//!
//! - [`tomato`]: the tomato-watering gridworld of "Correlated Proxies" (ORPO).
//! - [`language`]: a synthetic preference language with a known generator and gold reward
//!   (in the spirit of Gao et al.'s overoptimisation setting).
//! - [`multihop`]: multi-hop questions over a generated knowledge base, answered in turns
//!   with a `search` tool; the outcome as gold, farmable step rewards as proxies.
//! - [`rubric`]: prompts with weighted rubrics over a structured response language, a
//!   reference that knows each criterion's truth and verifiers with the failure modes of
//!   "Reward Hacking in Rubric-Based Reinforcement Learning".

pub mod language;
pub mod multihop;
pub mod rubric;
pub mod tomato;
