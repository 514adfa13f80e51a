//! Element-wise loops over contiguous buffers, split across rayon's threads when the
//! buffer is large enough to repay the split (goodhart patch: upstream runs these loops on
//! one thread, so with two threads the element-wise half of a forward and backward pass
//! left one core idle).

use alloc::vec::Vec;

/// Elements below which a loop runs on the calling thread (also the SIMD kernels'
/// threshold in `simd/portable.rs`; upstream's was 4 Mi there). On a 2-core x86 server one
/// core does not saturate memory bandwidth, so two threads speed up element-wise ops on
/// buffers far smaller than the L3 cache (a transformer's activations at batch 64 are
/// 0.3-3 Mi elements).
#[cfg(feature = "rayon")]
pub(crate) const MIN_PARALLEL: usize = 1 << 15;

/// Elements per rayon task (also the SIMD kernels'; upstream's was 4 Ki there).
#[cfg(feature = "rayon")]
pub(crate) const CHUNK: usize = 1 << 14;

/// `dst[i] = op(dst[i])`.
pub fn map_inplace<E, Op>(dst: &mut [E], op: Op)
where
    E: Copy + Send + Sync,
    Op: Fn(E) -> E + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if dst.len() >= MIN_PARALLEL {
        use rayon::prelude::*;
        dst.par_chunks_mut(CHUNK).for_each(|c| {
            for x in c.iter_mut() {
                *x = op(*x);
            }
        });
        return;
    }
    for x in dst.iter_mut() {
        *x = op(*x);
    }
}

/// `dst[i] = op(dst[i], src[i])` over the shorter of the two.
pub fn zip_inplace<E, R, Op>(dst: &mut [E], src: &[R], op: Op)
where
    E: Copy + Send + Sync,
    R: Copy + Send + Sync,
    Op: Fn(E, R) -> E + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if dst.len() >= MIN_PARALLEL {
        use rayon::prelude::*;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| {
                for (x, &y) in d.iter_mut().zip(s) {
                    *x = op(*x, y);
                }
            });
        return;
    }
    for (x, &y) in dst.iter_mut().zip(src) {
        *x = op(*x, y);
    }
}

/// `op(src[i])` for every element, as a new buffer.
pub fn map<E, R, Op>(src: &[E], op: Op) -> Vec<R>
where
    E: Copy + Send + Sync,
    R: Copy + Send + Sync,
    Op: Fn(E) -> R + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if src.len() >= MIN_PARALLEL {
        use rayon::prelude::*;
        return src.par_iter().with_min_len(CHUNK).map(|&x| op(x)).collect();
    }
    src.iter().map(|&x| op(x)).collect()
}

/// `op(a[i], b[i])` for every element of the shorter of the two, as a new buffer.
pub fn zip<E, R, Op>(a: &[E], b: &[E], op: Op) -> Vec<R>
where
    E: Copy + Send + Sync,
    R: Copy + Send + Sync,
    Op: Fn(E, E) -> R + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if a.len().min(b.len()) >= MIN_PARALLEL {
        use rayon::prelude::*;
        return a
            .par_iter()
            .zip(b.par_iter())
            .with_min_len(CHUNK)
            .map(|(&x, &y)| op(x, y))
            .collect();
    }
    a.iter().zip(b).map(|(&x, &y)| op(x, y)).collect()
}

/// `kernel(rows, first)` over chunks of whole rows of `dst` (rows of `row_len` elements;
/// `first` is the index of the chunk's first row).
pub fn rows_inplace<E, K>(dst: &mut [E], row_len: usize, kernel: K)
where
    E: Send + Sync,
    K: Fn(&mut [E], usize) + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if dst.len() >= MIN_PARALLEL && row_len > 0 {
        use rayon::prelude::*;
        let rows = CHUNK.div_ceil(row_len);
        dst.par_chunks_mut(rows * row_len)
            .enumerate()
            .for_each(|(i, d)| kernel(d, i * rows));
        return;
    }
    kernel(dst, 0);
}
