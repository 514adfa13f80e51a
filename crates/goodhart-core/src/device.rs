//! Backend and device selection: `--device cpu|wgpu|cuda[:N]`.
//!
//! Library code is generic over `B: Backend`; only binaries and tests pick a concrete
//! backend. They do it at run time through [`dispatch`], which runs a [`BackendJob`] on
//! the backend a [`DeviceSpec`] names, or explains why it cannot: the backend's cargo
//! feature was not compiled in, or the backend found no usable device.

use std::{fmt, str::FromStr};

use crate::error::{GoodhartError, Result};

/// burn's reverse-mode autodiff decorator: `Autodiff<B>` is a backend that records
/// gradients over backend `B` (`Autodiff<Dispatch>` in goodhart's binaries and tests).
pub use burn_autodiff::Autodiff;

/// A device as the user names it: `cpu`, `wgpu[:N]`, `cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU backend, burn-flex (feature `ndarray`: the feature kept its name when
    /// burn-flex replaced burn-ndarray).
    #[default]
    Cpu,
    /// The wgpu backend (feature `wgpu`): the default adapter, or discrete GPU `N`.
    Wgpu(Option<usize>),
    /// The CUDA backend (feature `cuda`), GPU `N` (0 when omitted).
    Cuda(usize),
}

impl DeviceSpec {
    /// The cargo feature that compiles this backend in.
    pub fn feature(&self) -> &'static str {
        match self {
            Self::Cpu => "ndarray",
            Self::Wgpu(_) => "wgpu",
            Self::Cuda(_) => "cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn is_compiled(&self) -> bool {
        compiled_backends().contains(&self.feature())
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(None) => write!(f, "wgpu"),
            Self::Wgpu(Some(n)) => write!(f, "wgpu:{n}"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = GoodhartError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| GoodhartError::invalid("device", format!("`{s}`: {reason}"));
        let (name, index) = match s.split_once(':') {
            Some((n, i)) => {
                let i = i
                    .parse::<usize>()
                    .map_err(|_| bad("the index after `:` must be a non-negative integer"))?;
                (n, Some(i))
            }
            None => (s, None),
        };
        match (name.trim().to_ascii_lowercase().as_str(), index) {
            ("cpu" | "ndarray", None) => Ok(Self::Cpu),
            ("cpu" | "ndarray", Some(_)) => Err(bad("cpu takes no index")),
            ("wgpu", i) => Ok(Self::Wgpu(i)),
            ("cuda", i) => Ok(Self::Cuda(i.unwrap_or(0))),
            _ => Err(bad("expected cpu, wgpu, wgpu:N, cuda or cuda:N")),
        }
    }
}

/// The backend features this binary was compiled with.
pub fn compiled_backends() -> &'static [&'static str] {
    &[
        #[cfg(feature = "ndarray")]
        "ndarray",
        #[cfg(feature = "wgpu")]
        "wgpu",
        #[cfg(feature = "cuda")]
        "cuda",
    ]
}

/// Work that can run on any backend; [`dispatch`] picks which at run time.
///
/// For training, wrap the backend in [`Autodiff<B>`](Autodiff) inside `run`.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B`, device `device`.
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output;
}

/// The one concrete backend of goodhart's binaries and tests: burn's runtime
/// `Dispatch`, which forwards every op to the backend its `DispatchDevice` names (the CPU
/// backend burn-flex, wgpu or CUDA, each compiled in by its feature: `ndarray`, `wgpu`,
/// `cuda`). Code generic over `B: Backend` is instantiated once for it (and
/// once for `Autodiff<Dispatch>`) instead of once per backend; the backends' own
/// instantiations are compiled once, in `burn-dispatch`. Floats are f32, ints i32.
#[cfg(any(feature = "ndarray", feature = "wgpu", feature = "cuda"))]
pub use burn::{Dispatch, DispatchDevice};

/// The CPU device of [`Dispatch`] (burn-flex, feature `ndarray`).
/// (`DispatchDevice::default()` is the first GPU backend compiled in, not the CPU.)
#[cfg(feature = "ndarray")]
pub fn cpu() -> DispatchDevice {
    DispatchDevice::Flex(burn::backend::flex::FlexDevice)
}

/// The [`DispatchDevice`] `spec` names, or why this binary has none:
/// [`GoodhartError::BackendNotCompiled`] when its feature is missing. No device is opened.
#[cfg(any(feature = "ndarray", feature = "wgpu", feature = "cuda"))]
pub fn device(spec: DeviceSpec) -> Result<DispatchDevice> {
    // Unused when every backend is compiled in.
    #[allow(unused_variables)]
    let not_compiled = || GoodhartError::BackendNotCompiled {
        backend: spec.to_string(),
        feature: spec.feature().into(),
    };
    match spec {
        DeviceSpec::Cpu => {
            #[cfg(feature = "ndarray")]
            {
                Ok(cpu())
            }
            #[cfg(not(feature = "ndarray"))]
            {
                Err(not_compiled())
            }
        }
        DeviceSpec::Wgpu(index) => {
            #[cfg(feature = "wgpu")]
            {
                use burn::backend::wgpu::WgpuDevice;
                Ok(DispatchDevice::Wgpu(index.map_or(
                    WgpuDevice::DefaultDevice,
                    WgpuDevice::DiscreteGpu,
                )))
            }
            #[cfg(not(feature = "wgpu"))]
            {
                let _ = index;
                Err(not_compiled())
            }
        }
        DeviceSpec::Cuda(index) => {
            #[cfg(feature = "cuda")]
            {
                Ok(DispatchDevice::Cuda(burn::backend::cuda::CudaDevice {
                    index,
                }))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = index;
                Err(not_compiled())
            }
        }
    }
}

/// Runs `job` on [`Dispatch`] with the device `spec` names.
///
/// On the CPU the job runs on a worker of the pool whose threads run burn-flex's and
/// gemm's parallel loops ([`cpu_pool`]): each parallel op then starts from a thread of
/// that pool, which takes a share of the work, instead of waking the pool from outside
/// and sleeping until it is done (docs/speed.md).
///
/// Errors with [`GoodhartError::BackendNotCompiled`] when the backend's feature is
/// missing, and [`GoodhartError::BackendUnavailable`] when it has no usable device
/// (checked by a one-element round trip before the job starts) or the CPU pool's threads
/// did not start.
#[cfg(any(feature = "ndarray", feature = "wgpu", feature = "cuda"))]
pub fn dispatch<J>(spec: DeviceSpec, job: J) -> Result<J::Output>
where
    J: BackendJob + Send,
    J::Output: Send,
{
    let device = device(spec)?;
    if spec != DeviceSpec::Cpu {
        probe::<Dispatch>(spec, &device)?;
        return Ok(job.run::<Dispatch>(device));
    }
    #[cfg(feature = "ndarray")]
    {
        Ok(cpu_pool()?.install(move || job.run::<Dispatch>(device)))
    }
    #[cfg(not(feature = "ndarray"))]
    {
        Ok(job.run::<Dispatch>(device))
    }
}

/// The rayon pool of CPU jobs, started on first use: as many threads as rayon's global
/// pool would have (`RAYON_NUM_THREADS`, else the logical CPUs), each with a 16 MiB
/// stack (a process's main thread has 8 MiB; rayon's default is 2 MiB).
#[cfg(feature = "ndarray")]
pub fn cpu_pool() -> Result<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<std::result::Result<rayon::ThreadPool, String>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("goodhart-cpu-{i}"))
            .stack_size(16 << 20)
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|reason| GoodhartError::BackendUnavailable {
        backend: DeviceSpec::Cpu.to_string(),
        reason: format!("its thread pool did not start: {reason}"),
    })
}

/// A one-element round trip: GPU runtimes panic when they find no adapter or driver;
/// this turns that into an error naming the backend.
#[cfg(any(feature = "ndarray", feature = "wgpu", feature = "cuda"))]
fn probe<B: burn::tensor::backend::Backend>(spec: DeviceSpec, device: &B::Device) -> Result<()> {
    let device = device.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let t = burn::tensor::Tensor::<B, 1>::from_floats([1.0, 2.0], &device);
        t.sum().into_scalar().to_string()
    }));
    match outcome {
        Ok(v) if v.starts_with('3') => Ok(()),
        Ok(v) => Err(GoodhartError::BackendUnavailable {
            backend: spec.to_string(),
            reason: format!("1 + 2 evaluated to {v}"),
        }),
        Err(panic) => Err(GoodhartError::BackendUnavailable {
            backend: spec.to_string(),
            reason: panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the runtime panicked while opening the device".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("ndarray".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(
            "wgpu".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Wgpu(None)
        );
        assert_eq!(
            "wgpu:1".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Wgpu(Some(1))
        );
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("CUDA:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:x", "cpu:0", "", "wgpu:-1"] {
            assert!(
                bad.parse::<DeviceSpec>().is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_feature_is_named() {
        struct Nothing;
        impl BackendJob for Nothing {
            type Output = ();
            fn run<B: burn::tensor::backend::Backend>(self, _: B::Device) {}
        }
        let err = dispatch(DeviceSpec::Cuda(0), Nothing).unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend `cuda:0` is not compiled in: rebuild with `--features cuda`"
        );
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn cpu_jobs_run_on_a_worker_of_the_cpu_pool() {
        struct Where;
        impl BackendJob for Where {
            type Output = (Option<usize>, Option<String>, usize);
            fn run<B: burn::tensor::backend::Backend>(self, _: B::Device) -> Self::Output {
                (
                    rayon::current_thread_index(),
                    std::thread::current().name().map(str::to_string),
                    rayon::current_num_threads(),
                )
            }
        }
        let pool = cpu_pool().unwrap();
        let (index, name, threads) = dispatch(DeviceSpec::Cpu, Where).unwrap();
        let index = index.expect("the job runs on a rayon worker");
        assert!(index < pool.current_num_threads());
        assert_eq!(
            name.as_deref(),
            Some(format!("goodhart-cpu-{index}").as_str())
        );
        assert_eq!(threads, pool.current_num_threads());
        // Called from inside the pool (a job that dispatches another), it runs in place.
        struct Nested;
        impl BackendJob for Nested {
            type Output = (Option<usize>, Option<usize>);
            fn run<B: burn::tensor::backend::Backend>(self, _: B::Device) -> Self::Output {
                let inner = dispatch(DeviceSpec::Cpu, Where).unwrap().0;
                (rayon::current_thread_index(), inner)
            }
        }
        let (outer, inner) = dispatch(DeviceSpec::Cpu, Nested).unwrap();
        assert_eq!(outer, inner);
    }
}
