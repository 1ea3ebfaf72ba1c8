//! Launch knobs for the benchmark only (`cuda_set_tuning`): grid caps in CTAs per SM and the
//! programmatic dependent launch switch. Process-wide; the defaults are what every user gets.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Grid caps: element kernels launch at most `sms * CTAS_PER_SM` CTAs (grid-stride beyond),
/// the amax pass at most `sms * AMAX_CTAS_PER_SM`.
static CTAS_PER_SM: AtomicU32 = AtomicU32::new(32);
static AMAX_CTAS_PER_SM: AtomicU32 = AtomicU32::new(2);
/// Programmatic dependent launch of the kernel after an amax pass (sm_90+).
static PDL: AtomicBool = AtomicBool::new(true);

/// Sets the given knobs (None keeps a value; the caps are at least 1).
pub fn set(ctas_per_sm: Option<u32>, amax_ctas_per_sm: Option<u32>, pdl: Option<bool>) {
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

/// `(ctas_per_sm, amax_ctas_per_sm, pdl)` in force.
pub fn get() -> (u32, u32, bool) {
    (ctas_per_sm(), amax_ctas_per_sm(), pdl())
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
