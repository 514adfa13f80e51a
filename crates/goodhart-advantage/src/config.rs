//! The config enum a TOML file uses to pick an estimator, the input every estimator is
//! called with, and the single entry point [`compute`].

use burn::tensor::{backend::Backend, Int, Tensor};
use goodhart_core::{groups::Groups, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    a2tgpo::{a2tgpo, A2tgpoConfig},
    bnpo::{bnpo, BnpoConfig},
    common::{outcome_at_last_token, outcome_from_tokens},
    dr_grpo::{dr_grpo, DrGrpoConfig},
    gae::{gae, GaeConfig},
    gdpo::{gdpo, GdpoConfig},
    gpg::{gpg, GpgConfig},
    gra::{gra, GraConfig},
    grpo::{grpo, GrpoConfig},
    grpo_passk::{grpo_passk, GrpoPasskConfig},
    igpo::{igpo, IgpoConfig},
    opo::{opo, OpoConfig},
    optimal_token_baseline::{optimal_token_baseline, OptimalTokenBaselineConfig},
    reinforce::{reinforce, ReinforceConfig},
    reinforce_plus_plus::{reinforce_plus_plus, ReinforcePlusPlusConfig},
    reinforce_plus_plus_baseline::{reinforce_plus_plus_baseline, ReinforcePlusPlusBaselineConfig},
    remax::{remax, RemaxConfig},
    rloo::{rloo, RlooConfig},
    verpo::{verpo, VerpoConfig},
    AdvantageOutput, REGISTRY,
};

/// An advantage estimator and its settings, chosen in TOML by `kind` (verl's registry
/// names where verl has one):
///
/// ```toml
/// [advantage]
/// kind = "grpo"
/// scale = "batch"
/// eps = 1e-4
/// ```
/// Unknown kinds and unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdvantageConfig {
    /// [`gae`](crate::gae::gae).
    Gae(GaeConfig),
    /// [`reinforce`](crate::reinforce::reinforce).
    Reinforce(ReinforceConfig),
    /// [`reinforce_plus_plus`](crate::reinforce_plus_plus::reinforce_plus_plus).
    ReinforcePlusPlus(ReinforcePlusPlusConfig),
    /// [`reinforce_plus_plus_baseline`](crate::reinforce_plus_plus_baseline::reinforce_plus_plus_baseline).
    ReinforcePlusPlusBaseline(ReinforcePlusPlusBaselineConfig),
    /// [`rloo`](crate::rloo::rloo).
    Rloo(RlooConfig),
    /// [`grpo`](crate::grpo::grpo).
    Grpo(GrpoConfig),
    /// [`dr_grpo`](crate::dr_grpo::dr_grpo).
    DrGrpo(DrGrpoConfig),
    /// [`bnpo`](crate::bnpo::bnpo).
    Bnpo(BnpoConfig),
    /// [`opo`](crate::opo::opo).
    Opo(OpoConfig),
    /// [`remax`](crate::remax::remax).
    Remax(RemaxConfig),
    /// [`gpg`](crate::gpg::gpg).
    Gpg(GpgConfig),
    /// [`grpo_passk`](crate::grpo_passk::grpo_passk).
    GrpoPassk(GrpoPasskConfig),
    /// [`gdpo`](crate::gdpo::gdpo).
    Gdpo(GdpoConfig),
    /// [`gra`](crate::gra::gra).
    Gra(GraConfig),
    /// [`a2tgpo`](crate::a2tgpo::a2tgpo).
    A2tgpo(A2tgpoConfig),
    /// [`igpo`](crate::igpo::igpo).
    Igpo(IgpoConfig),
    /// [`verpo`](crate::verpo::verpo).
    Verpo(VerpoConfig),
    /// [`optimal_token_baseline`](crate::optimal_token_baseline::optimal_token_baseline).
    OptimalTokenBaseline(OptimalTokenBaselineConfig),
}

impl Default for AdvantageConfig {
    /// GRPO with verl's defaults.
    fn default() -> Self {
        Self::Grpo(GrpoConfig::default())
    }
}

impl AdvantageConfig {
    /// The registry name (`"grpo"`, ...).
    pub fn name(&self) -> &'static str {
        let i = match self {
            Self::Gae(_) => 0,
            Self::Reinforce(_) => 1,
            Self::ReinforcePlusPlus(_) => 2,
            Self::ReinforcePlusPlusBaseline(_) => 3,
            Self::Rloo(_) => 4,
            Self::Grpo(_) => 5,
            Self::DrGrpo(_) => 6,
            Self::Bnpo(_) => 7,
            Self::Opo(_) => 8,
            Self::Remax(_) => 9,
            Self::Gpg(_) => 10,
            Self::GrpoPassk(_) => 11,
            Self::Gdpo(_) => 12,
            Self::Gra(_) => 13,
            Self::A2tgpo(_) => 14,
            Self::Igpo(_) => 15,
            Self::Verpo(_) => 16,
            Self::OptimalTokenBaseline(_) => 17,
        };
        REGISTRY[i].name
    }

    /// Runs the estimator on `input` (same as [`compute`]).
    pub fn compute<B: Backend>(&self, input: &AdvantageInput<'_, B>) -> Result<AdvantageOutput<B>> {
        compute(self, input)
    }
}

/// Per-turn data of a multi-turn rollout with at most `K` turns per response.
#[derive(Debug, Clone)]
pub struct Turns<B: Backend> {
    /// `[N, K]`: 1 for the turns a response has (a prefix of each row).
    pub turn_mask: Tensor<B, 2>,
    /// `[N, T]`: the turn index of each response token (read only where the response mask
    /// is set). Needed by the turn-level estimators (a2tgpo, igpo).
    pub token_turn: Option<Tensor<B, 2, Int>>,
    /// `[N, K]`: a reward per turn (a2tgpo's signal, gra's step rewards).
    pub turn_rewards: Option<Tensor<B, 2>>,
    /// `[N, K + 1]`: the policy's probability of the ground-truth answer before the first
    /// turn (column 0) and after each turn (igpo).
    pub answer_prob: Option<Tensor<B, 2>>,
}

/// Unit-test outcomes for verpo.
#[derive(Debug, Clone)]
pub struct UnitTests<B: Backend> {
    /// `[N, U]`: 1 where the response passes test `u` of its prompt.
    pub passed: Tensor<B, 2>,
    /// `[N, U]`: 1 for the tests its prompt has (responses to one prompt share them).
    pub mask: Tensor<B, 2>,
}

/// Everything an estimator may need. Build with [`AdvantageInput::new`] and the `with_*`
/// methods; each estimator errors naming the field it needs but did not get.
#[derive(Debug, Clone)]
pub struct AdvantageInput<'a, B: Backend> {
    /// One reward per response `[N]`. When absent, outcome estimators use the sum of
    /// `token_rewards` over counted positions. verl's outcome estimators sum every
    /// position (`token_level_rewards.sum(-1)`), masked ones included: the two differ when
    /// a reward sits on a masked (tool-output) token, and passing that full sum here
    /// reproduces verl.
    pub rewards: Option<Tensor<B, 1>>,
    /// Per-token rewards `[N, T]` (e.g. with a per-token KL penalty). When absent,
    /// token-level estimators put `rewards` on each response's last valid token.
    pub token_rewards: Option<Tensor<B, 2>>,
    /// Response mask `[N, T]` (0/1).
    pub mask: Tensor<B, 2>,
    /// Which responses answer the same prompt.
    pub groups: &'a Groups,
    /// Critic values `[N, T]` (gae).
    pub values: Option<Tensor<B, 2>>,
    /// Reward of the greedy response per response `[N]` (remax).
    pub baseline_rewards: Option<Tensor<B, 1>>,
    /// Reward components `[N, K]`, one column per reward (gdpo).
    pub reward_components: Option<Tensor<B, 2>>,
    /// Per-turn data (gra, a2tgpo, igpo).
    pub turns: Option<Turns<B>>,
    /// Unit-test outcomes (verpo).
    pub unit_tests: Option<UnitTests<B>>,
    /// Log-probs of the sampled tokens under the sampling policy `[N, T]`
    /// (optimal_token_baseline).
    pub logp_old: Option<Tensor<B, 2>>,
    /// `sum_v pi(v)^2` of the sampling policy's next-token distribution at each token
    /// `[N, T]` (optimal_token_baseline).
    pub sum_pi_squared: Option<Tensor<B, 2>>,
    /// Rollout importance weights `[N, T]` (optional for optimal_token_baseline).
    pub rollout_is_weights: Option<Tensor<B, 2>>,
}

impl<'a, B: Backend> AdvantageInput<'a, B> {
    /// An input with only the mask and the groups; add the rest with the `with_*` methods.
    pub fn new(mask: Tensor<B, 2>, groups: &'a Groups) -> Self {
        Self {
            rewards: None,
            token_rewards: None,
            mask,
            groups,
            values: None,
            baseline_rewards: None,
            reward_components: None,
            turns: None,
            unit_tests: None,
            logp_old: None,
            sum_pi_squared: None,
            rollout_is_weights: None,
        }
    }

    /// Sets the per-response rewards `[N]`.
    pub fn with_rewards(mut self, rewards: Tensor<B, 1>) -> Self {
        self.rewards = Some(rewards);
        self
    }

    /// Sets the per-token rewards `[N, T]`.
    pub fn with_token_rewards(mut self, token_rewards: Tensor<B, 2>) -> Self {
        self.token_rewards = Some(token_rewards);
        self
    }

    /// Sets the critic values `[N, T]`.
    pub fn with_values(mut self, values: Tensor<B, 2>) -> Self {
        self.values = Some(values);
        self
    }

    /// Sets the greedy-response rewards `[N]` (ReMax).
    pub fn with_baseline_rewards(mut self, baselines: Tensor<B, 1>) -> Self {
        self.baseline_rewards = Some(baselines);
        self
    }

    /// Sets the reward components `[N, K]` (GDPO).
    pub fn with_reward_components(mut self, components: Tensor<B, 2>) -> Self {
        self.reward_components = Some(components);
        self
    }

    /// Sets the per-turn data.
    pub fn with_turns(mut self, turns: Turns<B>) -> Self {
        self.turns = Some(turns);
        self
    }

    /// Sets the unit-test outcomes.
    pub fn with_unit_tests(mut self, tests: UnitTests<B>) -> Self {
        self.unit_tests = Some(tests);
        self
    }

    /// Sets the sampling policy's token log-probs and `sum_v pi^2` `[N, T]` each.
    pub fn with_policy_stats(
        mut self,
        logp_old: Tensor<B, 2>,
        sum_pi_squared: Tensor<B, 2>,
    ) -> Self {
        self.logp_old = Some(logp_old);
        self.sum_pi_squared = Some(sum_pi_squared);
        self
    }

    /// Sets rollout importance weights `[N, T]`.
    pub fn with_rollout_is_weights(mut self, weights: Tensor<B, 2>) -> Self {
        self.rollout_is_weights = Some(weights);
        self
    }

    /// One reward per response: `rewards`, or the masked sum of `token_rewards`.
    fn outcome(&self) -> Result<Tensor<B, 1>> {
        match (&self.rewards, &self.token_rewards) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(t)) => {
                crate::common::check_tokens(t, "token_rewards", &self.mask)?;
                Ok(outcome_from_tokens(t.clone(), &self.mask))
            }
            (None, None) => Err(missing("rewards", "every estimator (or token_rewards)")),
        }
    }

    /// Per-token rewards: `token_rewards`, or `rewards` on the last valid token.
    fn per_token(&self) -> Result<Tensor<B, 2>> {
        match (&self.token_rewards, &self.rewards) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(r)) => {
                crate::common::check_rows(r, self.mask.dims()[0], "rewards")?;
                Ok(outcome_at_last_token(r.clone(), &self.mask))
            }
            (None, None) => Err(missing("token_rewards", "every estimator (or rewards)")),
        }
    }

    fn turns(&self, method: &str) -> Result<&Turns<B>> {
        self.turns.as_ref().ok_or_else(|| missing("turns", method))
    }
}

fn missing(what: &str, method: &str) -> GoodhartError {
    GoodhartError::invalid(what, format!("required by {method} but not given"))
}

fn need<'t, T>(x: &'t Option<T>, what: &str, method: &str) -> Result<&'t T> {
    x.as_ref().ok_or_else(|| missing(what, method))
}

/// Runs the estimator `config` names on `input`.
pub fn compute<B: Backend>(
    config: &AdvantageConfig,
    input: &AdvantageInput<'_, B>,
) -> Result<AdvantageOutput<B>> {
    let (mask, groups) = (&input.mask, input.groups);
    let name = config.name();
    match config {
        AdvantageConfig::Gae(c) => gae(
            input.per_token()?,
            need(&input.values, "values", name)?.clone(),
            mask,
            c,
        ),
        AdvantageConfig::Reinforce(c) => reinforce(input.per_token()?, mask, c),
        AdvantageConfig::ReinforcePlusPlus(c) => reinforce_plus_plus(input.per_token()?, mask, c),
        AdvantageConfig::ReinforcePlusPlusBaseline(c) => {
            reinforce_plus_plus_baseline(input.outcome()?, mask, groups, c)
        }
        AdvantageConfig::Rloo(c) => rloo(input.outcome()?, mask, groups, c),
        AdvantageConfig::Grpo(c) => grpo(input.outcome()?, mask, groups, c),
        AdvantageConfig::DrGrpo(c) => dr_grpo(input.outcome()?, mask, groups, c),
        AdvantageConfig::Bnpo(c) => bnpo(input.outcome()?, mask, groups, c),
        AdvantageConfig::Opo(c) => opo(input.outcome()?, mask, groups, c),
        AdvantageConfig::Remax(c) => remax(
            input.per_token()?,
            need(&input.baseline_rewards, "baseline_rewards", name)?.clone(),
            mask,
            c,
        ),
        AdvantageConfig::Gpg(c) => gpg(input.outcome()?, mask, groups, c),
        AdvantageConfig::GrpoPassk(c) => grpo_passk(input.outcome()?, mask, groups, c),
        AdvantageConfig::Gdpo(c) => gdpo(
            need(&input.reward_components, "reward_components", name)?.clone(),
            mask,
            groups,
            c,
        ),
        AdvantageConfig::Gra(c) => {
            let turns = input.turns(name)?;
            let steps = need(&turns.turn_rewards, "turns.turn_rewards", name)?;
            gra(
                input.outcome()?,
                steps.clone(),
                &turns.turn_mask,
                mask,
                groups,
                c,
            )
        }
        AdvantageConfig::A2tgpo(c) => {
            let turns = input.turns(name)?;
            let signal = need(&turns.turn_rewards, "turns.turn_rewards", name)?;
            let token_turn = need(&turns.token_turn, "turns.token_turn", name)?;
            a2tgpo(
                c.outcome.then(|| input.outcome()).transpose()?,
                signal.clone(),
                &turns.turn_mask,
                token_turn,
                mask,
                groups,
                c,
            )
        }
        AdvantageConfig::Igpo(c) => {
            let turns = input.turns(name)?;
            let prob = need(&turns.answer_prob, "turns.answer_prob", name)?;
            let token_turn = need(&turns.token_turn, "turns.token_turn", name)?;
            igpo(
                prob.clone(),
                input.outcome()?,
                &turns.turn_mask,
                token_turn,
                mask,
                groups,
                c,
            )
        }
        AdvantageConfig::Verpo(c) => {
            let tests = need(&input.unit_tests, "unit_tests", name)?;
            verpo(
                input.outcome()?,
                tests.passed.clone(),
                &tests.mask,
                mask,
                groups,
                c,
            )
        }
        AdvantageConfig::OptimalTokenBaseline(c) => optimal_token_baseline(
            input.per_token()?,
            need(&input.logp_old, "logp_old", name)?.clone(),
            need(&input.sum_pi_squared, "sum_pi_squared", name)?.clone(),
            input.rollout_is_weights.clone(),
            mask,
            groups,
            c,
        ),
    }
}
