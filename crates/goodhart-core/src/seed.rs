//! One seeding story for the whole toolkit.
//!
//! Every random stream (sampling, data order, initialisation, environment noise) is a
//! [`ChaCha8Rng`] derived from the experiment seed and the stream's name, so adding a new
//! stream never shifts the numbers of another. Tensor-side randomness (burn's
//! `Tensor::random`, dropout) is seeded with [`seed_backend`] from the same derivation;
//! module initialisation goes through [`seeded`], which holds the backend RNG for itself.
//! Same seed, same backend, same thread count: the same numbers.

pub use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

/// A 64-bit seed for stream `stream` of experiment seed `seed` (FNV-1a over the name,
/// then SplitMix64 finalisation; stable across platforms and Rust versions).
pub fn derive(seed: u64, stream: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h))
}

/// Shuffles `items` in place from `rng` (rand's Fisher-Yates), for crates that do not
/// depend on rand themselves.
pub fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    use rand::seq::SliceRandom as _;
    items.shuffle(rng);
}

/// The random stream named `stream` of experiment seed `seed`.
pub fn rng(seed: u64, stream: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive(seed, stream))
}

/// Seeds the backend's tensor RNG on `device` for stream `stream`.
///
/// burn's backend RNG is one per process, shared by every thread: to initialise modules
/// reproducibly while other threads may do the same (parallel tests, a user's thread
/// pool), use [`seeded`].
pub fn seed_backend<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    seed: u64,
    stream: &str,
) {
    seeded::<B, _>(device, seed, stream, || ());
}

/// Held while the backend RNG is seeded and drawn from by [`seeded`].
static BACKEND_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `init` (module initialisation, `Tensor::random`) with the backend's tensor RNG
/// seeded for stream `stream` of `seed`, under a process-wide lock: no other [`seeded`]
/// call can reseed the RNG or draw from it in between, so the draws are the same whatever
/// other threads do. Without it, two threads initialising at once interleave their draws
/// and neither gets its seed's numbers.
pub fn seeded<B: burn::tensor::backend::Backend, T>(
    device: &B::Device,
    seed: u64,
    stream: &str,
    init: impl FnOnce() -> T,
) -> T {
    // The guarded value is `()`: a panic while it was held leaves nothing inconsistent.
    let _guard = BACKEND_RNG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    B::seed(device, derive(seed, stream));
    init()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt as _;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u32> = (0..4)
            .map(|_| 0)
            .scan(rng(1, "data"), |r, _| Some(r.random()))
            .collect();
        let b: Vec<u32> = (0..4)
            .map(|_| 0)
            .scan(rng(1, "data"), |r, _| Some(r.random()))
            .collect();
        let c: Vec<u32> = (0..4)
            .map(|_| 0)
            .scan(rng(1, "init"), |r, _| Some(r.random()))
            .collect();
        let d: Vec<u32> = (0..4)
            .map(|_| 0)
            .scan(rng(2, "data"), |r, _| Some(r.random()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        // Pinned value: a change of derivation would silently change every experiment.
        assert_eq!(derive(0, ""), splitmix64(splitmix64(0xcbf2_9ce4_8422_2325)));
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn seeded_draws_do_not_interleave_across_threads() {
        use burn::tensor::{Distribution, Tensor};
        type B = crate::device::Dispatch;
        let device = crate::device::cpu();
        let draw = |seed: u64| -> Vec<f32> {
            seeded::<B, _>(&device, seed, "init", || {
                // Several draws, as a module's layers make, for another thread to slip into.
                (0..8)
                    .flat_map(|_| {
                        Tensor::<B, 1>::random([16], Distribution::Default, &device)
                            .into_data()
                            .to_vec::<f32>()
                            .unwrap()
                    })
                    .collect()
            })
        };
        let expected: Vec<Vec<f32>> = (0..4).map(draw).collect();
        assert_ne!(expected[0], expected[1]);
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..4u64)
                .map(|seed| {
                    let draw = &draw;
                    s.spawn(move || (0..50).map(|_| draw(seed)).collect::<Vec<_>>())
                })
                .collect();
            for (seed, t) in threads.into_iter().enumerate() {
                for got in t.join().unwrap() {
                    assert_eq!(got, expected[seed], "seed {seed}");
                }
            }
        });
    }
}
