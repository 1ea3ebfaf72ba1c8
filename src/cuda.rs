//! The CUDA launch side: validates raw device pointers handed over by
//! `python/aqn_rs/_cuda.py` (which allocates every buffer with torch) and launches the
//! kernels of `cuda/` on torch's current stream for the tensor's device. Nothing here
//! synchronizes with the host, so the launches order with torch work and can be captured in
//! a CUDA graph. `cuda_fake_quant_t`, the hot path, takes the tensors themselves and reads
//! their pointers and torch's current stream through DLPack's C exchange API (`dlpack.rs`);
//! the pointers it reads are checked like any other.
//!
//! - The driver is loaded at run time (cudarc `dynamic-loading`): the extension imports on a
//!   machine without one, and `cudarc::driver::sys::is_culib_present()` is checked before any
//!   driver call (a missing libcuda would otherwise panic).
//! - Each device gets its primary context (the one torch uses) and the two embedded modules,
//!   loaded once on first use. Every call saves the caller's current context and restores it.
//! - Every pointer is checked with `cuPointerGetAttributes`: device memory, on the tensor's
//!   device, and the mapped range(s) cover the whole access (walking consecutive mappings,
//!   since torch's expandable segments map one tensor in several pieces).
//! - Every failure is a Python exception (RuntimeError for the driver, ValueError for bad
//!   pointers/sizes/arguments, TypeError for dtypes); nothing panics.
//!
//! Built without kernels (`AQN_NO_CUDA=1`, or no nvcc), the same functions exist and raise
//! RuntimeError, so `aqn_rs._cuda` imports everywhere.

// A CPU-only build keeps the argument checks but has nothing to launch.
#![cfg_attr(not(aqn_cuda), allow(dead_code))]

use pyo3::prelude::*;

use crate::error::{Error, Result};

/// Floats of the per-CTA amax scratch that Python allocates for NVFP4 without a given amax
/// (and for `amax`); the amax kernel never launches more CTAs than this.
pub const AMAX_SCRATCH: usize = 1024;

#[cfg_attr(aqn_cuda, allow(dead_code))]
const NOT_BUILT: &str = "aqn_rs was built without CUDA kernels (AQN_NO_CUDA=1 or no nvcc at \
build time); reinstall with them: `pip install --force-reinstall --no-binary aqn-rs aqn-rs` \
(nvcc comes from the nvidia-cuda-nvcc build requirement; set AQN_REQUIRE_CUDA=1 to make a \
build without kernels fail instead of falling back to the CPU)";

/// Element dtype of a tensor, as `_cuda.py` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dt {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
}

impl Dt {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(Error::Type(format!(
                "unsupported dtype {s:?}; expected \"f32\", \"bf16\" or \"f16\" \
                 (torch.float32, torch.bfloat16, torch.float16)"
            ))),
        }
    }
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
    /// Elements per 16-byte vector in the vector kernels.
    fn epv(self) -> usize {
        16 / self.size()
    }
}

/// FP4 format family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    Mxfp4 = 0,
    Nvfp4 = 1,
}

impl Fmt {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "mxfp4" => Ok(Self::Mxfp4),
            "nvfp4" => Ok(Self::Nvfp4),
            _ => Err(Error::Value(format!(
                "unknown format {s:?}; expected \"mxfp4\" or \"nvfp4\""
            ))),
        }
    }
    fn block(self) -> usize {
        match self {
            Self::Mxfp4 => aqn_core::mxfp4::BLOCK,
            Self::Nvfp4 => aqn_core::nvfp4::BLOCK,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Mxfp4 => "mxfp4",
            Self::Nvfp4 => "nvfp4",
        }
    }
}

/// MXFP4 scale mode number as the kernels take it (cuda/mxfp4.cu `MxMode`).
fn mode_number(fmt: Fmt, mode: &str) -> Result<i32> {
    if fmt == Fmt::Nvfp4 {
        return Ok(0); // NVFP4 has one rule; the mode argument is ignored
    }
    let m: aqn_core::ScaleMode = mode.parse()?;
    Ok(match m {
        aqn_core::ScaleMode::Floor => 0,
        aqn_core::ScaleMode::Rceil => 1,
        aqn_core::ScaleMode::Even => 2,
        aqn_core::ScaleMode::Ceil => 3,
    })
}

/// The `[rows, k]` view: checks that the sizes multiply without overflow.
fn numel(rows: u64, k: u64) -> Result<usize> {
    let layout = aqn_core::Layout::from_shape(&[rows as usize, k as usize], 1)?;
    Ok(layout.numel())
}

/// Where the caller's NVFP4 tensor amax comes from (exactly one of the three).
#[derive(Clone, Copy, Debug)]
enum AmaxSource {
    /// Reduce it on the device into this scratch (AMAX_SCRATCH f32).
    Compute { scratch: u64 },
    /// A device f32 (a 0-d tensor): used as is, never read on the host.
    Device { ptr: u64 },
    /// A host value, validated here.
    Host { value: f32 },
}

fn amax_source(amax_ptr: u64, amax_value: Option<f32>, scratch: u64) -> Result<AmaxSource> {
    match (amax_ptr != 0, amax_value, scratch != 0) {
        (true, None, false) => Ok(AmaxSource::Device { ptr: amax_ptr }),
        (false, Some(v), false) => {
            aqn_core::nvfp4::validate_amax(v)?;
            Ok(AmaxSource::Host { value: v })
        }
        (false, None, true) => Ok(AmaxSource::Compute { scratch }),
        _ => Err(Error::Value(
            "NVFP4 needs exactly one amax source: a device pointer, a host value, or a \
             scratch buffer to compute it in"
                .into(),
        )),
    }
}

#[cfg(aqn_cuda)]
mod imp {
    //! Everything that touches the driver (only compiled with the kernels).

    use super::{AmaxSource, Dt, Error, Fmt, Result, AMAX_SCRATCH};
    use cudarc::driver::sys;
    use std::ffi::{c_void, CStr};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::OnceLock;

    /// The embedded fatbins, one per format family (build.rs writes them to OUT_DIR).
    static MXFP4_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mxfp4.fatbin"));
    static NVFP4_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nvfp4.fatbin"));
    static NOISE_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/noise.fatbin"));

    /// Threads per CTA of the element kernels (cuda/blockwise.cuh VEC_THREADS) and the
    /// 16-byte vectors each thread takes per iteration (VEC_UNROLL).
    const VEC_THREADS: u32 = 256;
    const VEC_UNROLL: u64 = 4;
    /// Threads per CTA of amax_partials_* (cuda/nvfp4.cu AMAX_THREADS) and its unroll.
    const AMAX_THREADS: u32 = 512;
    const AMAX_UNROLL: u64 = 4;
    const MAX_DEVICES: usize = 64;

    /// Grid caps, tunable by the benchmark (`cuda_set_tuning`): element kernels launch at most
    /// `sms * CTAS_PER_SM` CTAs (grid-stride beyond), the amax at most `sms * AMAX_CTAS_PER_SM`.
    static CTAS_PER_SM: AtomicU32 = AtomicU32::new(32);
    static AMAX_CTAS_PER_SM: AtomicU32 = AtomicU32::new(2);
    /// Programmatic dependent launch of the kernel after an amax pass (sm_90+).
    static PDL: AtomicBool = AtomicBool::new(true);
    pub fn set_tuning(ctas_per_sm: Option<u32>, amax_ctas_per_sm: Option<u32>, pdl: Option<bool>) {
        if let Some(v) = pdl {
            PDL.store(v, Ordering::Relaxed);
        }
        if let Some(v) = ctas_per_sm {
            CTAS_PER_SM.store(v.max(1), Ordering::Relaxed);
        }
        if let Some(v) = amax_ctas_per_sm {
            AMAX_CTAS_PER_SM.store(v.max(1), Ordering::Relaxed);
        }
    }

    pub fn tuning() -> (u32, u32, bool) {
        (
            CTAS_PER_SM.load(Ordering::Relaxed),
            AMAX_CTAS_PER_SM.load(Ordering::Relaxed),
            PDL.load(Ordering::Relaxed),
        )
    }

    /// Launch arguments; mirrors `aqn::Args` in cuda/fp4_common.cuh field by field.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct KernelArgs {
        x: u64,
        out: u64,
        codes: u64,
        scales: u64,
        amax_src: u64,
        gs_out: u64,
        gs_src: u64,
        rows: i64,
        k: i64,
        n_amax: i32,
        amax_value: f32,
        gs_value: f32,
        mode: i32,
    }

    impl KernelArgs {
        fn new(rows: u64, k: u64) -> Self {
            Self {
                x: 0,
                out: 0,
                codes: 0,
                scales: 0,
                amax_src: 0,
                gs_out: 0,
                gs_src: 0,
                rows: rows as i64,
                k: k as i64,
                n_amax: 0,
                amax_value: 0.0,
                gs_value: 0.0,
                mode: 0,
            }
        }
    }

    /// Launch arguments of `noise_*`; mirrors `aqn_noise::NoiseArgs` in cuda/noise.cu.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct NoiseArgs {
        out: u64,
        n: u64,
        offset: u64,
        key: u64,
        step: u64,
        sigma: f32,
        pad: i32,
    }

    #[derive(Clone, Copy)]
    struct Func(sys::CUfunction);
    // SAFETY: a CUfunction is an immutable handle; the driver allows launching it from any
    // thread once its module is loaded (it stays loaded for the life of the process).
    unsafe impl Send for Func {}
    unsafe impl Sync for Func {}

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Op {
        FakeQuant = 0,
        Quantize = 1,
        Dequantize = 2,
    }

    impl Op {
        fn name(self) -> &'static str {
            match self {
                Op::FakeQuant => "fake_quant",
                Op::Quantize => "quantize",
                Op::Dequantize => "dequantize",
            }
        }
    }

    const N_ELEM_FUNCS: usize = 3 * 2 * 3 * 2;

    fn func_index(op: Op, fmt: Fmt, dt: Dt, scalar: bool) -> usize {
        (((op as usize * 2 + fmt as usize) * 3 + dt as usize) * 2) + scalar as usize
    }

    /// What one device needs: its primary context, the loaded kernels, its SM count.
    struct Device {
        ctx: sys::CUcontext,
        elem: [Func; N_ELEM_FUNCS],
        amax_partials: [Func; 3],
        amax_finalize: Func,
        noise: [Func; 3],
        sms: u32,
        /// Compute capability major (programmatic dependent launch needs 9+).
        cc_major: i32,
    }
    // SAFETY: the primary context handle is process-wide and retained for the life of the
    // process; CUDA contexts may be made current on any thread.
    unsafe impl Send for Device {}
    unsafe impl Sync for Device {}

    fn driver_error(call: &str, r: sys::CUresult) -> Error {
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

    fn check(call: &str, r: sys::CUresult) -> Result<()> {
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
    struct CtxGuard {
        prev: sys::CUcontext,
        switched: bool,
    }

    impl CtxGuard {
        fn enter(ctx: sys::CUcontext) -> Result<Self> {
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
            std::ptr::copy_nonoverlapping(
                image.as_ptr(),
                aligned.as_mut_ptr() as *mut u8,
                image.len(),
            );
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
                        let name = format!(
                            "{}_{}_{}{}",
                            op.name(),
                            fmt.name(),
                            dt.name(),
                            if scalar { "_scalar" } else { "" }
                        );
                        let module = if fmt == Fmt::Mxfp4 { mx } else { nv };
                        elem[func_index(op, fmt, dt, scalar)] = get_func(module, &name)?;
                    }
                }
            }
        }
        let amax_partials = [
            get_func(nv, "amax_partials_f32")?,
            get_func(nv, "amax_partials_bf16")?,
            get_func(nv, "amax_partials_f16")?,
        ];
        let amax_finalize = get_func(nv, "amax_finalize")?;
        let nz = load_module(NOISE_FATBIN, "noise")?;
        let noise = [
            get_func(nz, "noise_f32")?,
            get_func(nz, "noise_bf16")?,
            get_func(nz, "noise_f16")?,
        ];
        Ok(Device {
            ctx,
            elem,
            amax_partials,
            amax_finalize,
            noise,
            sms: sms.max(1) as u32,
            cc_major,
        })
    }

    fn device(ordinal: i32) -> Result<&'static Device> {
        #[allow(clippy::declare_interior_mutable_const)]
        const UNINIT: OnceLock<Result<Device>> = OnceLock::new();
        static DEVICES: [OnceLock<Result<Device>>; MAX_DEVICES] = [UNINIT; MAX_DEVICES];
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

    /// The stream must belong to the device's primary context (torch's streams do).
    fn check_stream(dev: &Device, ordinal: i32, stream: u64) -> Result<()> {
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
    fn check_ptr(what: &str, ptr: u64, bytes: u64, align: u64, ordinal: i32) -> Result<()> {
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

    /// Everything a call needs once its device, context and stream are checked.
    struct Launch {
        dev: &'static Device,
        ordinal: i32,
        stream: u64,
        _guard: CtxGuard,
    }

    impl Launch {
        fn new(ordinal: i32, stream: u64) -> Result<Launch> {
            let dev = device(ordinal)?;
            let guard = CtxGuard::enter(dev.ctx)?;
            check_stream(dev, ordinal, stream)?;
            Ok(Launch {
                dev,
                ordinal,
                stream,
                _guard: guard,
            })
        }

        fn ptr(&self, what: &str, ptr: u64, bytes: u64, align: u64) -> Result<()> {
            check_ptr(what, ptr, bytes, align, self.ordinal)
        }

        /// Launches `f` after the amax pass just enqueued, as a programmatic dependent launch
        /// where the device has it (sm_90+): its CTAs start while the amax pass drains and
        /// wait for it (`griddepcontrol.wait`) only before reading the partials.
        fn launch_after_amax(
            &self,
            f: Func,
            grid: u64,
            block: u32,
            args: &KernelArgs,
        ) -> Result<()> {
            if self.dev.cc_major < 9 || !PDL.load(Ordering::Relaxed) {
                return self.launch(f, grid, block, args);
            }
            let grid = grid.clamp(1, i32::MAX as u64) as u32;
            let mut params: [*mut c_void; 1] = [args as *const KernelArgs as *mut c_void];
            // SAFETY: an all-zero CUlaunchAttribute is a valid "ignore" value; we then set the
            // id and the matching union member.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid,
                gridDimY: 1,
                gridDimZ: 1,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: 0,
                hStream: self.stream as sys::CUstream,
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as in `launch`; `cfg` and `attr` outlive the call.
            let r = unsafe {
                sys::cuLaunchKernelEx(&cfg, f.0, params.as_mut_ptr(), std::ptr::null_mut())
            };
            check("cuLaunchKernelEx", r)
        }

        /// `A` is the kernel's one by-value parameter: `KernelArgs` for the FP4 kernels,
        /// `NoiseArgs` for the noise kernels.
        fn launch<A>(&self, f: Func, grid: u64, block: u32, args: &A) -> Result<()> {
            let grid = grid.clamp(1, i32::MAX as u64) as u32;
            let mut params: [*mut c_void; 1] = [args as *const A as *mut c_void];
            // SAFETY: every kernel takes one struct by value, which `A` mirrors (#[repr(C)],
            // same field order and types: `aqn::Args` <-> KernelArgs, `aqn_noise::NoiseArgs`
            // <-> NoiseArgs, and the callers pair each kernel with its own); every pointer in it
            // was checked above to be device memory of this device covering what the kernel
            // touches; the stream belongs to the current context.
            let r = unsafe {
                sys::cuLaunchKernel(
                    f.0,
                    grid,
                    1,
                    1,
                    block,
                    1,
                    1,
                    0,
                    self.stream as sys::CUstream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            check("cuLaunchKernel", r)
        }

        /// Launches an element kernel; after an amax pass (partials to fold) as a dependent.
        fn launch_elem(&self, f: Func, grid: u64, a: &KernelArgs) -> Result<()> {
            if a.n_amax >= 2 {
                self.launch_after_amax(f, grid, VEC_THREADS, a)
            } else {
                self.launch(f, grid, VEC_THREADS, a)
            }
        }

        /// Grid of an element kernel over `work` items of `per_cta` each.
        fn elem_grid(&self, work: u64, per_cta: u64) -> u64 {
            let cap = self.dev.sms as u64 * CTAS_PER_SM.load(Ordering::Relaxed) as u64;
            work.div_ceil(per_cta).min(cap).max(1)
        }

        /// Launches the amax partials of `n` elements into `scratch`; returns how many.
        fn amax_partials(&self, dt: Dt, x: u64, n: u64, scratch: u64) -> Result<i32> {
            self.ptr("amax scratch", scratch, (AMAX_SCRATCH * 4) as u64, 4)?;
            let per_cta = AMAX_THREADS as u64 * AMAX_UNROLL * dt.epv() as u64;
            let cap = (self.dev.sms as u64 * AMAX_CTAS_PER_SM.load(Ordering::Relaxed) as u64)
                .min(AMAX_SCRATCH as u64);
            let grid = n.div_ceil(per_cta).clamp(1, cap);
            let mut a = KernelArgs::new(1, n);
            a.x = x;
            a.out = scratch;
            self.launch(self.dev.amax_partials[dt as usize], grid, AMAX_THREADS, &a)?;
            Ok(grid as i32)
        }

        /// Fills the NVFP4 amax fields of `a` (launching the partials if needed).
        fn nv_amax(&self, a: &mut KernelArgs, src: AmaxSource, dt: Dt, n: u64) -> Result<()> {
            match src {
                AmaxSource::Host { value } => {
                    a.n_amax = 0;
                    a.amax_value = value;
                }
                AmaxSource::Device { ptr } => {
                    self.ptr("amax", ptr, 4, 4)?;
                    a.n_amax = 1;
                    a.amax_src = ptr;
                }
                AmaxSource::Compute { scratch } => {
                    if n == 0 {
                        a.n_amax = 0; // the amax of an empty tensor is 0
                        a.amax_value = 0.0;
                    } else {
                        a.n_amax = self.amax_partials(dt, a.x, n, scratch)?;
                        a.amax_src = scratch;
                    }
                }
            }
            Ok(())
        }
    }

    /// The element kernel and grid for one op: the vector kernel when whole blocks tile the
    /// flat tensor and the pointers allow 16-byte access, else the scalar one.
    fn pick(
        l: &Launch,
        op: Op,
        fmt: Fmt,
        dt: Dt,
        rows: u64,
        k: u64,
        ptrs_aligned: bool,
    ) -> (Func, u64) {
        let b = fmt.block() as u64;
        let n = rows * k;
        let vec = k.is_multiple_of(b) && ptrs_aligned;
        let f = l.dev.elem[func_index(op, fmt, dt, !vec)];
        let grid = if vec {
            l.elem_grid(n / dt.epv() as u64, VEC_THREADS as u64 * VEC_UNROLL)
        } else {
            l.elem_grid(rows * k.div_ceil(b), VEC_THREADS as u64)
        };
        (f, grid)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fake_quant(
        fmt: Fmt,
        mode: i32,
        dt: Dt,
        ordinal: i32,
        stream: u64,
        x: u64,
        out: u64,
        rows: u64,
        k: u64,
        amax: Option<AmaxSource>,
    ) -> Result<()> {
        let n = super::numel(rows, k)? as u64;
        let l = Launch::new(ordinal, stream)?;
        let bytes = n * dt.size() as u64;
        l.ptr("x", x, bytes, dt.size() as u64)?;
        l.ptr("out", out, bytes, dt.size() as u64)?;
        if n == 0 {
            return Ok(());
        }
        let mut a = KernelArgs::new(rows, k);
        a.x = x;
        a.out = out;
        a.mode = mode;
        if fmt == Fmt::Nvfp4 {
            let src = amax.ok_or_else(|| Error::Value("NVFP4 needs an amax source".into()))?;
            l.nv_amax(&mut a, src, dt, n)?;
        }
        let (f, grid) = pick(
            &l,
            Op::FakeQuant,
            fmt,
            dt,
            rows,
            k,
            (x | out).is_multiple_of(16),
        );
        l.launch_elem(f, grid, &a)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn quantize(
        fmt: Fmt,
        mode: i32,
        dt: Dt,
        ordinal: i32,
        stream: u64,
        x: u64,
        codes: u64,
        scales: u64,
        gs_out: u64,
        rows: u64,
        k: u64,
        amax: Option<AmaxSource>,
    ) -> Result<()> {
        let n = super::numel(rows, k)? as u64;
        let b = fmt.block() as u64;
        let l = Launch::new(ordinal, stream)?;
        l.ptr("x", x, n * dt.size() as u64, dt.size() as u64)?;
        l.ptr("codes", codes, rows * k.div_ceil(2), 1)?;
        l.ptr("scales", scales, rows * k.div_ceil(b), 1)?;
        let mut a = KernelArgs::new(rows, k);
        a.x = x;
        a.codes = codes;
        a.scales = scales;
        a.mode = mode;
        if fmt == Fmt::Nvfp4 {
            l.ptr("global_scale", gs_out, 4, 4)?;
            a.gs_out = gs_out;
            let src = amax.ok_or_else(|| Error::Value("NVFP4 needs an amax source".into()))?;
            l.nv_amax(&mut a, src, dt, n)?;
        } else if n == 0 {
            return Ok(());
        }
        // An empty NVFP4 tensor still launches one CTA: it writes the global scale.
        let code_align = (dt.epv() / 2) as u64;
        let aligned = x.is_multiple_of(16) && codes.is_multiple_of(code_align);
        let (f, grid) = pick(&l, Op::Quantize, fmt, dt, rows, k, aligned);
        l.launch_elem(f, grid, &a)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dequantize(
        fmt: Fmt,
        dt: Dt,
        ordinal: i32,
        stream: u64,
        codes: u64,
        scales: u64,
        gs_ptr: u64,
        gs_value: Option<f32>,
        out: u64,
        rows: u64,
        k: u64,
    ) -> Result<()> {
        let n = super::numel(rows, k)? as u64;
        let b = fmt.block() as u64;
        let l = Launch::new(ordinal, stream)?;
        l.ptr("codes", codes, rows * k.div_ceil(2), 1)?;
        l.ptr("scales", scales, rows * k.div_ceil(b), 1)?;
        l.ptr("out", out, n * dt.size() as u64, dt.size() as u64)?;
        let mut a = KernelArgs::new(rows, k);
        a.codes = codes;
        a.scales = scales;
        a.out = out;
        if fmt == Fmt::Nvfp4 {
            match (gs_ptr != 0, gs_value) {
                (true, None) => {
                    l.ptr("global_scale", gs_ptr, 4, 4)?;
                    a.gs_src = gs_ptr;
                }
                (false, Some(v)) => {
                    aqn_core::nvfp4::validate_global_scale(v)?;
                    a.gs_value = v;
                }
                _ => {
                    return Err(Error::Value(
                        "NVFP4 dequantize needs exactly one global scale (device or host)".into(),
                    ))
                }
            }
        }
        if n == 0 {
            return Ok(());
        }
        let code_align = (dt.epv() / 2) as u64;
        let aligned = out.is_multiple_of(16) && codes.is_multiple_of(code_align);
        let (f, grid) = pick(&l, Op::Dequantize, fmt, dt, rows, k, aligned);
        l.launch(f, grid, VEC_THREADS, &a)
    }

    pub fn probe_overhead(
        ordinal: i32,
        stream: u64,
        ptr: u64,
        reps: u32,
    ) -> Result<(f64, f64, f64, f64)> {
        let l = Launch::new(ordinal, stream)?;
        l.ptr("probe", ptr, 4, 4)?;
        let reps = reps.max(1);
        let per = |t: std::time::Instant| t.elapsed().as_nanos() as f64 / reps as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let mut c: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: valid out-pointer.
            unsafe { sys::cuCtxGetCurrent(&mut c) };
        }
        let ctx_ns = per(t);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            check_stream(l.dev, ordinal, stream)?;
        }
        let stream_ns = per(t);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            check_ptr("probe", ptr, 4, 4, ordinal)?;
        }
        let ptr_ns = per(t);
        let mut a = KernelArgs::new(1, 0);
        a.out = ptr;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            l.launch(l.dev.amax_finalize, 1, 32, &a)?;
        }
        let launch_ns = per(t);
        Ok((ctx_ns, stream_ns, ptr_ns, launch_ns))
    }

    pub fn amax(
        dt: Dt,
        ordinal: i32,
        stream: u64,
        x: u64,
        n: u64,
        scratch: u64,
        out: u64,
    ) -> Result<()> {
        let l = Launch::new(ordinal, stream)?;
        l.ptr("x", x, n * dt.size() as u64, dt.size() as u64)?;
        l.ptr("out", out, 4, 4)?;
        let mut a = KernelArgs::new(1, 0);
        a.out = out;
        if n > 0 {
            a.n_amax = l.amax_partials(dt, x, n, scratch)?;
            a.amax_src = scratch;
        }
        l.launch(l.dev.amax_finalize, 1, 32, &a)
    }

    /// Elements `offset .. offset + n` of the noise of `(key, step)`, `z * sigma` cast to
    /// `dt`, written to `out` (docs/NOISE.md). One thread per block of four elements.
    #[allow(clippy::too_many_arguments)]
    pub fn noise(
        dt: Dt,
        ordinal: i32,
        stream: u64,
        out: u64,
        n: u64,
        offset: u64,
        key: u64,
        step: u64,
        sigma: f32,
    ) -> Result<()> {
        let l = Launch::new(ordinal, stream)?;
        let bytes = n
            .checked_mul(dt.size() as u64)
            .ok_or_else(|| Error::Value(format!("noise: {n} elements overflow the byte count")))?;
        l.ptr("out", out, bytes, dt.size() as u64)?;
        if n == 0 {
            return Ok(());
        }
        // The CPU path's rule (`fill_gaussian`): offset + n must fit in u64.
        let last = offset.checked_add(n).map(|end| end - 1).ok_or_else(|| {
            Error::Value(format!(
                "noise element range overflows u64: offset {offset} + {n} elements"
            ))
        })?;
        let blocks = (last >> 2) - (offset >> 2) + 1;
        let a = NoiseArgs {
            out,
            n,
            offset,
            key,
            step,
            sigma,
            pad: 0,
        };
        const NOISE_THREADS: u32 = 256;
        let cap = l.dev.sms as u64 * 16;
        let grid = blocks.div_ceil(NOISE_THREADS as u64).min(cap).max(1);
        l.launch(l.dev.noise[dt as usize], grid, NOISE_THREADS, &a)
    }
}

// ---------------------------------------------------------------------------------------
// Python functions. Without the kernels they exist and raise RuntimeError(NOT_BUILT).

#[cfg(not(aqn_cuda))]
mod imp {
    //! CPU-only build: every entry point reports that the kernels are missing.
    use super::{Error, Result};
    pub fn not_built<T>() -> Result<T> {
        Err(Error::Runtime(super::NOT_BUILT.into()))
    }
    pub fn available() -> bool {
        false
    }
}

/// Whether CUDA kernels were compiled into this build.
#[pyfunction]
fn cuda_built() -> bool {
    cfg!(aqn_cuda)
}

/// The SASS/PTX targets of the embedded fatbins (empty for a CPU-only build).
#[pyfunction]
fn cuda_build_archs() -> Vec<&'static str> {
    #[cfg(aqn_cuda)]
    {
        env!("AQN_CUDA_ARCHS").split(',').collect()
    }
    #[cfg(not(aqn_cuda))]
    {
        Vec::new()
    }
}

/// Kernels built, a CUDA driver loadable and at least one device visible. Never raises.
#[pyfunction]
fn cuda_available() -> bool {
    imp::available()
}

/// Number of CUDA devices the driver sees.
#[pyfunction]
fn cuda_device_count() -> PyResult<i32> {
    #[cfg(aqn_cuda)]
    {
        Ok(imp::device_count()?)
    }
    #[cfg(not(aqn_cuda))]
    {
        Ok(imp::not_built()?)
    }
}

/// Benchmark knobs (None keeps a value): grid caps, in CTAs per SM, of the element kernels
/// and of the amax reduction, and whether the kernel after an amax pass is a programmatic
/// dependent launch (sm_90+). Returns the values in force.
#[pyfunction]
#[pyo3(signature = (ctas_per_sm = None, amax_ctas_per_sm = None, pdl = None))]
fn cuda_set_tuning(
    ctas_per_sm: Option<u32>,
    amax_ctas_per_sm: Option<u32>,
    pdl: Option<bool>,
) -> PyResult<(u32, u32, bool)> {
    #[cfg(aqn_cuda)]
    {
        imp::set_tuning(
            ctas_per_sm,
            amax_ctas_per_sm.map(|v| v.min(AMAX_SCRATCH as u32)),
            pdl,
        );
        Ok(imp::tuning())
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (ctas_per_sm, amax_ctas_per_sm, pdl);
        Ok(imp::not_built()?)
    }
}

/// Benchmark probe: nanoseconds per call of the driver work a launch does, averaged over
/// `reps`: (cuCtxGetCurrent, the stream check, the pointer check of `ptr`, cuLaunchKernel of
/// a one-warp kernel writing the f32 at `ptr`). Enqueues `reps` tiny kernels on `stream`.
#[pyfunction]
fn cuda_probe_overhead(
    device: i32,
    stream: u64,
    ptr: u64,
    reps: u32,
) -> PyResult<(f64, f64, f64, f64)> {
    #[cfg(aqn_cuda)]
    {
        Ok(imp::probe_overhead(device, stream, ptr, reps)?)
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (device, stream, ptr, reps);
        Ok(imp::not_built()?)
    }
}

/// Fake-quantize (quantize-dequantize) `rows * k` elements at device pointer `x` into `out`.
///
/// Args: fmt ("mxfp4"/"nvfp4"), mode (MXFP4 scale mode), dtype ("f32"/"bf16"/"f16"),
/// device ordinal, stream (raw handle of torch's current stream on that device), x, out,
/// rows, k, then the NVFP4 amax source: amax_ptr (device f32, 0 = none), amax_value (host
/// float or None), scratch (AMAX_SCRATCH f32 to reduce into, 0 = none) — exactly one.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_fake_quant(
    fmt: &str,
    mode: &str,
    dtype: &str,
    device: i32,
    stream: u64,
    x: u64,
    out: u64,
    rows: u64,
    k: u64,
    amax_ptr: u64,
    amax_value: Option<f32>,
    scratch: u64,
) -> PyResult<()> {
    let fmt = Fmt::parse(fmt)?;
    let mode = mode_number(fmt, mode)?;
    let dt = Dt::parse(dtype)?;
    Ok(fake_quant_launch(
        fmt, mode, dt, device, stream, x, out, rows, k, amax_ptr, amax_value, scratch,
    )?)
}

/// The common tail of `cuda_fake_quant` and `cuda_fake_quant_t`: the NVFP4 amax source
/// (checked after everything else), then the launch.
#[allow(clippy::too_many_arguments)]
fn fake_quant_launch(
    fmt: Fmt,
    mode: i32,
    dt: Dt,
    device: i32,
    stream: u64,
    x: u64,
    out: u64,
    rows: u64,
    k: u64,
    amax_ptr: u64,
    amax_value: Option<f32>,
    scratch: u64,
) -> Result<()> {
    let amax = if fmt == Fmt::Nvfp4 {
        Some(amax_source(amax_ptr, amax_value, scratch)?)
    } else {
        None
    };
    #[cfg(aqn_cuda)]
    {
        imp::fake_quant(fmt, mode, dt, device, stream, x, out, rows, k, amax)
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (mode, dt, device, stream, x, out, rows, k, amax);
        imp::not_built()
    }
}

/// Dtype of a DLPack dtype, if the kernels take it.
fn dt_of(d: crate::dlpack::DLDataType) -> Option<Dt> {
    use crate::dlpack::{DL_BFLOAT, DL_FLOAT};
    match (d.code, d.bits, d.lanes) {
        (DL_FLOAT, 32, 1) => Some(Dt::F32),
        (DL_BFLOAT, 16, 1) => Some(Dt::Bf16),
        (DL_FLOAT, 16, 1) => Some(Dt::F16),
        _ => None,
    }
}

/// `cuda_fake_quant` on tensors: reads x and out (a new tensor like x) through DLPack's C
/// exchange API and launches on the framework's current stream, with no Python call.
/// Returns False, launching nothing, when that API is not registered or x is not a
/// contiguous CUDA tensor of a supported dtype with at least one dimension: the caller then
/// takes its attribute-reading path, which raises the right error. The amax arguments are
/// those of `cuda_fake_quant`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_fake_quant_t(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    fmt: &str,
    mode: &str,
    amax_ptr: u64,
    amax_value: Option<f32>,
    scratch: u64,
) -> PyResult<bool> {
    let Some(xv) = crate::dlpack::view(py, x) else {
        return Ok(false);
    };
    let Some(dt) = dt_of(xv.dtype) else {
        return Ok(false);
    };
    if xv.device.device_type != crate::dlpack::DL_CUDA || xv.ndim < 1 || !xv.contiguous {
        return Ok(false);
    }
    let ov =
        crate::dlpack::view(py, out).ok_or_else(|| Error::Value("out is not a tensor".into()))?;
    if ov.device.device_type != crate::dlpack::DL_CUDA
        || ov.device.device_id != xv.device.device_id
        || dt_of(ov.dtype) != Some(dt)
        || !ov.contiguous
        || ov.numel != xv.numel
    {
        return Err(Error::Value(
            "out must be a contiguous tensor of x's dtype, size and CUDA device".into(),
        )
        .into());
    }
    let Some(stream) = crate::dlpack::current_stream(py, xv.device.device_id) else {
        return Ok(false);
    };
    let fmt = Fmt::parse(fmt)?;
    let mode = mode_number(fmt, mode)?;
    let rows = xv.numel.checked_div(xv.k).unwrap_or(0);
    fake_quant_launch(
        fmt,
        mode,
        dt,
        xv.device.device_id,
        stream,
        xv.ptr,
        ov.ptr,
        rows,
        xv.k,
        amax_ptr,
        amax_value,
        scratch,
    )?;
    Ok(true)
}

/// Quantize `rows * k` elements at `x` to packed codes (`rows * ceil(k/2)` bytes) and scale
/// bytes (`rows * ceil(k/block)`); NVFP4 also writes the f32 global scale at `gs_out`.
/// The amax arguments are those of `cuda_fake_quant`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_quantize(
    fmt: &str,
    mode: &str,
    dtype: &str,
    device: i32,
    stream: u64,
    x: u64,
    codes: u64,
    scales: u64,
    gs_out: u64,
    rows: u64,
    k: u64,
    amax_ptr: u64,
    amax_value: Option<f32>,
    scratch: u64,
) -> PyResult<()> {
    let fmt = Fmt::parse(fmt)?;
    let mode = mode_number(fmt, mode)?;
    let dt = Dt::parse(dtype)?;
    let amax = if fmt == Fmt::Nvfp4 {
        Some(amax_source(amax_ptr, amax_value, scratch)?)
    } else {
        None
    };
    #[cfg(aqn_cuda)]
    {
        Ok(imp::quantize(
            fmt, mode, dt, device, stream, x, codes, scales, gs_out, rows, k, amax,
        )?)
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (
            mode, dt, device, stream, x, codes, scales, gs_out, rows, k, amax,
        );
        Ok(imp::not_built()?)
    }
}

/// Dequantize packed codes and scale bytes into `rows * k` elements at `out`. NVFP4 takes
/// its global scale from the device (`gs_ptr`) or the host (`gs_value`), exactly one; a
/// device global scale that is not finite and positive gives NaN (it cannot raise without
/// a host sync).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_dequantize(
    fmt: &str,
    dtype: &str,
    device: i32,
    stream: u64,
    codes: u64,
    scales: u64,
    gs_ptr: u64,
    gs_value: Option<f32>,
    out: u64,
    rows: u64,
    k: u64,
) -> PyResult<()> {
    let fmt = Fmt::parse(fmt)?;
    let dt = Dt::parse(dtype)?;
    #[cfg(aqn_cuda)]
    {
        Ok(imp::dequantize(
            fmt, dt, device, stream, codes, scales, gs_ptr, gs_value, out, rows, k,
        )?)
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (
            fmt, dt, device, stream, codes, scales, gs_ptr, gs_value, out, rows, k,
        );
        Ok(imp::not_built()?)
    }
}

/// Max |x| over `n` elements at `x` into the f32 at `out` (NaN if any NaN, 0 if n == 0),
/// using `scratch` (AMAX_SCRATCH f32) for the per-CTA partials.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_amax(
    dtype: &str,
    device: i32,
    stream: u64,
    x: u64,
    n: u64,
    scratch: u64,
    out: u64,
) -> PyResult<()> {
    let dt = Dt::parse(dtype)?;
    #[cfg(aqn_cuda)]
    {
        Ok(imp::amax(dt, device, stream, x, n, scratch, out)?)
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (dt, device, stream, x, n, scratch, out);
        Ok(imp::not_built()?)
    }
}

/// Elements `offset .. offset + n` of AQN's noise for `(seed, step, name)` (docs/NOISE.md),
/// `z * float32(sigma)` cast to `dtype`, into `n` elements at `out`: the CUDA twin of
/// `noise_fill_f32`, bit for bit.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_noise(
    dtype: &str,
    device: i32,
    stream: u64,
    out: u64,
    n: u64,
    offset: u64,
    seed: u64,
    name: &str,
    step: u64,
    sigma: f64,
) -> PyResult<()> {
    let dt = Dt::parse(dtype)?;
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(
            Error::Value(format!("sigma must be a finite number >= 0, got {sigma}")).into(),
        );
    }
    let key = aqn_core::noise::noise_key(seed, name);
    #[cfg(aqn_cuda)]
    {
        Ok(imp::noise(
            dt,
            device,
            stream,
            out,
            n,
            offset,
            key,
            step,
            sigma as f32,
        )?)
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (dt, device, stream, out, n, offset, key, step);
        Ok(imp::not_built()?)
    }
}

/// Adds the CUDA functions (and `CUDA_AMAX_SCRATCH`) to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CUDA_AMAX_SCRATCH", AMAX_SCRATCH)?;
    m.add_function(wrap_pyfunction!(cuda_built, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_build_archs, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_set_tuning, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_probe_overhead, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_fake_quant, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_fake_quant_t, m)?)?;
    m.add_function(wrap_pyfunction!(
        crate::dlpack::dlpack_exchange_register,
        m
    )?)?;
    m.add_function(wrap_pyfunction!(cuda_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_amax, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_noise, m)?)?;
    Ok(())
}
