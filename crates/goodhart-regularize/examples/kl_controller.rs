//! A KL estimator on your own log-probs and an adaptive KL controller (Ziegler et al.,
//! verl's `kl_ctrl`) following the batch KL towards its target.
//!
//! ```text
//! cargo build --workspace --examples && target/debug/examples/kl_controller
//! ```

use burn::tensor::{Tensor, TensorData};
use goodhart_core::device::{cpu, Dispatch};
use goodhart_regularize::{
    controller::{ControllerConfig, ControllerObservation},
    kl::{kl_per_token, KlEstimator},
};

type B = Dispatch;

fn main() -> goodhart_core::Result<()> {
    let device = cpu();
    // Log-probs of 2 responses of 3 tokens under the policy and the reference; the
    // second response has 2 tokens (its last position is padding).
    let t = |x: [f32; 6]| Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [2, 3]), &device);
    let lp = t([-1.0, -0.5, -2.0, -0.1, -0.3, 0.0]);
    let lr = t([-1.2, -0.4, -2.5, -0.2, -0.3, 0.0]);
    let mask = t([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);

    for (name, est) in KlEstimator::ALL {
        let kl = kl_per_token(lp.clone(), lr.clone(), &mask, est, true)?;
        let v: Vec<f32> = kl.into_data().convert::<f32>().into_vec().expect("f32");
        println!("{name:>4}: {v:.4?}");
    }
    // k3 = exp(-d) + d - 1 with d = lp - lr; at the first token d = 0.2.
    let k3 = kl_per_token(lp, lr, &mask, KlEstimator::K3, true)?;
    let first = k3
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32")[0];
    assert!(
        (first - ((-0.2f32).exp() + 0.2 - 1.0)).abs() < 1e-6,
        "{first}"
    );

    // The adaptive controller: beta *= 1 + clip(kl / target - 1, -0.2, 0.2) n / horizon.
    let mut ctrl = ControllerConfig::Adaptive {
        init_coef: 0.1,
        target: 0.05,
        horizon: 1000.0,
    }
    .init()?;
    for (step, kl) in [0.2, 0.2, 0.04, 0.01].into_iter().enumerate() {
        let beta = ctrl.update(ControllerObservation {
            kl,
            reward: 0.0,
            n_steps: 256.0,
        })?;
        println!("step {step}: batch KL {kl:.2} -> beta {beta:.5}");
    }
    // By hand: two steps above target (error clipped at +0.2), then -0.2 and -0.2.
    let up = 1.0 + 0.2 * 256.0 / 1000.0;
    let down = 1.0 - 0.2 * 256.0 / 1000.0;
    let want = 0.1 * up * up * down * down;
    assert!(
        (ctrl.value() - want).abs() < 1e-12,
        "{} vs {want}",
        ctrl.value()
    );
    Ok(())
}
