//! Metric reductions for the SRDD scanner: how much damage fake quantization does to one
//! tensor, in one pass over it, without materializing the quantized tensor.
//!
//! For every finite block the block rule of [`crate::blockwise`] gives the scale, each element
//! its E2M1 code and its fake-quant value `q` (rounded to the input dtype exactly as
//! `fake_quant` writes it), and the pass accumulates:
//!
//! - the SQNR terms `sum x^2` and `sum (x - q)^2`, in f64 (`x` and `q` widened exactly);
//! - the largest `|x - q|`;
//! - the deadzone count (`x != 0` and `q == 0`) and the saturation count (the value the E2M1
//!   encoder sees, `|x / d|`, is above the grid's top 6: the element is clipped);
//! - the histogram of the 16 E2M1 codes and of the 256 scale bytes, and the min/max/sum of the
//!   decode-direction block scales `d`;
//! - the gain scan: for a ladder of magnitudes `r * amax_b` relative to each block's amax
//!   (`r` = [`gain_ladder`], 2^-8 .. 1), the quantizer's response `Q_b(r * amax_b) / amax_b`
//!   with the block's scale held fixed, summed over blocks, plus how many blocks zero (deadzone)
//!   or clip (saturation) a probe at each rung. The mean response's slope between rungs is the
//!   quantizer's gain `dQ/dx` (docs/guides/SCANNER.md).
//!
//! Blocks holding NaN or Inf are counted and left out of every other statistic.
//!
//! Determinism: the rows are cut into chunks whose size depends only on the shape, each chunk
//! is reduced sequentially, and the chunk results are merged in order on one thread, so the
//! result is bit-identical for any number of threads.

use rayon::prelude::*;

use crate::blockwise::BlockRule;
use crate::element::Element;
use crate::error::Result;
use crate::formats::{e2m1_decode, e2m1_encode, pow2, F4_E2M1_MAX};
use crate::layout::Layout;
use crate::mxfp4::{Mxfp4, ScaleMode, BLOCK as MX_BLOCK};
use crate::nvfp4::{self, Nvfp4, BLOCK as NV_BLOCK};

/// Octaves the gain ladder spans below the block amax.
pub const GAIN_OCTAVES: usize = 8;
/// Rungs per octave.
pub const GAIN_PER_OCTAVE: usize = 4;
/// Rungs of the ladder: `2^-8 .. 2^0` in steps of `2^(1/4)`.
pub const GAIN_RUNGS: usize = GAIN_OCTAVES * GAIN_PER_OCTAVE + 1;

/// `2^(k/4)` for k = 0..3 rounded to f32: the mantissas of the ladder (each rung is one of
/// these times an exact power of two, so the ladder is the same f32 values everywhere).
const LADDER_MANTISSAS: [f32; GAIN_PER_OCTAVE] =
    [1.0, 1.189_207_1, std::f32::consts::SQRT_2, 1.681_792_8];

/// Largest block of any rule.
const MAX_BLOCK: usize = 32;
/// Bits of |x| at or above this are Inf or NaN.
const NON_FINITE_ABS_BITS: u32 = 0x7F80_0000;
/// At most this many chunk partials per tensor (bounds the memory of the ordered merge).
const MAX_CHUNKS: usize = 1024;

/// The gain ladder: magnitudes relative to a block's amax, ascending, the last one exactly 1.
pub fn gain_ladder() -> [f32; GAIN_RUNGS] {
    let mut r = [0f32; GAIN_RUNGS];
    for (j, v) in r.iter_mut().enumerate() {
        let (octave, k) = (j / GAIN_PER_OCTAVE, j % GAIN_PER_OCTAVE);
        // exact: a power of two times an f32
        *v = pow2(octave as i32 - GAIN_OCTAVES as i32) * LADDER_MANTISSAS[k];
    }
    r
}

/// What one pass over a tensor found (raw sums and counts; the ratios are derived).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorScan {
    /// Elements in the tensor.
    pub numel: u64,
    /// Blocks in the tensor (short tail blocks included).
    pub blocks: u64,
    /// Blocks holding NaN or Inf (left out of every statistic below except `scale_bytes`).
    pub nonfinite_blocks: u64,
    /// Elements in those blocks.
    pub nonfinite_elements: u64,
    /// Finite blocks whose amax is 0.
    pub zero_blocks: u64,
    /// Elements equal to ±0.
    pub zeros: u64,
    /// `sum x^2` over finite blocks (f64).
    pub sum_x2: f64,
    /// `sum (x - q)^2` over finite blocks (f64).
    pub sum_err2: f64,
    /// `max |x - q|` (f64, exact: the difference of two f32 values).
    pub max_abs_err: f64,
    /// Max |x| over finite blocks.
    pub amax: f32,
    /// Elements with `x != 0` and `q == 0` (lost to the deadzone).
    pub deadzone: u64,
    /// Elements clipped at the top of their block's grid (`|x / d| > 6`).
    pub saturated: u64,
    /// Histogram of E2M1 codes (`sign << 3 | index`) over finite blocks.
    pub codes: [u64; 16],
    /// Histogram of scale bytes over all blocks (the NaN byte for non-finite blocks).
    pub scale_bytes: Vec<u64>,
    /// Min / max / sum of the decode-direction block scales over finite blocks
    /// (`dec_min` = +Inf and `dec_max` = 0 when there is none).
    pub dec_min: f32,
    pub dec_max: f32,
    pub dec_sum: f64,
    /// Blocks in the gain scan (finite, amax > 0).
    pub gain_blocks: u64,
    /// Per rung `j`: `sum_b Q_b(r_j * amax_b) / amax_b` (f64).
    pub response_sum: [f64; GAIN_RUNGS],
    /// Per rung: blocks whose quantizer returns 0 for a probe of magnitude `r_j * amax_b`.
    pub probe_dead: [u64; GAIN_RUNGS],
    /// Per rung: blocks whose quantizer clips that probe (`|probe / d| > 6`).
    pub probe_clipped: [u64; GAIN_RUNGS],
}

impl Default for TensorScan {
    fn default() -> Self {
        Self {
            numel: 0,
            blocks: 0,
            nonfinite_blocks: 0,
            nonfinite_elements: 0,
            zero_blocks: 0,
            zeros: 0,
            sum_x2: 0.0,
            sum_err2: 0.0,
            max_abs_err: 0.0,
            amax: 0.0,
            deadzone: 0,
            saturated: 0,
            codes: [0; 16],
            scale_bytes: vec![0; 256],
            dec_min: f32::INFINITY,
            dec_max: 0.0,
            dec_sum: 0.0,
            gain_blocks: 0,
            response_sum: [0.0; GAIN_RUNGS],
            probe_dead: [0; GAIN_RUNGS],
            probe_clipped: [0; GAIN_RUNGS],
        }
    }
}

impl TensorScan {
    /// Add `o`'s counts and sums to `self` (in this order: the caller fixes the order).
    pub fn merge(&mut self, o: &Self) {
        self.numel += o.numel;
        self.blocks += o.blocks;
        self.nonfinite_blocks += o.nonfinite_blocks;
        self.nonfinite_elements += o.nonfinite_elements;
        self.zero_blocks += o.zero_blocks;
        self.zeros += o.zeros;
        self.sum_x2 += o.sum_x2;
        self.sum_err2 += o.sum_err2;
        self.max_abs_err = self.max_abs_err.max(o.max_abs_err);
        self.amax = self.amax.max(o.amax);
        self.deadzone += o.deadzone;
        self.saturated += o.saturated;
        for (a, b) in self.codes.iter_mut().zip(&o.codes) {
            *a += b;
        }
        for (a, b) in self.scale_bytes.iter_mut().zip(&o.scale_bytes) {
            *a += b;
        }
        self.dec_min = self.dec_min.min(o.dec_min);
        self.dec_max = self.dec_max.max(o.dec_max);
        self.dec_sum += o.dec_sum;
        self.gain_blocks += o.gain_blocks;
        for (a, b) in self.response_sum.iter_mut().zip(&o.response_sum) {
            *a += b;
        }
        for (a, b) in self.probe_dead.iter_mut().zip(&o.probe_dead) {
            *a += b;
        }
        for (a, b) in self.probe_clipped.iter_mut().zip(&o.probe_clipped) {
            *a += b;
        }
    }

    /// Signal-to-quantization-noise ratio in dB, `10 log10(sum x^2 / sum (x-q)^2)`
    /// (+Inf when there is no error, NaN for an all-zero or empty tensor).
    pub fn sqnr_db(&self) -> f64 {
        10.0 * (self.sum_x2 / self.sum_err2).log10()
    }

    /// Relative error `||x - q|| / ||x||`.
    pub fn rel_err(&self) -> f64 {
        (self.sum_err2 / self.sum_x2).sqrt()
    }
}

#[inline(always)]
fn amax_bits(block: &[f32]) -> u32 {
    block
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF))
}

/// Scan `rows` rows of `k` elements (one chunk), sequentially.
fn scan_rows<T: Element, R: BlockRule>(
    rule: &R,
    k: usize,
    xs: &[T],
    ladder: &[f32; GAIN_RUNGS],
) -> TensorScan {
    let mut st = TensorScan::default();
    let mut buf = [0f32; MAX_BLOCK];
    for xr in xs.chunks(k) {
        for xb in xr.chunks(R::BLOCK) {
            let n = xb.len() as u64;
            st.numel += n;
            st.blocks += 1;
            let v = &mut buf[..xb.len()];
            T::widen(xb, v);
            let m = amax_bits(v);
            if m >= NON_FINITE_ABS_BITS {
                st.nonfinite_blocks += 1;
                st.nonfinite_elements += n;
                st.scale_bytes[R::NAN_BYTE as usize] += 1;
                continue;
            }
            let a = f32::from_bits(m);
            let s = rule.scale(a);
            st.scale_bytes[s.byte as usize] += 1;
            st.dec_min = st.dec_min.min(s.dec);
            st.dec_max = st.dec_max.max(s.dec);
            st.dec_sum += s.dec as f64;
            st.amax = st.amax.max(a);

            let (mut x2, mut e2, mut emax) = (0f64, 0f64, st.max_abs_err);
            for &x in v.iter() {
                let y = rule.scaled(x, &s);
                let c = e2m1_encode(y);
                // exactly the value fake_quant writes: f32 product, then the output dtype's RNE
                let q = T::from_f32(e2m1_decode(c) * s.dec).to_f32();
                st.codes[c as usize] += 1;
                let (xd, qd) = (x as f64, q as f64);
                let e = xd - qd;
                x2 += xd * xd;
                e2 += e * e;
                emax = emax.max(e.abs());
                st.zeros += (x == 0.0) as u64;
                st.deadzone += (x != 0.0 && q == 0.0) as u64;
                st.saturated += (y.abs() > F4_E2M1_MAX) as u64;
            }
            st.sum_x2 += x2;
            st.sum_err2 += e2;
            st.max_abs_err = emax;

            if a == 0.0 {
                st.zero_blocks += 1;
                continue;
            }
            // The gain scan: probes at r * amax with this block's scale held fixed (a probe
            // below the amax does not change the block's amax, so this is the quantizer's
            // actual response to an element of that magnitude in this block).
            st.gain_blocks += 1;
            let ad = a as f64;
            for (j, &r) in ladder.iter().enumerate() {
                let p = a * r;
                let y = rule.scaled(p, &s);
                let q = e2m1_decode(e2m1_encode(y)) * s.dec;
                st.response_sum[j] += q as f64 / ad;
                st.probe_dead[j] += (q == 0.0) as u64;
                st.probe_clipped[j] += (y.abs() > F4_E2M1_MAX) as u64;
            }
        }
    }
    st
}

/// Scan a tensor with a block rule (the rule fixes the format and, for NVFP4, the global scale).
pub fn scan<T: Element, R: BlockRule>(rule: &R, layout: Layout, x: &[T]) -> Result<TensorScan> {
    const { assert!(R::BLOCK <= MAX_BLOCK) };
    layout.check_len("input", layout.numel(), x.len())?;
    if layout.numel() == 0 {
        return Ok(TensorScan::default());
    }
    let ladder = gain_ladder();
    // Chunk size depends on the shape only (never on the thread count): determinism.
    let rows_per_chunk = layout.rows_per_task().max(layout.rows.div_ceil(MAX_CHUNKS));
    let parts: Vec<TensorScan> = x
        .par_chunks(rows_per_chunk * layout.k)
        .map(|xs| scan_rows(rule, layout.k, xs, &ladder))
        .collect();
    let mut total = TensorScan::default();
    for p in &parts {
        total.merge(p);
    }
    Ok(total)
}

/// Scan a tensor of shape `shape` under MXFP4 with scale mode `mode`.
pub fn scan_mxfp4<T: Element>(mode: ScaleMode, shape: &[usize], x: &[T]) -> Result<TensorScan> {
    scan(&Mxfp4 { mode }, Layout::from_shape(shape, MX_BLOCK)?, x)
}

/// Scan a tensor under NVFP4; `amax` overrides the tensor amax that sets the global scale (a
/// fused q/k/v or gate/up group shares the max of its members'). Returns the scan and the
/// global scale used.
pub fn scan_nvfp4<T: Element>(
    shape: &[usize],
    x: &[T],
    amax: Option<f32>,
) -> Result<(TensorScan, f32)> {
    let layout = Layout::from_shape(shape, NV_BLOCK)?;
    layout.check_len("input", layout.numel(), x.len())?;
    let a = match amax {
        Some(a) => {
            nvfp4::validate_amax(a)?;
            a
        }
        None => nvfp4::amax(x),
    };
    let rule = Nvfp4 {
        gs: nvfp4::global_scale(a),
    };
    Ok((scan(&rule, layout, x)?, rule.gs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockwise;
    use crate::formats::E8M0_NAN;
    use half::bf16;

    /// A deterministic heavy-tailed test tensor (xorshift; no RNG crate needed).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                let v = (u - 0.5) * 2.0;
                (v * v * v * 0.05) as f32 // cubing gives heavy tails and many small values
            })
            .collect()
    }

    /// The same metrics from the fused fake_quant and quantize outputs, naively.
    fn naive<T: Element, R: BlockRule>(rule: &R, layout: Layout, x: &[T]) -> TensorScan {
        let mut fq = vec![T::from_f32(0.0); x.len()];
        blockwise::fake_quant(rule, layout, x, &mut fq).unwrap();
        let mut codes = vec![0u8; layout.rows * layout.packed_per_row()];
        let mut scales = vec![0u8; layout.rows * layout.blocks_per_row()];
        blockwise::quantize(rule, layout, x, &mut codes, &mut scales).unwrap();
        let mut st = TensorScan::default();
        for (i, (xv, qv)) in x.iter().zip(&fq).enumerate() {
            let (xf, qf) = (xv.to_f32() as f64, qv.to_f32() as f64);
            st.sum_x2 += xf * xf;
            st.sum_err2 += (xf - qf) * (xf - qf);
            st.max_abs_err = st.max_abs_err.max((xf - qf).abs());
            st.deadzone += (xf != 0.0 && qf == 0.0) as u64;
            let (r, c) = (i / layout.k, i % layout.k);
            let byte = codes[r * layout.packed_per_row() + c / 2];
            st.codes[((byte >> ((c % 2) * 4)) & 0xF) as usize] += 1;
        }
        for &b in &scales {
            st.scale_bytes[b as usize] += 1;
        }
        st
    }

    #[test]
    fn ladder_is_exact_and_ends_at_one() {
        let r = gain_ladder();
        assert_eq!(r[GAIN_RUNGS - 1], 1.0);
        assert_eq!(r[0], 2f32.powi(-8));
        assert_eq!(
            r[GAIN_PER_OCTAVE * 4 + 2],
            2f32.powi(-4) * LADDER_MANTISSAS[2]
        );
        assert!(r.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn matches_fake_quant_and_quantize() {
        let (rows, k) = (37, 200); // short tail blocks for both formats
        let x = data(rows * k, 7);
        for mode in ScaleMode::ALL {
            let rule = Mxfp4 { mode };
            let layout = Layout::from_shape(&[rows, k], MX_BLOCK).unwrap();
            let st = scan(&rule, layout, &x).unwrap();
            let nv = naive(&rule, layout, &x);
            assert_eq!(st.codes, nv.codes, "{mode}");
            assert_eq!(st.scale_bytes, nv.scale_bytes, "{mode}");
            assert_eq!(st.deadzone, nv.deadzone, "{mode}");
            assert_eq!(st.max_abs_err, nv.max_abs_err, "{mode}");
            assert!((st.sum_err2 / nv.sum_err2 - 1.0).abs() < 1e-12);
            assert!((st.sum_x2 / nv.sum_x2 - 1.0).abs() < 1e-12);
            assert_eq!(st.numel, (rows * k) as u64);
            assert_eq!(st.blocks, (rows * k.div_ceil(32)) as u64);
        }
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let gs = nvfp4::global_scale(nvfp4::amax(&xb));
        let rule = Nvfp4 { gs };
        let layout = Layout::from_shape(&[rows, k], NV_BLOCK).unwrap();
        let (st, g2) = scan_nvfp4(&[rows, k], &xb, None).unwrap();
        assert_eq!(gs, g2);
        let nv = naive(&rule, layout, &xb);
        assert_eq!(st.codes, nv.codes);
        assert_eq!(st.scale_bytes, nv.scale_bytes);
        assert_eq!(st.deadzone, nv.deadzone);
        assert_eq!(st.max_abs_err, nv.max_abs_err);
        assert!((st.sum_err2 / nv.sum_err2 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bit_identical_for_any_thread_count() {
        let x = data(3000 * 96, 11);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| scan_nvfp4(&[3000, 96], &x, None).unwrap().0)
        };
        let (a, b) = (run(1), run(5));
        assert_eq!(a.sum_x2.to_bits(), b.sum_x2.to_bits());
        assert_eq!(a.sum_err2.to_bits(), b.sum_err2.to_bits());
        assert_eq!(a.dec_sum.to_bits(), b.dec_sum.to_bits());
        for j in 0..GAIN_RUNGS {
            assert_eq!(a.response_sum[j].to_bits(), b.response_sum[j].to_bits());
        }
        assert_eq!(a, b);
    }

    #[test]
    fn hand_block_deadzone_saturation_and_probes() {
        // One MX block: amax 7 -> floor e = 0 (grid 0..6, d = 1): 7 clips, 0.2 is lost,
        // 0.25 ties to 0 (lost), 0.3 -> 0.5, zeros are not deadzone.
        let mut x = vec![0.0f32; 32];
        x[0] = 7.0;
        x[1] = 0.2;
        x[2] = -0.25;
        x[3] = 0.3;
        x[4] = 6.5;
        let st = scan_mxfp4(ScaleMode::Floor, &[32], &x).unwrap();
        assert_eq!(st.saturated, 2);
        assert_eq!(st.deadzone, 2);
        assert_eq!(st.zeros, 27);
        assert_eq!(st.max_abs_err, 1.0);
        assert_eq!(st.codes[0x7], 2); // two 6s
        assert_eq!(st.codes[0x8], 1); // -0.25 -> -0
        assert_eq!(st.scale_bytes[127], 1);
        assert_eq!((st.dec_min, st.dec_max, st.dec_sum), (1.0, 1.0, 1.0));
        // probes: r = 1 (7.0) clips; 6/7 < r clips; r * 7 <= 0.25 is dead.
        let r = gain_ladder();
        for (j, &rj) in r.iter().enumerate() {
            assert_eq!(st.probe_clipped[j], (rj * 7.0 > 6.0) as u64, "rung {j}");
            assert_eq!(st.probe_dead[j], (rj * 7.0 <= 0.25) as u64, "rung {j}");
        }
        assert_eq!(st.response_sum[GAIN_RUNGS - 1], 6.0 / 7.0);
        // rceil never clips a probe: d >= amax / 6.
        let st = scan_mxfp4(ScaleMode::Rceil, &[32], &x).unwrap();
        assert!(st.probe_clipped.iter().all(|&c| c == 0));
        assert_eq!(st.saturated, 0);
    }

    #[test]
    fn nonfinite_and_zero_blocks_are_set_apart() {
        let mut x = vec![0.0f32; 96];
        x[33] = f32::NAN;
        x[70] = 1.0;
        let st = scan_mxfp4(ScaleMode::Floor, &[96], &x).unwrap();
        assert_eq!(
            (st.blocks, st.nonfinite_blocks, st.nonfinite_elements),
            (3, 1, 32)
        );
        assert_eq!((st.zero_blocks, st.gain_blocks), (1, 1));
        assert_eq!(st.scale_bytes[E8M0_NAN as usize], 1);
        assert_eq!(st.codes.iter().sum::<u64>(), 64);
        assert_eq!(st.sum_err2, 0.0);
        assert_eq!(st.sqnr_db(), f64::INFINITY);
        let empty = scan_mxfp4(ScaleMode::Floor, &[0, 32], &x[..0]).unwrap();
        assert_eq!(empty, TensorScan::default());
        assert!(scan_nvfp4(&[4], &x[..4], Some(-1.0)).is_err());
        assert!(scan_mxfp4(ScaleMode::Floor, &[5], &x[..4]).is_err());
    }
}
