//! Key/value cache for incremental decoding.
//!
//! Decoding token `t` needs the keys and values of tokens `0..t` in every layer; without a
//! cache they are recomputed at every step (`O(T^2)` token-forwards for `T` tokens), with
//! it each step runs one position and attends over the cached prefix (`O(T)`
//! token-forwards). The cache is allocated once for `capacity` positions: each layer holds
//! `K, V [1, H_kv, 1, B, capacity, d_head]` (the attention's layout) and a step writes its
//! positions into them. The cache also holds the key padding mask `[B, capacity]`, 0 on
//! padding and on positions not yet written, from which the next positions are counted;
//! attention runs over all `capacity` keys with the unwritten ones masked out.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{GoodhartError, Result};

/// Cached keys and values of one layer, `[1, H_kv, 1, B, capacity, d_head]` once written.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    k: Option<Tensor<B, 6>>,
    v: Option<Tensor<B, 6>>,
}

impl<B: Backend> LayerCache<B> {
    /// Writes `k, v [1, H_kv, 1, B, T, d_head]` at positions `at..at + T` (allocating
    /// `capacity` positions on the first write) and returns the whole buffers.
    pub(crate) fn write(
        &mut self,
        k: Tensor<B, 6>,
        v: Tensor<B, 6>,
        at: usize,
        capacity: usize,
    ) -> (Tensor<B, 6>, Tensor<B, 6>) {
        let [one, h, g, b, t, d] = k.dims();
        let device = k.device();
        let put = |buf: Option<Tensor<B, 6>>, new: Tensor<B, 6>| {
            let buf = buf.unwrap_or_else(|| Tensor::zeros([one, h, g, b, capacity, d], &device));
            // The buffer is held only here, so a backend that writes in place when it
            // can (wgpu, CUDA) copies only the new positions.
            buf.slice_assign([0..one, 0..h, 0..g, 0..b, at..at + t, 0..d], new)
        };
        let k = put(self.k.take(), k);
        let v = put(self.v.take(), v);
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        (k, v)
    }

    /// Cached keys `[1, H_kv, 1, B, len, d_head]` of the first `len` positions, if any.
    pub fn keys(&self, len: usize) -> Option<Tensor<B, 6>> {
        self.k.as_ref().map(|k| k.clone().narrow(4, 0, len))
    }

    /// Cached values `[1, H_kv, 1, B, len, d_head]` of the first `len` positions, if any.
    pub fn values(&self, len: usize) -> Option<Tensor<B, 6>> {
        self.v.as_ref().map(|v| v.clone().narrow(4, 0, len))
    }
}

/// Per-layer keys and values of the tokens run so far, and their padding mask.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerCache<B>>,
    mask: Option<Tensor<B, 2>>,
    len: usize,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `n_layers` blocks and sequences of at most
    /// `capacity` positions (prompt and generated tokens).
    pub fn new(n_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| LayerCache { k: None, v: None })
                .collect(),
            mask: None,
            len: 0,
            capacity,
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

    /// Most positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Batch size of the cached rows (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dims()[0])
    }

    /// The cached layers.
    pub fn layers(&self) -> &[LayerCache<B>] {
        &self.layers
    }

    /// Key padding mask `[B, len]` of the cached positions (1 = real token).
    pub fn mask(&self) -> Option<Tensor<B, 2>> {
        self.mask.as_ref().map(|m| m.clone().narrow(1, 0, self.len))
    }

    /// Number of real (unmasked) cached tokens per row, `[B, 1]`.
    pub(crate) fn real_tokens(&self) -> Option<Tensor<B, 2>> {
        self.mask.as_ref().map(|m| m.clone().sum_dim(1))
    }

    /// Error unless `t` more positions of a batch of `b` rows fit.
    pub(crate) fn check_room(&self, b: usize, t: usize) -> Result<()> {
        if self.len > 0 && self.batch_size() != b {
            return Err(GoodhartError::shape(
                "tokens (batch of the cache)",
                &[self.batch_size(), t],
                &[b, t],
            ));
        }
        if self.len + t > self.capacity {
            return Err(GoodhartError::invalid(
                "tokens",
                format!(
                    "{} cached + {t} new positions exceed the cache's capacity {}",
                    self.len, self.capacity
                ),
            ));
        }
        Ok(())
    }

    /// Writes the padding mask `[B, T]` of the next `T` positions and returns the mask
    /// of every key `[B, capacity]` (0 past them).
    pub(crate) fn write_mask(&mut self, mask: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, t] = mask.dims();
        let buf = self
            .mask
            .take()
            .unwrap_or_else(|| Tensor::zeros([b, self.capacity], &mask.device()));
        let buf = buf.slice_assign([0..b, self.len..self.len + t], mask);
        self.mask = Some(buf.clone());
        buf
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
