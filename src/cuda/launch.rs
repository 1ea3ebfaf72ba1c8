//! One launch's context and the launch mechanics: the checked device, current context and
//! stream of a call; grid sizes (capped per SM, grid-stride beyond); the NVFP4 amax pass
//! that precedes a kernel needing the tensor amax; and programmatic dependent launch (sm_90+)
//! of the kernel after that pass. Nothing here synchronizes with the host.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::abi::{
    Args, Dt, Fmt, KernelParam, Op, AMAX_SCRATCH, AMAX_THREADS, AMAX_UNROLL, VEC_THREADS,
    VEC_UNROLL,
};
use super::args::AmaxSource;
use super::driver::{check, device, CtxGuard, Device, Func};
use super::ptr::{check_ptr, check_stream};
use super::tuning;
use crate::error::Result;

/// Everything a call needs once its device, context and stream are checked.
pub struct Launch {
    pub dev: &'static Device,
    pub ordinal: i32,
    pub stream: u64,
    _guard: CtxGuard,
}

impl Launch {
    pub fn new(ordinal: i32, stream: u64) -> Result<Launch> {
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

    pub fn ptr(&self, what: &str, ptr: u64, bytes: u64, align: u64) -> Result<()> {
        check_ptr(what, ptr, bytes, align, self.ordinal)
    }

    /// Launches `f` after the amax pass just enqueued, as a programmatic dependent launch
    /// where the device has it (sm_90+): its CTAs start while the amax pass drains and
    /// wait for it (`griddepcontrol.wait`) only before reading the partials.
    fn launch_after_amax(&self, f: Func, grid: u64, block: u32, args: &Args) -> Result<()> {
        if self.dev.cc_major < 9 || !tuning::pdl() {
            return self.launch(f, grid, block, args);
        }
        let grid = grid.clamp(1, i32::MAX as u64) as u32;
        let mut params: [*mut c_void; 1] = [args as *const Args as *mut c_void];
        // SAFETY: an all-zero CUlaunchAttribute is a valid "ignore" value; we then set the
        // id and the matching union member.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
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
        let r =
            unsafe { sys::cuLaunchKernelEx(&cfg, f.0, params.as_mut_ptr(), std::ptr::null_mut()) };
        check("cuLaunchKernelEx", r)
    }

    /// `A` is the kernel's one by-value parameter: `Args` for the FP4 kernels,
    /// `NoiseArgs` for the noise kernels.
    pub fn launch<A: KernelParam>(&self, f: Func, grid: u64, block: u32, args: &A) -> Result<()> {
        let grid = grid.clamp(1, i32::MAX as u64) as u32;
        let mut params: [*mut c_void; 1] = [args as *const A as *mut c_void];
        // SAFETY: every kernel takes one struct by value, which `A` mirrors (`KernelParam`:
        // #[repr(C)], layout asserted against the CUDA struct at build time; `aqn::Args` <->
        // Args, `aqn_noise::NoiseArgs` <-> NoiseArgs, and the callers pair each kernel with
        // its own); every pointer in it was checked above to be device memory of this device
        // covering what the kernel touches; the stream belongs to the current context.
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
    pub fn launch_elem(&self, f: Func, grid: u64, a: &Args) -> Result<()> {
        if a.n_amax >= 2 {
            self.launch_after_amax(f, grid, VEC_THREADS, a)
        } else {
            self.launch(f, grid, VEC_THREADS, a)
        }
    }

    /// Grid of an element kernel over `work` items of `per_cta` each.
    fn elem_grid(&self, work: u64, per_cta: u64) -> u64 {
        let cap = self.dev.sms as u64 * tuning::ctas_per_sm() as u64;
        work.div_ceil(per_cta).min(cap).max(1)
    }

    /// Launches the amax partials of `n` elements into `scratch`, asking L2 to keep the first
    /// `keep_vecs` 16-byte vectors (0: no cache hints); returns how many partials.
    pub fn amax_partials(
        &self,
        dt: Dt,
        x: u64,
        n: u64,
        scratch: u64,
        keep_vecs: u64,
    ) -> Result<i32> {
        self.ptr("amax scratch", scratch, (AMAX_SCRATCH * 4) as u64, 4)?;
        let per_cta = AMAX_THREADS as u64 * AMAX_UNROLL * dt.epv() as u64;
        let cap =
            (self.dev.sms as u64 * tuning::amax_ctas_per_sm() as u64).min(AMAX_SCRATCH as u64);
        let grid = n.div_ceil(per_cta).clamp(1, cap);
        let mut a = Args::new(1, n);
        a.x = x;
        a.out = scratch;
        a.keep_vecs = keep_vecs as i64;
        self.launch(self.dev.amax_partials[dt as usize], grid, AMAX_THREADS, &a)?;
        Ok(grid as i32)
    }

    /// Fills the NVFP4 amax fields of `a` (launching the partials if needed).
    pub fn nv_amax(&self, a: &mut Args, src: AmaxSource, dt: Dt, n: u64) -> Result<()> {
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
                    // The element kernel after this pass reads the tensor from its start: the
                    // first bytes are the ones to keep (tuning::l2_keep_bytes).
                    let keep = tuning::l2_keep_vecs().min(n / dt.epv() as u64);
                    a.n_amax = self.amax_partials(dt, a.x, n, scratch, keep)?;
                    a.amax_src = scratch;
                    a.keep_vecs = keep as i64;
                }
            }
        }
        Ok(())
    }
}

/// The element kernel and grid for one op: the vector kernel when whole blocks tile the
/// flat tensor and the pointers allow 16-byte access, else the scalar one.
pub fn pick(
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
    let f = l.dev.elem(op, fmt, dt, !vec);
    let grid = if vec {
        l.elem_grid(n / dt.epv() as u64, VEC_THREADS as u64 * VEC_UNROLL)
    } else {
        l.elem_grid(rows * k.div_ceil(b), VEC_THREADS as u64)
    };
    (f, grid)
}
