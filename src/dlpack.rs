//! DLPack's C exchange API (`torch.Tensor.__dlpack_c_exchange_api__`, torch >= 2.10): a
//! table of C functions through which a kernel library reads a tensor's pointer, shape,
//! strides, dtype and device, and the framework's current stream, without a Python call.
//! `_cuda.fake_quant` uses it to skip the per-call attribute reads (each a Python method
//! call); without it (older torch) `_cuda.py` reads the attributes itself.
//!
//! The layouts mirror `dlpack.h` (v1.x) as torch ships it in `ATen/dlpack.h`.

// A CPU-only build reads tensors but launches nothing with their pointers.
#![cfg_attr(not(aqn_cuda), allow(dead_code))]

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3::prelude::*;

/// `kDLCUDA`.
pub const DL_CUDA: i32 = 2;
/// `kDLFloat` / `kDLBfloat` type codes.
pub const DL_FLOAT: u8 = 2;
pub const DL_BFLOAT: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct ExchangeApiHeader {
    version: DLPackVersion,
    prev_api: *mut ExchangeApiHeader,
}

/// `DLPackExchangeAPI`; only the two functions we call are typed.
#[repr(C)]
struct ExchangeApi {
    header: ExchangeApiHeader,
    managed_tensor_allocator: *const c_void,
    managed_tensor_from_py_object_no_sync: *const c_void,
    managed_tensor_to_py_object_no_sync: *const c_void,
    dltensor_from_py_object_no_sync:
        Option<unsafe extern "C" fn(py_object: *mut c_void, out: *mut DLTensor) -> i32>,
    current_work_stream: Option<
        unsafe extern "C" fn(device_type: i32, device_id: i32, out: *mut *mut c_void) -> i32,
    >,
}

static API: AtomicPtr<ExchangeApi> = AtomicPtr::new(std::ptr::null_mut());
/// The tensor type the API came from (a strong reference, kept for the life of the process):
/// the API's functions are only for instances of it (dlpack.h).
static TYPE: AtomicPtr<pyo3::ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

const CAPSULE_NAME: &std::ffi::CStr = c"dlpack_exchange_api";

/// Registers the exchange API of `tensor_type` (torch.Tensor): its
/// `__dlpack_c_exchange_api__` capsule. Returns False, registering nothing, when the type
/// has no such capsule (torch < 2.10), or its table is of another major version or lacks the
/// two functions used.
#[pyfunction]
pub fn dlpack_exchange_register(tensor_type: &Bound<'_, PyAny>) -> bool {
    let Ok(capsule) = tensor_type.getattr("__dlpack_c_exchange_api__") else {
        return false;
    };
    // SAFETY: PyCapsule_IsValid accepts any object; PyCapsule_GetPointer is called only on a
    // valid capsule of that name, whose pointer the producer keeps alive for the life of the
    // process (dlpack.h: "The DLPackExchangeAPI* must stay alive throughout the lifetime of
    // the process").
    let api = unsafe {
        let o = capsule.as_ptr();
        if pyo3::ffi::PyCapsule_IsValid(o, CAPSULE_NAME.as_ptr()) != 1 {
            return false;
        }
        pyo3::ffi::PyCapsule_GetPointer(o, CAPSULE_NAME.as_ptr()) as *mut ExchangeApi
    };
    if api.is_null() {
        return false;
    }
    // SAFETY: non-null, and points at the producer's static table (above).
    let ok = unsafe {
        (*api).header.version.major == 1
            && (*api).dltensor_from_py_object_no_sync.is_some()
            && (*api).current_work_stream.is_some()
    };
    if ok {
        // The type first: `view` reads API, then TYPE. A second registration leaks the first
        // type's reference (a type object lives as long as its module anyway).
        TYPE.store(tensor_type.clone().into_ptr(), Ordering::Release);
        API.store(api, Ordering::Release);
    }
    ok
}

/// What a kernel call needs of a tensor, read through the exchange API.
pub struct View {
    pub ptr: u64,
    pub device: DLDevice,
    pub dtype: DLDataType,
    pub ndim: i32,
    /// Last dimension (0 for a 0-d tensor).
    pub k: u64,
    pub numel: u64,
    /// Row-major contiguous (dimensions of size 1 may have any stride, as torch allows).
    pub contiguous: bool,
}

/// Reads `obj` through the registered API. None when no API is registered, `obj` is not an
/// instance of the registered type, or the producer cannot describe it (no storage, a meta
/// tensor...): any Python error it set is cleared, and the caller takes its
/// attribute-reading path, which reports the problem.
pub fn view(py: Python<'_>, obj: &Bound<'_, PyAny>) -> Option<View> {
    let api = API.load(Ordering::Acquire);
    let ty = TYPE.load(Ordering::Acquire);
    if api.is_null() || ty.is_null() {
        return None;
    }
    // SAFETY: `ty` is a type object we hold a reference to; `api` is the registered static
    // table with this function present (checked at registration), called only on instances
    // of that type, as dlpack.h asks; the DLTensor is ours to fill; shape/strides point into
    // the tensor's TensorImpl, which `obj` (borrowed for this call) keeps alive while we read.
    unsafe {
        match pyo3::ffi::PyObject_IsInstance(obj.as_ptr(), ty) {
            1 => {}
            0 => return None,
            _ => {
                drop(PyErr::take(py));
                return None;
            }
        }
        let f = (*api).dltensor_from_py_object_no_sync?;
        let mut t: DLTensor = std::mem::zeroed();
        if f(obj.as_ptr() as *mut c_void, &mut t) != 0 {
            drop(PyErr::take(py));
            return None;
        }
        let nd = t.ndim.max(0) as usize;
        let shape: &[i64] = if nd == 0 || t.shape.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(t.shape, nd)
        };
        let mut numel: u64 = 1;
        let mut contiguous = true;
        let mut expect: i64 = 1;
        for i in (0..nd).rev() {
            let s = shape[i];
            if s < 0 {
                return None;
            }
            numel = numel.checked_mul(s as u64)?;
            if !t.strides.is_null() && s != 1 {
                if *t.strides.add(i) != expect {
                    contiguous = false;
                }
                expect = expect.checked_mul(s)?;
            }
        }
        Some(View {
            ptr: (t.data as u64).checked_add(t.byte_offset)?,
            device: t.device,
            dtype: t.dtype,
            ndim: t.ndim,
            k: shape.last().map_or(0, |&s| s as u64),
            numel,
            contiguous,
        })
    }
}

/// The framework's current stream on CUDA device `ordinal` (None: no API, or it failed).
pub fn current_stream(py: Python<'_>, ordinal: i32) -> Option<u64> {
    let api = API.load(Ordering::Acquire);
    if api.is_null() {
        return None;
    }
    // SAFETY: registered static table with this function present; valid out-pointer.
    unsafe {
        let f = (*api).current_work_stream?;
        let mut s: *mut c_void = std::ptr::null_mut();
        if f(DL_CUDA, ordinal, &mut s) != 0 {
            drop(PyErr::take(py));
            return None;
        }
        Some(s as u64)
    }
}
