//! Length: penalties on long responses and FiMi-style length debiasing.
//!
//! Reward models favour long responses whatever their quality (length bias), and a policy
//! exploits it. Three remedies, each a named method (TOML `kind`):
//!
//! | kind | reward |
//! |---|---|
//! | `linear_length` | `r - coef * max(L - free, 0)` (the PAR code's `penalty_per_token` past `gen_valid_len`; `free = 0` is a plain linear penalty) |
//! | `dapo_overlong` | `r + p(L)`, DAPO's soft overlong punishment (below) |
//! | `fimi` | `r - f(L)`, `f` a small MLP fitted on a sinusoidal length encoding (FiMi-RM) |
//!
//! DAPO (Yu et al. 2025) soft overlong punishment, with `Lmax` the maximum response
//! length, `Lbuf` the buffer and `f` the penalty factor:
//! `p(L) = 0` for `L <= Lmax - Lbuf`; `((Lmax - Lbuf) - L) / Lbuf * f` for
//! `Lmax - Lbuf < L <= Lmax`; `-f` for `L > Lmax`. verl computes
//! `min(-(L - (Lmax - Lbuf)) / Lbuf * f, 0)` and never sees `L > Lmax` (generation stops
//! there); the clamp at `-f` is DAPO's definition. Defaults: DAPO's `Lmax = 20480`,
//! `Lbuf = 4096`, `f = 1`.
//!
//! FiMi-RM ("Bias Fitting to Mitigate Length Bias of Reward Model in RLHF") fits the
//! length-reward relation with a lightweight network and removes it. Here: encode `L`
//! sinusoidally (`sin(w_i x)`, `cos(w_i x)`, `x = L / L_max`, `w_i = (pi/2) 2^i`; see
//! [`sinusoidal`]), fit `r_hat = MLP(enc(L))` with the loss
//! `-|pearson(r, r_hat)| + mse(r, r_hat)`, then debias `r' = r - r_hat(L)`. The exact
//! debias form of the paper is *(unverified)*: FiMi folds the fitted relation into the
//! reward model; subtracting it from the reward is this toolkit's reading. Responses of
//! equal length are shifted equally, so their ranking never changes.

use burn::{
    module::{AutodiffModule, Module},
    nn::{Linear, LinearConfig},
    optim::{AdamConfig, GradientsParams, Optimizer},
    tensor::{
        activation::gelu,
        backend::{AutodiffBackend, Backend},
        cast::ToElement,
        Tensor,
    },
};
use goodhart_core::{
    ops::{check_finite, check_same_shape},
    params::materialized,
    seed, GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// A length method and its settings (TOML: `kind = "linear_length" | "dapo_overlong" |
/// "fimi"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthConfig {
    /// `r - coef * max(L - free, 0)`.
    LinearLength {
        /// Penalty per token.
        coef: f32,
        /// Tokens allowed free of penalty (default 0).
        #[serde(default)]
        free: f32,
    },
    /// DAPO's soft overlong punishment ([`dapo_overlong`]).
    DapoOverlong(OverlongConfig),
    /// FiMi-style debiasing ([`LengthDebiasConfig`]).
    Fimi(LengthDebiasConfig),
}

impl LengthConfig {
    /// The registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::LinearLength { .. } => "linear_length",
            Self::DapoOverlong(_) => "dapo_overlong",
            Self::Fimi(_) => "fimi",
        }
    }
}

impl LengthConfig {
    /// Applies a penalty method to `rewards [N]` with `lengths [N]`:
    /// [`linear_length_penalty`] or `r +` [`dapo_overlong`]. `fimi` needs a fit first
    /// ([`fit_length_bias`], then [`LengthBias::debias`]) and is an error here.
    pub fn penalise<B: Backend>(
        &self,
        rewards: Tensor<B, 1>,
        lengths: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>> {
        match self {
            Self::LinearLength { coef, free } => {
                linear_length_penalty(rewards, lengths, *coef, *free)
            }
            Self::DapoOverlong(c) => {
                check_inputs(&rewards, &lengths)?;
                Ok(rewards + dapo_overlong(lengths, c)?)
            }
            Self::Fimi(_) => Err(GoodhartError::invalid(
                "length.kind",
                "`fimi` is fitted, not a fixed penalty: use fit_length_bias, then LengthBias::debias",
            )),
        }
    }
}

/// `r - coef * max(L - free, 0)` for `rewards [N]` and `lengths [N]`.
pub fn linear_length_penalty<B: Backend>(
    rewards: Tensor<B, 1>,
    lengths: Tensor<B, 1>,
    coef: f32,
    free: f32,
) -> Result<Tensor<B, 1>> {
    check_inputs(&rewards, &lengths)?;
    if !(coef.is_finite() && free.is_finite()) {
        return Err(GoodhartError::invalid(
            "linear_length",
            "coef and free must be finite",
        ));
    }
    Ok(rewards - (lengths - free).clamp_min(0.0) * coef)
}

/// Settings of DAPO's soft overlong punishment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlongConfig {
    /// Maximum response length `Lmax` (DAPO: 20480).
    #[serde(default = "default_max_len")]
    pub max_len: f32,
    /// Buffer length `Lbuf` (DAPO: 4096); the penalty ramps over `(Lmax - Lbuf, Lmax]`.
    #[serde(default = "default_buffer")]
    pub buffer: f32,
    /// Penalty factor `f` (DAPO, verl: 1).
    #[serde(default = "default_factor")]
    pub factor: f32,
}

fn default_max_len() -> f32 {
    20480.0
}
fn default_buffer() -> f32 {
    4096.0
}
fn default_factor() -> f32 {
    1.0
}

impl Default for OverlongConfig {
    fn default() -> Self {
        Self {
            max_len: default_max_len(),
            buffer: default_buffer(),
            factor: default_factor(),
        }
    }
}

/// DAPO's soft overlong penalty `p(L)` for `lengths [N]`: 0 up to `Lmax - Lbuf`, then
/// `-(L - (Lmax - Lbuf)) / Lbuf * f`, and `-f` past `Lmax`. Add it to the reward.
pub fn dapo_overlong<B: Backend>(
    lengths: Tensor<B, 1>,
    config: &OverlongConfig,
) -> Result<Tensor<B, 1>> {
    check_finite(&lengths, "lengths")?;
    let OverlongConfig {
        max_len,
        buffer,
        factor,
    } = *config;
    if !(buffer > 0.0
        && buffer <= max_len
        && factor.is_finite()
        && factor >= 0.0
        && max_len.is_finite())
    {
        return Err(GoodhartError::invalid(
            "dapo_overlong",
            format!("need 0 < buffer <= max_len and factor >= 0 (got {config:?})"),
        ));
    }
    let expected = max_len - buffer;
    Ok(((lengths - expected) / buffer * (-factor)).clamp(-factor, 0.0))
}

/// Settings of the FiMi length-bias fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LengthDebiasConfig {
    /// Sinusoidal encoding width `d` (even; default 8, i.e. 4 frequencies).
    pub encoding_dim: usize,
    /// Hidden width of the two-layer MLP (default 32).
    pub hidden: usize,
    /// Full-batch Adam steps (default 300).
    pub steps: usize,
    /// Of which the first `warmup` minimise the MSE alone (default 100). The `-|pearson|`
    /// term is flat in the prediction's scale and rewards a negatively correlated
    /// prediction as much as a positive one, so from some initialisations the full loss
    /// settles on a near-zero, negatively correlated fit; the MSE warm-up starts it on the
    /// right side (this toolkit's addition).
    pub warmup: usize,
    /// Adam learning rate (default 1e-2).
    pub lr: f64,
    /// Seed of the MLP's initialisation (default 0).
    pub seed: u64,
}

impl Default for LengthDebiasConfig {
    fn default() -> Self {
        Self {
            encoding_dim: 8,
            hidden: 32,
            steps: 300,
            warmup: 100,
            lr: 1e-2,
            seed: 0,
        }
    }
}

/// The fitted length-bias model
/// `r_hat(L) = mean_r + std_r * (W2 GELU(W1 enc(L / L_scale)))`.
#[derive(Module, Debug)]
pub struct LengthBias<B: Backend> {
    fc: Linear<B>,
    out: Linear<B>,
    #[module(skip)]
    dim: usize,
    /// Largest length seen in the fit; lengths are encoded as `L / L_scale`.
    #[module(skip)]
    length_scale: f32,
    #[module(skip)]
    reward_mean: f32,
    #[module(skip)]
    reward_std: f32,
}

impl<B: Backend> LengthBias<B> {
    /// The MLP's output on the standardised scale.
    fn standardised(&self, lengths: Tensor<B, 1>) -> Tensor<B, 1> {
        let n = lengths.dims()[0];
        let enc = sinusoidal(lengths / self.length_scale, self.dim);
        self.out.forward(gelu(self.fc.forward(enc))).reshape([n])
    }

    /// `r_hat(L)` for `lengths [N]`.
    pub fn predict(&self, lengths: Tensor<B, 1>) -> Tensor<B, 1> {
        self.standardised(lengths) * self.reward_std + self.reward_mean
    }

    /// `r - r_hat(L)`: the debiased rewards. Errors on mismatched or non-finite inputs.
    pub fn debias(&self, rewards: Tensor<B, 1>, lengths: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        check_inputs(&rewards, &lengths)?;
        Ok(rewards - self.predict(lengths))
    }
}

/// Sinusoidal encoding `[N, d]` of `x [N]` (lengths divided by the largest fitted
/// length, so mostly in `[0, 1]`): columns `2i`, `2i+1` are `sin(w_i x)`, `cos(w_i x)`
/// with dyadic frequencies `w_i = (pi / 2) 2^i`. The lowest pair is monotone over
/// `[0, 1]`, the higher ones add resolution; lengths past the fitted range extrapolate
/// periodically, so fit on the lengths you will debias.
pub fn sinusoidal<B: Backend>(x: Tensor<B, 1>, d: usize) -> Tensor<B, 2> {
    let n = x.dims()[0];
    let w: Vec<f32> = (0..d / 2)
        .map(|i| std::f32::consts::FRAC_PI_2 * 2f32.powi(i as i32))
        .collect();
    let w = Tensor::<B, 1>::from_floats(w.as_slice(), &x.device()).reshape([1, d / 2]);
    let angles = x.reshape([n, 1]) * w;
    let pair = Tensor::stack::<3>(vec![angles.clone().sin(), angles.cos()], 2);
    pair.reshape([n, d])
}

/// `-|pearson(r, r_hat)| + mean((r - r_hat)^2)`, FiMi's fitting loss.
fn fimi_loss<B: Backend>(r: Tensor<B, 1>, r_hat: Tensor<B, 1>) -> Tensor<B, 1> {
    let mse = (r.clone() - r_hat.clone()).powi_scalar(2).mean();
    let rc = r.clone() - r.mean();
    let hc = r_hat.clone() - r_hat.mean();
    let cov = (rc.clone() * hc.clone()).sum();
    let denom = (rc.powi_scalar(2).sum() * hc.powi_scalar(2).sum() + 1e-12).sqrt();
    mse - (cov / denom).abs()
}

/// Fits the length-bias model to `rewards [N]` against `lengths [N]` on an autodiff
/// backend and returns it on the inner backend. The rewards are standardised for the
/// fit (so the learning rate does not depend on their scale) and the prediction mapped
/// back. Errors on fewer than two points, mismatched or non-finite inputs, lengths that
/// are all zero or negative, or an odd / zero encoding width.
pub fn fit_length_bias<B: AutodiffBackend>(
    rewards: Tensor<B, 1>,
    lengths: Tensor<B, 1>,
    config: &LengthDebiasConfig,
) -> Result<LengthBias<B::InnerBackend>> {
    check_inputs(&rewards, &lengths)?;
    if rewards.dims()[0] < 2 {
        return Err(GoodhartError::invalid(
            "rewards",
            "the fit needs at least two responses",
        ));
    }
    if config.encoding_dim == 0 || !config.encoding_dim.is_multiple_of(2) || config.hidden == 0 {
        return Err(GoodhartError::invalid(
            "fimi",
            "encoding_dim must be even and positive, hidden positive",
        ));
    }
    let (r, l) = (rewards.detach(), lengths.detach());
    let scalar = |t: Tensor<B, 1>| t.into_scalar().to_f32();
    let length_scale = scalar(l.clone().abs().max());
    if length_scale.is_nan() || length_scale <= 0.0 {
        return Err(GoodhartError::invalid(
            "lengths",
            "need at least one positive length",
        ));
    }
    let reward_mean = scalar(r.clone().mean());
    let reward_std = scalar((r.clone() - reward_mean).powi_scalar(2).mean().sqrt()).max(1e-6);
    let z = (r - reward_mean) / reward_std;
    let device = z.device();
    // Drawn under the lock: burn initialises lazily, at first use otherwise.
    let (fc, out) = seed::seeded::<B, _>(&device, config.seed, "reward/fimi/init", || {
        (
            materialized(LinearConfig::new(config.encoding_dim, config.hidden).init(&device)),
            materialized(LinearConfig::new(config.hidden, 1).init(&device)),
        )
    });
    let mut model = LengthBias {
        fc,
        out,
        dim: config.encoding_dim,
        length_scale,
        reward_mean,
        reward_std,
    };
    let mut optim = AdamConfig::new().init::<B, LengthBias<B>>();
    for step in 0..config.steps {
        let r_hat = model.standardised(l.clone());
        let loss = if step < config.warmup {
            (z.clone() - r_hat).powi_scalar(2).mean()
        } else {
            fimi_loss(z.clone(), r_hat)
        };
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(config.lr, model, grads);
    }
    Ok(model.valid())
}

fn check_inputs<B: Backend>(rewards: &Tensor<B, 1>, lengths: &Tensor<B, 1>) -> Result<()> {
    check_same_shape(rewards, "rewards", lengths, "lengths")?;
    if rewards.dims()[0] == 0 {
        return Err(GoodhartError::Empty {
            what: "rewards".into(),
        });
    }
    check_finite(rewards, "rewards")?;
    check_finite(lengths, "lengths")
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};
    use rand::RngExt as _;

    goodhart_core::backend_test! {
        fn penalties_hand_values<B>(device) {
            let l = Tensor::<B, 1>::from_floats([10.0, 16.0, 18.0, 20.0, 25.0], device);
            // Lmax 20, Lbuf 4, f 2: expected 16; p = -(L - 16)/4 * 2 clamped to [-2, 0]
            let cfg = OverlongConfig { max_len: 20.0, buffer: 4.0, factor: 2.0 };
            assert_close(&values(dapo_overlong(l.clone(), &cfg).unwrap()), &[0.0, 0.0, -1.0, -2.0, -2.0], tolerance(1e-6));
            let r = Tensor::<B, 1>::from_floats([1.0; 5], device);
            // 1 - 0.1 * max(L - 12, 0): 1, 0.6, 0.4, 0.2, -0.3
            let lin = linear_length_penalty(r, l.clone(), 0.1, 12.0).unwrap();
            assert_close(&values(lin), &[1.0, 0.6, 0.4, 0.2, -0.3], tolerance(1e-6));
            // through the config: 1 + p(L)
            let via = LengthConfig::DapoOverlong(cfg).penalise(Tensor::ones([5], device), l.clone()).unwrap();
            assert_close(&values(via), &[1.0, 1.0, 0.0, -1.0, -1.0], tolerance(1e-6));
            assert!(LengthConfig::Fimi(LengthDebiasConfig::default()).penalise(Tensor::ones([5], device), l.clone()).is_err());
            let bad = OverlongConfig { max_len: 20.0, buffer: 0.0, factor: 1.0 };
            assert!(matches!(dapo_overlong(l, &bad), Err(GoodhartError::InvalidArgument { .. })));
        }
    }

    fn pearson(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len() as f32;
        let (ma, mb) = (a.iter().sum::<f32>() / n, b.iter().sum::<f32>() / n);
        let cov: f32 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f32 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f32 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    }

    goodhart_core::backend_test! {
        fn fimi_removes_most_of_an_injected_length_bias<B>(device) {
            use goodhart_core::device::Autodiff;
            // quality q ~ U(-1, 1), lengths in [10, 200], r = q + 3 sqrt(L / 200) (a
            // saturating bias that no linear fit captures exactly)
            let mut rng = seed::rng(7, "test/fimi");
            let n = 400;
            let lengths: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { 50.0 } else { rng.random_range(10..=200) as f32 }).collect();
            let q: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let r: Vec<f32> = q.iter().zip(&lengths).map(|(q, l)| q + 3.0 * (l / 200.0).sqrt()).collect();
            let before = pearson(&r, &lengths);
            let rt = Tensor::<Autodiff<B>, 1>::from_floats(r.as_slice(), device);
            let lt = Tensor::<Autodiff<B>, 1>::from_floats(lengths.as_slice(), device);
            let mut last = Vec::new();
            // Three initialisations: the fit must not depend on a lucky one.
            for seed in 0..3u64 {
                let config = LengthDebiasConfig { seed, ..Default::default() };
                let fit = fit_length_bias(rt.clone(), lt.clone(), &config).unwrap();
                let debiased = values(fit.debias(
                    Tensor::<B, 1>::from_floats(r.as_slice(), device),
                    Tensor::<B, 1>::from_floats(lengths.as_slice(), device)).unwrap());
                let after = pearson(&debiased, &lengths);
                eprintln!("length-reward correlation: before {before:.3}, after {after:.3} (seed {seed})");
                assert!(before > 0.5, "the injected bias is visible: {before}");
                assert!(after.abs() <= 0.2 * before, "at least 80% removed: before {before}, after {after}");
                last = debiased;
            }
            // the ranking of the equal-length (L = 50) responses is unchanged
            let idx: Vec<usize> = (0..n).step_by(2).collect();
            for w in idx.windows(2) {
                let (a, b) = (w[0], w[1]);
                assert_eq!(r[a] > r[b], last[a] > last[b], "pair {a} {b}");
            }
        }
    }

    goodhart_core::backend_test! {
        fn fimi_rejects_bad_input<B>(device) {
            use goodhart_core::device::Autodiff;
            let one = Tensor::<Autodiff<B>, 1>::from_floats([1.0], device);
            assert!(fit_length_bias(one.clone(), one, &LengthDebiasConfig::default()).is_err());
            let r = Tensor::<Autodiff<B>, 1>::from_floats([1.0, f32::NAN], device);
            let l = Tensor::<Autodiff<B>, 1>::from_floats([1.0, 2.0], device);
            assert!(matches!(fit_length_bias(r, l.clone(), &LengthDebiasConfig::default()), Err(GoodhartError::NonFinite { .. })));
            let odd = LengthDebiasConfig { encoding_dim: 3, ..Default::default() };
            assert!(fit_length_bias(l.clone(), l, &odd).is_err());
        }
    }
}
