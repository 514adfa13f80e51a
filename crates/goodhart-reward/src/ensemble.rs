//! Reward-model ensembles: `K` members scoring the same responses, combined by an
//! [`Aggregator`], with the members' disagreement exposed as an uncertainty signal.
//!
//! Members differ by seed (initialisation and data order;
//! [`train_ensemble`](crate::train::train_ensemble)). Coste et al. (2024, "Reward Model
//! Ensembles Help Mitigate Overoptimization") define the mean, worst-case (WCO) and
//! uncertainty-weighted (UWO) objectives; Eisenstein et al. ("Helping or Herding?") find
//! that ensembles mitigate but do not remove hacking when members share errors, which is
//! why the disagreement ([`member_variance`]) is reported and not only the aggregate.
//!
//! Scores are laid out `[K, N]`: one row per member.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{ops::check_finite, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::source::{RewardOutput, RewardSource};

/// How the `K` members' scores of one response become one reward (TOML:
/// `kind = "mean" | "median" | "worst_case" | "uwo"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregator {
    /// `mean_k r_k` (Coste et al.'s mean objective).
    Mean,
    /// The median over members (average of the two middle scores for even `K`, as
    /// `numpy.median`); robust to one wild member.
    Median,
    /// `min_k r_k` (Coste et al.'s worst-case optimisation, WCO): the most pessimistic
    /// member.
    WorstCase,
    /// Uncertainty-weighted optimisation (UWO, Coste et al.):
    /// `mean_k r_k - lambda Var_k(r_k)`, with the *variance* (not the std).
    Uwo {
        /// Penalty weight `lambda`. Coste et al. use 0.5 for best-of-n and 0.1 for PPO
        /// ([`Aggregator::uwo_bon`], [`Aggregator::uwo_ppo`]); the serde default is the
        /// PPO value.
        #[serde(default = "uwo_lambda_default")]
        lambda: f32,
        /// Unbiased (`/(K-1)`) instead of population (`/K`, the default, as
        /// `numpy.var`) variance. With one member the variance is 0 either way.
        #[serde(default)]
        unbiased: bool,
    },
}

fn uwo_lambda_default() -> f32 {
    0.1
}

impl Default for Aggregator {
    /// The mean.
    fn default() -> Self {
        Self::Mean
    }
}

impl Aggregator {
    /// UWO with Coste et al.'s best-of-n weight `lambda = 0.5` (population variance).
    pub fn uwo_bon() -> Self {
        Self::Uwo {
            lambda: 0.5,
            unbiased: false,
        }
    }

    /// UWO with Coste et al.'s PPO weight `lambda = 0.1` (population variance).
    pub fn uwo_ppo() -> Self {
        Self::Uwo {
            lambda: 0.1,
            unbiased: false,
        }
    }

    /// The registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Median => "median",
            Self::WorstCase => "worst_case",
            Self::Uwo { .. } => "uwo",
        }
    }

    /// Combines member scores `[K, N]` into one reward per response `[N]`.
    ///
    /// Errors on `K = 0` or `N = 0`, on a non-finite score, and on a negative or
    /// non-finite `lambda`.
    pub fn aggregate<B: Backend>(&self, scores: Tensor<B, 2>) -> Result<Tensor<B, 1>> {
        check_members(&scores)?;
        let [k, n] = scores.dims();
        Ok(match *self {
            Self::Mean => scores.mean_dim(0).reshape([n]),
            Self::WorstCase => scores.min_dim(0).reshape([n]),
            Self::Median => {
                let sorted = scores.sort(0);
                let hi = sorted.clone().narrow(0, k / 2, 1);
                let mid = if k % 2 == 1 {
                    hi
                } else {
                    (sorted.narrow(0, k / 2 - 1, 1) + hi) / 2.0
                };
                mid.reshape([n])
            }
            Self::Uwo { lambda, unbiased } => {
                if !(lambda.is_finite() && lambda >= 0.0) {
                    return Err(GoodhartError::invalid(
                        "uwo.lambda",
                        format!("must be finite and non-negative, got {lambda}"),
                    ));
                }
                let mean = scores.clone().mean_dim(0).reshape([n]);
                mean - member_variance(scores, unbiased)? * lambda
            }
        })
    }
}

fn check_members<B: Backend>(scores: &Tensor<B, 2>) -> Result<()> {
    let [k, n] = scores.dims();
    if k == 0 {
        return Err(GoodhartError::Empty {
            what: "ensemble members".into(),
        });
    }
    if n == 0 {
        return Err(GoodhartError::Empty {
            what: "responses".into(),
        });
    }
    check_finite(scores, "member scores")
}

/// The members' disagreement on each response: `Var_k(r_k)` over the `K` rows of
/// `scores [K, N]`, population (`/K`) or unbiased (`/(K-1)`). It is 0 for identical
/// members and for a single member (in both conventions, by definition here). Use it
/// as the uncertainty `U` of [`ctrl_u`](crate::uncertainty::ctrl_u) or as a metric.
pub fn member_variance<B: Backend>(scores: Tensor<B, 2>, unbiased: bool) -> Result<Tensor<B, 1>> {
    check_members(&scores)?;
    let [k, n] = scores.dims();
    if k == 1 {
        return Ok(Tensor::zeros([n], &scores.device()));
    }
    let mean = scores.clone().mean_dim(0);
    let ss = (scores - mean).powi_scalar(2).sum_dim(0).reshape([n]);
    let denom = if unbiased { k - 1 } else { k } as f32;
    Ok(ss / denom)
}

/// An ensemble of reward sources scored together and aggregated. Its output carries
/// every member's score (`members [K, N]`), so the disagreement stays visible.
#[derive(Debug, Clone)]
pub struct RewardEnsemble<S> {
    name: String,
    members: Vec<S>,
    aggregator: Aggregator,
}

impl<S> RewardEnsemble<S> {
    /// An ensemble of `members` combined by `aggregator`; errors when empty.
    pub fn new(name: impl Into<String>, members: Vec<S>, aggregator: Aggregator) -> Result<Self> {
        if members.is_empty() {
            return Err(GoodhartError::Empty {
                what: "ensemble members".into(),
            });
        }
        Ok(Self {
            name: name.into(),
            members,
            aggregator,
        })
    }

    /// The members.
    pub fn members(&self) -> &[S] {
        &self.members
    }

    /// The aggregator.
    pub fn aggregator(&self) -> Aggregator {
        self.aggregator
    }
}

impl<B: Backend, I, S: RewardSource<B, I>> RewardSource<B, I> for RewardEnsemble<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &I) -> Result<RewardOutput<B>> {
        let rows = self
            .members
            .iter()
            .map(|m| m.score(input).map(|o| o.reward.unsqueeze_dim(0)))
            .collect::<Result<Vec<_>>>()?;
        let n = rows[0].dims()[1];
        if let Some(bad) = rows.iter().find(|r| r.dims()[1] != n) {
            return Err(GoodhartError::shape(
                "ensemble member scores",
                &[1, n],
                &bad.dims(),
            ));
        }
        let members = Tensor::cat(rows, 0);
        let mut out = RewardOutput::scalar(self.aggregator.aggregate(members.clone())?)?;
        out.members = Some(members);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FnReward, Sequences};
    use goodhart_core::testing::{assert_close, tolerance, values};

    // Three members (rows) scoring four responses (columns).
    fn scores<B: Backend>(device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_floats(
            [
                [1.0, 0.0, 2.0, -1.0],
                [3.0, 0.0, 2.0, 5.0],
                [2.0, 6.0, 2.0, 2.0],
            ],
            device,
        )
    }

    goodhart_core::backend_test! {
        fn aggregators_match_hand_computed_values<B>(device) {
            let tol = tolerance(1e-6);
            let s = scores::<B>(device);
            // means: 6/3 = 2, 6/3 = 2, 2, 6/3 = 2
            assert_close(&values(Aggregator::Mean.aggregate(s.clone()).unwrap()), &[2.0, 2.0, 2.0, 2.0], tol);
            // sorted columns: (1,2,3) (0,0,6) (2,2,2) (-1,2,5)
            assert_close(&values(Aggregator::Median.aggregate(s.clone()).unwrap()), &[2.0, 0.0, 2.0, 2.0], tol);
            assert_close(&values(Aggregator::WorstCase.aggregate(s.clone()).unwrap()), &[1.0, 0.0, 2.0, -1.0], tol);
            // squared deviations: (1+1+0)=2, (4+4+16)=24, 0, (9+9+0)=18
            // population var: 2/3, 8, 0, 6; unbiased: 1, 12, 0, 9
            assert_close(&values(member_variance(s.clone(), false).unwrap()), &[2.0 / 3.0, 8.0, 0.0, 6.0], tol);
            assert_close(&values(member_variance(s.clone(), true).unwrap()), &[1.0, 12.0, 0.0, 9.0], tol);
            // UWO lambda 0.5, population: 2 - 0.5 * var
            assert_close(&values(Aggregator::uwo_bon().aggregate(s.clone()).unwrap()),
                &[2.0 - 1.0 / 3.0, -2.0, 2.0, -1.0], tol);
            let uwo_unbiased = Aggregator::Uwo { lambda: 0.1, unbiased: true };
            assert_close(&values(uwo_unbiased.aggregate(s.clone()).unwrap()), &[1.9, 0.8, 2.0, 1.1], tol);
            // even K: median averages the two middle scores: (1,3) -> 2, (0,0) -> 0, ...
            let even = s.narrow(0, 0, 2);
            assert_close(&values(Aggregator::Median.aggregate(even).unwrap()), &[2.0, 0.0, 2.0, 2.0], tol);
        }
    }

    goodhart_core::backend_test! {
        fn uwo_penalises_the_variance_not_the_std<B>(device) {
            // Members 0 and 4: population variance 4, std 2. mean 2.
            // variance: 2 - 1 * 4 = -2; std would give 2 - 1 * 2 = 0.
            let s = Tensor::<B, 2>::from_floats([[0.0], [4.0]], device);
            let uwo = Aggregator::Uwo { lambda: 1.0, unbiased: false };
            assert_close(&values(uwo.aggregate(s).unwrap()), &[-2.0], tolerance(1e-6));
        }
    }

    goodhart_core::backend_test! {
        fn identical_members_do_not_disagree<B>(device) {
            let row = Tensor::<B, 2>::from_floats([[0.3, -1.7, 12.5]], device);
            let s = Tensor::cat(vec![row.clone(), row.clone(), row.clone(), row], 0);
            for unbiased in [false, true] {
                assert_close(&values(member_variance(s.clone(), unbiased).unwrap()), &[0.0; 3], 1e-6);
                let u = Aggregator::Uwo { lambda: 0.5, unbiased };
                assert_close(&values(u.aggregate(s.clone()).unwrap()), &[0.3, -1.7, 12.5], tolerance(1e-6));
            }
            let one = Tensor::<B, 2>::from_floats([[1.0, 2.0]], device);
            assert_close(&values(member_variance(one, true).unwrap()), &[0.0, 0.0], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn bad_scores_are_typed_errors<B>(device) {
            let nan = Tensor::<B, 2>::from_floats([[1.0, f32::NAN]], device);
            assert!(matches!(Aggregator::Mean.aggregate(nan), Err(GoodhartError::NonFinite { .. })));
            let empty = Tensor::<B, 2>::zeros([0, 3], device);
            assert!(matches!(Aggregator::Median.aggregate(empty), Err(GoodhartError::Empty { .. })));
            let neg = Aggregator::Uwo { lambda: -1.0, unbiased: false };
            assert!(matches!(neg.aggregate(scores::<B>(device)), Err(GoodhartError::InvalidArgument { .. })));
            assert!(RewardEnsemble::<FnReward<fn(&Sequences<B>) -> Result<Tensor<B, 1>>>>::new("e", vec![], Aggregator::Mean).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn ensemble_source_keeps_member_scores<B>(device) {
            let pairs: Vec<(&[u32], &[u32])> = vec![(&[1], &[2, 3]), (&[1], &[2])];
            let s = Sequences::<B>::from_pairs(&pairs, 0, device).unwrap();
            type F<B> = Box<dyn Fn(&Sequences<B>) -> Result<Tensor<B, 1>>>;
            let a: F<B> = Box::new(|s: &Sequences<B>| Ok(s.response_lengths()));
            let b: F<B> = Box::new(|s: &Sequences<B>| Ok(s.response_lengths() * 3.0));
            let e = RewardEnsemble::new("rm", vec![FnReward::new("a", a), FnReward::new("b", b)], Aggregator::WorstCase).unwrap();
            let out = RewardSource::<B>::score(&e, &s).unwrap();
            // lengths (2, 1): members (2, 1) and (6, 3): min (2, 1); population var ((2-4)^2+(6-4)^2)/2 = 4, 1
            assert_close(&values(out.reward.clone()), &[2.0, 1.0], 0.0);
            assert_close(&values(out.uncertainty(false).unwrap().unwrap()), &[4.0, 1.0], tolerance(1e-6));
        }
    }
}
