//! Helpers shared by the crate's tests.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::policy::PolicyInputs;

/// A `[b, t]` tensor from row-major values.
pub fn t2<B: Backend>(v: Vec<f32>, b: usize, t: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, [b, t]), device)
}

/// A `[n]` tensor.
pub fn t1<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Policy inputs with `lp_old = 0`, so `lp = ln(ratio)`.
pub fn ratio_inputs<B: Backend>(
    ratios: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<f32>,
    b: usize,
    t: usize,
    device: &B::Device,
) -> PolicyInputs<B> {
    let lp = ratios.iter().map(|r| r.ln()).collect();
    PolicyInputs::new(
        t2(lp, b, t, device),
        Tensor::zeros([b, t], device),
        t2(adv, b, t, device),
        t2(mask, b, t, device),
    )
    .unwrap()
}

/// The single value of a one-element tensor.
pub fn scalar<B: Backend>(x: Tensor<B, 1>) -> f32 {
    goodhart_core::testing::values(x)[0]
}
