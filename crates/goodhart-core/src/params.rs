//! Parameter-level operations on any burn [`Module`] that more than one crate needs:
//! forcing lazy initialisation, frozen snapshots, and the EMA blend of two modules of
//! the same architecture. Reference policies (goodhart-policy) and reference
//! management (goodhart-regularize) are built on these.

use burn::{
    module::{Module, ModuleMapper, ModuleVisitor, Param},
    tensor::{backend::Backend, Bool, Int, Tensor},
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
}
