//! Validation of what Python hands over as raw integers: a stream must belong to the
//! device's primary context, and every pointer must be device memory of the tensor's device
//! whose mapped range(s) cover the whole access, aligned as the kernel reads it. Checked
//! with `cuStreamGetCtx` and `cuPointerGetAttributes` before every launch, so a wrong
//! pointer is a ValueError instead of a fault on the device.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::driver::{driver_error, Device};
use crate::error::{Error, Result};

/// The stream must belong to the device's primary context (torch's streams do).
pub fn check_stream(dev: &Device, ordinal: i32, stream: u64) -> Result<()> {
    let mut sctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: `stream` is a stream handle from torch (0 = legacy default, resolved against
    // the current context, which the caller set); valid out-pointer.
    let r = unsafe { sys::cuStreamGetCtx(stream as sys::CUstream, &mut sctx) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Value(format!(
            "invalid CUDA stream {stream:#x}: {}",
            driver_error("cuStreamGetCtx", r)
        )));
    }
    if sctx != dev.ctx {
        return Err(Error::Value(format!(
            "CUDA stream {stream:#x} does not belong to cuda:{ordinal}'s primary context \
             (pass torch.cuda.current_stream(tensor.device))"
        )));
    }
    Ok(())
}

/// `ptr .. ptr + bytes` must be device memory of `ordinal`, fully mapped, and aligned to
/// `align`. Walks consecutive mappings (torch's expandable segments map a tensor in pieces).
pub fn check_ptr(what: &str, ptr: u64, bytes: u64, align: u64, ordinal: i32) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if ptr == 0 {
        return Err(Error::Value(format!("{what}: null pointer")));
    }
    if !ptr.is_multiple_of(align) {
        return Err(Error::Value(format!(
            "{what}: pointer {ptr:#x} is not {align}-byte aligned"
        )));
    }
    let end = ptr.checked_add(bytes).ok_or_else(|| {
        Error::Value(format!(
            "{what}: pointer {ptr:#x} + {bytes} bytes overflows"
        ))
    })?;
    let mut at = ptr;
    while at < end {
        let mut mem_type: u32 = 0;
        let mut dev_ord: i32 = -1;
        let mut start: u64 = 0;
        let mut size: usize = 0;
        let mut attrs = [
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        let mut data: [*mut c_void; 4] = [
            &mut mem_type as *mut u32 as *mut c_void,
            &mut dev_ord as *mut i32 as *mut c_void,
            &mut start as *mut u64 as *mut c_void,
            &mut size as *mut usize as *mut c_void,
        ];
        // SAFETY: each data slot points at storage of the attribute's type
        // (CUmemorytype = u32, int, CUdeviceptr = u64, size_t); for a pointer the driver
        // does not know it fills defaults and returns success.
        let r = unsafe {
            sys::cuPointerGetAttributes(
                attrs.len() as u32,
                attrs.as_mut_ptr(),
                data.as_mut_ptr(),
                at as sys::CUdeviceptr,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Value(format!(
                "{what}: {}",
                driver_error("cuPointerGetAttributes", r)
            )));
        }
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 && at != ptr {
            return Err(Error::Value(format!(
                "{what}: the access of {bytes} bytes at {ptr:#x} runs past the end of its \
                 allocation (at {at:#x}); are the sizes right?"
            )));
        }
        if mem_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            let kind = match mem_type {
                0 => "not CUDA memory (a CPU tensor?)",
                x if x == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 => {
                    "pinned host memory, not device memory"
                }
                _ => "not device memory",
            };
            return Err(Error::Value(format!("{what}: pointer {at:#x} is {kind}")));
        }
        if dev_ord != ordinal {
            return Err(Error::Value(format!(
                "{what}: tensor is on cuda:{dev_ord}, expected cuda:{ordinal}"
            )));
        }
        let range_end = start.saturating_add(size as u64);
        if size == 0 || at < start || range_end <= at {
            return Err(Error::Value(format!(
                "{what}: could not find the allocation of pointer {at:#x}"
            )));
        }
        at = range_end;
    }
    Ok(())
}
