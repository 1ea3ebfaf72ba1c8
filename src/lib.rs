//! The Python binding of aqn-core: converts numpy buffers and error values, nothing else
//! (STYLE.md 1). Tensors arrive as C-contiguous numpy arrays (torch CPU tensors are viewed
//! zero-copy by `python/aqn_rs/quantizers.py`; bf16/f16 travel as uint16 bit patterns with a
//! dtype tag), outputs are preallocated by the caller, and the GIL is released around every
//! whole-tensor call (STYLE.md 4).

use aqn_core::{mxfp4, nvfp4, ScaleMode};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use error::{AqnError, Error};

/// Element dtype of a buffer; numpy has no bf16, so the tag travels beside the array.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn parse(s: &str) -> error::Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(Error::Type(format!(
                "unsupported dtype {s:?}; expected \"f32\", \"bf16\" or \"f16\""
            ))),
        }
    }
}

/// `obj` as a C-contiguous numpy array of element type `T`, or a TypeError/ValueError that says
/// which argument (`what`) and which dtype (`want`) was expected.
fn c_array<'a, 'py, T: numpy::Element>(
    obj: &'a Bound<'py, PyAny>,
    what: &str,
    want: &str,
) -> error::Result<&'a Bound<'py, PyArrayDyn<T>>> {
    let arr = obj
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| Error::Type(format!("{what}: expected a numpy array of dtype {want}")))?;
    if !arr.is_c_contiguous() {
        return Err(Error::Value(format!(
            "{what}: expected a C-contiguous array (call .contiguous() / np.ascontiguousarray first)"
        )));
    }
    Ok(arr)
}

fn readonly<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    want: &str,
) -> error::Result<PyReadonlyArrayDyn<'py, T>> {
    Ok(c_array::<T>(obj, what, want)?.readonly())
}

fn readwrite<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    want: &str,
) -> error::Result<PyReadwriteArrayDyn<'py, T>> {
    c_array::<T>(obj, what, want)?
        .try_readwrite()
        .map_err(|e| Error::Value(format!("{what}: cannot write to this array ({e})")))
}

fn as_slice<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> error::Result<&'a [T]> {
    a.as_slice()
        .map_err(|e| Error::Value(format!("array is not contiguous: {e}")))
}

fn as_slice_mut<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
) -> error::Result<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|e| Error::Value(format!("array is not contiguous: {e}")))
}

fn same_shape(a: &[usize], b: &[usize]) -> error::Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::Value(format!(
            "output shape {b:?} does not match input shape {a:?}"
        )))
    }
}

/// A float element type the binding hands to the core, and how numpy holds it: f32 as itself,
/// bf16 and f16 as their uint16 bit patterns (numpy has no bf16).
trait FloatElem: Sized {
    type Bits: numpy::Element;
    /// The numpy dtype the binding expects, for error messages.
    const NUMPY: &'static str;
    fn view(bits: &[Self::Bits]) -> &[Self];
    fn view_mut(bits: &mut [Self::Bits]) -> &mut [Self];
}

impl FloatElem for f32 {
    type Bits = f32;
    const NUMPY: &'static str = "float32";
    fn view(bits: &[f32]) -> &[f32] {
        bits
    }
    fn view_mut(bits: &mut [f32]) -> &mut [f32] {
        bits
    }
}

impl FloatElem for bf16 {
    type Bits = u16;
    const NUMPY: &'static str = "uint16 (bf16 bits)";
    fn view(bits: &[u16]) -> &[bf16] {
        bits.reinterpret_cast()
    }
    fn view_mut(bits: &mut [u16]) -> &mut [bf16] {
        bits.reinterpret_cast_mut()
    }
}

impl FloatElem for f16 {
    type Bits = u16;
    const NUMPY: &'static str = "uint16 (f16 bits)";
    fn view(bits: &[u16]) -> &[f16] {
        bits.reinterpret_cast()
    }
    fn view_mut(bits: &mut [u16]) -> &mut [f16] {
        bits.reinterpret_cast_mut()
    }
}

/// Runs `$body` with `$T` the element type named by `$dtype`: the one place that turns a tag
/// into a type.
macro_rules! with_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {{
        match $dtype {
            Dtype::F32 => {
                type $T = f32;
                $body
            }
            Dtype::Bf16 => {
                type $T = bf16;
                $body
            }
            Dtype::F16 => {
                type $T = f16;
                $body
            }
        }
    }};
}

/// Runs `$body` with `$xs: &[T]` (input) and `$os: &mut [T]` (output) for the dtype named by
/// `$dtype`, and `$shape` the input's shape (the output must have it too).
macro_rules! with_float_io {
    ($dtype:expr, $x:expr, $out:expr, |$xs:ident, $os:ident, $shape:ident| $body:expr) => {
        with_dtype!($dtype, |T| {
            let xa = readonly::<<T as FloatElem>::Bits>($x, "input", T::NUMPY)?;
            let mut oa = readwrite::<<T as FloatElem>::Bits>($out, "output", T::NUMPY)?;
            let $shape = xa.shape().to_vec();
            same_shape(&$shape, oa.shape())?;
            let $xs: &[T] = T::view(as_slice(&xa)?);
            let $os: &mut [T] = T::view_mut(as_slice_mut(&mut oa)?);
            $body
        })
    };
}

/// Like `with_float_io` for one float input (`$what` names it in errors).
macro_rules! with_float_in {
    ($dtype:expr, $x:expr, $what:expr, |$xs:ident, $shape:ident| $body:expr) => {
        with_dtype!($dtype, |T| {
            let xa = readonly::<<T as FloatElem>::Bits>($x, $what, T::NUMPY)?;
            let $shape = xa.shape().to_vec();
            let $xs: &[T] = T::view(as_slice(&xa)?);
            $body
        })
    };
}

/// Like `with_float_io` for one float output.
macro_rules! with_float_out {
    ($dtype:expr, $out:expr, |$os:ident, $shape:ident| $body:expr) => {
        with_dtype!($dtype, |T| {
            let mut oa = readwrite::<<T as FloatElem>::Bits>($out, "output", T::NUMPY)?;
            let $shape = oa.shape().to_vec();
            let $os: &mut [T] = T::view_mut(as_slice_mut(&mut oa)?);
            $body
        })
    };
}

// After the macros above, which scan.rs uses too.
mod aqn;
mod cuda;
mod dlpack;
mod error;
mod scan;

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

#[pymodule]
fn _aqn_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("AqnError", m.py().get_type::<AqnError>())?;
    m.add_function(wrap_pyfunction!(mxfp4_fake_quant, m)?)?;
    m.add_function(wrap_pyfunction!(mxfp4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(mxfp4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_fake_quant, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_amax, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_global_scale, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threads, m)?)?;
    cuda::register(m)?;
    aqn::register(m)?;
    scan::register(m)?;
    Ok(())
}
