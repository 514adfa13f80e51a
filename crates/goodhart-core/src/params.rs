//! Parameter-level operations on any burn [`Module`] that more than one crate needs:
//! forcing lazy initialisation, frozen snapshots, the EMA blend of two modules of the
//! same architecture, global gradient-norm clipping, and stable parameter ids for
//! checkpoints. Reference policies
//! (goodhart-policy) and reference management (goodhart-regularize) are built on these;
//! every trainer clips with [`clip_grad_norm`].

use burn::{
    module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId},
    optim::GradientsParams,
    tensor::{
        backend::{AutodiffBackend, Backend},
        cast::ToElement,
        Bool, Int, Tensor,
    },
};

use crate::error::{GoodhartError, Result};

/// A frozen copy of `module`: same parameters, no gradient tracking.
///
/// burn initialises parameters lazily, and each clone of a not-yet-initialised parameter
/// would draw its own values; the module's parameters are therefore materialised first,
/// so the copy always equals the original.
pub fn snapshot<B: Backend, M: Module<B>>(module: &M) -> M {
    materialize(module);
    module.clone().no_grad()
}

/// Forces burn's lazy parameter initialisation of `module` in place.
pub fn materialize<B: Backend, M: Module<B>>(module: &M) {
    struct Touch;
    impl<B: Backend> ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
            let _ = param.val();
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// [`materialize`] by value, for constructors: `Ok(materialized(Model { .. }))`.
pub fn materialized<B: Backend, M: Module<B>>(module: M) -> M {
    materialize(&module);
    module
}

/// `module` with parameter ids that depend only on `salt` and each parameter's place in
/// visit order (FNV-1a of `salt`, mixed with the index by SplitMix64).
///
/// burn draws a parameter's id from the operating system's randomness and writes it into
/// checkpoints, so two processes that compute the same weights would write files that
/// differ in those bytes. Savers pass the module through this first, with the file's name
/// as the salt (distinct files keep distinct ids); the weights are untouched.
pub fn with_stable_ids<B: Backend, M: Module<B>>(module: M, salt: &str) -> M {
    struct Ids {
        base: u64,
        next: u64,
    }
    impl Ids {
        fn id(&mut self) -> ParamId {
            let mut z = self.base ^ self.next.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            self.next += 1;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ParamId::from(z ^ (z >> 31))
        }
    }
    impl<B: Backend> ModuleMapper<B> for Ids {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, tensor, mapper) = param.consume();
            Param::from_mapped_value(self.id(), tensor, mapper)
        }
        fn map_int<const D: usize>(
            &mut self,
            param: Param<Tensor<B, D, Int>>,
        ) -> Param<Tensor<B, D, Int>> {
            let (_, tensor, mapper) = param.consume();
            Param::from_mapped_value(self.id(), tensor, mapper)
        }
        fn map_bool<const D: usize>(
            &mut self,
            param: Param<Tensor<B, D, Bool>>,
        ) -> Param<Tensor<B, D, Bool>> {
            let (_, tensor, mapper) = param.consume();
            Param::from_mapped_value(self.id(), tensor, mapper)
        }
    }
    let base = salt.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    module.map(&mut Ids { base, next: 0 })
}

struct Collect<B: Backend> {
    params: Vec<(Vec<usize>, Tensor<B, 1>)>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val().detach();
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        self.params.push((shape, t.reshape([n])));
    }
}

struct Blend<B: Backend> {
    online: std::vec::IntoIter<(Vec<usize>, Tensor<B, 1>)>,
    tau: f64,
    error: Option<GoodhartError>,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, reference, mapper) = param.consume();
        let dims = reference.dims();
        let value = match self.online.next() {
            Some((shape, p)) if shape == dims => {
                reference.detach() * self.tau + p.reshape(dims) * (1.0 - self.tau)
            }
            Some((shape, _)) => {
                self.error
                    .get_or_insert(GoodhartError::shape("online parameter", &dims, &shape));
                reference
            }
            None => {
                self.error.get_or_insert(GoodhartError::invalid(
                    "online module",
                    "has fewer parameters than the reference",
                ));
                reference
            }
        };
        Param::from_mapped_value(id, value, mapper)
    }
}

/// `p_ref <- tau p_ref + (1 - tau) p` for every float parameter, matched in visiting
/// order (the modules must share an architecture). `tau` in `[0, 1]`: 1 keeps the
/// reference, 0 copies the policy. The result carries no gradient.
pub fn ema_update<B: Backend, M: Module<B>>(reference: M, online: &M, tau: f64) -> Result<M> {
    if !(0.0..=1.0).contains(&tau) {
        return Err(GoodhartError::invalid(
            "tau",
            format!("must be in [0, 1], got {tau}"),
        ));
    }
    let mut collect = Collect { params: Vec::new() };
    online.visit(&mut collect);
    let mut blend = Blend {
        online: collect.params.into_iter(),
        tau,
        error: None,
    };
    let out = reference.map(&mut blend);
    if blend.online.next().is_some() {
        blend.error.get_or_insert(GoodhartError::invalid(
            "online module",
            "has more parameters than the reference",
        ));
    }
    match blend.error {
        Some(e) => Err(e),
        None => Ok(out.no_grad()),
    }
}

/// The check [`clip_grad_norm`] makes of `max_norm`, for trainers to run before any work:
/// `>= 0` (0 = no clipping), not NaN.
pub fn check_max_grad_norm(max_norm: f64) -> Result<()> {
    if max_norm >= 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            "max_grad_norm",
            format!("must be >= 0 (0 = no clipping), got {max_norm}"),
        ))
    }
}

/// Scales every gradient of `module` by `min(1, max_norm / (norm + 1e-6))`, `norm` the L2
/// norm of all its parameters' gradients taken together: PyTorch's `clip_grad_norm_`,
/// which verl, TRL and CleanRL call (burn's own `GradientClippingConfig::Norm` clips each
/// parameter tensor on its own). Returns the gradients and `norm` before clipping, read
/// back once; `max_norm = 0` turns clipping off (`None`), but the norm is still checked.
///
/// Errors: `max_norm` negative or NaN ([`GoodhartError::InvalidArgument`]); a non-finite
/// norm ([`GoodhartError::NonFinite`]), so that no optimiser step is taken on it.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: f64,
) -> Result<(GradientsParams, Option<f64>)> {
    check_max_grad_norm(max_norm)?;
    struct SquaredNorm<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        sums: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.sums.push(g.powi_scalar(2).sum());
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }
    let mut squares = SquaredNorm::<B> {
        grads: &grads,
        sums: Vec::new(),
    };
    module.visit(&mut squares);
    if squares.sums.is_empty() {
        return Ok((grads, Some(0.0)));
    }
    let norm = Tensor::cat(squares.sums, 0)
        .sum()
        .into_scalar()
        .to_f64()
        .sqrt();
    if !norm.is_finite() {
        return Err(GoodhartError::NonFinite {
            what: format!("gradient norm ({norm})"),
        });
    }
    if max_norm == 0.0 {
        return Ok((grads, None));
    }
    let factor = (max_norm / (norm + 1e-6)).min(1.0);
    if factor < 1.0 {
        module.visit(&mut Scale {
            grads: &mut grads,
            factor,
        });
    }
    Ok((grads, Some(norm)))
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};

    use super::*;
    use crate::testing::{assert_close, tolerance, values};

    fn filled<B: Backend>(v: f32, out: usize, device: &B::Device) -> Linear<B> {
        let mut l = LinearConfig::new(2, out).init::<B>(device);
        l.weight = Param::from_tensor(Tensor::full([2, out], v, device));
        l.bias = Some(Param::from_tensor(Tensor::full([out], v, device)));
        l
    }

    crate::backend_test! {
        fn stable_ids_depend_on_the_salt_and_the_order_only<B>(device) {
            let ids = |l: &Linear<B>| (l.weight.id.val(), l.bias.as_ref().unwrap().id.val());
            let (a, b) = (filled::<B>(1.0, 3, device), filled::<B>(1.0, 3, device));
            assert_ne!(ids(&a), ids(&b), "burn draws fresh ids");
            let (a, b) = (with_stable_ids(a, "m0"), with_stable_ids(b, "m0"));
            assert_eq!(ids(&a), ids(&b));
            assert_ne!(ids(&a).0, ids(&a).1);
            // By hand (Python, 64-bit wrapping): FNV-1a("m0") = 624181789078886840; the
            // weight (index 0) gets SplitMix64's finaliser of it, the bias (index 1) of it
            // xor 0x9e3779b97f4a7c15.
            assert_eq!(ids(&a), (2186832396483467707, 4814895373340713586));
            let c = with_stable_ids(filled::<B>(1.0, 3, device), "m1");
            assert_ne!(ids(&c).0, ids(&a).0);
            assert_close(&values(a.weight.val()), &[1.0; 6], 0.0);
        }
    }

    crate::backend_test! {
        fn snapshot_and_ema_by_hand<B>(device) {
            // A never-used module: the snapshot must equal it despite lazy init. Drawn
            // under `seeded`'s lock, as every draw in the project is (another test of this
            // binary asserts that seeded draws are not interleaved).
            let (fresh, copy) = crate::seed::seeded::<B, _>(device, 0, "test/params", || {
                let fresh = LinearConfig::new(3, 2).init::<B>(device);
                let copy = snapshot(&fresh);
                (fresh, copy)
            });
            assert_close(&values(copy.weight.val()), &values(fresh.weight.val()), 0.0);
            assert!(!copy.weight.is_require_grad());
            // 0.9 * 0 + 0.1 * 1 = 0.1, then 0.9 * 0.1 + 0.1 * 1 = 0.19.
            let (zero, one) = (filled::<B>(0.0, 3, device), filled::<B>(1.0, 3, device));
            let once = ema_update(zero, &one, 0.9).unwrap();
            assert_close(&values(once.weight.val()), &[0.1; 6], tolerance(1e-7));
            let twice = ema_update(once, &one, 0.9).unwrap();
            assert_close(&values(twice.bias.clone().unwrap().val()), &[0.19; 3], tolerance(1e-6));
            assert!(ema_update(twice.clone(), &one, 1.5).is_err());
            let wider = filled::<B>(1.0, 4, device);
            assert!(matches!(ema_update(twice, &wider, 0.5), Err(GoodhartError::ShapeMismatch { .. })));
        }
    }

    crate::backend_test! {
        fn clip_grad_norm_uses_the_norm_over_all_parameters<B>(device) {
            type A<B> = crate::device::Autodiff<B>;
            // y = x W + b with x = [[1]], loss = 3 y0 + 4 y1: dW = [[3, 4]], db = [3, 4].
            // Global norm sqrt(9 + 16 + 9 + 16) = sqrt(50); at max_norm 1 both tensors
            // scale by 1 / (sqrt(50) + 1e-6): [0.424264, 0.565685] each (a per-tensor
            // clip would give [0.6, 0.8]).
            let mut lin = LinearConfig::new(1, 2).init::<A<B>>(device);
            lin.weight = Param::from_tensor(Tensor::from_floats([[0.5, -1.0]], device));
            lin.bias = Some(Param::from_tensor(Tensor::from_floats([0.25, 2.0], device)));
            let grads = || {
                let y = lin.forward(Tensor::<A<B>, 2>::from_floats([[1.0]], device));
                let loss = (y * Tensor::from_floats([[3.0, 4.0]], device)).sum();
                GradientsParams::from_grads(loss.backward(), &lin)
            };
            let read = |g: &GradientsParams| {
                let mut v = values(g.get::<B, 2>(lin.weight.id).unwrap());
                v.extend(values(g.get::<B, 1>(lin.bias.as_ref().unwrap().id).unwrap()));
                v
            };
            let (clipped, norm) = clip_grad_norm(&lin, grads(), 1.0).unwrap();
            assert_close(&[norm.unwrap() as f32], &[50f32.sqrt()], tolerance(1e-6));
            let s = 1.0 / (50f32.sqrt() + 1e-6);
            assert_close(&read(&clipped), &[3.0 * s, 4.0 * s, 3.0 * s, 4.0 * s], tolerance(1e-6));
            // Under the threshold nothing moves; 0 turns clipping off.
            let (same, norm) = clip_grad_norm(&lin, grads(), 10.0).unwrap();
            assert_close(&[norm.unwrap() as f32], &[50f32.sqrt()], tolerance(1e-6));
            assert_close(&read(&same), &[3.0, 4.0, 3.0, 4.0], 0.0);
            let (off, norm) = clip_grad_norm(&lin, grads(), 0.0).unwrap();
            assert_eq!(norm, None);
            assert_close(&read(&off), &[3.0, 4.0, 3.0, 4.0], 0.0);
            for bad in [-1.0, f64::NAN] {
                assert!(matches!(clip_grad_norm(&lin, grads(), bad), Err(GoodhartError::InvalidArgument { .. })));
            }
            // A NaN gradient: an error, not a step.
            let y = lin.forward(Tensor::<A<B>, 2>::from_floats([[f32::NAN]], device));
            let nan = GradientsParams::from_grads(y.sum().backward(), &lin);
            assert!(matches!(clip_grad_norm(&lin, nan, 1.0), Err(GoodhartError::NonFinite { .. })));
            // Also with clipping off.
            let y = lin.forward(Tensor::<A<B>, 2>::from_floats([[f32::NAN]], device));
            let nan = GradientsParams::from_grads(y.sum().backward(), &lin);
            assert!(matches!(clip_grad_norm(&lin, nan, 0.0), Err(GoodhartError::NonFinite { .. })));
        }
    }
}
