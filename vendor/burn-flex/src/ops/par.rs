//! Element-wise loops over contiguous buffers, split across rayon's threads when the
//! buffer is large enough to repay the split, each chunk compiled for the widest x86
//! vector extension the CPU has (goodhart patch: upstream runs these loops on one thread,
//! so with two threads the element-wise half of a forward and backward pass left one core
//! idle, and compiles them for the baseline x86-64, 4 floats per instruction).
//!
//! The loops call `op` on one element at a time; LLVM vectorises them when `op` is plain
//! arithmetic. Rust never contracts `a * b + c` into a fused multiply-add nor reorders
//! float arithmetic, so every vector width gives the same bits.

use alloc::vec::Vec;
use core::mem::MaybeUninit;

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

/// The four loop bodies. `#[inline(always)]`, so that each is compiled again inside the
/// `#[target_feature]` functions of [`versions!`], with `op` inlined into the loop.
#[inline(always)]
fn map_inplace_body<E: Copy, Op: Fn(E) -> E>(dst: &mut [E], op: &Op) {
    for x in dst.iter_mut() {
        *x = op(*x);
    }
}

#[inline(always)]
fn zip_inplace_body<E: Copy, R: Copy, Op: Fn(E, R) -> E>(dst: &mut [E], src: &[R], op: &Op) {
    for (x, &y) in dst.iter_mut().zip(src) {
        *x = op(*x, y);
    }
}

#[inline(always)]
fn map_body<E: Copy, R, Op: Fn(E) -> R>(src: &[E], dst: &mut [MaybeUninit<R>], op: &Op) {
    for (d, &x) in dst.iter_mut().zip(src) {
        d.write(op(x));
    }
}

#[inline(always)]
fn zip_body<E: Copy, R, Op: Fn(E, E) -> R>(
    a: &[E],
    b: &[E],
    dst: &mut [MaybeUninit<R>],
    op: &Op,
) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        d.write(op(x, y));
    }
}

/// For each loop body `$body`, a function `$name` with the same arguments that runs it
/// compiled for x86-64-v4 (AVX-512) or x86-64-v3 (AVX2 and FMA) when the CPU has those
/// (detected once by std), and for the build's target otherwise.
macro_rules! versions {
    ($(fn $name:ident<$($g:ident),*>($($arg:ident: $ty:ty),*) = $body:ident where [$($bound:tt)*];)*) => {$(
        #[inline]
        fn $name<$($g),*>($($arg: $ty),*) where $($bound)* {
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                fn v4<$($g),*>($($arg: $ty),*) where $($bound)* {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                fn v3<$($g),*>($($arg: $ty),*) where $($bound)* {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has every feature `v4` enables (the v4 level
                    // implies v3's).
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("bmi1")
                    && std::is_x86_feature_detected!("bmi2")
                    && std::is_x86_feature_detected!("lzcnt")
                    && std::is_x86_feature_detected!("popcnt")
                {
                    // SAFETY: the CPU has every feature `v3` enables.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    )*};
}

/// `kernel(row, out)` for each row of `src` and the matching row of `dst` (rows of
/// `row_len` elements).
#[inline(always)]
fn rows_body<E: Copy, R, K: Fn(&[E], &mut [MaybeUninit<R>])>(
    src: &[E],
    dst: &mut [MaybeUninit<R>],
    row_len: usize,
    kernel: &K,
) {
    for (s, d) in src.chunks(row_len).zip(dst.chunks_mut(row_len)) {
        kernel(s, d);
    }
}

versions! {
    fn rows_chunk<E, R, K>(src: &[E], dst: &mut [MaybeUninit<R>], row_len: usize, kernel: &K) = rows_body
        where [E: Copy, K: Fn(&[E], &mut [MaybeUninit<R>])];
    fn map_inplace_chunk<E, Op>(dst: &mut [E], op: &Op) = map_inplace_body
        where [E: Copy, Op: Fn(E) -> E];
    fn zip_inplace_chunk<E, R, Op>(dst: &mut [E], src: &[R], op: &Op) = zip_inplace_body
        where [E: Copy, R: Copy, Op: Fn(E, R) -> E];
    fn map_chunk<E, R, Op>(src: &[E], dst: &mut [MaybeUninit<R>], op: &Op) = map_body
        where [E: Copy, Op: Fn(E) -> R];
    fn zip_chunk<E, R, Op>(a: &[E], b: &[E], dst: &mut [MaybeUninit<R>], op: &Op) = zip_body
        where [E: Copy, Op: Fn(E, E) -> R];
}

/// A buffer of `n` elements written by `fill(chunk, first)` for chunks of `chunk`
/// elements of the uninitialised buffer (`first`: the chunk's first index), which must
/// write every element; on rayon's threads once `n` reaches [`MIN_PARALLEL`].
fn build<R, F>(n: usize, chunk: usize, fill: F) -> Vec<R>
where
    R: Send,
    F: Fn(&mut [MaybeUninit<R>], usize) + Send + Sync,
{
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    #[cfg(feature = "rayon")]
    if n >= MIN_PARALLEL {
        use rayon::prelude::*;
        spare
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(c, i * chunk));
    } else {
        fill(spare, 0);
    }
    #[cfg(not(feature = "rayon"))]
    {
        let _ = chunk;
        fill(spare, 0);
    }
    // SAFETY: `fill` wrote all `n` elements (`map`'s and `zip`'s bodies write every element
    // of their chunk, their sources being at least `n` long; `map_rows`'s kernels write
    // every element of their rows, by its contract).
    unsafe { out.set_len(n) };
    out
}

/// `dst[i] = op(dst[i])`.
pub fn map_inplace<E, Op>(dst: &mut [E], op: Op)
where
    E: Copy + Send + Sync,
    Op: Fn(E) -> E + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if dst.len() >= MIN_PARALLEL {
        use rayon::prelude::*;
        dst.par_chunks_mut(CHUNK)
            .for_each(|c| map_inplace_chunk(c, &op));
        return;
    }
    map_inplace_chunk(dst, &op);
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
            .for_each(|(d, s)| zip_inplace_chunk(d, s, &op));
        return;
    }
    zip_inplace_chunk(dst, src, &op);
}

/// `op(src[i])` for every element, as a new buffer.
pub fn map<E, R, Op>(src: &[E], op: Op) -> Vec<R>
where
    E: Copy + Send + Sync,
    R: Copy + Send + Sync,
    Op: Fn(E) -> R + Send + Sync,
{
    build(src.len(), CHUNK, |d, first| {
        map_chunk(&src[first..first + d.len()], d, &op)
    })
}

/// `op(a[i], b[i])` for every element of the shorter of the two, as a new buffer.
pub fn zip<E, R, Op>(a: &[E], b: &[E], op: Op) -> Vec<R>
where
    E: Copy + Send + Sync,
    R: Copy + Send + Sync,
    Op: Fn(E, E) -> R + Send + Sync,
{
    build(a.len().min(b.len()), CHUNK, |d, first| {
        let end = first + d.len();
        zip_chunk(&a[first..end], &b[first..end], d, &op)
    })
}

/// A new buffer of `src.len()` elements, row by row: `kernel(row, out)` for each row of
/// `row_len` elements of `src`, where `out` is the same row of the new buffer. Whole rows
/// on rayon's threads (about [`CHUNK`] elements per task) once `src` reaches
/// [`MIN_PARALLEL`] elements, each task compiled as `map`'s loops are.
///
/// # Safety
///
/// `kernel` must write every element of `out`: the buffer is returned as initialised.
///
/// # Panics
///
/// If `row_len` is 0 or does not divide `src.len()`.
pub(crate) unsafe fn map_rows<E, R, K>(src: &[E], row_len: usize, kernel: K) -> Vec<R>
where
    E: Copy + Send + Sync,
    R: Send,
    K: Fn(&[E], &mut [MaybeUninit<R>]) + Send + Sync,
{
    let n = src.len();
    assert!(
        row_len > 0 && n % row_len == 0,
        "map_rows: rows of {row_len} do not tile {n} elements"
    );
    let chunk = CHUNK.div_ceil(row_len) * row_len;
    build(n, chunk, |d, first| {
        rows_chunk(&src[first..first + d.len()], d, row_len, &kernel)
    })
}

/// `kernel(block, first)` over blocks of `dst`, where computing one output element reads
/// `cost` input elements (a reduction): split over rayon's threads when the inputs read
/// reach [`MIN_PARALLEL`], in blocks of a multiple of `align` outputs that read about
/// [`CHUNK`] inputs each (`first`: the index of the block's first output).
pub fn outputs<E, K>(dst: &mut [E], cost: usize, align: usize, kernel: K)
where
    E: Send + Sync,
    K: Fn(&mut [E], usize) + Send + Sync,
{
    #[cfg(feature = "rayon")]
    if dst.len().saturating_mul(cost) >= MIN_PARALLEL && align > 0 {
        use rayon::prelude::*;
        let block = CHUNK.div_ceil(cost.max(1)).next_multiple_of(align);
        if block < dst.len() {
            dst.par_chunks_mut(block)
                .enumerate()
                .for_each(|(i, d)| kernel(d, i * block));
            return;
        }
    }
    let _ = (cost, align);
    kernel(dst, 0);
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
