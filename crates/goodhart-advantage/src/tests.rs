//! Tests: hand-computed vectors for every estimator (arithmetic in the comments), the
//! peers' published values from METHODS.md, property invariants, bad input, and the
//! TOML registry. Every tensor test runs on the backend `GOODHART_TEST_DEVICE` names.

use std::f32::consts::FRAC_1_SQRT_2;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use goodhart_core::{
    testing::{assert_close, tolerance, values},
    GoodhartError,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};

use super::*;
use crate::{
    a2tgpo::{a2tgpo, A2tgpoConfig},
    bnpo::{bnpo, bnpo_beta_params, BnpoConfig},
    dr_grpo::{dr_grpo, DrGrpoConfig},
    gae::{gae, GaeConfig},
    gdpo::{gdpo, GdpoConfig},
    gpg::{gpg, GpgConfig},
    gra::{gra, GraConfig},
    grpo::{grpo, GrpoConfig, GrpoScale},
    grpo_passk::{grpo_passk, GrpoPasskConfig},
    igpo::{igpo, IgpoConfig},
    opo::{opo, OpoConfig},
    optimal_token_baseline::{optimal_token_baseline, OptimalTokenBaselineConfig},
    reinforce::{reinforce, ReinforceConfig},
    reinforce_plus_plus::{reinforce_plus_plus, ReinforcePlusPlusConfig},
    reinforce_plus_plus_baseline::{reinforce_plus_plus_baseline, ReinforcePlusPlusBaselineConfig},
    remax::{remax, RemaxConfig},
    rloo::{rloo, RlooConfig},
    verpo::{verpo, VerpoConfig},
};

fn t1<B: Backend>(x: &[f32], d: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(x.to_vec(), [x.len()]), d)
}

fn t2<B: Backend>(x: &[f32], n: usize, t: usize, d: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(x.to_vec(), [n, t]), d)
}

fn ti<B: Backend>(x: &[i64], n: usize, t: usize, d: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(x.to_vec(), [n, t]), d)
}

fn ones<B: Backend>(n: usize, t: usize, d: &B::Device) -> Tensor<B, 2> {
    Tensor::ones([n, t], d)
}

fn per<B: Backend>(o: &AdvantageOutput<B>) -> Vec<f32> {
    values(o.per_response.clone().expect("outcome estimator"))
}

/// Each response's value repeated over `tokens[i]` valid tokens of a row of `t`.
fn spread(v: &[f32], mask: &[f32], t: usize) -> Vec<f32> {
    mask.iter()
        .enumerate()
        .map(|(j, &m)| if m == 0.0 { 0.0 } else { v[j / t] })
        .collect()
}

// ---------------------------------------------------------------- GRPO family

goodhart_core::backend_test! {
    fn grpo_reproduces_trl_reference_values<B>(device) {
        // METHODS.md: TRL-style GRPO on {1,1,2} and {1,0}, unbiased std, eps 1e-4.
        // {1,1,2}: mu 4/3, sigma sqrt((1/9+1/9+4/9)/2) = 0.57735
        //   -> (-1/3)/0.57745 = -0.5773, (2/3)/0.57745 = 1.1545
        // {1,0}: mu 0.5, sigma sqrt(0.5) = 0.70711 -> 0.5/0.70721 = 0.7070
        let groups = Groups::new(vec![4, 4, 4, 9, 9]).unwrap();
        let r = t1::<B>(&[1.0, 1.0, 2.0, 1.0, 0.0], device);
        let m = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0];
        let mask = t2::<B>(&m, 5, 2, device);
        let cfg = GrpoConfig { eps: 1e-4, ..GrpoConfig::default() };
        let out = grpo(r, &mask, &groups, &cfg).unwrap();
        let expected = [-0.5773, -0.5773, 1.1545, 0.7070, -0.7070];
        let tol = tolerance(1e-4);
        assert_close(&per(&out), &expected, tol);
        assert_close(&values(out.advantages), &spread(&expected, &m, 2), tol);
        assert!(out.returns.is_none());
    }
}

goodhart_core::backend_test! {
    fn grpo_scales_and_std_conventions<B>(device) {
        let groups = Groups::new(vec![0, 0, 0, 1, 1]).unwrap();
        let r = t1::<B>(&[1.0, 1.0, 2.0, 1.0, 0.0], device);
        let mask = ones::<B>(5, 1, device);
        let tol = tolerance(1e-5);
        let run = |cfg: GrpoConfig| per(&grpo(r.clone(), &mask, &groups, &cfg).unwrap());
        // centred: -1/3, -1/3, 2/3 | 0.5, -0.5
        let none = run(GrpoConfig { scale: GrpoScale::None, ..Default::default() });
        assert_close(&none, &[-1.0 / 3.0, -1.0 / 3.0, 2.0 / 3.0, 0.5, -0.5], tol);
        // batch std: mean 1, squared deviations 0+0+1+0+1 = 2, /4 -> sqrt(0.5) = 0.707107
        let s = 0.5f32.sqrt() + 1e-6;
        let batch = run(GrpoConfig { scale: GrpoScale::Batch, ..Default::default() });
        assert_close(&batch, &[-1.0 / 3.0 / s, -1.0 / 3.0 / s, 2.0 / 3.0 / s, 0.5 / s, -0.5 / s], tol);
        // biased group std: {1,1,2} sqrt(2/9) = 0.471405 -> -0.707107, 1.414214; {1,0} 0.5 -> +-1
        let biased = run(GrpoConfig { unbiased_std: false, ..Default::default() });
        assert_close(&biased, &[-0.707105, -0.707105, 1.414211, 0.999998, -0.999998], tol);
    }
}

goodhart_core::backend_test! {
    fn grpo_groups_of_one_follow_the_policy<B>(device) {
        let groups = Groups::new(vec![0, 0, 7]).unwrap();
        let r = t1::<B>(&[1.0, 3.0, 5.0], device);
        let mask = ones::<B>(3, 2, device);
        let run = |singleton| grpo(r.clone(), &mask, &groups, &GrpoConfig { singleton, ..Default::default() });
        // {1,3}: mu 2, sigma sqrt(2) -> -+0.707106; the lone 5: verl's mean 0, std 1 -> 5 / (1 + 1e-6)
        let tol = tolerance(1e-5);
        assert_close(&per(&run(SingletonGroups::Reward).unwrap()), &[-FRAC_1_SQRT_2, FRAC_1_SQRT_2, 4.999995], tol);
        assert_close(&per(&run(SingletonGroups::Zero).unwrap()), &[-FRAC_1_SQRT_2, FRAC_1_SQRT_2, 0.0], tol);
        assert_eq!(
            run(SingletonGroups::Error).unwrap_err(),
            GoodhartError::GroupTooSmall { group: 7, size: 1, min: 2, method: "grpo".into() }
        );
    }
}

goodhart_core::backend_test! {
    fn dr_grpo_rloo_opo_gpg_by_hand<B>(device) {
        let tol = tolerance(1e-5);
        let groups = Groups::new(vec![0, 0, 0]).unwrap();
        let r = t1::<B>(&[1.0, 2.0, 6.0], device);
        let mask = ones::<B>(3, 2, device);
        // Dr.GRPO: mu = 3 -> -2, -1, 3
        let d = dr_grpo(r.clone(), &mask, &groups, &DrGrpoConfig::default()).unwrap();
        assert_close(&per(&d), &[-2.0, -1.0, 3.0], tol);
        // RLOO: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
        let l = rloo(r.clone(), &mask, &groups, &RlooConfig::default()).unwrap();
        assert_close(&per(&l), &[-3.0, -1.5, 4.5], tol);
        assert_close(&values(l.advantages), &[-3.0, -3.0, -1.5, -1.5, 4.5, 4.5], tol);
        // RLOO group of one: verl returns r; Zero returns 0.
        let lone = Groups::new(vec![0, 0, 1]).unwrap();
        let l = rloo(r.clone(), &mask, &lone, &RlooConfig::default()).unwrap();
        // {1,2}: 1 - 2 = -1, 2 - 1 = 1; lone 6 -> 6
        assert_close(&per(&l), &[-1.0, 1.0, 6.0], tol);
        let l = rloo(r.clone(), &mask, &lone, &RlooConfig { singleton: SingletonGroups::Zero }).unwrap();
        assert_close(&per(&l), &[-1.0, 1.0, 0.0], tol);

        // OPO: lengths 1 and 3, rewards 1 and 0: b = (1*1 + 3*0)/4 = 0.25 -> 0.75, -0.25
        let g2 = Groups::new(vec![3, 3]).unwrap();
        let mask2 = t2::<B>(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2, 3, device);
        let o = opo(t1::<B>(&[1.0, 0.0], device), &mask2, &g2, &OpoConfig::default()).unwrap();
        assert_close(&per(&o), &[0.75, -0.25], tol);
        assert_close(&values(o.advantages), &[0.75, 0.0, 0.0, -0.25, -0.25, -0.25], tol);

        // GPG: B = 4, two non-zero rewards -> alpha 2; group means 0.5 -> 2 * (+-0.5)
        let g4 = Groups::new(vec![0, 0, 1, 1]).unwrap();
        let r4 = t1::<B>(&[1.0, 0.0, 0.0, 1.0], device);
        let p = gpg(r4, &ones::<B>(4, 1, device), &g4, &GpgConfig::default()).unwrap();
        assert_close(&per(&p), &[1.0, -1.0, -1.0, 1.0], tol);
    }
}

goodhart_core::backend_test! {
    fn bnpo_by_hand<B>(device) {
        // Two groups: {1, 0} -> p = 0.5; {1, 1, 1, 0} -> p = 0.75. Over groups: m = 0.625,
        // v = (0.125^2 + 0.125^2)/2 = 0.015625, c = 0.625*0.375/0.015625 - 1 = 14,
        // alpha = 1 + 14*0.625/3 = 3.916667, beta = 1 + 14*0.375/3 = 2.75.
        let (a, b) = bnpo_beta_params(&[0.5, 0.75]);
        assert!((a - 3.916_666_7).abs() < 1e-6 && (b - 2.75).abs() < 1e-9, "{a} {b}");
        // (r - p) / BetaPDF(p; a, b), pdf from lgamma (Python math.lgamma):
        // pdf(0.5) = 1.76066, pdf(0.75) = 1.70794
        let groups = Groups::new(vec![0, 0, 1, 1, 1, 1]).unwrap();
        let r = t1::<B>(&[1.0, 0.0, 1.0, 1.0, 1.0, 0.0], device);
        let out = bnpo(r, &ones::<B>(6, 1, device), &groups, &BnpoConfig::default()).unwrap();
        let (x, y, z) = (0.283_983_7, 0.146_374_8, -0.439_124_5);
        assert_close(&per(&out), &[x, -x, y, y, y, z], tolerance(1e-5));
        // Rewards outside the range are refused; a degenerate batch is Beta(1, 1).
        assert_eq!(bnpo_beta_params(&[0.3]), (1.0, 1.0));
        let bad = bnpo(t1::<B>(&[2.0, 0.0], device), &ones::<B>(2, 1, device),
            &Groups::new(vec![0, 0]).unwrap(), &BnpoConfig::default());
        assert!(matches!(bad, Err(GoodhartError::InvalidArgument { .. })));
    }
}

goodhart_core::backend_test! {
    fn bnpo_weights_are_the_inverse_beta_density<B>(device) {
        // Success rates 1/4, 1/2, 3/4: A = (r - p_q) / pdf(p_q) under statrs' Beta with the
        // batch's method-of-moments parameters.
        use statrs::distribution::{Beta, Continuous};
        let r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0];
        let groups = Groups::new((0..12).map(|i| i / 4).collect::<Vec<u64>>()).unwrap();
        let (a, b) = bnpo_beta_params(&[0.25, 0.5, 0.75]);
        let beta = Beta::new(a, b).unwrap();
        let expected: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let p = [0.25, 0.5, 0.75][i / 4];
                ((x as f64 - p) / beta.pdf(p)) as f32
            })
            .collect();
        let out = bnpo(t1::<B>(&r, device), &ones::<B>(12, 1, device), &groups, &BnpoConfig::default()).unwrap();
        assert_close(&per(&out), &expected, tolerance(1e-5));
    }
}

goodhart_core::backend_test! {
    fn grpo_passk_by_hand<B>(device) {
        // group 0: {0.2, 0.9, 0.5}: best is 0.9, runner-up 0.5 -> gap 0.4;
        //   unbiased std: mean 0.5333, squared deviations 0.1111+0.1344+0.0011 = 0.2467 / 2
        //   -> 0.351188 -> 0.4 / 0.351189 = 1.138986
        // group 1: {1, 1}: tie -> 0 for both
        let groups = Groups::new(vec![0, 0, 0, 1, 1]).unwrap();
        let r = t1::<B>(&[0.2, 0.9, 0.5, 1.0, 1.0], device);
        let mask = ones::<B>(5, 1, device);
        let tol = tolerance(1e-5);
        let out = grpo_passk(r.clone(), &mask, &groups, &GrpoPasskConfig::default()).unwrap();
        assert_close(&per(&out), &[0.0, 1.138_986, 0.0, 0.0, 0.0], tol);
        let raw = GrpoPasskConfig { normalize: false, ..Default::default() };
        assert_close(&per(&grpo_passk(r.clone(), &mask, &groups, &raw).unwrap()), &[0.0, 0.4, 0.0, 0.0, 0.0], tol);
        let lone = Groups::new(vec![0, 0, 0, 1, 2]).unwrap();
        assert!(matches!(grpo_passk(r, &mask, &lone, &raw), Err(GoodhartError::GroupTooSmall { group: 1, .. })));
    }
}

goodhart_core::backend_test! {
    fn gdpo_by_hand<B>(device) {
        // components c1 = [1,0 | 1,0], c2 = [0,1 | 2,2], weights [1, 2], eps 1e-4.
        // within groups ({1,0} and {0,1}: mean 0.5, unbiased std 0.70711; {2,2}: std 0):
        // c1 -> +-k, c2 -> -+k | 0, 0 with k = 0.5/(0.70711 + 1e-4) = 0.707007
        // s = [k - 2k, -k + 2k, k, -k] = k [-1, 1, 1, -1]; batch mean 0, unbiased std k sqrt(4/3)
        // -> +-k / (1.1547 k + 1e-4) = +-0.865919
        let groups = Groups::new(vec![0, 0, 1, 1]).unwrap();
        let c = t2::<B>(&[1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 0.0, 2.0], 4, 2, device);
        let cfg = GdpoConfig { weights: vec![1.0, 2.0], ..Default::default() };
        let out = gdpo(c.clone(), &ones::<B>(4, 1, device), &groups, &cfg).unwrap();
        let x = 0.865_919_3;
        assert_close(&per(&out), &[-x, x, x, -x], tolerance(1e-5));
        let wrong = GdpoConfig { weights: vec![1.0], ..Default::default() };
        assert!(matches!(gdpo(c, &ones::<B>(4, 1, device), &groups, &wrong), Err(GoodhartError::ShapeMismatch { .. })));
    }
}

// ---------------------------------------------------------------- token level

goodhart_core::backend_test! {
    fn gae_by_hand<B>(device) {
        let tol = tolerance(1e-5);
        let r = t2::<B>(&[0.0, 0.0, 1.0], 1, 3, device);
        let v = t2::<B>(&[0.5, 0.6, 0.7], 1, 3, device);
        let mask = ones::<B>(1, 3, device);
        // gamma = lambda = 1: deltas 0.1, 0.1, 0.3 -> A = 0.5, 0.4, 0.3; returns A + V = 1, 1, 1
        let raw = GaeConfig { whiten: false, ..Default::default() };
        let out = gae(r.clone(), v.clone(), &mask, &raw).unwrap();
        assert_close(&values(out.advantages), &[0.5, 0.4, 0.3], tol);
        assert_close(&values(out.returns.unwrap()), &[1.0, 1.0, 1.0], tol);
        // whitened (default): mean 0.4, unbiased std 0.1 -> 1, 0, -1
        let out = gae(r.clone(), v.clone(), &mask, &GaeConfig::default()).unwrap();
        assert_close(&values(out.advantages), &[1.0, 0.0, -1.0], tolerance(1e-4));
        // gamma 0.9, lambda 0.5: t2: delta 0.3, A 0.3; t1: delta 0.9*0.7 - 0.6 = 0.03,
        // A = 0.03 + 0.45*0.3 = 0.165; t0: delta 0.9*0.6 - 0.5 = 0.04, A = 0.04 + 0.45*0.165 = 0.11425
        let cfg = GaeConfig { gamma: 0.9, lambda: 0.5, whiten: false, ..Default::default() };
        let out = gae(r, v, &mask, &cfg).unwrap();
        assert_close(&values(out.advantages), &[0.11425, 0.165, 0.3], tol);
        assert_close(&values(out.returns.unwrap()), &[0.61425, 0.765, 1.0], tol);
    }
}

goodhart_core::backend_test! {
    fn gae_multi_turn_carries_through_masked_tokens<B>(device) {
        // mask [1, 0, 1]: the middle token is tool output (NaN there must not matter).
        // gamma 0.9, lambda 0.5: t2: A = 1 - 0.7 = 0.3; t1 carries A = 0.3, V = 0.7;
        // t0: delta = 0.9*0.7 - 0.5 = 0.13, A = 0.13 + 0.45*0.3 = 0.265 (one discount, not two)
        let r = t2::<B>(&[0.0, f32::NAN, 1.0], 1, 3, device);
        let v = t2::<B>(&[0.5, f32::NAN, 0.7], 1, 3, device);
        let mask = t2::<B>(&[1.0, 0.0, 1.0], 1, 3, device);
        let cfg = GaeConfig { gamma: 0.9, lambda: 0.5, whiten: false, ..Default::default() };
        let out = gae(r, v, &mask, &cfg).unwrap();
        let tol = tolerance(1e-5);
        assert_close(&values(out.advantages), &[0.265, 0.0, 0.3], tol);
        assert_close(&values(out.returns.unwrap()), &[0.765, 0.0, 1.0], tol);
    }
}

goodhart_core::backend_test! {
    fn reinforce_family_and_remax_by_hand<B>(device) {
        let tol = tolerance(1e-5);
        let r = t2::<B>(&[1.0, 2.0, 4.0], 1, 3, device);
        let mask = ones::<B>(1, 3, device);
        // gamma 0.5: G2 = 4, G1 = 2 + 2 = 4, G0 = 1 + 2 = 3
        let out = reinforce(r.clone(), &mask, &ReinforceConfig { gamma: 0.5 }).unwrap();
        assert_close(&values(out.advantages), &[3.0, 4.0, 4.0], tol);
        // REINFORCE++: whiten [3, 4, 4]: mean 11/3, unbiased var (4/9 + 1/9 + 1/9)/2 = 1/3
        // -> (-2/3, 1/3, 1/3) / 0.57735 = -1.1547, 0.57735, 0.57735
        let cfg = ReinforcePlusPlusConfig { gamma: 0.5, ..Default::default() };
        let out = reinforce_plus_plus(r.clone(), &mask, &cfg).unwrap();
        assert_close(&values(out.advantages), &[-1.154_7, 0.577_350, 0.577_350], tolerance(1e-4));
        assert_close(&values(out.returns.unwrap()), &[3.0, 4.0, 4.0], tol);
        // ReMax: reward-to-go [7, 6, 4] minus the greedy reward 5 -> 2, 1, -1
        let out = remax(r, t1::<B>(&[5.0], device), &mask, &RemaxConfig {}).unwrap();
        assert_close(&values(out.advantages), &[2.0, 1.0, -1.0], tol);
        assert_close(&values(out.returns.unwrap()), &[7.0, 6.0, 4.0], tol);

        // REINFORCE++-baseline: {1, 3} centred -1, +1; tokens: row 0 has 2, row 1 has 1:
        // [-1, -1, 1]: mean -1/3, unbiased var (4/9+4/9+16/9)/2 = 4/3 -> std 1.1547
        // -> -0.57735, -0.57735, 1.1547
        let mask = t2::<B>(&[1.0, 1.0, 1.0, 0.0], 2, 2, device);
        let out = reinforce_plus_plus_baseline(t1::<B>(&[1.0, 3.0], device), &mask,
            &Groups::new(vec![0, 0]).unwrap(), &ReinforcePlusPlusBaselineConfig::default()).unwrap();
        assert_close(&values(out.advantages), &[-0.577_350, -0.577_350, 1.154_7, 0.0], tolerance(1e-4));
    }
}

// ---------------------------------------------------------------- multi-turn, multi-reward

goodhart_core::backend_test! {
    fn gra_by_hand<B>(device) {
        // R = outcome + 1[outcome >= 1] * sum of valid steps:
        // [1 + 0.2 + 0.3, 0 (gated), 1 + 0.1] = [1.5, 0, 1.1]; with scale none: mean 2.6/3
        let outcome = t1::<B>(&[1.0, 0.0, 1.0], device);
        let steps = t2::<B>(&[0.2, 0.3, 0.5, 0.5, 0.1, f32::NAN], 3, 2, device);
        let step_mask = t2::<B>(&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], 3, 2, device);
        let groups = Groups::new(vec![0, 0, 0]).unwrap();
        let cfg = GraConfig { grpo: GrpoConfig { scale: GrpoScale::None, ..Default::default() }, ..Default::default() };
        let out = gra(outcome, steps, &step_mask, &ones::<B>(3, 1, device), &groups, &cfg).unwrap();
        let mu = 2.6 / 3.0;
        assert_close(&per(&out), &[1.5 - mu, -mu, 1.1 - mu], tolerance(1e-5));
    }
}

goodhart_core::backend_test! {
    fn a2tgpo_by_hand<B>(device) {
        // responses 0, 1 share a prompt; response 2 is alone. Turn signals:
        // turn 0 {1, 3}: mu 2, sigma sqrt(2) -> -+0.707106; turn 1 {2, 6}: -+0.707106.
        // gamma 0.5, rescaled: A1 = z1 / sqrt(1); A0 = (z0 + 0.5 z1) / sqrt(2) = -+0.75
        // response 2: (prompt, turn) groups of one -> 0 (default Zero).
        let groups = Groups::new(vec![0, 0, 1]).unwrap();
        let signal = t2::<B>(&[1.0, 2.0, 3.0, 6.0, 9.0, f32::NAN], 3, 2, device);
        let turn_mask = t2::<B>(&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], 3, 2, device);
        let token_turn = ti::<B>(&[0, 0, 1, 0, 1, 1, 0, -1, -1], 3, 3, device);
        let mask = t2::<B>(&[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 3, 3, device);
        let cfg = A2tgpoConfig { gamma: 0.5, alpha: 1.0, outcome: false, ..Default::default() };
        let out = a2tgpo(None, signal.clone(), &turn_mask, &token_turn, &mask, &groups, &cfg).unwrap();
        let (a0, a1) = (0.75, FRAC_1_SQRT_2);
        assert_close(&values(out.advantages), &[-a0, -a0, -a1, a0, a1, a1, 0.0, 0.0, 0.0], tolerance(1e-5));
        // With the outcome (the method's default alpha 0.3): outcomes {1, 0} of prompt 0
        // z-score to +-1/sqrt(2) (mean 0.5, unbiased sd sqrt(0.5)); response 2 is alone
        // (GRPO's singleton rule keeps its reward 0.5). A = 0.3 S_k + A_out.
        let outcome = t1::<B>(&[1.0, 0.0, 0.5], device);
        let cfg = A2tgpoConfig { gamma: 0.5, ..Default::default() };
        let out = a2tgpo(Some(outcome), signal, &turn_mask, &token_turn, &mask, &groups, &cfg).unwrap();
        let o = FRAC_1_SQRT_2;
        let (b0, b1) = (0.3 * a0, 0.3 * a1);
        assert_close(
            &values(out.advantages),
            &[o - b0, o - b0, o - b1, -o + b0, -o + b1, -o + b1, 0.5, 0.0, 0.0],
            tolerance(1e-5),
        );
        // a token naming a turn that does not exist is an error
        let bad = ti::<B>(&[0, 0, 5, 0, 1, 1, 0, -1, -1], 3, 3, device);
        let t = t2::<B>(&[1.0, 2.0, 3.0, 6.0, 9.0, 0.0], 3, 2, device);
        assert!(matches!(a2tgpo(None, t, &turn_mask, &bad, &mask, &groups, &cfg), Err(GoodhartError::InvalidArgument { .. })));
    }
}

goodhart_core::backend_test! {
    fn igpo_by_hand<B>(device) {
        // p = [0.1, 0.4, 0.9] and [0.1, 0.2, 0.3]; outcomes 1 and 0.
        // turn rewards: gain on turn 0, outcome on the last turn: [0.3, 1] and [0.1, 0]
        // pooled over the group: mean 0.35, unbiased std sqrt(0.61/3) = 0.450925
        // z = [-0.110883, 1.441478 | -0.554415, -0.776181]; gamma 1: A0 = z0 + z1
        let groups = Groups::new(vec![0, 0]).unwrap();
        let p = t2::<B>(&[0.1, 0.4, 0.9, 0.1, 0.2, 0.3], 2, 3, device);
        let turn_mask = ones::<B>(2, 2, device);
        let token_turn = ti::<B>(&[0, 1, 0, 1], 2, 2, device);
        let out = igpo(p, t1::<B>(&[1.0, 0.0], device), &turn_mask, &token_turn,
            &ones::<B>(2, 2, device), &groups, &IgpoConfig::default()).unwrap();
        assert_close(&values(out.advantages), &[1.330_595, 1.441_478, -1.330_595, -0.776_181], tolerance(1e-5));
    }
}

goodhart_core::backend_test! {
    fn verpo_by_hand<B>(device) {
        // two responses, two tests: passed [1, 0] and [1, 1] -> pass rates [1, 0.5]
        // -> weights [0, 0.5] -> dense [0/0.5, 0.5/0.5] = [0, 1]; outcomes [0, 1]
        // -> R = [0, 2] -> GRPO: mu 1, sigma sqrt(2) -> -+0.707106
        let groups = Groups::new(vec![0, 0]).unwrap();
        let passed = t2::<B>(&[1.0, 0.0, 1.0, 1.0], 2, 2, device);
        let out = verpo(t1::<B>(&[0.0, 1.0], device), passed, &ones::<B>(2, 2, device),
            &ones::<B>(2, 1, device), &groups, &VerpoConfig::default()).unwrap();
        assert_close(&per(&out), &[-FRAC_1_SQRT_2, FRAC_1_SQRT_2], tolerance(1e-5));
    }
}

// ---------------------------------------------------------------- entry point and errors

goodhart_core::backend_test! {
    fn entry_point_derives_outcome_and_token_rewards<B>(device) {
        let groups = Groups::new(vec![0, 0]).unwrap();
        let mask = t2::<B>(&[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 2, 3, device);
        // token rewards with garbage under the mask: outcomes 3 and 1
        let tok = t2::<B>(&[1.0, 2.0, f32::NAN, 1.0, 9.0, f32::INFINITY], 2, 3, device);
        let input = AdvantageInput::new(mask.clone(), &groups).with_token_rewards(tok);
        let out = compute(&AdvantageConfig::DrGrpo(DrGrpoConfig::default()), &input).unwrap();
        assert_close(&values(out.advantages), &[1.0, 1.0, 0.0, -1.0, 0.0, 0.0], tolerance(1e-6));
        // outcome rewards go to the last valid token for token-level estimators
        let input = AdvantageInput::new(mask, &groups).with_rewards(t1::<B>(&[3.0, 1.0], device));
        let out = compute(&AdvantageConfig::Reinforce(ReinforceConfig::default()), &input).unwrap();
        assert_close(&values(out.advantages), &[3.0, 3.0, 0.0, 1.0, 0.0, 0.0], tolerance(1e-6));
        // a missing input is named
        let err = compute(&AdvantageConfig::Gae(GaeConfig::default()), &input).unwrap_err();
        assert!(err.to_string().contains("values"), "{err}");
        let err = compute(&AdvantageConfig::Remax(RemaxConfig {}), &input).unwrap_err();
        assert!(err.to_string().contains("baseline_rewards"), "{err}");
    }
}

goodhart_core::backend_test! {
    fn bad_input_is_a_typed_error<B>(device) {
        let groups = Groups::new(vec![0, 0, 1]).unwrap();
        let mask = ones::<B>(3, 2, device);
        let outcome_kinds = ["grpo", "rloo", "dr_grpo", "bnpo", "opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline"];
        for kind in outcome_kinds {
            // grpo_passk always refuses groups of one; the others are told to.
            let extra = if kind == "grpo_passk" { "" } else { "\nsingleton = \"error\"" };
            let cfg: AdvantageConfig = toml::from_str(&format!("kind = \"{kind}\"{extra}")).unwrap();
            // length mismatch
            let short = AdvantageInput::new(mask.clone(), &groups).with_rewards(t1::<B>(&[1.0, 0.0], device));
            assert!(matches!(compute(&cfg, &short), Err(GoodhartError::ShapeMismatch { .. })), "{kind}");
            // NaN reward
            let nan = AdvantageInput::new(mask.clone(), &groups).with_rewards(t1::<B>(&[1.0, f32::NAN, 0.0], device));
            assert!(matches!(compute(&cfg, &nan), Err(GoodhartError::NonFinite { .. })), "{kind}");
            // group of one under `singleton = "error"` (pass@k always refuses it)
            let ok = AdvantageInput::new(mask.clone(), &groups).with_rewards(t1::<B>(&[1.0, 0.0, 0.5], device));
            assert!(matches!(compute(&cfg, &ok), Err(GoodhartError::GroupTooSmall { group: 1, .. })), "{kind}");
            // mask rows do not match
            let rows = AdvantageInput::new(ones::<B>(2, 2, device), &groups).with_rewards(t1::<B>(&[1.0, 0.0, 0.5], device));
            assert!(matches!(compute(&cfg, &rows), Err(GoodhartError::ShapeMismatch { .. })), "{kind}");
        }
        // token-level: NaN at a valid position, shape mismatch, bad gamma
        let nan = t2::<B>(&[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0], 3, 2, device);
        assert!(matches!(reinforce(nan, &mask, &ReinforceConfig::default()), Err(GoodhartError::NonFinite { .. })));
        let wide = ones::<B>(3, 3, device);
        assert!(matches!(gae(wide.clone(), wide, &mask, &GaeConfig::default()), Err(GoodhartError::ShapeMismatch { .. })));
        let z = Tensor::<B, 2>::zeros([3, 2], device);
        assert!(matches!(gae(z.clone(), z, &mask, &GaeConfig { gamma: 1.5, ..Default::default() }), Err(GoodhartError::InvalidArgument { .. })));
        // eps must be > 0
        let r = t1::<B>(&[1.0, 0.0, 0.5], device);
        assert!(matches!(grpo(r, &mask, &groups, &GrpoConfig { eps: 0.0, ..Default::default() }), Err(GoodhartError::InvalidArgument { .. })));
    }
}

// ---------------------------------------------------------------- invariants (proptest)

/// Random groups (ids shuffled, sizes 2..=5) with rewards in [-5, 5].
fn grouped_rewards() -> impl Strategy<Value = (Vec<u64>, Vec<f32>)> {
    prop::collection::vec(2usize..=5, 1..6).prop_flat_map(|sizes| {
        let ids: Vec<u64> = sizes
            .iter()
            .enumerate()
            .flat_map(|(g, &s)| std::iter::repeat_n(g as u64 * 7 + 3, s))
            .collect();
        let n = ids.len();
        (
            Just(ids).prop_shuffle(),
            prop::collection::vec(-5.0f32..5.0, n),
        )
    })
}

fn group_members(ids: &[u64]) -> std::collections::BTreeMap<u64, Vec<usize>> {
    let mut m = std::collections::BTreeMap::<u64, Vec<usize>>::new();
    for (i, &g) in ids.iter().enumerate() {
        m.entry(g).or_default().push(i);
    }
    m
}

goodhart_core::backend_test! {
    fn grpo_sums_to_zero_and_rloo_leaves_one_out<B>(device) {
        let mut runner = TestRunner::new(Config { cases: 48, ..Default::default() });
        let tol = tolerance(1e-3);
        runner.run(&grouped_rewards(), |(ids, r)| {
            let groups = Groups::new(ids.clone()).unwrap();
            let mask = ones::<B>(r.len(), 1, device);
            let a = per(&grpo(t1::<B>(&r, device), &mask, &groups, &GrpoConfig::default()).unwrap());
            let l = per(&rloo(t1::<B>(&r, device), &mask, &groups, &RlooConfig::default()).unwrap());
            for members in group_members(&ids).values() {
                let sum: f32 = members.iter().map(|&i| a[i]).sum();
                prop_assert!(sum.abs() < tol, "GRPO group sum {sum}");
                let total: f32 = members.iter().map(|&i| r[i]).sum();
                for &i in members {
                    let others = (total - r[i]) / (members.len() - 1) as f32;
                    prop_assert!((l[i] - (r[i] - others)).abs() < tol, "RLOO {} vs {}", l[i], r[i] - others);
                }
            }
            Ok(())
        }).unwrap();
    }
}

goodhart_core::backend_test! {
    fn bnpo_with_beta_one_one_is_r_minus_group_mean<B>(device) {
        // Every group holds a permutation of the same rewards, so all p_q are equal, the
        // batch variance is 0 and the fit is Beta(1, 1): A = r - p_q.
        let strategy = (prop::collection::vec(0.0f32..=1.0, 2..6), 1usize..5, any::<u64>());
        let mut runner = TestRunner::new(Config { cases: 32, ..Default::default() });
        runner.run(&strategy, |(base, g, seed)| {
            let mut ids = Vec::new();
            let mut r = Vec::new();
            for k in 0..g {
                let rot = (seed as usize + k) % base.len();
                r.extend(base[rot..].iter().chain(&base[..rot]));
                ids.extend(std::iter::repeat_n(k as u64, base.len()));
            }
            let groups = Groups::new(ids).unwrap();
            let out = bnpo(t1::<B>(&r, device), &ones::<B>(r.len(), 1, device), &groups, &BnpoConfig::default()).unwrap();
            let mean = base.iter().sum::<f32>() / base.len() as f32;
            let expected: Vec<f32> = r.iter().map(|x| x - mean).collect();
            assert_close(&per(&out), &expected, tolerance(1e-5));
            Ok(())
        }).unwrap();
    }
}

/// Rows of `t` tokens: rewards, values and a prefix-or-holey mask (first token valid).
fn token_batch() -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<f32>, Vec<bool>)> {
    (1usize..5, 1usize..7).prop_flat_map(|(n, t)| {
        (
            Just(n),
            Just(t),
            prop::collection::vec(-2.0f32..2.0, n * t),
            prop::collection::vec(-2.0f32..2.0, n * t),
            prop::collection::vec(any::<bool>(), n * t),
        )
    })
}

goodhart_core::backend_test! {
    fn gae_with_unit_discounts_is_reward_to_go_minus_values<B>(device) {
        let mut runner = TestRunner::new(Config { cases: 48, ..Default::default() });
        runner.run(&token_batch(), |(n, t, r, v, m)| {
            let mask: Vec<f32> = m.iter().map(|&b| b as u8 as f32).collect();
            let cfg = GaeConfig { whiten: false, ..Default::default() };
            let out = gae(t2::<B>(&r, n, t, device), t2::<B>(&v, n, t, device), &t2::<B>(&mask, n, t, device), &cfg).unwrap();
            let (a, ret) = (values(out.advantages), values(out.returns.unwrap()));
            for i in 0..n {
                for j in 0..t {
                    let k = i * t + j;
                    if mask[k] == 0.0 {
                        prop_assert!(a[k] == 0.0 && ret[k] == 0.0);
                        continue;
                    }
                    // reward-to-go over the valid tokens from j on
                    let togo: f32 = (j..t).filter(|&s| mask[i * t + s] != 0.0).map(|s| r[i * t + s]).sum();
                    prop_assert!((ret[k] - togo).abs() < tolerance(1e-4), "return {} vs {}", ret[k], togo);
                    prop_assert!((a[k] - (ret[k] - v[k])).abs() < tolerance(1e-4));
                }
            }
            Ok(())
        }).unwrap();
    }
}

/// Runs `kind` through the entry point on a token batch.
fn run_kind<B: Backend>(
    kind: &str,
    groups: &Groups,
    tok: Tensor<B, 2>,
    values: Tensor<B, 2>,
    mask: Tensor<B, 2>,
) -> Vec<f32> {
    let cfg: AdvantageConfig = toml::from_str(&format!("kind = \"{kind}\"")).unwrap();
    let n = mask.dims()[0];
    let device = mask.device();
    let input = AdvantageInput::new(mask, groups)
        .with_token_rewards(tok)
        .with_values(values)
        .with_baseline_rewards(Tensor::ones([n], &device));
    goodhart_core::testing::values(compute(&cfg, &input).unwrap().advantages)
}

goodhart_core::backend_test! {
    fn masked_positions_never_matter<B>(device) {
        // Same valid entries, padding filled with 0 or with NaN / garbage: same output.
        let kinds = ["gae", "reinforce", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
            "rloo", "grpo", "dr_grpo", "opo", "remax", "gpg"];
        let mut runner = TestRunner::new(Config { cases: 16, ..Default::default() });
        runner.run(&token_batch(), |(n, t, r, v, m)| {
            let mut mask: Vec<f32> = m.iter().map(|&b| b as u8 as f32).collect();
            for i in 0..n { mask[i * t] = 1.0; }
            let groups = Groups::new((0..n as u64).map(|i| i / 2).collect::<Vec<_>>()).unwrap();
            let fill = |x: &[f32], with: f32| -> Vec<f32> {
                x.iter().zip(&mask).map(|(&a, &mk)| if mk == 0.0 { with } else { a }).collect()
            };
            for kind in kinds {
                let clean = run_kind::<B>(kind, &groups, t2::<B>(&fill(&r, 0.0), n, t, device),
                    t2::<B>(&fill(&v, 0.0), n, t, device), t2::<B>(&mask, n, t, device));
                let dirty = run_kind::<B>(kind, &groups, t2::<B>(&fill(&r, f32::NAN), n, t, device),
                    t2::<B>(&fill(&v, 1e30), n, t, device), t2::<B>(&mask, n, t, device));
                prop_assert!(clean.iter().all(|x| x.is_finite()), "{kind}: {clean:?}");
                assert_close(&dirty, &clean, 0.0);
            }
            Ok(())
        }).unwrap();
    }
}

goodhart_core::backend_test! {
    fn permuting_responses_with_their_groups_permutes_the_result<B>(device) {
        let kinds = ["grpo", "rloo", "dr_grpo", "gpg", "opo", "bnpo", "reinforce_plus_plus_baseline"];
        let strategy = grouped_rewards().prop_flat_map(|(ids, r)| {
            let n = ids.len();
            (Just(ids), Just(r), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        });
        let mut runner = TestRunner::new(Config { cases: 24, ..Default::default() });
        runner.run(&strategy, |(ids, r, perm)| {
            let n = ids.len();
            // BNPO needs rewards in [0, 1]
            let r: Vec<f32> = r.iter().map(|x| (x + 5.0) / 10.0).collect();
            let p_ids: Vec<u64> = perm.iter().map(|&i| ids[i]).collect();
            let p_r: Vec<f32> = perm.iter().map(|&i| r[i]).collect();
            let (g, pg) = (Groups::new(ids).unwrap(), Groups::new(p_ids).unwrap());
            for kind in kinds {
                let cfg: AdvantageConfig = toml::from_str(&format!("kind = \"{kind}\"")).unwrap();
                let mask = ones::<B>(n, 1, device);
                let a = values(compute(&cfg, &AdvantageInput::new(mask.clone(), &g).with_rewards(t1::<B>(&r, device))).unwrap().advantages);
                let b = values(compute(&cfg, &AdvantageInput::new(mask, &pg).with_rewards(t1::<B>(&p_r, device))).unwrap().advantages);
                let expected: Vec<f32> = perm.iter().map(|&i| a[i]).collect();
                assert_close(&b, &expected, tolerance(1e-4));
            }
            Ok(())
        }).unwrap();
    }
}

// ---------------------------------------------------------------- registry / TOML

#[test]
fn every_registry_name_deserialises_from_toml() {
    for m in REGISTRY {
        let cfg: AdvantageConfig = toml::from_str(&format!("kind = \"{}\"", m.name))
            .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        assert_eq!(cfg.name(), m.name);
        // and round-trips
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(
            toml::from_str::<AdvantageConfig>(&text).unwrap(),
            cfg,
            "{text}"
        );
        assert!(!m.summary.is_empty() && !m.source.is_empty());
    }
    assert_eq!(REGISTRY.len(), 18);
}

#[test]
fn toml_picks_settings_and_rejects_unknown_kinds_and_keys() {
    let cfg: AdvantageConfig =
        toml::from_str("kind = \"grpo\"\nscale = \"batch\"\neps = 1e-4\nsingleton = \"zero\"")
            .unwrap();
    assert_eq!(
        cfg,
        AdvantageConfig::Grpo(GrpoConfig {
            scale: GrpoScale::Batch,
            eps: 1e-4,
            unbiased_std: true,
            singleton: SingletonGroups::Zero
        })
    );
    let cfg: AdvantageConfig =
        toml::from_str("kind = \"gra\"\ndelta = 0.5\n[grpo]\nscale = \"none\"").unwrap();
    assert!(
        matches!(cfg, AdvantageConfig::Gra(GraConfig { delta, grpo: GrpoConfig { scale: GrpoScale::None, .. } }) if delta == 0.5)
    );
    let err = toml::from_str::<AdvantageConfig>("kind = \"ppo_magic\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown variant") && err.contains("grpo") && err.contains("rloo"),
        "{err}"
    );
    let err = toml::from_str::<AdvantageConfig>("kind = \"grpo\"\nepsilon = 1e-4")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown field") && err.contains("epsilon"),
        "{err}"
    );
    assert_eq!(AdvantageConfig::default().name(), "grpo");
}

/// verl 0.9.1's outputs (`fixtures/verl_0_9_1.json`, written by
/// `../goodhart-objective/fixtures/verl_0_9_1.py` from the verl wheel).
fn verl_fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("../fixtures/verl_0_9_1.json")).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

goodhart_core::backend_test! {
    fn optimal_token_baseline_matches_verl<B>(device) {
        let f = verl_fixture();
        let (n, t) = (f["n"].as_u64().unwrap() as usize, f["t"].as_u64().unwrap() as usize);
        let ids: Vec<u64> = f["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().as_bytes()[0] as u64).collect();
        let groups = Groups::new(ids).unwrap();
        let m = |k: &str| t2::<B>(&floats(&f[k]), n, t, device);
        for case in f["otb"].as_array().unwrap() {
            let cfg = OptimalTokenBaselineConfig { handle_zero_tail: case["handle_zero_tail"].as_bool().unwrap(), ..Default::default() };
            let w = case["weighted"].as_bool().unwrap().then(|| m("rollout_is_weights"));
            let out = optimal_token_baseline(m("token_rewards"), m("logp_old"), m("sum_pi_squared"), w, &m("mask"), &groups, &cfg).unwrap();
            assert_close(&values(out.advantages), &floats(&case["advantages"]), tolerance(2e-5));
            assert_close(&values(out.returns.unwrap()), &floats(&case["returns"]), tolerance(2e-5));
        }
        // Through the registry: the estimator names what it misses.
        let cfg: AdvantageConfig = toml::from_str("kind = \"optimal_token_baseline\"").unwrap();
        let input = AdvantageInput::new(m("mask"), &groups).with_token_rewards(m("token_rewards"));
        let err = cfg.compute(&input).unwrap_err().to_string();
        assert!(err.contains("logp_old"), "{err}");
        let out = cfg.compute(&input.with_policy_stats(m("logp_old"), m("sum_pi_squared"))).unwrap();
        assert_close(&values(out.advantages), &floats(&f["otb"][0]["advantages"]), tolerance(2e-5));
    }
}

goodhart_core::backend_test! {
    fn optimal_token_baseline_by_hand<B>(device) {
        // One group of two, lengths 2 and 1; outcome 1 and 0 on the last tokens; pi = 0.5
        // and sum pi^2 = 0.5 everywhere, so w = 1 - 1 + 0.5 = 0.5 and W = 0.5, 1.0 | 0.5.
        // G = 1, 1 | 0. B_0 = (1 * 0.5 + 0 * 0.5) / 1.0 = 0.5; B_1 = 1 * 1.0 / 1.0 = 1,
        // but position 1 lies past the second-longest length (1): no baseline there.
        let mask = t2::<B>(&[1.0, 1.0, 1.0, 0.0], 2, 2, device);
        let rewards = t2::<B>(&[0.0, 1.0, 0.0, f32::NAN], 2, 2, device);
        let lp = t2::<B>(&[0.5f32.ln(); 4], 2, 2, device);
        let sp = t2::<B>(&[0.5; 4], 2, 2, device);
        let groups = Groups::new(vec![7, 7]).unwrap();
        let run = |tail: bool| {
            let cfg = OptimalTokenBaselineConfig { handle_zero_tail: tail, ..Default::default() };
            values(optimal_token_baseline(rewards.clone(), lp.clone(), sp.clone(), None, &mask, &groups, &cfg).unwrap().advantages)
        };
        assert_close(&run(true), &[0.5, 1.0, -0.5, 0.0], tolerance(1e-6));
        assert_close(&run(false), &[0.5, 0.0, -0.5, 0.0], tolerance(1e-6));
        // A group of one: no baseline, A = G.
        let lone = Groups::new(vec![1, 2]).unwrap();
        let out = optimal_token_baseline(rewards, lp, sp, None, &mask, &lone, &OptimalTokenBaselineConfig::default()).unwrap();
        assert_close(&values(out.advantages), &[1.0, 1.0, 0.0, 0.0], tolerance(1e-6));
    }
}

goodhart_core::backend_test! {
    fn a_reward_on_a_masked_token_counts_as_in_verl_only_through_with_rewards<B>(device) {
        // verl's GRPO scores each response by token_level_rewards.sum(-1), masked positions
        // included; goodhart's token-reward route sums the counted tokens only. The two
        // differ when a reward sits on a masked (tool-output) token; summing every position
        // and passing it as `rewards` reproduces verl.
        let f = verl_fixture();
        let (n, t) = (f["n"].as_u64().unwrap() as usize, f["t"].as_u64().unwrap() as usize);
        let ids: Vec<u64> = f["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().as_bytes()[0] as u64).collect();
        let groups = Groups::new(ids).unwrap();
        let g = &f["grpo"];
        let mask = t2::<B>(&floats(&g["mask"]), n, t, device);
        let rewards = t2::<B>(&floats(&g["token_rewards"]), n, t, device);
        let cfg = AdvantageConfig::default();
        let verl = floats(&g["advantages"]);
        let all_positions = AdvantageInput::new(mask.clone(), &groups).with_rewards(rewards.clone().sum_dim(1).reshape([n]));
        assert_close(&values(cfg.compute(&all_positions).unwrap().advantages), &verl, tolerance(1e-5));
        let counted = AdvantageInput::new(mask.clone(), &groups).with_token_rewards(rewards);
        let ours = values(cfg.compute(&counted).unwrap().advantages);
        // Response 0 (the one with the masked reward) and its group differ.
        assert!((ours[0] - verl[0]).abs() > 0.1, "{} vs {}", ours[0], verl[0]);
        // The other groups agree.
        assert_close(&ours[3 * t..], &verl[3 * t..], tolerance(1e-5));
    }
}

goodhart_core::backend_test! {
    /// A failure the permutation proptest found: two groups whose success rates differ by
    /// about 1e-4 make BNPO's Beta fit so sharp (alpha and beta near 1e7) that `1 / pdf`
    /// computed in f32 gave one group or the other the 1e6 clamp depending on the order of
    /// the groups. In f64 both orders agree.
    fn bnpo_with_nearly_equal_group_rates_is_order_free<B>(device) {
        let ids: Vec<u64> = vec![3, 3, 3, 3, 10, 10, 3, 10, 10, 10];
        let raw = [1.7082431f32, -1.3197047, 4.148659, -0.90979975, -0.06917135, -4.384835, -3.9023075, 2.4225545, -1.8365808, 3.5928533];
        let r: Vec<f32> = raw.iter().map(|x| (x + 5.0) / 10.0).collect();
        let perm = [5usize, 1, 2, 8, 9, 3, 7, 6, 0, 4];
        let p_ids: Vec<u64> = perm.iter().map(|&i| ids[i]).collect();
        let p_r: Vec<f32> = perm.iter().map(|&i| r[i]).collect();
        let cfg: AdvantageConfig = toml::from_str("kind = \"bnpo\"").unwrap();
        let (g, pg) = (Groups::new(ids).unwrap(), Groups::new(p_ids).unwrap());
        let a = values(compute(&cfg, &AdvantageInput::new(ones::<B>(10, 1, device), &g).with_rewards(t1::<B>(&r, device))).unwrap().advantages);
        let b = values(compute(&cfg, &AdvantageInput::new(ones::<B>(10, 1, device), &pg).with_rewards(t1::<B>(&p_r, device))).unwrap().advantages);
        let expected: Vec<f32> = perm.iter().map(|&i| a[i]).collect();
        assert_close(&b, &expected, tolerance(1e-4));
    }
}
