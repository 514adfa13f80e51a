//! Masked and grouped statistics shared by the estimator crates.
//!
//! All functions are generic over the backend and stay on the device. Masks are float
//! tensors of 0/1 (fractional weights are allowed where a weighted statistic makes
//! sense). Conventions follow verl's `core_algos.py` / `torch_functional.py` unless a
//! function says otherwise.

use burn::tensor::{backend::Backend, cast::ToElement, IndexingUpdateOp, Tensor};

use crate::{
    error::{GoodhartError, Result},
    groups::Groups,
};

/// Error unless `a` and `b` have the same shape.
pub fn check_same_shape<B: Backend, const D: usize>(
    a: &Tensor<B, D>,
    a_name: &str,
    b: &Tensor<B, D>,
    b_name: &str,
) -> Result<()> {
    let (sa, sb) = (a.dims(), b.dims());
    if sa == sb {
        Ok(())
    } else {
        Err(GoodhartError::shape(
            format!("{b_name} (to match {a_name})"),
            &sa,
            &sb,
        ))
    }
}

/// Error if `x` holds NaN or infinity (one device reduction, one scalar read back).
pub fn check_finite<B: Backend, const D: usize>(x: &Tensor<B, D>, what: &str) -> Result<()> {
    if x.clone()
        .is_finite()
        .bool_not()
        .any()
        .into_scalar()
        .to_bool()
    {
        Err(GoodhartError::NonFinite { what: what.into() })
    } else {
        Ok(())
    }
}

/// Error if `x` holds NaN or infinity at a position where `mask` is non-zero; values
/// under the mask are never read, so padding may hold anything.
pub fn check_finite_masked<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    mask: &Tensor<B, D>,
    what: &str,
) -> Result<()> {
    let bad = x
        .clone()
        .is_finite()
        .bool_not()
        .bool_and(mask.clone().not_equal_elem(0.0));
    if bad.any().into_scalar().to_bool() {
        Err(GoodhartError::NonFinite { what: what.into() })
    } else {
        Ok(())
    }
}

/// Replaces the positions where `mask` is zero by 0, so that NaN or garbage in padding
/// cannot leak into a sum (`x * mask` would give `NaN * 0 = NaN`).
pub fn zero_masked<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    mask: &Tensor<B, D>,
) -> Tensor<B, D> {
    x.mask_fill(mask.clone().equal_elem(0.0), 0.0) * mask.clone()
}

/// A tensor's values on the host as `f32`, for the few decisions made there (a random or
/// top-k choice of tokens).
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| GoodhartError::invalid("tensor data", format!("{e:?}")))
}

/// `sum(x * m)` as a one-element tensor.
pub fn masked_sum<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    mask: &Tensor<B, D>,
) -> Tensor<B, 1> {
    zero_masked(x, mask).sum()
}

/// `sum(x * m) / sum(m)`; 0 when the mask is all zero (verl divides by `sum(m) + 1e-8`,
/// which gives the same 0).
pub fn masked_mean<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    mask: &Tensor<B, D>,
) -> Tensor<B, 1> {
    masked_sum(x, mask) / mask.clone().sum().clamp_min(1e-8)
}

/// Masked variance around the masked mean.
///
/// `unbiased` applies Bessel's correction `n/(n-1)` with `n = sum(m)`; for `n <= 1` the
/// biased value (0) is returned. verl's `masked_var` raises a `ValueError` there
/// (`sum(m)` of 0 or 1 with `unbiased=True`).
pub fn masked_var<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    mask: &Tensor<B, D>,
    unbiased: bool,
) -> Tensor<B, 1> {
    let x = zero_masked(x, mask);
    let n = mask.clone().sum();
    let mean = x.clone().sum() / n.clone().clamp_min(1e-8);
    let centred = (x - mean.unsqueeze()) * mask.clone();
    let var = centred.powi_scalar(2).sum() / n.clone().clamp_min(1e-8);
    if unbiased {
        // n/(n-1) for n > 1, 1 otherwise.
        let bessel = n.clone() / (n.clone() - 1.0).clamp_min(1.0);
        let bessel = bessel.mask_fill(n.lower_equal_elem(1.0), 1.0);
        var * bessel
    } else {
        var
    }
}

/// Which whitening formula to use; the libraries differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Whitening {
    /// `(x - mean) * rsqrt(var_unbiased + 1e-8)` (verl `masked_whiten`, TRL `whiten`).
    #[default]
    Unbiased,
    /// `(x - mean) * rsqrt(clamp(var_biased, min = 1e-8))` (OpenRLHF).
    BiasedClamped,
}

/// Whitens `x` over the positions where `mask` is non-zero; masked positions are 0.
/// With `shift_mean = false` the mean is added back (TRL's option for rewards).
pub fn masked_whiten<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    mask: &Tensor<B, D>,
    shift_mean: bool,
    convention: Whitening,
) -> Tensor<B, D> {
    let mean = masked_mean(x.clone(), mask);
    let scale = match convention {
        Whitening::Unbiased => (masked_var(x.clone(), mask, true) + 1e-8).sqrt().recip(),
        Whitening::BiasedClamped => masked_var(x.clone(), mask, false)
            .clamp_min(1e-8)
            .sqrt()
            .recip(),
    };
    let mut out = (x - mean.clone().unsqueeze()) * scale.unsqueeze();
    if !shift_mean {
        out = out + mean.unsqueeze();
    }
    zero_masked(out, mask)
}

/// Per-group statistics of one value per response.
#[derive(Debug, Clone)]
pub struct GroupStats<B: Backend> {
    /// Number of members of each group, `[G]`.
    pub count: Tensor<B, 1>,
    /// Sum over each group, `[G]`.
    pub sum: Tensor<B, 1>,
    /// Mean of each group, `[G]`.
    pub mean: Tensor<B, 1>,
    /// Sum of squared deviations from the group mean, `[G]`.
    pub sq_dev: Tensor<B, 1>,
}

impl<B: Backend> GroupStats<B> {
    /// Population (biased, `/n`) or sample (unbiased, `/(n-1)`) variance per group.
    /// The unbiased variance of a group of one is NaN, as `torch.std` gives; callers
    /// decide what a group of one means for their method.
    pub fn var(&self, unbiased: bool) -> Tensor<B, 1> {
        let denom = if unbiased {
            self.count.clone() - 1.0
        } else {
            self.count.clone()
        };
        self.sq_dev.clone() / denom
    }

    /// Standard deviation per group (see [`GroupStats::var`]).
    pub fn std(&self, unbiased: bool) -> Tensor<B, 1> {
        self.var(unbiased).sqrt()
    }
}

/// Sums `x` (one value per response) into its groups: `out[g] = sum_{i in g} x_i`.
pub fn group_sum<B: Backend>(
    x: Tensor<B, 1>,
    index: &Tensor<B, 1, burn::tensor::Int>,
    num_groups: usize,
) -> Tensor<B, 1> {
    Tensor::zeros([num_groups], &x.device()).select_assign(
        0,
        index.clone(),
        x,
        IndexingUpdateOp::Add,
    )
}

/// Count, sum, mean and squared deviations of `x` within each group (two passes, so the
/// variance does not suffer the cancellation of `E[x^2] - E[x]^2`).
pub fn group_stats<B: Backend>(x: Tensor<B, 1>, groups: &Groups) -> Result<GroupStats<B>> {
    groups.require_len(x.dims()[0], "rewards (one per group id)")?;
    let device = x.device();
    let index = groups.index_tensor::<B>(&device);
    let g = groups.num_groups();
    let count = groups.sizes_tensor::<B>(&device);
    let sum = group_sum(x.clone(), &index, g);
    let mean = sum.clone() / count.clone();
    let dev = x - mean.clone().select(0, index.clone());
    let sq_dev = group_sum(dev.powi_scalar(2), &index, g);
    Ok(GroupStats {
        count,
        sum,
        mean,
        sq_dev,
    })
}

/// Broadcasts a per-group value `[G]` back to responses `[N]`.
pub fn per_response<B: Backend>(per_group: Tensor<B, 1>, groups: &Groups) -> Tensor<B, 1> {
    let index = groups.index_tensor::<B>(&per_group.device());
    per_group.select(0, index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, tolerance, values};

    crate::backend_test! {
        fn masked_moments_ignore_padding<B>(device) {
            let x = Tensor::<B, 2>::from_floats([[1.0, 2.0, f32::NAN], [3.0, 100.0, 6.0]], device);
            let m = Tensor::<B, 2>::from_floats([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], device);
            // valid values 1, 2, 3, 6: mean 3, squared deviations 4 + 1 + 0 + 9 = 14
            let tol = tolerance(1e-6);
            assert_close(&values(masked_mean(x.clone(), &m)), &[3.0], tol);
            assert_close(&values(masked_var(x.clone(), &m, false)), &[3.5], tol);
            assert_close(&values(masked_var(x.clone(), &m, true)), &[14.0 / 3.0], tol);
            let w = values(masked_whiten(x.clone(), &m, true, Whitening::Unbiased));
            let s = (14.0f32 / 3.0 + 1e-8).sqrt();
            assert_close(&w, &[-2.0 / s, -1.0 / s, 0.0, 0.0, 0.0, 3.0 / s], tolerance(1e-5));
            let w = values(masked_whiten(x.clone(), &m, false, Whitening::BiasedClamped));
            let s = 3.5f32.sqrt();
            assert_close(&w, &[3.0 - 2.0 / s, 3.0 - 1.0 / s, 0.0, 3.0, 0.0, 3.0 + 3.0 / s], tolerance(1e-5));
            assert!(check_finite(&x, "x").is_err());
            assert!(check_finite_masked(&x, &m, "x").is_ok());
            let empty = Tensor::<B, 2>::zeros([2, 3], device);
            assert_close(&values(masked_mean(x, &empty)), &[0.0], 0.0);
        }
    }

    crate::backend_test! {
        fn group_stats_over_scattered_ids<B>(device) {
            let groups = Groups::new(vec![5, 9, 5, 9, 5, 2]).unwrap();
            let x = Tensor::<B, 1>::from_floats([1.0, 10.0, 2.0, 14.0, 6.0, 7.0], device);
            let s = group_stats(x, &groups).unwrap();
            let tol = tolerance(1e-5);
            assert_close(&values(s.count.clone()), &[3.0, 2.0, 1.0], 0.0);
            assert_close(&values(s.mean.clone()), &[3.0, 12.0, 7.0], tol);
            assert_close(&values(s.var(false)), &[14.0 / 3.0, 4.0, 0.0], tol);
            let unbiased = values(s.var(true));
            assert_close(&unbiased[..2], &[7.0, 8.0], tol);
            assert!(unbiased[2].is_nan());
            assert_close(&values(per_response(s.mean, &groups)), &[3.0, 12.0, 3.0, 12.0, 3.0, 7.0], tol);
        }
    }

    crate::backend_test! {
        fn group_length_mismatch_is_an_error<B>(device) {
            let groups = Groups::new(vec![0, 0, 1]).unwrap();
            let x = Tensor::<B, 1>::from_floats([1.0, 2.0], device);
            assert!(matches!(group_stats(x, &groups), Err(GoodhartError::ShapeMismatch { .. })));
        }
    }
}
