//! The MXFP4 and NVFP4 entry points on CPU buffers: fake quant, quantize, dequantize, the
//! tensor amax and the NVFP4 global scale. Each converts its buffers (`crate::buffer`) and
//! calls `aqn_core` with the GIL released, so other Python threads run during the pass.

use aqn_core::{mxfp4, nvfp4, ScaleMode};
use pyo3::prelude::*;

use crate::buffer::{
    as_slice, as_slice_mut, readonly, readwrite, with_float_in, with_float_io, with_float_out,
    Dtype,
};
use crate::error::Error;

fn parse_mode(s: &str) -> PyResult<ScaleMode> {
    Ok(s.parse::<ScaleMode>().map_err(Error::Core)?)
}

fn check_amax(amax: Option<f32>) -> PyResult<()> {
    if let Some(a) = amax {
        nvfp4::validate_amax(a).map_err(Error::Core)?;
    }
    Ok(())
}

/// MXFP4 fake quant of `x` into `out` (same shape and dtype tag).
#[pyfunction]
fn mxfp4_fake_quant(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
    scale_mode: &str,
) -> PyResult<()> {
    let (dtype, mode) = (Dtype::parse(dtype)?, parse_mode(scale_mode)?);
    with_float_io!(dtype, x, out, |xs, os, shape| {
        py.detach(|| mxfp4::fake_quant(mode, &shape, xs, os))
            .map_err(Error::Core)?;
        Ok(())
    })
}

/// MXFP4 quantize of `x` into packed `codes` and E8M0 `scales` (uint8 arrays).
#[pyfunction]
fn mxfp4_quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: &str,
    scale_mode: &str,
    codes: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (dtype, mode) = (Dtype::parse(dtype)?, parse_mode(scale_mode)?);
    let mut ca = readwrite::<u8>(codes, "codes", "uint8")?;
    let mut sa = readwrite::<u8>(scales, "scales", "uint8")?;
    let (cs, ss) = (as_slice_mut(&mut ca)?, as_slice_mut(&mut sa)?);
    with_float_in!(dtype, x, "input", |xs, shape| {
        py.detach(|| mxfp4::quantize(mode, &shape, xs, cs, ss))
            .map_err(Error::Core)?;
        Ok(())
    })
}

/// MXFP4 dequantize of `codes`/`scales` into `out`, whose shape is the tensor's shape.
#[pyfunction]
fn mxfp4_dequantize(
    py: Python<'_>,
    codes: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let dtype = Dtype::parse(dtype)?;
    let ca = readonly::<u8>(codes, "codes", "uint8")?;
    let sa = readonly::<u8>(scales, "scales", "uint8")?;
    let (cs, ss) = (as_slice(&ca)?, as_slice(&sa)?);
    with_float_out!(dtype, out, |os, shape| {
        py.detach(|| mxfp4::dequantize(&shape, cs, ss, os))
            .map_err(Error::Core)?;
        Ok(())
    })
}

/// NVFP4 fake quant of `x` into `out`; returns the global scale used.
#[pyfunction]
#[pyo3(signature = (x, out, dtype, amax=None))]
fn nvfp4_fake_quant(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    dtype: &str,
    amax: Option<f32>,
) -> PyResult<f32> {
    let dtype = Dtype::parse(dtype)?;
    check_amax(amax)?;
    with_float_io!(dtype, x, out, |xs, os, shape| {
        Ok(py
            .detach(|| nvfp4::fake_quant(&shape, xs, amax, os))
            .map_err(Error::Core)?)
    })
}

/// NVFP4 quantize of `x` into packed `codes` and E4M3 `scales`; returns the global scale.
#[pyfunction]
#[pyo3(signature = (x, dtype, codes, scales, amax=None))]
fn nvfp4_quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    dtype: &str,
    codes: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    amax: Option<f32>,
) -> PyResult<f32> {
    let dtype = Dtype::parse(dtype)?;
    check_amax(amax)?;
    let mut ca = readwrite::<u8>(codes, "codes", "uint8")?;
    let mut sa = readwrite::<u8>(scales, "scales", "uint8")?;
    let (cs, ss) = (as_slice_mut(&mut ca)?, as_slice_mut(&mut sa)?);
    with_float_in!(dtype, x, "input", |xs, shape| {
        Ok(py
            .detach(|| nvfp4::quantize(&shape, xs, amax, cs, ss))
            .map_err(Error::Core)?)
    })
}

/// NVFP4 dequantize of `codes`/`scales` with `global_scale` into `out`.
#[pyfunction]
fn nvfp4_dequantize(
    py: Python<'_>,
    codes: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    global_scale: f32,
    out: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let dtype = Dtype::parse(dtype)?;
    let ca = readonly::<u8>(codes, "codes", "uint8")?;
    let sa = readonly::<u8>(scales, "scales", "uint8")?;
    let (cs, ss) = (as_slice(&ca)?, as_slice(&sa)?);
    with_float_out!(dtype, out, |os, shape| {
        py.detach(|| nvfp4::dequantize(&shape, cs, ss, global_scale, os))
            .map_err(Error::Core)?;
        Ok(())
    })
}

/// Max |x| over a tensor (NaN if any element is NaN, 0 if empty).
#[pyfunction]
fn nvfp4_amax(py: Python<'_>, x: &Bound<'_, PyAny>, dtype: &str) -> PyResult<f32> {
    let dtype = Dtype::parse(dtype)?;
    with_float_in!(dtype, x, "input", |xs, _shape| {
        Ok(py.detach(|| nvfp4::amax(xs)))
    })
}

/// The NVFP4 global scale for a tensor amax (compressed-tensors' `generate_gparam`).
#[pyfunction]
fn nvfp4_global_scale(amax: f32) -> PyResult<f32> {
    check_amax(Some(amax))?;
    Ok(nvfp4::global_scale(amax))
}

/// Number of CPU threads the kernels use (rayon's pool; `RAYON_NUM_THREADS` sets it).
#[pyfunction]
fn cpu_threads() -> usize {
    rayon_threads()
}

fn rayon_threads() -> usize {
    aqn_core::current_num_threads()
}

/// Registers the quantizer functions.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(mxfp4_fake_quant, m)?)?;
    m.add_function(wrap_pyfunction!(mxfp4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(mxfp4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_fake_quant, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_amax, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_global_scale, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threads, m)?)?;
    Ok(())
}
