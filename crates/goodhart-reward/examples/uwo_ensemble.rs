//! A reward ensemble of your own scorers, combined by uncertainty-weighted optimisation
//! (UWO, Coste et al.): `mean_k r_k - lambda Var_k(r_k)`, so responses the members
//! disagree on are rewarded less.
//!
//! ```text
//! cargo build --workspace --examples && target/debug/examples/uwo_ensemble
//! ```

use burn::tensor::Tensor;
use goodhart_core::device::{cpu, Dispatch};
use goodhart_reward::{source::FnReward, Aggregator, RewardEnsemble, RewardSource, Sequences};

type B = Dispatch;

/// A scorer that rewards a response's length at `per_token` per token (a stand-in for a
/// reward model: three of them that agree on short responses and not on long ones).
fn length_scorer(
    per_token: f32,
) -> FnReward<impl Fn(&Sequences<B>) -> goodhart_core::Result<Tensor<B, 1>>> {
    FnReward::new(format!("len x{per_token}"), move |s: &Sequences<B>| {
        let [n, _] = s.response_mask.dims();
        Ok(s.response_mask.clone().sum_dim(1).reshape([n]) * per_token)
    })
}

fn main() -> goodhart_core::Result<()> {
    let device = cpu();
    // Three prompts' responses of 1, 2 and 4 tokens (ids are arbitrary here).
    let pairs: Vec<(&[u32], &[u32])> = vec![
        (&[1, 5], &[7]),
        (&[1, 6], &[7, 8]),
        (&[1, 5], &[7, 8, 9, 10]),
    ];
    let batch = Sequences::<B>::from_pairs(&pairs, 0, &device)?;
    let members = vec![length_scorer(0.5), length_scorer(1.0), length_scorer(1.5)];
    let uwo = RewardEnsemble::new(
        "proxy",
        members,
        Aggregator::Uwo {
            lambda: 0.5,
            unbiased: false,
        },
    )?;
    let out = uwo.score(&batch)?;
    let reward: Vec<f32> = out
        .reward
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");
    let scores = out.members.expect("an ensemble reports its members");
    println!("members [K, N]: {}", scores);
    println!("UWO reward:     {reward:.4?}");

    // By hand: a response of L tokens gets 0.5 L, L, 1.5 L: mean L, population variance
    // L^2 / 6, so UWO = L - 0.5 L^2 / 6 = L - L^2 / 12.
    for (r, len) in reward.iter().zip([1.0f32, 2.0, 4.0]) {
        assert!((r - (len - len * len / 12.0)).abs() < 1e-5, "{reward:?}");
    }
    Ok(())
}
