//! GRPO and RLOO advantages of your own rewards: two prompts, four responses each, one
//! reward per response.
//!
//! ```text
//! cargo build --workspace --examples && target/debug/examples/own_rewards
//! ```

use burn::tensor::{Tensor, TensorData};
use goodhart_advantage::{
    grpo::{grpo, GrpoConfig},
    rloo::{rloo, RlooConfig},
    AdvantageOutput, Groups,
};
use goodhart_core::device::{cpu, Dispatch};

type B = Dispatch;

fn per_response(out: AdvantageOutput<B>) -> Vec<f32> {
    let adv = out
        .per_response
        .expect("outcome estimators give one value per response");
    adv.into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 data")
}

fn main() -> goodhart_core::Result<()> {
    let device = cpu();
    // Responses 0-3 answer prompt 0, responses 4-7 prompt 1.
    let rewards = vec![1.0f32, 0.0, 0.0, 1.0, 0.2, 0.4, 0.6, 0.8];
    let groups = Groups::contiguous(2, 4)?;
    let r = Tensor::<B, 1>::from_data(TensorData::new(rewards.clone(), [8]), &device);
    // An outcome reward on a one-token view of each response: the mask is all ones.
    let mask = Tensor::<B, 2>::ones([8, 1], &device);

    let grpo_adv = per_response(grpo(r.clone(), &mask, &groups, &GrpoConfig::default())?);
    let rloo_adv = per_response(rloo(r, &mask, &groups, &RlooConfig::default())?);
    println!("reward   GRPO     RLOO");
    for i in 0..8 {
        println!("{:6.2} {:7.4} {:8.4}", rewards[i], grpo_adv[i], rloo_adv[i]);
    }

    // By hand. GRPO: (r - mean) / (std + 1e-6), the unbiased std of the group; group 0
    // has mean 0.5 and std sqrt(1/3). RLOO: r minus the mean of the group's other three.
    let grpo0 = 0.5 / ((1.0f32 / 3.0).sqrt() + 1e-6);
    assert!((grpo_adv[0] - grpo0).abs() < 1e-4, "{grpo_adv:?}");
    assert!(
        (rloo_adv[0] - (1.0 - 1.0 / 3.0)).abs() < 1e-5,
        "{rloo_adv:?}"
    );
    assert!((rloo_adv[7] - (0.8 - 0.4)).abs() < 1e-5, "{rloo_adv:?}");
    Ok(())
}
