//! Every policy loss, `agg_loss` mode and rollout-IS weight against verl 0.9.1's own
//! outputs (`fixtures/verl_0_9_1.json`, written by `fixtures/verl_0_9_1.py` from the
//! verl wheel): loss values and gradients with respect to `lp`, on a batch with ratios
//! near the clip range and one far past it, each with a masked hole and an empty row,
//! under verl's local call, its trainer call and a data-parallel call.

use burn::tensor::{Tensor, TensorData};
use goodhart_core::{
    aggregate::{EmptyRows, GlobalBatch, LossAggregation},
    device::Autodiff,
    testing::values,
};
use serde::Deserialize;

use crate::{IsLevel, PolicyInputs, PolicyLossConfig, RolloutIsConfig};

#[derive(Deserialize)]
struct Fixture {
    b: usize,
    t: usize,
    batches: Vec<Batch>,
    losses: Vec<LossCase>,
    agg_loss: Vec<AggCase>,
    rollout_is: Vec<IsCase>,
}

#[derive(Deserialize)]
struct Batch {
    old: Vec<f32>,
    lp: Vec<f32>,
    adv: Vec<f32>,
    mask: Vec<f32>,
    weights: Vec<f32>,
}

#[derive(Deserialize)]
struct LossCase {
    loss: String,
    params: serde_json::Map<String, serde_json::Value>,
    mode: String,
    global: String,
    batch: usize,
    weighted: bool,
    value: f32,
    grad: Vec<f32>,
}

#[derive(Deserialize)]
struct AggCase {
    mode: String,
    global: String,
    loss: Vec<f32>,
    mask: Vec<f32>,
    value: f32,
}

#[derive(Deserialize)]
struct IsCase {
    level: IsLevel,
    threshold: f32,
    lower: Option<f32>,
    batch_normalize: bool,
    log_ratio: Vec<f32>,
    mask: Vec<f32>,
    weights: Vec<f32>,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("../fixtures/verl_0_9_1.json")).unwrap()
}

/// verl's `global_batch_info` of each call, as a [`GlobalBatch`].
fn global(name: &str, b: usize, mask: &[f32]) -> GlobalBatch {
    let tokens: f32 = mask.iter().sum();
    match name {
        // No global count: verl's agg_loss divides by the rows with a valid token.
        "local" => GlobalBatch {
            empty_rows: EmptyRows::Skip,
            ..Default::default()
        },
        "trainer" => GlobalBatch {
            global_batch_size: Some(b as f64),
            batch_num_tokens: Some(tokens as f64),
            ..Default::default()
        },
        "dp2" => GlobalBatch {
            dp_size: 2,
            global_batch_size: Some(2.0 * b as f64 + 1.0),
            batch_num_tokens: Some(tokens as f64 * 2.0 + 3.0),
            loss_scale_factor: Some(16.0),
            ..Default::default()
        },
        other => panic!("unknown call {other}"),
    }
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= 2e-6 * (1.0 + want.abs())
}

goodhart_core::backend_test! {
    fn policy_losses_match_verl<B>(device) {
        let f = fixture();
        let t2 = |v: &[f32]| Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(v.to_vec(), [f.b, f.t]), device);
        let mut checked = std::collections::BTreeMap::<String, usize>::new();
        for (i, c) in f.losses.iter().enumerate() {
            let batch = &f.batches[c.batch];
            let mut table = c.params.clone();
            table.insert("kind".into(), c.loss.clone().into());
            let mut cfg: PolicyLossConfig = serde_json::from_value(table.into()).unwrap();
            let mode: LossAggregation = serde_json::from_value(c.mode.clone().into()).unwrap();
            // geo_mean and sapo take no mode in verl (their fixture cases carry the one
            // verl applies); geo_mean's torch.mean counts every row.
            let mut g = global(&c.global, f.b, &batch.mask);
            if c.loss == "geo_mean" {
                g.empty_rows = EmptyRows::Count;
            } else {
                cfg = cfg.with_aggregation(mode).unwrap();
            }
            let lp = t2(&batch.lp).require_grad();
            let mut inputs = PolicyInputs::new(lp.clone(), t2(&batch.old), t2(&batch.adv), t2(&batch.mask))
                .unwrap()
                .with_global_batch(g)
                .unwrap();
            if c.weighted {
                inputs = inputs.with_rollout_is_weights(t2(&batch.weights)).unwrap();
            }
            let out = cfg.loss(&inputs).unwrap();
            let value = values(out.loss.clone())[0];
            let grad = values(lp.grad(&out.loss.backward()).unwrap());
            let what = format!("case {i}: {} {} {} weighted={}", c.loss, c.mode, c.global, c.weighted);
            assert!(close(value, c.value), "{what}: loss {value} vs verl {}", c.value);
            for (k, (&a, &b)) in grad.iter().zip(&c.grad).enumerate() {
                assert!(close(a, b), "{what}: grad[{k}] {a} vs verl {b}");
            }
            *checked.entry(c.loss.clone()).or_default() += 1;
        }
        // Every loss of the registry that verl has is covered (it has no turn-level loss).
        for info in crate::policy::REGISTRY.iter().filter(|i| i.name != "a2tgpo_clip") {
            assert!(checked.get(info.name).copied().unwrap_or(0) >= 4, "{}: {checked:?}", info.name);
        }
    }
}

goodhart_core::backend_test! {
    fn agg_loss_and_rollout_is_weights_match_verl<B>(device) {
        let f = fixture();
        let t2 = |v: &[f32]| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [f.b, f.t]), device);
        for c in &f.agg_loss {
            let mode: LossAggregation = serde_json::from_value(c.mode.clone().into()).unwrap();
            let got = values(mode.aggregate_global(t2(&c.loss), &t2(&c.mask), &global(&c.global, f.b, &c.mask)).unwrap())[0];
            assert!(close(got, c.value), "{} {}: {got} vs verl {}", c.mode, c.global, c.value);
        }
        assert_eq!(f.agg_loss.len(), 15);
        for c in &f.rollout_is {
            let cfg = RolloutIsConfig { level: c.level, threshold: c.threshold, lower: c.lower, batch_normalize: c.batch_normalize };
            // log_ratio = lp_old - lp_rollout with lp_rollout = 0.
            let w = cfg.weights(&t2(&c.log_ratio), &t2(&vec![0.0; f.b * f.t]), &t2(&c.mask)).unwrap();
            for (&a, &b) in values(w.weights).iter().zip(&c.weights) {
                assert!(close(a, b), "{cfg:?}: {a} vs verl {b}");
            }
        }
        assert_eq!(f.rollout_is.len(), 8);
    }
}
