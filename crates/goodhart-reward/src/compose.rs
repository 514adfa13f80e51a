//! Composition: a weighted sum of named reward sources, `r = sum_i w_i r_i`, with every
//! component kept by name so the metrics see each one (a proxy that rises while one of
//! its components collapses is what reward hacking looks like).

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{batch::RolloutBatch, GoodhartError, Result};

use crate::source::{RewardOutput, RewardSource, Sequences};

/// One weighted component of a [`Composite`].
pub struct Component<B: Backend, I> {
    /// Its name (metric key `reward/<composite>/<name>`).
    pub name: String,
    /// Its weight `w_i`.
    pub weight: f32,
    /// The source.
    pub source: Box<dyn RewardSource<B, I>>,
}

/// The output of [`Composite::score_components`]: the weighted total and each
/// component's own (unweighted) output.
#[derive(Debug, Clone)]
pub struct Composed<B: Backend> {
    /// `sum_i w_i r_i`, `[N]`.
    pub total: Tensor<B, 1>,
    /// Each component's output, by name.
    pub components: BTreeMap<String, RewardOutput<B>>,
}

impl<B: Backend> Composed<B> {
    /// Adds the total under `name` and each component under `name/<component>` to
    /// `batch` (e.g. `proxy`, `proxy/length`, `proxy/rm`).
    pub fn into_batch(self, name: &str, mut batch: RolloutBatch<B>) -> Result<RolloutBatch<B>> {
        for (c, out) in self.components {
            batch = batch.with_reward(format!("{name}/{c}"), out.reward)?;
        }
        batch.with_reward(name, self.total)
    }
}

/// A weighted sum of named sources of the same input type.
pub struct Composite<B: Backend, I = Sequences<B>> {
    name: String,
    components: Vec<Component<B, I>>,
}

impl<B: Backend, I> Composite<B, I> {
    /// A composite named `name`. Errors on no component, a duplicate or empty name, or a
    /// non-finite weight.
    pub fn new(name: impl Into<String>, components: Vec<Component<B, I>>) -> Result<Self> {
        if components.is_empty() {
            return Err(GoodhartError::Empty {
                what: "composite reward components".into(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &components {
            if c.name.is_empty() || !seen.insert(c.name.as_str()) {
                return Err(GoodhartError::invalid(
                    "components",
                    format!(
                        "component names must be unique and non-empty (`{}`)",
                        c.name
                    ),
                ));
            }
            if !c.weight.is_finite() {
                return Err(GoodhartError::invalid(
                    format!("components.{}.weight", c.name),
                    "must be finite",
                ));
            }
        }
        Ok(Self {
            name: name.into(),
            components,
        })
    }

    /// Scores every component and their weighted sum. Errors if a component fails or
    /// returns a different number of responses than the first.
    pub fn score_components(&self, input: &I) -> Result<Composed<B>> {
        let mut total: Option<Tensor<B, 1>> = None;
        let mut components = BTreeMap::new();
        for c in &self.components {
            let out = c.source.score(input)?;
            let weighted = out.reward.clone() * c.weight;
            total = Some(match total {
                None => weighted,
                Some(t) => {
                    goodhart_core::ops::check_same_shape(
                        &t,
                        "first component",
                        &weighted,
                        &c.name,
                    )?;
                    t + weighted
                }
            });
            components.insert(c.name.clone(), out);
        }
        Ok(Composed {
            total: total.expect("at least one component (checked in new)"),
            components,
        })
    }
}

impl<B: Backend, I> RewardSource<B, I> for Composite<B, I> {
    fn name(&self) -> &str {
        &self.name
    }

    /// The weighted total (use [`Composite::score_components`] to keep the components).
    fn score(&self, input: &I) -> Result<RewardOutput<B>> {
        RewardOutput::scalar(self.score_components(input)?.total)
    }

    /// Each component's usage, keyed `<component>/<name>`.
    fn usage(&self) -> Vec<(String, f64)> {
        self.components
            .iter()
            .flat_map(|c| {
                c.source
                    .usage()
                    .into_iter()
                    .map(|(k, v)| (format!("{}/{k}", c.name), v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FnReward;
    use goodhart_core::{
        groups::Groups,
        testing::{assert_close, values},
    };

    goodhart_core::backend_test! {
        fn weighted_sum_keeps_each_component<B>(device) {
            let pairs: Vec<(&[u32], &[u32])> = vec![(&[1], &[2, 3, 4]), (&[1], &[2])];
            let s = Sequences::<B>::from_pairs(&pairs, 0, device).unwrap();
            let len = FnReward::new("len", |s: &Sequences<B>| Ok(s.response_lengths()));
            let one = FnReward::new("one", |s: &Sequences<B>| Ok(Tensor::ones([s.len()], &s.tokens.device())));
            let c = Composite::new("proxy", vec![
                Component { name: "length".into(), weight: -0.5, source: Box::new(len) },
                Component { name: "bonus".into(), weight: 2.0, source: Box::new(one) },
            ]).unwrap();
            // lengths (3, 1): -0.5 * 3 + 2 = 0.5 ; -0.5 * 1 + 2 = 1.5
            let out = c.score_components(&s).unwrap();
            assert_close(&values(out.total.clone()), &[0.5, 1.5], 0.0);
            assert_close(&values(out.components["length"].reward.clone()), &[3.0, 1.0], 0.0);
            assert_close(&values(out.components["bonus"].reward.clone()), &[1.0, 1.0], 0.0);
            let batch = RolloutBatch::new(s.tokens.clone(), s.response_mask.clone(), Groups::new(vec![0, 0]).unwrap()).unwrap();
            let batch = out.into_batch("proxy", batch).unwrap();
            assert_eq!(batch.rewards().keys().cloned().collect::<Vec<_>>(), ["proxy", "proxy/bonus", "proxy/length"]);
            assert_close(&values(RewardSource::<B>::score(&c, &s).unwrap().reward), &[0.5, 1.5], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn bad_composites_are_rejected<B>(device) {
            let _ = device;
            let mk = |name: &str, w: f32| Component::<B, Sequences<B>> {
                name: name.into(), weight: w,
                source: Box::new(FnReward::new("x", |s: &Sequences<B>| Ok(s.response_lengths()))),
            };
            assert!(matches!(Composite::<B>::new("p", vec![]), Err(GoodhartError::Empty { .. })));
            assert!(Composite::new("p", vec![mk("a", 1.0), mk("a", 2.0)]).is_err());
            assert!(Composite::new("p", vec![mk("a", f32::NAN)]).is_err());
        }
    }
}
