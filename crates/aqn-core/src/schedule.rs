//! The AQN sigma schedule: QeRL's staged decay of the noise standard deviation.
//!
//! The normative rule, from QeRL's `trl_trainer/noise_scheduler.py`
//! (`get_sigma_by_step`) and `trl_trainer/grpo_trainer.py` (the `sigma_trend` line), in f64:
//!
//! ```text
//! trend    = sigma_start * (sigma_end / sigma_start) ** (arange(K - 1) / (K - 2))   # K-1 values
//! step     = min(step, T)
//! interval = int(step // (T / K))          # Python float floor division
//! sigma    = 0 if interval == 0 else trend[min(interval - 1, K - 2)]
//! ```
//!
//! with `K = num_stages` and `T = total_steps` (optimizer steps). This module generalizes it:
//!
//! - **Stages.** `stage(step) = min(int(step // (T / K)), K - 1)`: `K` equal stages of `T / K`
//!   steps each; step `T` (and beyond) is in the last stage.
//! - **Zero first stage** (`zero_first_stage = true`, QeRL): stage 0 has sigma 0 (quantization
//!   noise only) and the `M = K - 1` later stages follow the trend. Without it, all `M = K`
//!   stages follow the trend.
//! - **Trend** of `M` values, `t_j = j / (M - 1)` (f64 division) for `j = 0..M`, `t_0 = 0` when
//!   `M = 1`:
//!   - `exponential`: `sigma_start * (sigma_end / sigma_start) ** t_j` (QeRL; `powf` is the C
//!     library's `pow`, as numpy's scalar and CPython's `**` are);
//!   - `linear`: `sigma_start * (1 - t_j) + sigma_end * t_j`;
//!   - `cosine`: `w = 0.5 * (1 + cos(pi * t_j))`, `sigma_start * w + sigma_end * (1 - w)`;
//!   - `constant`: `sigma_start` (`sigma_end` is ignored).
//! - **K = 1.** One stage. With the zero first stage that stage is the noiseless one, so sigma
//!   is 0 at every step; without it sigma is `trend[0] = sigma_start` at every step.
//! - **K = 2** with the zero first stage: QeRL's formula divides by `K - 2 = 0` (NaN); here the
//!   one noisy stage uses `sigma_start` (`M = 1`, `t_0 = 0`), which every decay gives.
//!
//! For K >= 3 with the zero first stage, `exponential` is bit for bit QeRL's formula (the
//! exponent `j / (K - 2)` is the same f64 division as numpy's `arange(K-1) / (K-2)`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// How the noisy stages' sigmas go from `sigma_start` to `sigma_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decay {
    Exponential,
    Linear,
    Cosine,
    Constant,
}

impl Decay {
    pub const ALL: [Decay; 4] = [
        Decay::Exponential,
        Decay::Linear,
        Decay::Cosine,
        Decay::Constant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Decay::Exponential => "exponential",
            Decay::Linear => "linear",
            Decay::Cosine => "cosine",
            Decay::Constant => "constant",
        }
    }
}

impl fmt::Display for Decay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Decay {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Decay::ALL
            .into_iter()
            .find(|d| d.name() == lower)
            .ok_or_else(|| {
                Error::Argument(format!(
                    "unknown decay {s:?}; expected one of \"exponential\", \"linear\", \"cosine\", \"constant\""
                ))
            })
    }
}

/// Largest `total_steps`: steps are converted to f64 exactly, as Python does for ints < 2^53.
pub const MAX_TOTAL_STEPS: u64 = 1 << 53;

/// CPython's float floor division `a // b` (`Objects/floatobject.c`, `_float_div_mod`):
/// `mod = fmod(a, b)`, `div = (a - mod) / b`, sign fix-up, then `floor(div)` snapped up when
/// `div - floor(div) > 0.5`. This is not always `floor(a / b)`: `87 // (174 / 14)` is 6.0
/// where `floor(87 / (174 / 14))` is 7.0 (the divisor is not exact and fmod sees the truth).
pub fn py_floordiv(a: f64, b: f64) -> f64 {
    let mut m = a % b; // Rust's `%` on f64 is C's fmod (exact)
    let mut div = (a - m) / b;
    if m != 0.0 {
        if (b < 0.0) != (m < 0.0) {
            m += b;
            div -= 1.0;
        }
    } else {
        m = 0.0f64.copysign(b);
    }
    let _ = m;
    if div != 0.0 {
        let mut fd = div.floor();
        if div - fd > 0.5 {
            fd += 1.0;
        }
        fd
    } else {
        0.0f64.copysign(a / b)
    }
}

/// A validated sigma schedule; see the module docs for the formulas.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaSchedule {
    sigma_start: f64,
    sigma_end: f64,
    num_stages: u32,
    total_steps: u64,
    decay: Decay,
    zero_first_stage: bool,
    enabled: bool,
    trend: Vec<f64>,
}

impl SigmaSchedule {
    /// Validate and build. Errors: `num_stages < 1`, a negative, NaN or infinite sigma,
    /// `total_steps` outside `1..=2^53`, and for `exponential`: `sigma_end > sigma_start`, or
    /// `sigma_end == 0 < sigma_start` (an exponential cannot reach 0; use linear or cosine).
    /// `enabled = false` keeps the configuration but gives sigma 0 at every step.
    pub fn new(
        sigma_start: f64,
        sigma_end: f64,
        num_stages: u32,
        total_steps: u64,
        decay: Decay,
        zero_first_stage: bool,
        enabled: bool,
    ) -> Result<SigmaSchedule> {
        for (what, v) in [("sigma_start", sigma_start), ("sigma_end", sigma_end)] {
            if !v.is_finite() {
                return Err(Error::Argument(format!(
                    "{what} must be a finite number >= 0, got {v}"
                )));
            }
            if v < 0.0 {
                return Err(Error::Argument(format!(
                    "{what} must be >= 0 (a standard deviation), got {v}"
                )));
            }
        }
        if num_stages < 1 {
            return Err(Error::Argument(format!(
                "num_stages must be >= 1, got {num_stages}"
            )));
        }
        if !(1..=MAX_TOTAL_STEPS).contains(&total_steps) {
            return Err(Error::Argument(format!(
                "total_steps must be in 1..=2^53, got {total_steps}"
            )));
        }
        if decay == Decay::Exponential {
            if sigma_end > sigma_start {
                return Err(Error::Argument(format!(
                    "exponential decay needs sigma_end <= sigma_start, got sigma_start={sigma_start}, \
                     sigma_end={sigma_end} (use decay=\"linear\" or \"cosine\" to increase)"
                )));
            }
            if sigma_end == 0.0 && sigma_start > 0.0 {
                return Err(Error::Argument(format!(
                    "exponential decay cannot reach sigma_end=0 from sigma_start={sigma_start}; \
                     use decay=\"linear\" or \"cosine\", or a small positive sigma_end"
                )));
            }
        }
        let noisy = if zero_first_stage {
            num_stages - 1
        } else {
            num_stages
        } as usize;
        let trend = (0..noisy)
            .map(|j| {
                let t = if noisy > 1 {
                    j as f64 / (noisy - 1) as f64
                } else {
                    0.0
                };
                match decay {
                    // 0/0 would be NaN: a schedule of zeros stays zero.
                    Decay::Exponential if sigma_start == 0.0 => 0.0,
                    Decay::Exponential => sigma_start * (sigma_end / sigma_start).powf(t),
                    Decay::Linear => sigma_start * (1.0 - t) + sigma_end * t,
                    Decay::Cosine => {
                        let w = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                        sigma_start * w + sigma_end * (1.0 - w)
                    }
                    Decay::Constant => sigma_start,
                }
            })
            .collect();
        Ok(SigmaSchedule {
            sigma_start,
            sigma_end,
            num_stages,
            total_steps,
            decay,
            zero_first_stage,
            enabled,
            trend,
        })
    }

    pub fn sigma_start(&self) -> f64 {
        self.sigma_start
    }
    pub fn sigma_end(&self) -> f64 {
        self.sigma_end
    }
    pub fn num_stages(&self) -> u32 {
        self.num_stages
    }
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }
    pub fn decay(&self) -> Decay {
        self.decay
    }
    pub fn zero_first_stage(&self) -> bool {
        self.zero_first_stage
    }
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The noisy stages' sigmas, in order (QeRL's `sigma_trend` with the zero first stage).
    pub fn trend(&self) -> &[f64] {
        &self.trend
    }

    /// The stage of a step, `0..num_stages`: `min(int(min(step, T) // (T / K)), K - 1)`.
    pub fn stage(&self, step: u64) -> u32 {
        let t = self.total_steps;
        let k = self.num_stages;
        let s = step.min(t);
        let width = t as f64 / k as f64;
        let interval = py_floordiv(s as f64, width);
        // interval is a small non-negative integer (<= K) by construction
        (interval as u64).min(k as u64 - 1) as u32
    }

    /// Sigma at a step (steps past `total_steps` stay in the last stage).
    pub fn sigma(&self, step: u64) -> f64 {
        if !self.enabled {
            return 0.0;
        }
        let stage = self.stage(step) as usize;
        if self.zero_first_stage {
            if stage == 0 {
                0.0
            } else {
                self.trend[stage - 1]
            }
        } else {
            self.trend[stage]
        }
    }

    /// Sigma at every step `0..=total_steps` (`total_steps + 1` values).
    pub fn schedule(&self) -> Vec<f64> {
        (0..=self.total_steps).map(|s| self.sigma(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QeRL's code, transcribed (the trend as numpy computes it for these sizes; see the
    /// Python tests for the comparison with numpy itself).
    fn qerl(step: u64, t: u64, trend: &[f64]) -> f64 {
        let step = step.min(t);
        let num_intervals = trend.len() + 1;
        let steps_per_interval = t as f64 / num_intervals as f64;
        let interval_id = py_floordiv(step as f64, steps_per_interval) as i64;
        if interval_id == 0 {
            return 0.0;
        }
        let sigma_id = ((interval_id - 1) as usize).min(trend.len() - 1);
        trend[sigma_id]
    }

    #[test]
    fn equals_qerl_for_the_plans_settings() {
        for (s0, s1) in [(0.05f64, 5e-4f64), (0.001, 1e-5)] {
            let k = 10u32;
            let trend: Vec<f64> = (0..k - 1)
                .map(|i| s0 * (s1 / s0).powf(i as f64 / (k - 2) as f64))
                .collect();
            let s = SigmaSchedule::new(s0, s1, k, 174, Decay::Exponential, true, true).unwrap();
            assert_eq!(s.trend(), &trend[..]);
            for step in 0..=200 {
                assert_eq!(
                    s.sigma(step).to_bits(),
                    qerl(step, 174, &trend).to_bits(),
                    "step {step}"
                );
            }
            assert_eq!(s.sigma(0), 0.0);
            assert_eq!(s.trend()[0], s0);
        }
    }

    #[test]
    fn python_floor_division() {
        // values checked against CPython, where floor(a / b) differs (fmod rule)
        assert_eq!(py_floordiv(87.0, 174.0 / 14.0), 6.0);
        assert_eq!(py_floordiv(174.0, 174.0 / 7.0), 6.0);
        assert_eq!(py_floordiv(1.0, 0.2), 4.0);
        assert_eq!(py_floordiv(174.0, 17.4), 10.0);
        assert_eq!(py_floordiv(0.0, 17.4), 0.0);
        assert_eq!(py_floordiv(7.0, 2.0), 3.0);
        assert_eq!(py_floordiv(-7.0, 2.0), -4.0);
    }

    #[test]
    fn small_k() {
        let s = SigmaSchedule::new(0.05, 5e-4, 1, 100, Decay::Exponential, true, true).unwrap();
        assert!(s.schedule().iter().all(|&x| x == 0.0));
        let s = SigmaSchedule::new(0.05, 5e-4, 1, 100, Decay::Exponential, false, true).unwrap();
        assert!(s.schedule().iter().all(|&x| x == 0.05));
        let s = SigmaSchedule::new(0.05, 5e-4, 2, 100, Decay::Exponential, true, true).unwrap();
        assert_eq!(s.sigma(49), 0.0);
        assert_eq!(s.sigma(50), 0.05);
        assert_eq!(s.sigma(100), 0.05);
        assert_eq!(s.stage(1000), 1);
    }

    #[test]
    fn other_decays_hit_both_ends() {
        for d in [Decay::Linear, Decay::Cosine] {
            let s = SigmaSchedule::new(0.05, 0.0, 5, 100, d, false, true).unwrap();
            assert_eq!(s.trend()[0], 0.05);
            assert_eq!(*s.trend().last().unwrap(), 0.0);
            assert!(s.trend().windows(2).all(|w| w[0] > w[1]));
        }
        let s = SigmaSchedule::new(0.05, 0.0, 5, 100, Decay::Constant, false, true).unwrap();
        assert!(s.trend().iter().all(|&x| x == 0.05));
    }

    #[test]
    fn disabled_is_zero() {
        let s = SigmaSchedule::new(0.05, 5e-4, 10, 174, Decay::Exponential, true, false).unwrap();
        assert!(s.schedule().iter().all(|&x| x == 0.0));
        assert_eq!(s.stage(174), 9);
    }

    #[test]
    fn errors() {
        let e = |r: Result<SigmaSchedule>| r.unwrap_err().to_string();
        let d = Decay::Exponential;
        assert!(e(SigmaSchedule::new(0.05, 5e-4, 0, 10, d, true, true)).contains("num_stages"));
        assert!(e(SigmaSchedule::new(
            -0.1,
            0.0,
            3,
            10,
            Decay::Linear,
            true,
            true
        ))
        .contains(">= 0"));
        assert!(e(SigmaSchedule::new(f64::NAN, 0.0, 3, 10, d, true, true)).contains("finite"));
        assert!(e(SigmaSchedule::new(0.01, 0.02, 3, 10, d, true, true)).contains("sigma_end <="));
        assert!(e(SigmaSchedule::new(0.01, 0.0, 3, 10, d, true, true)).contains("cannot reach"));
        assert!(e(SigmaSchedule::new(0.01, 0.001, 3, 0, d, true, true)).contains("total_steps"));
        assert!(SigmaSchedule::new(0.01, 0.02, 3, 10, Decay::Linear, true, true).is_ok());
        assert!("Exponential".parse::<Decay>().is_ok());
        assert!("step"
            .parse::<Decay>()
            .unwrap_err()
            .to_string()
            .contains("unknown decay"));
        let z = SigmaSchedule::new(0.0, 0.0, 4, 10, d, true, true).unwrap();
        assert!(z.schedule().iter().all(|&x| x == 0.0));
    }
}
