//! aqn-core: the numerics of aqn-rs, with no Python in sight.
//!
//! Quantization:
//! - [`formats`]: the element and scale codecs (E2M1, E8M0, E4M3) and nibble packing;
//! - [`mxfp4`]: OCP MXFP4 (block 32, E8M0 scale) with the four scale modes;
//! - [`nvfp4`]: NVFP4 (block 16, E4M3 scale, f32 global scale) by the compressed-tensors rule;
//! - [`blockwise`]: the per-block engine both formats run on;
//! - [`layout`]: a tensor seen as rows of `k` elements cut into blocks;
//! - [`element`]: the input/output dtypes (f32, bf16, f16);
//! - [`scan`]: the SRDD scanner's one-pass damage metrics.
//!
//! AQN (adaptive quantization noise):
//! - [`noise`]: counter-based Gaussian noise, the same on every process and device;
//! - [`schedule`]: QeRL's staged sigma schedule;
//! - [`selector`]: which modules are quantized or noised, and which rule decided.
//!
//! [`error`] has the one error enum. The exact quantization rules are written down in
//! `docs/reference/FORMATS.md`, the noise in `docs/reference/NOISE.md`; every function here cites
//! the rule it implements. All tensor functions see a row-major tensor as rows of `k` elements
//! (the last dimension) and work on the rows in parallel with rayon.

pub mod blockwise;
pub mod element;
pub mod error;
pub mod formats;
pub mod layout;
pub mod mxfp4;
pub mod noise;
pub mod nvfp4;
pub mod scan;
pub mod schedule;
pub mod selector;

pub use element::Element;
pub use error::{Error, Result};
pub use layout::Layout;
pub use mxfp4::ScaleMode;

/// Threads in the pool the tensor functions run on (rayon's global pool).
pub fn current_num_threads() -> usize {
    rayon::current_num_threads()
}
