//! The CUDA launch side of the binding: the `cuda_*` Python functions. They take raw device
//! pointers handed over by `python/aqn_rs/_cuda.py` (which allocates every buffer with torch)
//! and launch the kernels of `cuda/` on torch's current stream for the tensor's device.
//! Nothing here synchronizes with the host, so the launches order with torch work and can be
//! captured in a CUDA graph. `cuda_fake_quant_t`, the hot path, takes the tensors themselves
//! and reads their pointers and torch's current stream through DLPack's C exchange API
//! (`crate::dlpack`); the pointers it reads are checked like any other.
//!
//! - `abi`: the kernel ABI (argument blocks, launch constants, kernel names), one owner;
//! - `args`: the Python arguments, checked before any driver call;
//! - `driver`: the driver loaded at run time, each device's primary context and kernels;
//! - `ptr`: stream and pointer validation (device memory of the right device, fully mapped);
//! - `launch`: one call's checked context, grids, the amax pass and dependent launch;
//! - `ops`: each op's buffer checks, argument block and launch;
//! - `tuning`: the benchmark's launch knobs.
//!
//! Every failure is an `Error` (RuntimeError for the driver, ValueError for bad
//! pointers/sizes/arguments, TypeError for dtypes); nothing panics. Built without kernels
//! (`AQN_NO_CUDA=1`, or no nvcc), only `abi` and `args` are compiled: the same functions
//! exist, check their arguments and raise RuntimeError, so `aqn_rs._cuda` imports everywhere.

use pyo3::prelude::*;

use crate::error::{Error, Result};

// A CPU-only build checks the arguments but launches nothing, so most of the ABI and some
// parsed values go unused there.
#[cfg_attr(not(aqn_cuda), allow(dead_code))]
mod abi;
#[cfg_attr(not(aqn_cuda), allow(dead_code))]
mod args;
#[cfg(aqn_cuda)]
mod driver;
#[cfg(aqn_cuda)]
mod launch;
#[cfg(aqn_cuda)]
mod ops;
#[cfg(aqn_cuda)]
mod ptr;
#[cfg(aqn_cuda)]
mod tuning;

use abi::{Dt, Fmt};

#[cfg(not(aqn_cuda))]
const NOT_BUILT: &str = "aqn_rs was built without CUDA kernels (AQN_NO_CUDA=1 or no nvcc at \
build time); reinstall with them: `pip install --force-reinstall --no-binary aqn-rs aqn-rs` \
(nvcc comes from the nvidia-cuda-nvcc build requirement; set AQN_REQUIRE_CUDA=1 to make a \
build without kernels fail instead of falling back to the CPU)";

/// What every entry point of a CPU-only build returns once its arguments are checked.
#[cfg(not(aqn_cuda))]
fn not_built<T>() -> Result<T> {
    Err(Error::Runtime(NOT_BUILT.into()))
}

/// `kernels!(ops::f(a, b, ..))`: the call where the kernels are built; in a CPU-only build
/// the arguments (already parsed and checked, so a bad call fails the same way in both
/// builds) are consumed and the result is `not_built()`'s error. The one place that rule is
/// written, instead of a cfg pair in every entry point.
macro_rules! kernels {
    ($($f:ident)::+ ( $($arg:expr),* $(,)? )) => {{
        #[cfg(aqn_cuda)]
        let r = $($f)::+($($arg),*);
        #[cfg(not(aqn_cuda))]
        let r = {
            let _ = ($(&$arg,)*);
            not_built()
        };
        r
    }};
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
    #[cfg(aqn_cuda)]
    {
        driver::available()
    }
    #[cfg(not(aqn_cuda))]
    {
        false
    }
}

/// Number of CUDA devices the driver sees.
#[pyfunction]
fn cuda_device_count() -> PyResult<i32> {
    Ok(kernels!(driver::device_count())?)
}

/// Benchmark knobs (None keeps a value): grid caps, in CTAs per SM, of the element kernels
/// and of the amax reduction, whether the kernel after an amax pass is a programmatic
/// dependent launch (sm_90+), the bytes of weights per multi-tensor NVFP4 launch (0: as
/// many tensors as a launch holds) and the bytes an NVFP4 amax pass asks L2 to keep for the
/// kernel after it (0: no cache hints). Returns the values in force.
#[pyfunction]
#[pyo3(signature = (ctas_per_sm = None, amax_ctas_per_sm = None, pdl = None, many_batch_bytes = None, l2_keep_bytes = None))]
fn cuda_set_tuning(
    ctas_per_sm: Option<u32>,
    amax_ctas_per_sm: Option<u32>,
    pdl: Option<bool>,
    many_batch_bytes: Option<u64>,
    l2_keep_bytes: Option<u64>,
) -> PyResult<(u32, u32, bool, u64, u64)> {
    #[cfg(aqn_cuda)]
    {
        tuning::set(
            ctas_per_sm,
            amax_ctas_per_sm.map(|v| v.min(abi::AMAX_SCRATCH as u32)),
            pdl,
            many_batch_bytes,
            l2_keep_bytes,
        );
        Ok(tuning::get())
    }
    #[cfg(not(aqn_cuda))]
    {
        let _ = (
            ctas_per_sm,
            amax_ctas_per_sm,
            pdl,
            many_batch_bytes,
            l2_keep_bytes,
        );
        Ok(not_built()?)
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
    Ok(kernels!(ops::probe_overhead(device, stream, ptr, reps))?)
}

/// Fake-quantize (quantize-dequantize) `rows * k` elements at device pointer `x` into `out`.
///
/// Args: fmt ("mxfp4"/"nvfp4"), mode (MXFP4 scale mode), dtype ("f32"/"bf16"/"f16"),
/// device ordinal, stream (raw handle of torch's current stream on that device), x, out,
/// rows, k, then the NVFP4 amax source: amax_ptr (device f32, 0 = none), amax_value (host
/// float or None), scratch (AMAX_SCRATCH f32 to reduce into, 0 = none) — exactly one.
#[pyfunction]
// The Python signature: _cuda.py passes each buffer, size and option as its own argument
// (no Python object groups them), and the stub _aqn_rs.pyi documents them one by one.
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
    let fmt = args::format(fmt)?;
    let mode = args::mode_number(fmt, mode)?;
    let dt = args::dtype(dtype)?;
    Ok(fake_quant_launch(
        fmt, mode, dt, device, stream, x, out, rows, k, amax_ptr, amax_value, scratch,
    )?)
}

/// The common tail of `cuda_fake_quant` and `cuda_fake_quant_t`: the NVFP4 amax source
/// (checked after everything else), then the launch.
// The parsed arguments of cuda_fake_quant / cuda_fake_quant_t, passed on one for one.
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
        Some(args::amax_source(amax_ptr, amax_value, scratch)?)
    } else {
        None
    };
    kernels!(ops::fake_quant(
        fmt, mode, dt, device, stream, x, out, rows, k, amax
    ))
}

/// `cuda_fake_quant` on tensors: reads x and out (a new tensor like x) through DLPack's C
/// exchange API and launches on the framework's current stream, with no Python call.
/// Returns False, launching nothing, when that API is not registered or x is not a
/// contiguous CUDA tensor of a supported dtype with at least one dimension: the caller then
/// takes its attribute-reading path, which raises the right error. The amax arguments are
/// those of `cuda_fake_quant`.
#[pyfunction]
// The Python signature: _cuda.py passes each buffer, size and option as its own argument
// (no Python object groups them), and the stub _aqn_rs.pyi documents them one by one.
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
    let Some(dt) = args::dt_of(xv.dtype) else {
        return Ok(false);
    };
    if xv.device.device_type != crate::dlpack::DL_CUDA || xv.ndim < 1 || !xv.contiguous {
        return Ok(false);
    }
    let ov =
        crate::dlpack::view(py, out).ok_or_else(|| Error::Value("out is not a tensor".into()))?;
    if ov.device.device_type != crate::dlpack::DL_CUDA
        || ov.device.device_id != xv.device.device_id
        || args::dt_of(ov.dtype) != Some(dt)
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
    let fmt = args::format(fmt)?;
    let mode = args::mode_number(fmt, mode)?;
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
// The Python signature: _cuda.py passes each buffer, size and option as its own argument
// (no Python object groups them), and the stub _aqn_rs.pyi documents them one by one.
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
    let fmt = args::format(fmt)?;
    let mode = args::mode_number(fmt, mode)?;
    let dt = args::dtype(dtype)?;
    let amax = if fmt == Fmt::Nvfp4 {
        Some(args::amax_source(amax_ptr, amax_value, scratch)?)
    } else {
        None
    };
    Ok(kernels!(ops::quantize(
        fmt, mode, dt, device, stream, x, codes, scales, gs_out, rows, k, amax
    ))?)
}

/// Dequantize packed codes and scale bytes into `rows * k` elements at `out`. NVFP4 takes
/// its global scale from the device (`gs_ptr`) or the host (`gs_value`), exactly one; a
/// device global scale that is not finite and positive gives NaN (it cannot raise without
/// a host sync).
#[pyfunction]
// The Python signature: _cuda.py passes each buffer, size and option as its own argument
// (no Python object groups them), and the stub _aqn_rs.pyi documents them one by one.
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
    let fmt = args::format(fmt)?;
    let dt = args::dtype(dtype)?;
    Ok(kernels!(ops::dequantize(
        fmt, dt, device, stream, codes, scales, gs_ptr, gs_value, out, rows, k
    ))?)
}

/// Max |x| over `n` elements at `x` into the f32 at `out` (NaN if any NaN, 0 if n == 0),
/// using `scratch` (AMAX_SCRATCH f32) for the per-CTA partials.
#[pyfunction]
fn cuda_amax(
    dtype: &str,
    device: i32,
    stream: u64,
    x: u64,
    n: u64,
    scratch: u64,
    out: u64,
) -> PyResult<()> {
    let dt = args::dtype(dtype)?;
    Ok(kernels!(ops::amax(dt, device, stream, x, n, scratch, out))?)
}

/// One max |x| over the tensors at `xs` (`ns` elements each, all of `dtype`) into the f32 at
/// `out`: the shared amax of an NVFP4 fused group, in one call. `scratch` holds `scratch_len`
/// f32, at least `len(xs) * AMAX_SCRATCH`.
#[pyfunction]
// The Python signature: _cuda.py passes each buffer and size as its own argument.
#[allow(clippy::too_many_arguments)]
fn cuda_amax_many(
    dtype: &str,
    device: i32,
    stream: u64,
    xs: Vec<u64>,
    ns: Vec<u64>,
    scratch: u64,
    scratch_len: u64,
    out: u64,
) -> PyResult<()> {
    let dt = args::dtype(dtype)?;
    Ok(kernels!(ops::amax_many(
        dt,
        device,
        stream,
        &xs,
        &ns,
        scratch,
        scratch_len,
        out
    ))?)
}

/// The multi-tensor NVFP4 launch size knob (`tuning::many_batch_bytes`; a CPU-only build has
/// no knobs).
fn many_batch_bytes() -> u64 {
    #[cfg(aqn_cuda)]
    {
        tuning::many_batch_bytes()
    }
    #[cfg(not(aqn_cuda))]
    {
        0
    }
}

/// Fake quant of many tensors of one dtype and device in a few launches: `xs[i]` into
/// `outs[i]` (`ns[i]` elements, last dimension `ks[i]`, the vector layout: whole blocks along
/// it, 16-byte aligned). NVFP4: tensor i uses the amax of slot `slots[i]` (< `n_slots`), the
/// max |x| over every tensor of that slot, computed here into the `n_slots` f32 at `amax`
/// (`scratch`: `scratch_len` f32, at least `n_slots * AMAX_SCRATCH`); MXFP4 takes no slots.
#[pyfunction]
// The Python signature: _cuda.py passes each buffer and size as its own argument.
#[allow(clippy::too_many_arguments)]
fn cuda_fake_quant_many(
    fmt: &str,
    mode: &str,
    dtype: &str,
    device: i32,
    stream: u64,
    xs: Vec<u64>,
    outs: Vec<u64>,
    ns: Vec<u64>,
    ks: Vec<u64>,
    slots: Vec<u32>,
    n_slots: u64,
    amax: u64,
    scratch: u64,
    scratch_len: u64,
) -> PyResult<()> {
    let fmt = args::format(fmt)?;
    let mode = args::mode_number(fmt, mode)?;
    let dt = args::dtype(dtype)?;
    let max_elems = if fmt == Fmt::Nvfp4 {
        many_batch_bytes() / dt.size() as u64
    } else {
        0 // one pass: nothing to keep in L2 between launches
    };
    let batches = args::many_batches(
        fmt,
        &xs,
        &outs,
        &ns,
        &ks,
        &slots,
        n_slots,
        scratch_len,
        max_elems,
    )?;
    Ok(kernels!(ops::fake_quant_many(
        fmt, mode, dt, device, stream, &batches, n_slots, amax, scratch
    ))?)
}

/// The weight sync's error statistics in one call: for each pair of tensors `xs[i]`, `ys[i]`
/// (`ns[i]` elements, all of `dtype`; x a weight, y its fake quant) the per-CTA f32 sums of
/// `(x - y)^2` and `x^2`, in stretch `i` of `out` (`out_len` f32, at least
/// `len(xs) * 2 * AMAX_SCRATCH`): `AMAX_SCRATCH` pairs each, the unused ones zero.
#[pyfunction]
// The Python signature: _cuda.py passes each buffer and size as its own argument.
#[allow(clippy::too_many_arguments)]
fn cuda_sq_err_many(
    dtype: &str,
    device: i32,
    stream: u64,
    xs: Vec<u64>,
    ys: Vec<u64>,
    ns: Vec<u64>,
    out: u64,
    out_len: u64,
) -> PyResult<()> {
    let dt = args::dtype(dtype)?;
    Ok(kernels!(ops::sq_err_many(
        dt, device, stream, &xs, &ys, &ns, out, out_len
    ))?)
}

/// Elements `offset .. offset + n` of AQN's noise for `(seed, step, name)`
/// (docs/reference/NOISE.md), `z * float32(sigma)` cast to `dtype`, into `n` elements at `out`: the
/// CUDA twin of `noise_fill_f32`, bit for bit.
#[pyfunction]
// The Python signature: _cuda.py passes each buffer, size and option as its own argument
// (no Python object groups them), and the stub _aqn_rs.pyi documents them one by one.
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
    let dt = args::dtype(dtype)?;
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(
            Error::Value(format!("sigma must be a finite number >= 0, got {sigma}")).into(),
        );
    }
    let key = aqn_core::noise::noise_key(seed, name);
    Ok(kernels!(ops::noise(
        dt,
        device,
        stream,
        out,
        n,
        offset,
        key,
        step,
        sigma as f32
    ))?)
}

/// Adds the CUDA functions (and `CUDA_AMAX_SCRATCH`) to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CUDA_AMAX_SCRATCH", abi::AMAX_SCRATCH)?;
    m.add("CUDA_MANY_MAX", abi::MANY_MAX)?;
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
    m.add_function(wrap_pyfunction!(cuda_amax_many, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_sq_err_many, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_fake_quant_many, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_noise, m)?)?;
    Ok(())
}
