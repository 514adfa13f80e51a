//! Explicit group ids: which responses answer the same prompt.
//!
//! Groups are given by an id per response, as verl does (`index` array), not only by
//! contiguous blocks as in TRL: after filtering or shuffling a batch, the members of a
//! group need not be neighbours. [`Groups`] maps arbitrary `u64` ids to dense indices
//! `0..num_groups()` in order of first appearance, so group statistics can be computed
//! with one scatter-add on any backend.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::error::{GoodhartError, Result};

/// Group membership of a batch of responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    ids: Vec<u64>,
    dense: Vec<usize>,
    labels: Vec<u64>,
    sizes: Vec<usize>,
}

impl Groups {
    /// Groups from one id per response. Errors on an empty batch.
    pub fn new(ids: impl Into<Vec<u64>>) -> Result<Self> {
        let ids = ids.into();
        if ids.is_empty() {
            return Err(GoodhartError::Empty {
                what: "group ids".into(),
            });
        }
        let mut lookup = std::collections::HashMap::with_capacity(ids.len() / 2 + 1);
        let mut labels = Vec::new();
        let mut sizes = Vec::new();
        let dense = ids
            .iter()
            .map(|&id| {
                let g = *lookup.entry(id).or_insert_with(|| {
                    labels.push(id);
                    sizes.push(0);
                    labels.len() - 1
                });
                sizes[g] += 1;
                g
            })
            .collect();
        Ok(Self {
            ids,
            dense,
            labels,
            sizes,
        })
    }

    /// `num_groups` contiguous blocks of `group_size` responses (TRL's layout).
    pub fn contiguous(num_groups: usize, group_size: usize) -> Result<Self> {
        if group_size == 0 {
            return Err(GoodhartError::invalid("group_size", "must be at least 1"));
        }
        Self::new(
            (0..num_groups as u64)
                .flat_map(|g| std::iter::repeat_n(g, group_size))
                .collect::<Vec<_>>(),
        )
    }

    /// Every response in its own group.
    pub fn singletons(n: usize) -> Result<Self> {
        Self::new((0..n as u64).collect::<Vec<_>>())
    }

    /// Number of responses.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: an empty `Groups` cannot be built.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of distinct groups.
    pub fn num_groups(&self) -> usize {
        self.labels.len()
    }

    /// The caller's id of each response.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// Dense group index (`0..num_groups()`) of each response.
    pub fn dense(&self) -> &[usize] {
        &self.dense
    }

    /// Caller's id of dense group `g`.
    pub fn label(&self, g: usize) -> u64 {
        self.labels[g]
    }

    /// Size of each dense group.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Error unless every group has at least `min` members.
    pub fn require_min_size(&self, min: usize, method: &str) -> Result<()> {
        match self.sizes.iter().position(|&s| s < min) {
            Some(g) => Err(GoodhartError::GroupTooSmall {
                group: self.labels[g],
                size: self.sizes[g],
                min,
                method: method.into(),
            }),
            None => Ok(()),
        }
    }

    /// Error unless there is one group id per element of an input of length `n`.
    pub fn require_len(&self, n: usize, what: &str) -> Result<()> {
        if n == self.len() {
            Ok(())
        } else {
            Err(GoodhartError::shape(what, &[self.len()], &[n]))
        }
    }

    /// Dense indices as an integer tensor, for `select` / `select_assign`.
    pub fn index_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        let idx: Vec<i64> = self.dense.iter().map(|&g| g as i64).collect();
        Tensor::from_data(TensorData::new(idx, [self.len()]), device)
    }

    /// Group sizes as a float tensor of length `num_groups()`.
    pub fn sizes_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1> {
        let s: Vec<f32> = self.sizes.iter().map(|&s| s as f32).collect();
        Tensor::from_data(TensorData::new(s, [self.num_groups()]), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_indices_follow_first_appearance() {
        let g = Groups::new(vec![7, 3, 7, 9, 3, 7]).unwrap();
        assert_eq!(g.dense(), &[0, 1, 0, 2, 1, 0]);
        assert_eq!(g.sizes(), &[3, 2, 1]);
        assert_eq!(g.num_groups(), 3);
        assert_eq!(g.label(2), 9);
        assert_eq!(
            g.require_min_size(2, "rloo"),
            Err(GoodhartError::GroupTooSmall {
                group: 9,
                size: 1,
                min: 2,
                method: "rloo".into()
            })
        );
    }

    #[test]
    fn empty_and_zero_size_are_errors() {
        assert!(matches!(
            Groups::new(Vec::<u64>::new()),
            Err(GoodhartError::Empty { .. })
        ));
        assert!(Groups::contiguous(3, 0).is_err());
        assert_eq!(
            Groups::contiguous(2, 3).unwrap().dense(),
            &[0, 0, 0, 1, 1, 1]
        );
    }
}
