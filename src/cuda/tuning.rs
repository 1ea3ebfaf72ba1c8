//! Launch knobs for the benchmark only (`cuda_set_tuning`): grid caps in CTAs per SM, the
//! programmatic dependent launch switch, the multi-tensor NVFP4 launch size and the L2 bytes an
//! amax pass keeps for the kernel after it. Process-wide; the defaults are what every user
//! gets.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Grid caps: element kernels launch at most `sms * CTAS_PER_SM` CTAs (grid-stride beyond),
/// the amax pass at most `sms * AMAX_CTAS_PER_SM`.
static CTAS_PER_SM: AtomicU32 = AtomicU32::new(32);
static AMAX_CTAS_PER_SM: AtomicU32 = AtomicU32::new(2);
/// Programmatic dependent launch of the kernel after an amax pass (sm_90+).
static PDL: AtomicBool = AtomicBool::new(true);
/// Bytes of weights per multi-tensor NVFP4 launch (0: up to the 126 entries a launch holds).
/// Smaller launches keep what the amax pass read in L2 for the fake quant right after it, at
/// the cost of more launches; `benchmarks/bench_step.py` measures the trade.
static MANY_BATCH_BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes an NVFP4 amax pass asks L2 to keep for the kernel after it (0: no cache hints): the
/// bytes that kernel reads first, with evict_last, all else evict_first (`aqn::L2Hint` in
/// cuda/fp4_common.cuh). Off until `benchmarks/bench_kernels.py --l2-keep-mb` has measured it.
static L2_KEEP_BYTES: AtomicU64 = AtomicU64::new(0);

/// Sets the given knobs (None keeps a value; the caps are at least 1).
pub fn set(
    ctas_per_sm: Option<u32>,
    amax_ctas_per_sm: Option<u32>,
    pdl: Option<bool>,
    many_batch_bytes: Option<u64>,
    l2_keep_bytes: Option<u64>,
) {
    if let Some(v) = l2_keep_bytes {
        L2_KEEP_BYTES.store(v, Ordering::Relaxed);
    }
    if let Some(v) = many_batch_bytes {
        MANY_BATCH_BYTES.store(v, Ordering::Relaxed);
    }
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

/// `(ctas_per_sm, amax_ctas_per_sm, pdl, many_batch_bytes, l2_keep_bytes)` in force.
pub fn get() -> (u32, u32, bool, u64, u64) {
    (
        ctas_per_sm(),
        amax_ctas_per_sm(),
        pdl(),
        many_batch_bytes(),
        l2_keep_bytes(),
    )
}

pub fn l2_keep_bytes() -> u64 {
    L2_KEEP_BYTES.load(Ordering::Relaxed)
}

/// `l2_keep_bytes` in the kernels' 16-byte vectors (what `keep_vecs` / `keep_chunks` count).
pub fn l2_keep_vecs() -> u64 {
    l2_keep_bytes() / super::abi::VEC_BYTES as u64
}

pub fn many_batch_bytes() -> u64 {
    MANY_BATCH_BYTES.load(Ordering::Relaxed)
}

pub fn ctas_per_sm() -> u32 {
    CTAS_PER_SM.load(Ordering::Relaxed)
}

pub fn amax_ctas_per_sm() -> u32 {
    AMAX_CTAS_PER_SM.load(Ordering::Relaxed)
}

pub fn pdl() -> bool {
    PDL.load(Ordering::Relaxed)
}
