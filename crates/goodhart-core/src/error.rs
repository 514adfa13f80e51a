//! The error type every goodhart library crate returns.
//!
//! Bad input is reported, never panicked on: each variant names *what* was wrong
//! (a tensor, a config key, a group) so a user can find it without a debugger.

use thiserror::Error;

/// Errors shared by the goodhart crates.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GoodhartError {
    /// Two inputs that must agree in shape do not.
    #[error("shape mismatch for `{what}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which input (e.g. `"values"`).
        what: String,
        /// The shape the call needed.
        expected: Vec<usize>,
        /// The shape it received.
        got: Vec<usize>,
    },
    /// An input holds NaN or infinity where finite numbers are required.
    #[error("`{what}` holds a non-finite value (NaN or infinity)")]
    NonFinite {
        /// Which input.
        what: String,
    },
    /// An input that must hold at least one element is empty.
    #[error("`{what}` is empty")]
    Empty {
        /// Which input.
        what: String,
    },
    /// A method that needs groups of a minimum size got a smaller one.
    #[error("group {group} has {size} member(s); {method} needs at least {min}")]
    GroupTooSmall {
        /// The caller's group id.
        group: u64,
        /// Its size.
        size: usize,
        /// The minimum the method accepts.
        min: usize,
        /// The method's name.
        method: String,
    },
    /// A parameter is out of its valid range or otherwise unusable.
    #[error("invalid `{name}`: {reason}")]
    InvalidArgument {
        /// Parameter or config key path.
        name: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A method name that no registry knows.
    #[error("unknown {family} `{name}`; known: {known}")]
    UnknownMethod {
        /// The registry (e.g. `"advantage estimator"`).
        family: String,
        /// The name asked for.
        name: String,
        /// Comma-separated list of valid names.
        known: String,
    },
    /// The requested backend was not compiled into this binary.
    #[error("backend `{backend}` is not compiled in: rebuild with `--features {feature}`")]
    BackendNotCompiled {
        /// Backend asked for.
        backend: String,
        /// Cargo feature that enables it.
        feature: String,
    },
    /// The backend is compiled in but no usable device was found.
    #[error("backend `{backend}` has no usable device: {reason}")]
    BackendUnavailable {
        /// Backend asked for.
        backend: String,
        /// What went wrong while opening it.
        reason: String,
    },
    /// A remote service (an LLM judge's endpoint) gave no usable answer.
    #[error("`{service}`: {reason}")]
    Remote {
        /// The service (the reward's name and its endpoint).
        service: String,
        /// What went wrong, with what it answered.
        reason: String,
    },
}

impl GoodhartError {
    /// Shorthand for [`GoodhartError::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`GoodhartError::ShapeMismatch`].
    pub fn shape(what: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Self::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }
}

/// Result alias used across goodhart.
pub type Result<T, E = GoodhartError> = std::result::Result<T, E>;

/// Runs `f`, turning a panic inside it into `Err` with the panic's message: for
/// dependencies that panic on bad input where a `Result` is due (burn's record decoding
/// `expect`s a valid parameter id). The process's panic hook still sees the panic.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}
