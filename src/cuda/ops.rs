//! The host side of each CUDA op: check the op's buffers against its sizes, fill the kernel's
//! argument block, pick the kernel (vector or scalar) and its grid, and launch. One function
//! per Python entry point of `mod.rs`, arguments already parsed (`args.rs`).

use cudarc::driver::sys;

use super::abi::{
    Args, Dt, Fmt, ManyArgs, NoiseArgs, Op, AMAX_SCRATCH, AMAX_THREADS, AMAX_UNROLL,
    FINALIZE_THREADS, NOISE_THREADS, VEC_THREADS, VEC_UNROLL,
};
use super::args::{keep_chunks, numel, AmaxSource, ManyBatch};
use super::launch::{pick, Launch};
use super::ptr::{check_ptr, check_stream};
use super::tuning;
use crate::error::{Error, Result};

// One parameter per argument of the Python entry point it serves, already parsed:
// a struct would only rename them.
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
    let n = numel(rows, k)? as u64;
    let l = Launch::new(ordinal, stream)?;
    let bytes = n * dt.size() as u64;
    l.ptr("x", x, bytes, dt.size() as u64)?;
    l.ptr("out", out, bytes, dt.size() as u64)?;
    if n == 0 {
        return Ok(());
    }
    let mut a = Args::new(rows, k);
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

// One parameter per argument of the Python entry point it serves, already parsed:
// a struct would only rename them.
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
    let n = numel(rows, k)? as u64;
    let b = fmt.block() as u64;
    let l = Launch::new(ordinal, stream)?;
    l.ptr("x", x, n * dt.size() as u64, dt.size() as u64)?;
    l.ptr("codes", codes, rows * k.div_ceil(2), 1)?;
    l.ptr("scales", scales, rows * k.div_ceil(b), 1)?;
    let mut a = Args::new(rows, k);
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

// One parameter per argument of the Python entry point it serves, already parsed:
// a struct would only rename them.
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
    let n = numel(rows, k)? as u64;
    let b = fmt.block() as u64;
    let l = Launch::new(ordinal, stream)?;
    l.ptr("codes", codes, rows * k.div_ceil(2), 1)?;
    l.ptr("scales", scales, rows * k.div_ceil(b), 1)?;
    l.ptr("out", out, n * dt.size() as u64, dt.size() as u64)?;
    let mut a = Args::new(rows, k);
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
    let mut a = Args::new(1, 0);
    a.out = ptr;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        l.launch(l.dev.amax_finalize, 1, FINALIZE_THREADS, &a)?;
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
    let mut a = Args::new(1, 0);
    a.out = out;
    if n > 0 {
        a.n_amax = l.amax_partials(dt, x, n, scratch, 0)?;
        a.amax_src = scratch;
    }
    l.launch(l.dev.amax_finalize, 1, FINALIZE_THREADS, &a)
}

/// Members of one `amax_many` call: their partials (at most AMAX_SCRATCH each) fit an i32.
pub const MAX_AMAX_MEMBERS: usize = 4096;

/// One max |x| over several tensors of one dtype (the shared amax of an NVFP4 fused group):
/// each member's partials into its own stretch of `scratch` (`scratch_len` f32), then one
/// fold of all of them into `out`. One call instead of an amax per member plus a stack and
/// a max on the host's side, and the same bits: a max is exact in any order.
///
/// The members' passes run last member first, so the first member was read last: its bytes
/// are the ones still in L2 when the caller fake-quantizes it next (the amax pass itself walks
/// each tensor from its end, see `amax_partials` in cuda/nvfp4.cu).
// One parameter per argument of the Python entry point it serves, already parsed.
#[allow(clippy::too_many_arguments)]
pub fn amax_many(
    dt: Dt,
    ordinal: i32,
    stream: u64,
    xs: &[u64],
    ns: &[u64],
    scratch: u64,
    scratch_len: u64,
    out: u64,
) -> Result<()> {
    if xs.len() != ns.len() {
        return Err(Error::Value(format!(
            "amax_many: {} pointers but {} element counts",
            xs.len(),
            ns.len()
        )));
    }
    // n_amax is an i32: members x AMAX_SCRATCH partials must fit it.
    if xs.len() > MAX_AMAX_MEMBERS {
        return Err(Error::Value(format!(
            "amax_many: {} tensors (at most {MAX_AMAX_MEMBERS} in one call)",
            xs.len()
        )));
    }
    let l = Launch::new(ordinal, stream)?;
    l.ptr("out", out, 4, 4)?;
    l.ptr("amax scratch", scratch, scratch_len.saturating_mul(4), 4)?;
    for (&x, &n) in xs.iter().zip(ns) {
        let bytes = n.checked_mul(dt.size() as u64).ok_or_else(|| {
            Error::Value(format!("amax_many: {n} elements overflow the byte count"))
        })?;
        l.ptr("x", x, bytes, dt.size() as u64)?;
    }
    // Every member's partials need their own slots; `amax_partials` also wants AMAX_SCRATCH
    // slots from its start, which the caller's N * AMAX_SCRATCH buffer always has.
    let need = (xs.len() as u64).saturating_mul(AMAX_SCRATCH as u64);
    if scratch_len < need {
        return Err(Error::Value(format!(
            "amax_many: scratch of {scratch_len} f32 for {} tensors (needs {need})",
            xs.len()
        )));
    }
    let mut off: u64 = 0;
    for (&x, &n) in xs.iter().zip(ns).rev() {
        if n > 0 {
            off += l.amax_partials(dt, x, n, scratch + 4 * off, 0)? as u64;
        }
    }
    let mut a = Args::new(1, 0);
    a.out = out;
    a.n_amax = off as i32; // at most len * AMAX_SCRATCH, checked above to fit the buffer
    a.amax_src = scratch;
    l.launch(l.dev.amax_finalize, 1, FINALIZE_THREADS, &a)
}

/// Per tensor pair `(x, y)` of `ns` elements each (all of `dt`): the f32 sums of
/// `(x - y)^2` and `x^2` of each CTA, in stretch `i` of `out` (`out_len` f32): pairs
/// `i * AMAX_SCRATCH .. (i + 1) * AMAX_SCRATCH`, the unused ones zeroed, so the caller folds
/// every stretch the same way (the weight sync's error statistics: one read of each input).
// One parameter per argument of the Python entry point it serves, already parsed.
#[allow(clippy::too_many_arguments)]
pub fn sq_err_many(
    dt: Dt,
    ordinal: i32,
    stream: u64,
    xs: &[u64],
    ys: &[u64],
    ns: &[u64],
    out: u64,
    out_len: u64,
) -> Result<()> {
    if xs.len() != ys.len() || xs.len() != ns.len() {
        return Err(Error::Value(format!(
            "sq_err_many: {} x pointers, {} y pointers and {} element counts",
            xs.len(),
            ys.len(),
            ns.len()
        )));
    }
    let stretch = 2 * AMAX_SCRATCH as u64; // f32 per tensor
    let need = (xs.len() as u64).saturating_mul(stretch);
    if out_len < need {
        return Err(Error::Value(format!(
            "sq_err_many: out of {out_len} f32 for {} tensors (needs {need})",
            xs.len()
        )));
    }
    let l = Launch::new(ordinal, stream)?;
    // The whole stretch the caller claims, not only the part written: a wrong length is a
    // caller's bug that would otherwise go unnoticed.
    l.ptr("out", out, out_len.saturating_mul(4), 4)?;
    let size = dt.size() as u64;
    for ((&x, &y), &n) in xs.iter().zip(ys).zip(ns) {
        let bytes = n.checked_mul(size).ok_or_else(|| {
            Error::Value(format!("sq_err_many: {n} elements overflow the byte count"))
        })?;
        l.ptr("x", x, bytes, size)?;
        l.ptr("y", y, bytes, size)?;
    }
    let per_cta = AMAX_THREADS as u64 * AMAX_UNROLL * dt.epv() as u64;
    let cap = (l.dev.sms as u64 * tuning::amax_ctas_per_sm() as u64).min(AMAX_SCRATCH as u64);
    for (i, ((&x, &y), &n)) in xs.iter().zip(ys).zip(ns).enumerate() {
        let mut a = Args::new(1, n);
        a.x = x;
        a.y = y;
        a.out = out + 4 * stretch * i as u64;
        a.n_amax = AMAX_SCRATCH as i32; // pairs in the stretch: the kernel zeroes the unused
        let grid = n.div_ceil(per_cta).clamp(1, cap);
        l.launch(l.dev.sq_err_partials[dt as usize], grid, AMAX_THREADS, &a)?;
    }
    Ok(())
}

/// Fake quant of many tensors of one dtype (the planned `batches` of `args::many_batches`),
/// a few launches per MANY_MAX tensors instead of one to three per tensor: for NVFP4 one
/// amax pass over all of a batch's tensors (per-slot partials into `scratch`), one fold into
/// the slots' amaxes at `amax` (`n_slots` f32: each slot's max over its tensors, the shared
/// amax of a fused group) and one fake-quant launch; for MXFP4 the fake-quant launch alone.
/// Each tensor's bits equal `fake_quant`'s of it with its slot's amax given.
// One parameter per argument of the Python entry point it serves, already parsed.
#[allow(clippy::too_many_arguments)]
pub fn fake_quant_many(
    fmt: Fmt,
    mode: i32,
    dt: Dt,
    ordinal: i32,
    stream: u64,
    batches: &[ManyBatch],
    n_slots: u64,
    amax: u64,
    scratch: u64,
) -> Result<()> {
    let l = Launch::new(ordinal, stream)?;
    let size = dt.size() as u64;
    let nv = fmt == Fmt::Nvfp4;
    if nv && n_slots > 0 {
        l.ptr("amax", amax, 4 * n_slots, 4)?;
        l.ptr(
            "amax scratch",
            scratch,
            4 * n_slots * AMAX_SCRATCH as u64,
            4,
        )?;
    }
    for b in batches {
        for t in &b.tensors {
            let bytes = t.n.checked_mul(size).ok_or_else(|| {
                Error::Value(format!(
                    "fake_quant_many: {} elements overflow the byte count",
                    t.n
                ))
            })?;
            // The vector layout: 16-byte loads and stores.
            l.ptr("x", t.x, bytes, 16)?;
            l.ptr("out", t.out, bytes, 16)?;
        }
    }
    let epv = dt.epv() as u64;
    // The entries of one launch with chunks of `chunk` vectors: (args, chunks).
    let entries = |b: &ManyBatch, chunk: u64| -> Result<ManyArgs> {
        let mut a = ManyArgs::new(mode);
        let mut c: u64 = 0;
        for (j, t) in b.tensors.iter().enumerate() {
            let n_vec = t.n / epv;
            let e = &mut a.e[j];
            e.x = t.x;
            e.out = t.out;
            e.n_vec = n_vec as i64;
            e.slot = (t.slot - b.slot_lo) as i32;
            e.chunk0 = i32::try_from(c).map_err(|_| {
                Error::Value("fake_quant_many: too many elements in one call".into())
            })?;
            c += n_vec.div_ceil(chunk);
        }
        i32::try_from(c)
            .map_err(|_| Error::Value("fake_quant_many: too many elements in one call".into()))?;
        a.n_entries = b.tensors.len() as i32;
        a.n_chunks = c as i64;
        a.n_slots = (b.slot_hi - b.slot_lo + 1) as i32;
        Ok(a)
    };
    for b in batches {
        let mut hinted = false;
        if nv {
            let mut a = entries(b, AMAX_THREADS as u64 * AMAX_UNROLL)?;
            let cap =
                (l.dev.sms as u64 * tuning::amax_ctas_per_sm() as u64).min(AMAX_SCRATCH as u64);
            let grid = (a.n_chunks as u64).clamp(1, cap);
            a.amax = amax + 4 * b.slot_lo as u64;
            a.partials = scratch;
            a.n_partials = grid as i32;
            a.keep_chunks = keep_chunks(
                b.tensors.iter().map(|t| t.n / epv),
                AMAX_THREADS as u64 * AMAX_UNROLL,
                tuning::l2_keep_vecs(),
            ) as i64;
            hinted = a.keep_chunks != 0;
            l.launch(
                l.dev.amax_many_partials[dt as usize],
                grid,
                AMAX_THREADS,
                &a,
            )?;
            l.launch(
                l.dev.amax_many_finalize,
                a.n_slots as u64,
                FINALIZE_THREADS,
                &a,
            )?;
        }
        if b.tensors.is_empty() {
            continue;
        }
        let mut a = entries(b, VEC_THREADS as u64 * VEC_UNROLL)?;
        a.amax = amax + 4 * b.slot_lo as u64;
        a.keep_chunks = hinted as i64;
        let cap = l.dev.sms as u64 * tuning::ctas_per_sm() as u64;
        let grid = (a.n_chunks as u64).clamp(1, cap);
        l.launch(
            l.dev.fake_quant_many[fmt as usize][dt as usize],
            grid,
            VEC_THREADS,
            &a,
        )?;
    }
    Ok(())
}

/// Elements `offset .. offset + n` of the noise of `(key, step)`, `z * sigma` cast to
/// `dt`, written to `out` (docs/reference/NOISE.md). One thread per block of four elements.
// One parameter per argument of the Python entry point it serves, already parsed:
// a struct would only rename them.
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
    let cap = l.dev.sms as u64 * 16;
    let grid = blocks.div_ceil(NOISE_THREADS as u64).min(cap).max(1);
    l.launch(l.dev.noise[dt as usize], grid, NOISE_THREADS, &a)
}
