//! Loss aggregation: how per-token losses `L [B, T]` and a response mask `m` become
//! one scalar. The choice changes the gradient's weighting between long and short
//! responses (DAPO, Dr.GRPO), so it is explicit and named as in verl's `agg_loss`.
//!
//! | name | formula |
//! |---|---|
//! | `token-mean` | `sum(L m) / sum(m) * dp` |
//! | `token-sum` | `sum(L m) * dp` |
//! | `seq-mean-token-sum` | `sum_i sum_t L m / N * dp` |
//! | `seq-mean-token-mean` | `sum_i (sum_t L m / sum_t m) / N * dp`, over rows with a valid token |
//! | `seq-mean-token-sum-norm` | `sum_i sum_t L m / N * dp / C`, `C` = `loss_scale_factor` or the padded length `T` (Dr.GRPO's constant normaliser) |
//!
//! `dp` is the data-parallel size (1 on one process), `N` the number of rows the
//! sequence mean divides by and `sum(m)` may be replaced by the global token count: the
//! normalisers of [`GlobalBatch`], verl's `global_batch_info`, which make a micro-batch's
//! loss its share of the global batch's.
//!
//! **Empty rows** (no valid token) add nothing to any sum. Whether they count in `N` is
//! one convention for every seq-mean mode, [`EmptyRows`]: by default they count
//! (`N = B`, or `global_batch_size` when given), as in verl 0.9.1's trainer, which
//! passes `global_batch_size` = the mini-batch's rows, empty ones included; this keeps
//! `N` constant when a sample filter empties rows. `empty_rows = "skip"` divides by the
//! rows with a valid token, as verl's `agg_loss` does when no `global_batch_size` is
//! given. An all-masked batch aggregates to 0 in every mode (verl: NaN under `skip` and
//! `token-mean`).

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    error::{GoodhartError, Result},
    ops::{check_same_shape, zero_masked},
};

/// A loss aggregation mode; serialised in kebab-case (`"token-mean"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAggregation {
    /// `sum(L m) / sum(m)` (verl's and TRL's default; DAPO).
    #[default]
    TokenMean,
    /// `sum(L m)`: no normaliser (verl's `token-sum`).
    TokenSum,
    /// Mean over sequences of the per-sequence token sum.
    SeqMeanTokenSum,
    /// Mean over sequences of the per-sequence token mean (original GRPO).
    SeqMeanTokenMean,
    /// `seq-mean-token-sum` divided by a constant (the padded length by default):
    /// Dr.GRPO's normaliser, `sum(L m) / (B T)` on one process.
    SeqMeanTokenSumNorm,
}

/// Whether rows without a valid token count in a seq-mean mode's outer mean;
/// `"count"` or `"skip"` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmptyRows {
    /// They count: the mean divides by every row (verl 0.9.1's trainer call).
    #[default]
    Count,
    /// They are left out: the mean divides by the rows with a valid token (verl's
    /// `agg_loss` without `global_batch_size`).
    Skip,
}

/// The normalisers of a global batch (verl's `global_batch_info`) and the empty-row
/// convention. The default is one process seeing the whole batch, empty rows counted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalBatch {
    /// Data-parallel size: the loss is scaled by it, so that averaging the gradients of
    /// `dp_size` ranks sums their shares (verl's DDP/FSDP convention). Default 1.
    pub dp_size: usize,
    /// Valid tokens in the global batch (`token-mean`'s denominator); required when
    /// `dp_size > 1`. `None`: the local `sum(m)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_num_tokens: Option<f64>,
    /// Rows in the global batch (the seq-mean modes' `N`); required when `dp_size > 1`.
    /// `None`: the local rows under [`EmptyRows`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<f64>,
    /// `seq-mean-token-sum-norm`'s constant `C`; `None`: the padded length `T`. Set it to
    /// the maximum response length to keep it constant across batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale_factor: Option<f64>,
    /// Whether empty rows count in the local `N` (ignored once `global_batch_size` is
    /// set: that number is used as given).
    pub empty_rows: EmptyRows,
}

impl Default for GlobalBatch {
    fn default() -> Self {
        Self {
            dp_size: 1,
            batch_num_tokens: None,
            global_batch_size: None,
            loss_scale_factor: None,
            empty_rows: EmptyRows::Count,
        }
    }
}

impl GlobalBatch {
    /// Errors unless `dp_size >= 1` and every given normaliser is finite and positive.
    pub fn validate(&self) -> Result<()> {
        if self.dp_size == 0 {
            return Err(GoodhartError::invalid("dp_size", "must be at least 1"));
        }
        for (name, v) in [
            ("batch_num_tokens", self.batch_num_tokens),
            ("global_batch_size", self.global_batch_size),
            ("loss_scale_factor", self.loss_scale_factor),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(GoodhartError::invalid(
                        name,
                        format!("must be finite and positive, got {v}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl LossAggregation {
    /// Every mode with its name, for listings.
    pub const ALL: [(&'static str, LossAggregation); 5] = [
        ("token-mean", Self::TokenMean),
        ("token-sum", Self::TokenSum),
        ("seq-mean-token-sum", Self::SeqMeanTokenSum),
        ("seq-mean-token-mean", Self::SeqMeanTokenMean),
        ("seq-mean-token-sum-norm", Self::SeqMeanTokenSumNorm),
    ];

    /// Aggregates per-token `loss [B, T]` under `mask [B, T]` into a one-element tensor,
    /// one process seeing the whole batch ([`GlobalBatch::default`]). Gradients flow
    /// through `loss`; masked positions (even NaN ones) contribute nothing.
    pub fn aggregate<B: Backend>(
        &self,
        loss: Tensor<B, 2>,
        mask: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>> {
        self.aggregate_global(loss, mask, &GlobalBatch::default())
    }

    /// [`aggregate`](Self::aggregate) with the normalisers of `batch`.
    ///
    /// Errors: a shape mismatch, an invalid `batch`, or `dp_size > 1` without the global
    /// count this mode divides by (as verl raises).
    pub fn aggregate_global<B: Backend>(
        &self,
        loss: Tensor<B, 2>,
        mask: &Tensor<B, 2>,
        batch: &GlobalBatch,
    ) -> Result<Tensor<B, 1>> {
        check_same_shape(mask, "mask", &loss, "loss")?;
        batch.validate()?;
        let [b, t] = loss.dims();
        let dp = batch.dp_size as f64;
        let need = |given: Option<f64>, name: &str| match given {
            None if batch.dp_size > 1 => Err(GoodhartError::invalid(
                name,
                format!("required when dp_size = {} > 1", batch.dp_size),
            )),
            _ => Ok(given),
        };
        let masked = zero_masked(loss, mask);
        // A sum over rows divided by the seq-mean modes' N.
        let per_row = |sum: Tensor<B, 1>, valid: Tensor<B, 1>| -> Result<Tensor<B, 1>> {
            Ok(
                match (
                    need(batch.global_batch_size, "global_batch_size")?,
                    batch.empty_rows,
                ) {
                    (Some(n), _) => sum / n as f32,
                    (None, EmptyRows::Count) => sum / b.max(1) as f32,
                    (None, EmptyRows::Skip) => sum / valid.sum().clamp_min(1.0),
                },
            )
        };
        let tokens = mask.clone().sum_dim(1).reshape([b]);
        let valid = tokens.clone().greater_elem(0.0).float();
        let dp_f = dp as f32;
        Ok(match self {
            Self::TokenMean => match need(batch.batch_num_tokens, "batch_num_tokens")? {
                Some(n) => masked.sum() * (dp / n) as f32,
                None => masked.sum() / mask.clone().sum().clamp_min(1e-8),
            },
            Self::TokenSum => masked.sum() * dp_f,
            Self::SeqMeanTokenSum => per_row(masked.sum(), valid)? * dp_f,
            Self::SeqMeanTokenSumNorm => {
                let c = batch.loss_scale_factor.unwrap_or(t.max(1) as f64);
                per_row(masked.sum(), valid)? * (dp / c) as f32
            }
            Self::SeqMeanTokenMean => {
                let per_seq = masked.sum_dim(1).reshape([b]) / tokens.clamp_min(1e-8);
                per_row((per_seq * valid.clone()).sum(), valid)? * dp_f
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, tolerance, values};
    use proptest::{
        collection::vec,
        test_runner::{Config, TestRunner},
    };

    // Rows: full, a hole in the middle, one token, empty (holding NaN and garbage).
    const LOSS: [[f32; 3]; 4] = [
        [1.0, 2.0, 3.0],
        [4.0, 50.0, 6.0],
        [7.0, f32::NAN, 9.0],
        [f32::NAN, 100.0, -3.0],
    ];
    const MASK: [[f32; 3]; 4] = [
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 1.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ];

    crate::backend_test! {
        fn every_mode_by_hand_with_holes_and_an_empty_row<B>(device) {
            let loss = Tensor::<B, 2>::from_floats(LOSS, device);
            let mask = Tensor::<B, 2>::from_floats(MASK, device);
            let tol = tolerance(1e-6);
            let agg = |m: LossAggregation, g: GlobalBatch| values(m.aggregate_global(loss.clone(), &mask, &g).unwrap());
            let count = GlobalBatch::default();
            let skip = GlobalBatch { empty_rows: EmptyRows::Skip, ..Default::default() };
            // valid tokens 1 2 3 | 4 6 | 7: sum 23 over 6 tokens; row sums 6, 10, 7, 0;
            // row means 2, 5, 7; 4 rows, 3 of them with a token; T = 3.
            assert_close(&agg(LossAggregation::TokenMean, count), &[23.0 / 6.0], tol);
            assert_close(&agg(LossAggregation::TokenSum, count), &[23.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenSum, count), &[23.0 / 4.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenMean, count), &[14.0 / 4.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenSumNorm, count), &[23.0 / 12.0], tol);
            // verl's agg_loss without global_batch_size: the empty row is left out.
            assert_close(&agg(LossAggregation::SeqMeanTokenSum, skip), &[23.0 / 3.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenMean, skip), &[14.0 / 3.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenSumNorm, skip), &[23.0 / 9.0], tol);
            // Token modes do not look at rows.
            assert_close(&agg(LossAggregation::TokenMean, skip), &[23.0 / 6.0], tol);
            // verl's trainer call: global_batch_size = the rows, empty included, equals count.
            let trainer = GlobalBatch { global_batch_size: Some(4.0), empty_rows: EmptyRows::Skip, ..Default::default() };
            assert_close(&agg(LossAggregation::SeqMeanTokenMean, trainer), &[14.0 / 4.0], tol);
            // Global normalisers: dp 2 of a global batch of 10 rows, 12 tokens, C = 8.
            let global = GlobalBatch {
                dp_size: 2,
                batch_num_tokens: Some(12.0),
                global_batch_size: Some(10.0),
                loss_scale_factor: Some(8.0),
                ..Default::default()
            };
            assert_close(&agg(LossAggregation::TokenMean, global), &[23.0 / 12.0 * 2.0], tol);
            assert_close(&agg(LossAggregation::TokenSum, global), &[46.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenSum, global), &[23.0 / 10.0 * 2.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenMean, global), &[14.0 / 10.0 * 2.0], tol);
            assert_close(&agg(LossAggregation::SeqMeanTokenSumNorm, global), &[23.0 / 10.0 * 2.0 / 8.0], tol);
        }
    }

    crate::backend_test! {
        fn all_masked_is_zero_and_bad_input_is_an_error<B>(device) {
            let loss = Tensor::<B, 2>::from_floats(LOSS, device);
            let none = Tensor::<B, 2>::zeros([4, 3], device);
            for (_, mode) in LossAggregation::ALL {
                for rows in [EmptyRows::Count, EmptyRows::Skip] {
                    let g = GlobalBatch { empty_rows: rows, ..Default::default() };
                    assert_eq!(values(mode.aggregate_global(loss.clone(), &none, &g).unwrap()), vec![0.0]);
                }
            }
            let mask = Tensor::<B, 2>::from_floats(MASK, device);
            let short = Tensor::<B, 2>::zeros([4, 2], device);
            assert!(LossAggregation::TokenMean.aggregate(loss.clone(), &short).is_err());
            let err = |m: LossAggregation, g: GlobalBatch| m.aggregate_global(loss.clone(), &mask, &g).unwrap_err().to_string();
            let dp2 = GlobalBatch { dp_size: 2, ..Default::default() };
            assert!(err(LossAggregation::TokenMean, dp2).contains("batch_num_tokens"));
            assert!(err(LossAggregation::SeqMeanTokenMean, dp2).contains("global_batch_size"));
            // token-sum needs no global count.
            assert_eq!(values(LossAggregation::TokenSum.aggregate_global(loss.clone(), &mask, &dp2).unwrap()), vec![46.0]);
            assert!(err(LossAggregation::TokenSum, GlobalBatch { dp_size: 0, ..Default::default() }).contains("dp_size"));
            for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
                let g = GlobalBatch { loss_scale_factor: Some(bad), ..Default::default() };
                assert!(err(LossAggregation::SeqMeanTokenSumNorm, g).contains("loss_scale_factor"));
            }
        }
    }

    crate::backend_test! {
        fn micro_batches_with_global_normalisers_add_up_to_the_batch<B>(device) {
            // Split a batch into micro-batches of rows: with the whole batch's token count
            // and row count, the micro-batch losses sum to the whole batch's loss.
            let mut runner = TestRunner::new(Config { cases: 32, ..Default::default() });
            let strategy = (vec(-3.0f32..3.0, 24), vec(0u8..2, 24), 1usize..6);
            runner
                .run(&strategy, |(l, m, cut)| {
                    let mask: Vec<f32> = m.iter().map(|&x| x as f32).collect();
                    let full = |v: &[f32], rows: std::ops::Range<usize>| {
                        let data: Vec<f32> = v[rows.start * 4..rows.end * 4].to_vec();
                        Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(data, [rows.len(), 4]), device)
                    };
                    let global = GlobalBatch {
                        batch_num_tokens: Some(mask.iter().sum::<f32>().max(1e-8) as f64),
                        global_batch_size: Some(6.0),
                        loss_scale_factor: Some(4.0),
                        ..Default::default()
                    };
                    for (_, mode) in LossAggregation::ALL {
                        let whole = values(mode.aggregate(full(&l, 0..6), &full(&mask, 0..6)).unwrap())[0];
                        let parts: f32 = [0..cut, cut..6]
                            .into_iter()
                            .map(|r| values(mode.aggregate_global(full(&l, r.clone()), &full(&mask, r), &global).unwrap())[0])
                            .sum();
                        assert!((whole - parts).abs() <= tolerance(1e-5) * (1.0 + whole.abs()), "{mode:?}: {whole} vs {parts}");
                    }
                    Ok(())
                })
                .unwrap();
        }
    }

    #[test]
    fn names_round_trip_through_serde() {
        for (name, mode) in LossAggregation::ALL {
            let v: LossAggregation = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(v, mode);
        }
        let g: GlobalBatch =
            serde_json::from_str(r#"{"empty_rows": "skip", "loss_scale_factor": 512}"#).unwrap();
        assert_eq!(
            g,
            GlobalBatch {
                empty_rows: EmptyRows::Skip,
                loss_scale_factor: Some(512.0),
                ..Default::default()
            }
        );
        assert!(serde_json::from_str::<GlobalBatch>(r#"{"empty_row": "skip"}"#).is_err());
    }
}
