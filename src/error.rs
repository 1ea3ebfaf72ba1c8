//! The binding's one error type and its one mapping to Python exceptions: every error the
//! extension raises is built as an [`Error`] and becomes a Python exception only in
//! `From<Error> for PyErr`, so the class a failure gets is decided in one place.
//!
//! | variant | Python exception |
//! |---|---|
//! | [`Error::Core`] (bad length, shape or argument value in the numerics) | `ValueError` |
//! | [`Error::Value`] (bad pointer, size, device, stream or argument value) | `ValueError` |
//! | [`Error::Type`] (unsupported dtype, wrong argument type) | `TypeError` |
//! | [`Error::Driver`] (a CUDA driver call failed) | `RuntimeError` |
//! | [`Error::Runtime`] (no kernels in this build, no usable driver) | `RuntimeError` |
//!
//! Messages say what was wrong and what was expected; the tests match on them.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

create_exception!(
    _aqn_rs,
    AqnError,
    PyException,
    "Base class of aqn-rs errors that are neither a bad type nor a bad value."
);

/// Everything that can go wrong in the binding (Clone: the CUDA side caches a failed driver
/// or device initialization and reports it again on every later call).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A caller error found by the numerics (`aqn_core`).
    #[error(transparent)]
    Core(#[from] aqn_core::Error),
    /// A value the binding rejects before calling the core or the driver.
    #[error("{0}")]
    Value(String),
    /// An argument of the wrong type, or an unsupported dtype.
    #[error("{0}")]
    Type(String),
    /// A CUDA driver call returned an error: its name and the driver's own name and
    /// description of the error code.
    // Only the build with kernels calls the driver.
    #[cfg_attr(not(aqn_cuda), allow(dead_code))]
    #[error("CUDA driver call {call} failed: {name} ({desc})")]
    Driver {
        call: String,
        name: String,
        desc: String,
    },
    /// The environment cannot run the call: no kernels in this build, no CUDA driver, or a
    /// device whose kernels failed to load.
    #[error("{0}")]
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            // Every core error is the caller's (the core has no internal failure states);
            // matched by variant so that a new one must be given its class here.
            Error::Core(
                aqn_core::Error::Length { .. }
                | aqn_core::Error::Shape(_)
                | aqn_core::Error::Argument(_),
            ) => PyValueError::new_err(msg),
            Error::Value(_) => PyValueError::new_err(msg),
            Error::Type(_) => PyTypeError::new_err(msg),
            Error::Driver { .. } | Error::Runtime(_) => PyRuntimeError::new_err(msg),
        }
    }
}
