//! AQN's counter-based Gaussian noise on the CPU (docs/reference/NOISE.md), and its building blocks
//! (FNV-1a, the Philox key, Philox4x32-10), exported so the tests can check them against
//! published vectors and the pure-torch reference.

use aqn_core::noise;
use pyo3::prelude::*;

use super::args::u64_arg;
use crate::error::Error;

/// Fill a C-contiguous float32 array with elements `offset .. offset + out.size` of the noise
/// tensor of `(seed, step, name)`, each `z * float32(sigma)` (docs/reference/NOISE.md).
#[pyfunction]
#[pyo3(signature = (out, seed, step, name, sigma=1.0, offset=None))]
fn noise_fill_f32(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    seed: &Bound<'_, PyAny>,
    step: &Bound<'_, PyAny>,
    name: &str,
    sigma: f64,
    offset: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let seed = u64_arg(seed, "seed")?;
    let step = u64_arg(step, "step")?;
    let offset = match offset {
        Some(o) => u64_arg(o, "offset")?,
        None => 0,
    };
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(
            Error::Value(format!("sigma must be a finite number >= 0, got {sigma}")).into(),
        );
    }
    let key = noise::noise_key(seed, name);
    let mut arr = crate::buffer::readwrite::<f32>(out, "out", "float32")?;
    let os = crate::buffer::as_slice_mut(&mut arr)?;
    py.detach(|| noise::fill_gaussian(key, step, offset, sigma as f32, os))
        .map_err(Error::Core)?;
    Ok(())
}

/// The 64-bit Philox key of `(seed, name)`: FNV-1a 64 of the seed's 8 little-endian bytes
/// followed by the name's UTF-8 bytes.
#[pyfunction]
fn noise_key(seed: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    Ok(noise::noise_key(u64_arg(seed, "seed")?, name))
}

/// Philox4x32-10 of a 4-word counter under a 2-word key (Random123's `philox4x32`).
#[pyfunction]
fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    noise::philox4x32_10(counter, key)
}

/// 64-bit FNV-1a of a byte string.
#[pyfunction]
fn fnv1a64(data: &[u8]) -> u64 {
    noise::fnv1a64(data)
}

/// Registers the noise functions.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(noise_fill_f32, m)?)?;
    m.add_function(wrap_pyfunction!(noise_key, m)?)?;
    m.add_function(wrap_pyfunction!(philox4x32_10, m)?)?;
    m.add_function(wrap_pyfunction!(fnv1a64, m)?)?;
    Ok(())
}
