//! One error enum for the core; the binding maps each variant to one Python exception.

/// What can go wrong in the numerics: always a caller error, never an internal state.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum Error {
    /// A buffer's length does not match the shape it is used with.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A shape that cannot be quantized (0-d, or an impossible size).
    #[error("invalid shape: {0}")]
    Shape(String),
    /// An argument value outside its domain (unknown scale mode, negative amax, ...).
    #[error("invalid argument: {0}")]
    Argument(String),
}

pub type Result<T> = std::result::Result<T, Error>;
