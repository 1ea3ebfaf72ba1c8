//! The CUDA driver, loaded at run time: `cuInit` once, each device's primary context (the
//! one torch uses) with the embedded kernels loaded into it on first use, the table of those
//! kernels, the guard that makes a context current and restores the caller's, and the
//! driver's error codes as `Error::Driver`.
//!
//! cudarc's `dynamic-loading` dlopens libcuda at first use, so the extension imports on a
//! machine without a driver; `is_culib_present()` is checked before any driver call because
//! a missing libcuda would otherwise panic inside cudarc's loader.

use std::ffi::{c_void, CStr};
use std::sync::OnceLock;

use cudarc::driver::sys;

use super::abi::{self, Dt, Fmt, Op};
use crate::error::{Error, Result};

/// The embedded fatbins, one per kernel source (build.rs writes them to OUT_DIR).
static MXFP4_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mxfp4.fatbin"));
static NVFP4_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nvfp4.fatbin"));
static NOISE_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/noise.fatbin"));

/// Devices a process can use here (the device table's size).
const MAX_DEVICES: usize = 64;

/// A loaded kernel.
#[derive(Clone, Copy)]
pub struct Func(pub sys::CUfunction);
// SAFETY: a CUfunction is an immutable handle; the driver allows launching it from any
// thread once its module is loaded (it stays loaded for the life of the process).
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

/// Element kernels per device: 3 ops x 2 formats x 3 dtypes x (vector, scalar).
const N_ELEM_FUNCS: usize = 3 * 2 * 3 * 2;

fn func_index(op: Op, fmt: Fmt, dt: Dt, scalar: bool) -> usize {
    (((op as usize * 2 + fmt as usize) * 3 + dt as usize) * 2) + scalar as usize
}

/// What one device needs: its primary context, the loaded kernels, its SM count.
pub struct Device {
    pub ctx: sys::CUcontext,
    elem: [Func; N_ELEM_FUNCS],
    /// `amax_partials_<dt>`, indexed by `Dt`.
    pub amax_partials: [Func; 3],
    pub amax_finalize: Func,
    /// `sq_err_partials_<dt>`, indexed by `Dt`.
    pub sq_err_partials: [Func; 3],
    /// `noise_<dt>`, indexed by `Dt`.
    pub noise: [Func; 3],
    /// `fake_quant_many_<fmt>_<dt>`, indexed by `Fmt`, then `Dt`.
    pub fake_quant_many: [[Func; 3]; 2],
    /// `amax_many_partials_<dt>`, indexed by `Dt`.
    pub amax_many_partials: [Func; 3],
    pub amax_many_finalize: Func,
    pub sms: u32,
    /// Compute capability major (programmatic dependent launch needs 9+).
    pub cc_major: i32,
}
// SAFETY: the primary context handle is process-wide and retained for the life of the
// process; CUDA contexts may be made current on any thread.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// The element kernel of `op` for `fmt` and `dt`, vector or scalar.
    pub fn elem(&self, op: Op, fmt: Fmt, dt: Dt, scalar: bool) -> Func {
        self.elem[func_index(op, fmt, dt, scalar)]
    }
}

/// The driver's name and description of error code `r` of `call`.
pub fn driver_error(call: &str, r: sys::CUresult) -> Error {
    let (mut name, mut desc): (*const std::ffi::c_char, *const std::ffi::c_char) =
        (std::ptr::null(), std::ptr::null());
    // SAFETY: the driver writes pointers to static strings (or leaves them null).
    unsafe {
        sys::cuGetErrorName(r, &mut name);
        sys::cuGetErrorString(r, &mut desc);
    }
    let s = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::from("?")
        } else {
            // SAFETY: non-null pointers from cuGetError* are NUL-terminated static strings.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    Error::Driver {
        call: call.to_owned(),
        name: s(name),
        desc: s(desc),
    }
}

/// Ok for CUDA_SUCCESS, else the driver error.
pub fn check(call: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_error(call, r))
    }
}

/// cuInit once; the device count, or why the driver is unusable.
fn driver() -> Result<i32> {
    static DRIVER: OnceLock<Result<i32>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            // A missing symbol in an old libcuda panics inside cudarc's loader: keep it
            // a Python exception.
            std::panic::catch_unwind(|| {
                // SAFETY: only probes whether libcuda can be dlopen'ed.
                if !unsafe { sys::is_culib_present() } {
                    return Err(Error::Runtime(
                        "no CUDA driver (libcuda.so) found on this machine".into(),
                    ));
                }
                // SAFETY: plain driver calls with valid out-pointers.
                unsafe {
                    check("cuInit", sys::cuInit(0))?;
                    let mut n = 0i32;
                    check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut n))?;
                    Ok(n)
                }
            })
            .unwrap_or_else(|_| {
                Err(Error::Runtime(
                    "the CUDA driver could not be loaded (panic)".into(),
                ))
            })
        })
        .clone()
}

pub fn available() -> bool {
    matches!(driver(), Ok(n) if n > 0)
}

pub fn device_count() -> Result<i32> {
    driver()
}

/// Makes `ctx` current for the guard's lifetime and restores the caller's context after.
pub struct CtxGuard {
    prev: sys::CUcontext,
    switched: bool,
}

impl CtxGuard {
    pub fn enter(ctx: sys::CUcontext) -> Result<Self> {
        let mut prev: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; ctx is a retained primary context.
        unsafe {
            check("cuCtxGetCurrent", sys::cuCtxGetCurrent(&mut prev))?;
            if prev == ctx {
                return Ok(Self {
                    prev,
                    switched: false,
                });
            }
            check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx))?;
        }
        Ok(Self {
            prev,
            switched: true,
        })
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        if self.switched {
            // SAFETY: restores the context that was current on entry (possibly null).
            unsafe {
                sys::cuCtxSetCurrent(self.prev);
            }
        }
    }
}

fn load_module(image: &[u8], what: &str) -> Result<sys::CUmodule> {
    // The embedded bytes sit at an arbitrary offset of the .so; the loader wants the
    // fatbin 8-byte aligned, so copy it into u64 storage first.
    let mut aligned = vec![0u64; image.len().div_ceil(8)];
    // SAFETY: `aligned` holds at least image.len() bytes; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr() as *mut u8, image.len());
    }
    let mut module: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: a valid fatbin image in memory that outlives the call (the driver copies it).
    let r = unsafe { sys::cuModuleLoadData(&mut module, aligned.as_ptr() as *const c_void) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Runtime(format!(
            "loading the {what} kernels failed: {}; this build carries SASS for {} \
             (and PTX for the lowest)",
            driver_error("cuModuleLoadData", r),
            env!("AQN_CUDA_ARCHS")
        )));
    }
    Ok(module)
}

fn get_func(module: sys::CUmodule, name: &str) -> Result<Func> {
    let c = std::ffi::CString::new(name).expect("kernel names have no NUL");
    let mut f: sys::CUfunction = std::ptr::null_mut();
    // SAFETY: module is loaded; valid out-pointer and NUL-terminated name.
    check(&format!("cuModuleGetFunction({name})"), unsafe {
        sys::cuModuleGetFunction(&mut f, module, c.as_ptr())
    })?;
    Ok(Func(f))
}

/// Sets up device `ordinal`, which `device` has checked exists.
fn init_device(ordinal: i32) -> Result<Device> {
    let mut dev: sys::CUdevice = 0;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    let mut sms = 0i32;
    let mut cc_major = 0i32;
    // SAFETY: valid out-pointers; the primary context is retained for the process's
    // life (torch retains the same one), never released.
    unsafe {
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal))?;
        check(
            "cuDevicePrimaryCtxRetain",
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
        )?;
        check(
            "cuDeviceGetAttribute",
            sys::cuDeviceGetAttribute(
                &mut sms,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                dev,
            ),
        )?;
        check(
            "cuDeviceGetAttribute",
            sys::cuDeviceGetAttribute(
                &mut cc_major,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                dev,
            ),
        )?;
    }
    let _guard = CtxGuard::enter(ctx)?;
    let mx = load_module(MXFP4_FATBIN, "MXFP4")?;
    let nv = load_module(NVFP4_FATBIN, "NVFP4")?;
    let mut elem = [Func(std::ptr::null_mut()); N_ELEM_FUNCS];
    for op in [Op::FakeQuant, Op::Quantize, Op::Dequantize] {
        for fmt in [Fmt::Mxfp4, Fmt::Nvfp4] {
            for dt in [Dt::F32, Dt::Bf16, Dt::F16] {
                for scalar in [false, true] {
                    let name = abi::elem_kernel(op, fmt, dt, scalar);
                    let module = if fmt == Fmt::Mxfp4 { mx } else { nv };
                    elem[func_index(op, fmt, dt, scalar)] = get_func(module, &name)?;
                }
            }
        }
    }
    let dts = [Dt::F32, Dt::Bf16, Dt::F16]; // in `Dt` order: the tables are indexed by it
    let mut amax_partials = [Func(std::ptr::null_mut()); 3];
    for dt in dts {
        amax_partials[dt as usize] = get_func(nv, &abi::amax_partials_kernel(dt))?;
    }
    let amax_finalize = get_func(nv, abi::AMAX_FINALIZE_KERNEL)?;
    let mut sq_err_partials = [Func(std::ptr::null_mut()); 3];
    for dt in dts {
        sq_err_partials[dt as usize] = get_func(nv, &abi::sq_err_partials_kernel(dt))?;
    }
    let mut fake_quant_many = [[Func(std::ptr::null_mut()); 3]; 2];
    let mut amax_many_partials = [Func(std::ptr::null_mut()); 3];
    for dt in dts {
        fake_quant_many[Fmt::Mxfp4 as usize][dt as usize] =
            get_func(mx, &abi::fake_quant_many_kernel(Fmt::Mxfp4, dt))?;
        fake_quant_many[Fmt::Nvfp4 as usize][dt as usize] =
            get_func(nv, &abi::fake_quant_many_kernel(Fmt::Nvfp4, dt))?;
        amax_many_partials[dt as usize] = get_func(nv, &abi::amax_many_partials_kernel(dt))?;
    }
    let amax_many_finalize = get_func(nv, abi::AMAX_MANY_FINALIZE_KERNEL)?;
    let nz = load_module(NOISE_FATBIN, "noise")?;
    let mut noise = [Func(std::ptr::null_mut()); 3];
    for dt in dts {
        noise[dt as usize] = get_func(nz, &abi::noise_kernel(dt))?;
    }
    Ok(Device {
        ctx,
        elem,
        amax_partials,
        amax_finalize,
        sq_err_partials,
        noise,
        fake_quant_many,
        amax_many_partials,
        amax_many_finalize,
        sms: sms.max(1) as u32,
        cc_major,
    })
}

/// Device `ordinal`, set up on first use (a failure is cached: see below).
pub fn device(ordinal: i32) -> Result<&'static Device> {
    static DEVICES: [OnceLock<Result<Device>>; MAX_DEVICES] =
        [const { OnceLock::new() }; MAX_DEVICES];
    let count = driver()?;
    if ordinal < 0 || ordinal >= count || ordinal as usize >= MAX_DEVICES {
        return Err(Error::Value(format!(
            "CUDA device {ordinal} does not exist ({count} visible)"
        )));
    }
    // A failed initialization (a driver call or a module load: RuntimeError) is cached and
    // raised again on every later call for this device.
    let slot = DEVICES[ordinal as usize].get_or_init(|| init_device(ordinal));
    slot.as_ref().map_err(Error::clone)
}
