//! Key/value cache for incremental decoding.
//!
//! Decoding token `t` needs the keys and values of tokens `0..t` in every layer; without a
//! cache they are recomputed at every step (`O(T^2)` token-forwards for `T` tokens), with
//! it each step runs one position and attends over the cached prefix (`O(T)`
//! token-forwards). Each layer holds `K, V [B, H, T_cached, d_head]`, extended by one
//! position per decoding step; the cache also holds the key padding mask `[B, T_cached]`,
//! from which the next positions are counted.

use burn::tensor::{backend::Backend, Tensor};

/// Cached keys and values of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerCache<B> {
    /// Keys and values of the cached prefix followed by `k, v` (along the time axis);
    /// stored back when `keep`.
    pub(crate) fn extend(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        keep: bool,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let join = |old: Option<Tensor<B, 4>>, new: Tensor<B, 4>| match old {
            Some(old) => Tensor::cat(vec![old, new], 2),
            None => new,
        };
        let k = join(self.k.take(), k);
        let v = join(self.v.take(), v);
        if keep {
            self.k = Some(k.clone());
            self.v = Some(v.clone());
        }
        (k, v)
    }

    /// Cached keys `[B, H, T_cached, d_head]`, if any.
    pub fn keys(&self) -> Option<&Tensor<B, 4>> {
        self.k.as_ref()
    }

    /// Cached values `[B, H, T_cached, d_head]`, if any.
    pub fn values(&self) -> Option<&Tensor<B, 4>> {
        self.v.as_ref()
    }
}

/// Per-layer keys and values of the tokens run so far, and their padding mask.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerCache<B>>,
    pub(crate) mask: Option<Tensor<B, 2>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| LayerCache { k: None, v: None })
                .collect(),
            mask: None,
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch size of the cached rows (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dims()[0])
    }

    /// The cached layers.
    pub fn layers(&self) -> &[LayerCache<B>] {
        &self.layers
    }

    /// Key padding mask `[B, T_cached]` (1 = real token).
    pub fn mask(&self) -> Option<&Tensor<B, 2>> {
        self.mask.as_ref()
    }

    /// Number of real (unmasked) cached tokens per row, `[B, 1]`.
    pub(crate) fn real_tokens(&self) -> Option<Tensor<B, 2>> {
        self.mask.as_ref().map(|m| m.clone().sum_dim(1))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
