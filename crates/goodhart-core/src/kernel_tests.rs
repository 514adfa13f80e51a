//! The backend's element-wise kernels that goodhart patches on the CPU
//! (vendor/burn-flex/PATCHES.md), against f64 references and host arithmetic, at sizes
//! that take both the single-thread and the multi-thread paths.

use crate::device::Autodiff;
use crate::testing::{assert_close, tolerance, values};
use burn::tensor::activation::{gelu, log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use statrs::function::erf::erf;

/// Standard normal CDF and density.
fn phi(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf, pdf)
}

/// `n` points spread over `[lo, hi]`.
fn grid(n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
        .collect()
}

crate::backend_test! {
    fn gelu_and_its_gradient_match_the_normal_cdf<B>(device) {
        // 40,001 points (the multi-thread path) and 101 (the single-thread one).
        for n in [40_001, 101] {
            let x = grid(n, -10.0, 10.0);
            let want: Vec<f32> = x.iter().map(|&v| (v as f64 * phi(v as f64).0) as f32).collect();
            let dwant: Vec<f32> = x
                .iter()
                .map(|&v| {
                    let (cdf, pdf) = phi(v as f64);
                    (cdf + v as f64 * pdf) as f32
                })
                .collect();
            let t = Tensor::<Autodiff<B>, 1>::from_floats(x.as_slice(), device).require_grad();
            let y = gelu(t.clone());
            assert_close(&values(y.clone().inner()), &want, tolerance(1e-6));
            let grads = y.sum().backward();
            let dx = t.grad(&grads).expect("gelu's input has a gradient");
            assert_close(&values(dx), &dwant, tolerance(1e-6));
        }
    }
}

crate::backend_test! {
    fn softmax_gives_masked_scores_exactly_zero<B>(device) {
        // 512 rows of 80 scores (a decoding step's attention shape), every third masked
        // with -1e9 as the attention bias does; then rows of 83, whose sums end in a
        // partial group of lanes.
        for (rows, cols) in [(512, 80), (400, 83)] {
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    if i % 3 == 0 {
                        -1e9
                    } else {
                        ((i * 7919) % 1000) as f32 / 100.0 - 5.0
                    }
                })
                .collect();
            let mut want = vec![0f32; x.len()];
            for (row, out) in x.chunks(cols).zip(want.chunks_mut(cols)) {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (o, e) in out.iter_mut().zip(e) {
                    *o = (e / sum) as f32;
                }
            }
            let t = Tensor::<B, 1>::from_floats(x.as_slice(), device).reshape([rows, cols]);
            let got = values(softmax(t, 1));
            assert_close(&got, &want, tolerance(1e-6));
            assert!(got.iter().step_by(3).all(|&p| p == 0.0), "a masked score got weight");
        }
    }
}

crate::backend_test! {
    fn element_wise_ops_on_large_tensors_match_host_arithmetic<B>(device) {
        // 100,003 elements: the multi-thread path with a ragged last chunk.
        let n = 100_003;
        let a: Vec<f32> = (0..n).map(|i| ((i * 37) % 1001) as f32 / 97.0 - 5.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 53) % 997) as f32 / 89.0 + 0.5).collect();
        let ta = || Tensor::<B, 1>::from_floats(a.as_slice(), device);
        let tb = || Tensor::<B, 1>::from_floats(b.as_slice(), device);
        let host = |f: fn(f32, f32) -> f32| a.iter().zip(&b).map(|(&x, &y)| f(x, y)).collect::<Vec<_>>();
        let exact = tolerance(0.0);
        assert_close(&values(ta() + tb()), &host(|x, y| x + y), exact);
        assert_close(&values(ta() * tb()), &host(|x, y| x * y), exact);
        assert_close(&values(ta() / tb()), &host(|x, y| x / y), exact);
        assert_close(&values(ta() - 2.5), &host(|x, _| x - 2.5), exact);
        assert_close(&values(ta().abs().sqrt()), &host(|x, _| x.abs().sqrt()), tolerance(1e-6));
        let exp = values(ta().exp());
        for (g, w) in exp.iter().zip(a.iter().map(|x| x.exp())) {
            assert!((g - w).abs() <= tolerance(1e-6) * w, "exp: {g} vs {w}");
        }
        // Broadcasts: one shared row, and one scalar per row.
        let (rows, cols) = (n / 7, 7);
        let m = &a[..rows * cols];
        let row: Vec<f32> = b[..cols].to_vec();
        let per_row: Vec<f32> = b[..rows].to_vec();
        let tm = Tensor::<B, 1>::from_floats(m, device).reshape([rows, cols]);
        let shared = tm.clone() * Tensor::<B, 1>::from_floats(row.as_slice(), device).reshape([1, cols]);
        let want: Vec<f32> = m.iter().enumerate().map(|(i, &x)| x * row[i % cols]).collect();
        assert_close(&values(shared), &want, exact);
        let scaled = tm - Tensor::<B, 1>::from_floats(per_row.as_slice(), device).reshape([rows, 1]);
        let want: Vec<f32> = m.iter().enumerate().map(|(i, &x)| x - per_row[i / cols]).collect();
        assert_close(&values(scaled), &want, exact);
    }
}

crate::backend_test! {
    fn exp_and_sigmoid_match_f64_over_the_whole_range<B>(device) {
        // 200,001 points from below the smallest subnormal result to past overflow, then
        // the edges: NaN, the infinities, the largest finite result, the first overflow.
        let mut x = grid(200_001, -110.0, 95.0);
        x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 88.72283, 88.7229, -103.9, -104.0]);
        // Up to 2 ulp for normal results; subnormal results to their spacing on the CPU
        // (GPUs may flush them to zero).
        let rel = tolerance(2.4e-7);
        let floor = match crate::testing::test_device() {
            crate::device::DeviceSpec::Cpu => f32::from_bits(1) as f64,
            _ => f32::MIN_POSITIVE as f64,
        };
        let check = |name: &str, got: &[f32], exact: &dyn Fn(f64) -> f64| {
            for (&v, &g) in x.iter().zip(got) {
                let w = exact(v as f64);
                if w.is_nan() {
                    assert!(g.is_nan(), "{name}({v}) = {g}, want NaN");
                } else if w > f32::MAX as f64 {
                    assert_eq!(g, f32::INFINITY, "{name}({v})");
                } else {
                    let err = (g as f64 - w).abs();
                    assert!(err <= rel as f64 * w + floor, "{name}({v}) = {g}, want {w}");
                }
            }
        };
        let t = || Tensor::<B, 1>::from_floats(x.as_slice(), device);
        check("exp", &values(t().exp()), &|v| v.exp());
        check("sigmoid", &values(burn::tensor::activation::sigmoid(t())), &|v| {
            1.0 / (1.0 + (-v).exp())
        });
    }
}

crate::backend_test! {
    fn slice_assign_leaves_other_handles_unchanged<B>(device) {
        // A buffer written in place when it has one owner must still be copied when it
        // has two: the clone keeps its zeros.
        let buf = Tensor::<B, 2>::zeros([300, 200], device);
        let kept = buf.clone();
        let ones = Tensor::<B, 2>::ones([2, 200], device);
        let written = buf.slice_assign([10..12, 0..200], ones);
        assert_eq!(values(kept.clone()).iter().sum::<f32>(), 0.0);
        // `written` now has one owner: a second write goes into it.
        let twos = Tensor::<B, 2>::full([1, 200], 2.0, device);
        let written = written.slice_assign([299..300, 0..200], twos);
        let got = values(written);
        assert_eq!(got.iter().sum::<f32>(), 2.0 * 200.0 + 2.0 * 200.0);
        assert_eq!(got[10 * 200], 1.0);
        assert_eq!(got[299 * 200 + 5], 2.0);
        assert_eq!(got[12 * 200], 0.0);
        assert_eq!(values(kept).iter().sum::<f32>(), 0.0);
    }
}

crate::backend_test! {
    fn log_softmax_matches_f64_and_keeps_nan_rows_nan<B>(device) {
        // 40 rows of 1,001 logits (the multi-thread path; 62 full groups of lanes and 9
        // left over): row 3 has a -inf logit (its log-probability is -inf), row 7 a NaN
        // (the whole row is NaN).
        let (rows, cols) = (40, 1_001);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 2003) as f32 / 50.0 - 20.0)
            .collect();
        x[3 * cols + 11] = f32::NEG_INFINITY;
        x[7 * cols + 500] = f32::NAN;
        let mut want = vec![0f32; x.len()];
        for (row, out) in x.chunks(cols).zip(want.chunks_mut(cols)) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let nan = row.iter().any(|v| v.is_nan());
            for (o, &v) in out.iter_mut().zip(row) {
                *o = if nan { f32::NAN } else { (v as f64 - max - lse) as f32 };
            }
        }
        let t = Tensor::<B, 1>::from_floats(x.as_slice(), device).reshape([rows, cols]);
        let got = values(log_softmax(t, 1));
        // Log-probabilities reach -60, where an f32 ulp is 3.8e-6.
        assert_close(&got, &want, tolerance(1e-5));
        assert_eq!(got[3 * cols + 11], f32::NEG_INFINITY);
    }
}

/// The backend's layer norm over the last dim, eps 1e-5.
fn layer_norm<B: Backend>(
    x: Tensor<B, 3>,
    gamma: Tensor<B, 1>,
    beta: Option<Tensor<B, 1>>,
) -> Tensor<B, 3> {
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.map(|b| b.into_primitive().tensor()),
        1e-5,
    )))
}

/// `n` values in `[-4, 4)` from a fixed integer hash, distinct per `salt`.
fn pseudo(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % 8009) as f32 / 1001.0 - 4.0)
        .collect()
}

crate::backend_test! {
    fn softmax_log_softmax_and_layer_norm_gradients_match_their_decompositions<B>(device) {
        // The autodiff backend runs these three as single ops with analytic backwards
        // (vendor/burn-autodiff/PATCHES.md); the references are the same functions
        // written as element-wise ops and reductions, differentiated op by op. Shapes
        // take the multi-thread path; softmax is checked over the last and a middle dim.
        type A<B> = Autodiff<B>;
        let (b, t, d) = (6, 50, 130);
        let x = pseudo(b * t * d, 1);
        let w = pseudo(b * t * d, 2);
        let input = || Tensor::<A<B>, 1>::from_floats(x.as_slice(), device).reshape([b, t, d]).require_grad();
        let weights = Tensor::<A<B>, 1>::from_floats(w.as_slice(), device).reshape([b, t, d]);
        let grad_of = |f: &dyn Fn(Tensor<A<B>, 3>) -> Tensor<A<B>, 3>| {
            let x = input();
            let y = f(x.clone());
            let grads = (y.clone() * weights.clone()).sum().backward();
            (values(y.inner()), values(x.grad(&grads).expect("the input has a gradient")))
        };
        let tol = tolerance(1e-5);
        for dim in [2, 1] {
            let (y, g) = grad_of(&|x| softmax(x, dim));
            let (y_ref, g_ref) = grad_of(&|x| {
                let e = (x.clone() - x.detach().max_dim(dim)).exp();
                e.clone() / e.sum_dim(dim)
            });
            assert_close(&y, &y_ref, tol);
            assert_close(&g, &g_ref, tol);
            let (y, g) = grad_of(&|x| log_softmax(x, dim));
            let (y_ref, g_ref) = grad_of(&|x| {
                let s = x.clone() - x.detach().max_dim(dim);
                s.clone() - s.exp().sum_dim(dim).log()
            });
            assert_close(&y, &y_ref, tol);
            assert_close(&g, &g_ref, tol);
        }
        // LayerNorm with and without a shift: the gradients of the input, the scale and
        // the shift.
        let gamma = || Tensor::<A<B>, 1>::from_floats(&pseudo(d, 3)[..], device).require_grad();
        let beta = || Tensor::<A<B>, 1>::from_floats(&pseudo(d, 4)[..], device).require_grad();
        for with_beta in [true, false] {
            let run = |fused: bool| {
                let (x, g, s) = (input(), gamma(), beta());
                let y = if fused {
                    layer_norm(x.clone(), g.clone(), with_beta.then(|| s.clone()))
                } else {
                    let c = x.clone() - x.clone().mean_dim(2);
                    let y = c.clone() / (c.square().mean_dim(2) + 1e-5).sqrt()
                        * g.clone().reshape([1, 1, d]);
                    if with_beta { y + s.clone().reshape([1, 1, d]) } else { y }
                };
                let grads = (y.clone() * weights.clone()).sum().backward();
                let mut out = vec![values(y.inner()), values(x.grad(&grads).expect("dx")), values(g.grad(&grads).expect("dgamma"))];
                if with_beta {
                    out.push(values(s.grad(&grads).expect("dbeta")));
                }
                out
            };
            // Relative to each tensor's largest value: the scale's gradient sums 300 rows.
            for (fused, reference) in run(true).iter().zip(run(false)) {
                let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
                assert_close(fused, &reference, tolerance(2e-6) * scale);
            }
        }
    }
}

crate::backend_test! {
    fn transposing_copies_match_host_indexing<B>(device) {
        // Permutations materialised: with a strided innermost dim (a batched transpose
        // above and below the multi-thread threshold, and a 4-d permutation) and with a
        // contiguous one (attention's head permutation `[B, T, H, d] -> [H, B, T, d]`,
        // above and below the threshold).
        let cases: [(&[usize], &[usize]); 5] = [
            (&[5, 90, 80], &[0, 2, 1]),
            (&[2, 3, 4], &[0, 2, 1]),
            (&[4, 10, 12, 70], &[0, 3, 2, 1]),
            (&[64, 80, 4, 32], &[2, 0, 1, 3]),
            (&[2, 3, 4, 5], &[2, 0, 1, 3]),
        ];
        for (shape, perm) in cases {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let t = Tensor::<B, 1>::from_floats(x.as_slice(), device);
            let got = match shape.len() {
                3 => values(t.reshape([shape[0], shape[1], shape[2]]).permute([perm[0], perm[1], perm[2]])),
                _ => values(
                    t.reshape([shape[0], shape[1], shape[2], shape[3]])
                        .permute([perm[0], perm[1], perm[2], perm[3]]),
                ),
            };
            // Element `i` of the result, in the permuted shape's row-major order, is the
            // input at the index whose dim `perm[k]` is the result's `k`-th coordinate.
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let strides: Vec<usize> = (0..shape.len())
                .map(|d| shape[d + 1..].iter().product())
                .collect();
            for (i, &g) in got.iter().enumerate() {
                let mut rest = i;
                let mut src = 0;
                for k in (0..out_shape.len()).rev() {
                    src += (rest % out_shape[k]) * strides[perm[k]];
                    rest /= out_shape[k];
                }
                assert_eq!(g, x[src], "shape {shape:?} perm {perm:?} element {i}");
            }
        }
    }
}

crate::backend_test! {
    fn sums_along_the_first_and_last_dims_match_host_sums<B>(device) {
        // A bias gradient's shape (`[B T, n]`, summed over rows) and a layer norm's
        // (`[B T, D]`, summed along rows), above and below the multi-thread threshold.
        for (rows, cols) in [(5120, 384), (5120, 128), (7, 33)] {
            let x = pattern(rows * cols, 7919, 2001);
            let t = Tensor::<B, 1>::from_floats(x.as_slice(), device).reshape([rows, cols]);
            // Each column summed in row order, in f32, as one thread would.
            let mut columns = vec![0f32; cols];
            for row in x.chunks(cols) {
                for (c, v) in columns.iter_mut().zip(row) {
                    *c += v;
                }
            }
            let got = values(t.clone().sum_dim(0));
            assert_close(&got, &columns, tolerance(1e-4));
            let by_row: Vec<f32> = x
                .chunks(cols)
                .map(|row| row.iter().map(|&v| v as f64).sum::<f64>() as f32)
                .collect();
            assert_close(&values(t.sum_dim(1)), &by_row, tolerance(1e-4));
        }
    }
}

crate::backend_test! {
    fn products_of_few_rows_match_host_products<B>(device) {
        // A decoding step's products (one row per sequence) against f64 dot products:
        // rows 1, 8 and 64, with the right-hand side a column block of a wider matrix
        // (a view, as the attention projections use) and its transpose (an LM head
        // stored `[V, D]`); at these sizes the CPU backend splits the output columns
        // over threads.
        let (k, wide, at, n) = (300, 2600, 300, 2000);
        let w = pattern(k * wide, 7919, 2001);
        for m in [1, 8, 64] {
            let x = pattern(m * k, 104_729, 1999);
            let lhs = Tensor::<B, 1>::from_floats(x.as_slice(), device).reshape([m, k]);
            let rhs = Tensor::<B, 1>::from_floats(w.as_slice(), device).reshape([k, wide]);
            let want = host_product(m, k, n, |r, j| x[r * k + j], |j, c| w[j * wide + at + c]);
            let got = values(lhs.clone().matmul(rhs.clone().narrow(1, at, n)));
            assert_close(&got, &want, tolerance(1e-4));
            // The same product with the right-hand side stored transposed.
            let stored_t = rhs.narrow(1, at, n).transpose();
            let stored_t = Tensor::<B, 1>::from_floats(values(stored_t).as_slice(), device);
            let got = values(lhs.matmul(stored_t.reshape([n, k]).transpose()));
            assert_close(&got, &want, tolerance(1e-4));
        }
    }
}

crate::backend_test! {
    fn weight_gradient_products_match_host_products_on_any_thread_count<B>(device) {
        // A weight gradient's product `x^T dY` (`[D_in, B T] x [B T, D_out]`, the left side
        // a transposed view of `x [B T, D_in]`) against f64 dot products, at the shapes the
        // CPU backend splits along `B T` (vendor/burn-flex/PATCHES.md, patch 13), with an
        // inner dimension that its blocks do not divide evenly; and the same values on a
        // pool of one thread as on the default one (the blocks do not depend on threads).
        for (rows, d_in, d_out) in [(5120, 128, 128), (5123, 128, 512), (4100, 512, 8)] {
            let x = pattern(rows * d_in, 7919, 2001);
            let g = pattern(rows * d_out, 104_729, 1999);
            let xt = Tensor::<B, 1>::from_floats(x.as_slice(), device)
                .reshape([rows, d_in])
                .transpose();
            let gt = Tensor::<B, 1>::from_floats(g.as_slice(), device).reshape([rows, d_out]);
            let want = host_product(d_in, rows, d_out, |r, j| x[j * d_in + r], |j, c| g[j * d_out + c]);
            let got = values(xt.clone().matmul(gt.clone()));
            assert_close(&got, &want, tolerance(1e-3));
            #[cfg(feature = "ndarray")]
            if crate::testing::test_device() == crate::device::DeviceSpec::Cpu {
                let on_one = on_one_thread(|| values(xt.matmul(gt)));
                assert_eq!(got, on_one, "{rows} x {d_in} x {d_out}");
            }
        }
    }
}

/// `f` on a rayon pool of one thread (the CPU backend's kernels then split nothing).
#[cfg(feature = "ndarray")]
fn on_one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a pool of one thread")
        .install(f)
}

/// `len` values in `[-1, 1)`: `(i * step) % modulus`, scaled by 1/1000 and shifted by -1.
fn pattern(len: usize, step: usize, modulus: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * step) % modulus) as f32 / 1000.0 - 1.0)
        .collect()
}

/// The `[rows, cols]` product of `a(r, j)` and `b(j, c)` over `inner`, each element
/// summed in f64 and rounded to f32 once.
fn host_product(
    rows: usize,
    inner: usize,
    cols: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            (0..inner)
                .map(|j| a(r, j) as f64 * b(j, c) as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

crate::backend_test! {
    fn products_of_many_rows_match_host_products_on_any_thread_count<B>(device) {
        // The policy's forward and input-gradient products (`[B T, k] x [k, n]`, the right
        // side also a transposed view, as `dY W^T` reads it) against f64 dot products, at
        // shapes the CPU backend splits into blocks of rows (vendor/burn-flex/PATCHES.md),
        // with a row count its blocks do not divide evenly; and the same values on a pool
        // of one thread, where it does not split.
        for (rows, k, n) in [(5120, 128, 384), (5123, 384, 128), (1000, 96, 80)] {
            let x = pattern(rows * k, 7919, 2001);
            let w = pattern(k * n, 104_729, 1999);
            let lhs = Tensor::<B, 1>::from_floats(x.as_slice(), device).reshape([rows, k]);
            let rhs = Tensor::<B, 1>::from_floats(w.as_slice(), device).reshape([k, n]);
            // The right side stored as its transpose `[n, k]`, read through a view.
            let w_t: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let rhs_view = Tensor::<B, 1>::from_floats(w_t.as_slice(), device)
                .reshape([n, k])
                .transpose();
            let want = host_product(rows, k, n, |r, j| x[r * k + j], |j, c| w[j * n + c]);
            let got = values(lhs.clone().matmul(rhs.clone()));
            assert_close(&got, &want, tolerance(1e-4));
            let through_view = values(lhs.clone().matmul(rhs_view.clone()));
            assert_close(&through_view, &want, tolerance(1e-4));
            #[cfg(feature = "ndarray")]
            if crate::testing::test_device() == crate::device::DeviceSpec::Cpu {
                let on_one = on_one_thread(|| values(lhs.matmul(rhs)));
                assert_eq!(got, on_one, "{rows} x {k} x {n}");
            }
        }
    }
}
