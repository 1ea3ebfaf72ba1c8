//! numpy buffers to typed slices for the CPU entry points: the dtype tag, C-contiguity and
//! writability checks, and the `with_float_*` macros that turn a tag into an element type.
//! Tensors arrive as C-contiguous numpy arrays (torch CPU tensors are viewed zero-copy by
//! `python/aqn_rs/quantizers.py`); numpy has no bf16, so bf16/f16 travel as uint16 bit
//! patterns beside a dtype tag. Outputs are preallocated by the caller.

use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::error::{self, Error};

/// Element dtype of a buffer; numpy has no bf16, so the tag travels beside the array.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn parse(s: &str) -> error::Result<Self> {
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
pub fn c_array<'a, 'py, T: numpy::Element>(
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

pub fn readonly<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    want: &str,
) -> error::Result<PyReadonlyArrayDyn<'py, T>> {
    Ok(c_array::<T>(obj, what, want)?.readonly())
}

pub fn readwrite<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    want: &str,
) -> error::Result<PyReadwriteArrayDyn<'py, T>> {
    c_array::<T>(obj, what, want)?
        .try_readwrite()
        .map_err(|e| Error::Value(format!("{what}: cannot write to this array ({e})")))
}

pub fn as_slice<'a, T: numpy::Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> error::Result<&'a [T]> {
    a.as_slice()
        .map_err(|e| Error::Value(format!("array is not contiguous: {e}")))
}

pub fn as_slice_mut<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
) -> error::Result<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|e| Error::Value(format!("array is not contiguous: {e}")))
}

pub fn same_shape(a: &[usize], b: &[usize]) -> error::Result<()> {
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
pub trait FloatElem: Sized {
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
            $crate::buffer::Dtype::F32 => {
                type $T = f32;
                $body
            }
            $crate::buffer::Dtype::Bf16 => {
                type $T = half::bf16;
                $body
            }
            $crate::buffer::Dtype::F16 => {
                type $T = half::f16;
                $body
            }
        }
    }};
}

/// Runs `$body` with `$xs: &[T]` (input) and `$os: &mut [T]` (output) for the dtype named by
/// `$dtype`, and `$shape` the input's shape (the output must have it too).
macro_rules! with_float_io {
    ($dtype:expr, $x:expr, $out:expr, |$xs:ident, $os:ident, $shape:ident| $body:expr) => {
        $crate::buffer::with_dtype!($dtype, |T| {
            use numpy::PyUntypedArrayMethods as _;
            use $crate::buffer::{
                as_slice, as_slice_mut, readonly, readwrite, same_shape, FloatElem,
            };
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
        $crate::buffer::with_dtype!($dtype, |T| {
            use numpy::PyUntypedArrayMethods as _;
            use $crate::buffer::{as_slice, readonly, FloatElem};
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
        $crate::buffer::with_dtype!($dtype, |T| {
            use numpy::PyUntypedArrayMethods as _;
            use $crate::buffer::{as_slice_mut, readwrite, FloatElem};
            let mut oa = readwrite::<<T as FloatElem>::Bits>($out, "output", T::NUMPY)?;
            let $shape = oa.shape().to_vec();
            let $os: &mut [T] = T::view_mut(as_slice_mut(&mut oa)?);
            $body
        })
    };
}

// The macros by path (`crate::buffer::with_float_io!`), like any other item of this module.
pub(crate) use {with_dtype, with_float_in, with_float_io, with_float_out};
