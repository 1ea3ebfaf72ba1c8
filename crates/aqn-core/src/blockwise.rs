//! The one engine behind every format: per block, take the amax, derive the block's scale
//! from a [`BlockRule`], then encode (and for fake quant, decode) every element.
//! MXFP4 and NVFP4 differ only in their rule. docs/reference/FORMATS.md has the rules.

use rayon::prelude::*;

use crate::element::Element;
use crate::error::Result;
use crate::formats::{e2m1_decode, e2m1_encode, e2m1_round};
use crate::layout::Layout;

/// Bits of |x| at or above this are Inf (== 0x7F80_0000) or NaN (above).
const NON_FINITE_ABS_BITS: u32 = 0x7F80_0000;

/// A block's scale, derived from a finite block amax or from a stored scale byte.
#[derive(Debug, Clone, Copy)]
pub struct BlockScale {
    /// The scale byte stored by `quantize`.
    pub byte: u8,
    /// Decode-direction scale: element = code value * `dec`.
    pub dec: f32,
    /// Encode-direction factor, for rules that multiply (MX: `2^-e`).
    pub enc: f32,
}

/// How one format turns block amaxes into scales and elements into E2M1 inputs.
pub trait BlockRule: Sync {
    /// Block size along the last dimension.
    const BLOCK: usize;
    /// The scale byte written for a block containing NaN or Inf.
    const NAN_BYTE: u8;
    /// The scale of a block whose amax is finite.
    fn scale(&self, amax: f32) -> BlockScale;
    /// The value handed to the E2M1 encoder for element `x` of a block with scale `s`.
    fn scaled(&self, x: f32, s: &BlockScale) -> f32;
    /// Decode-direction scale from a stored byte, `None` for a NaN scale.
    fn dec_from_byte(&self, byte: u8) -> Option<f32>;
}

/// Largest block of any rule (stack buffers are sized by it).
const MAX_BLOCK: usize = 32;

/// Max of |x| over a widened block, as f32 bits (see [`amax_bits`]).
#[inline(always)]
fn amax_bits_f32(block: &[f32]) -> u32 {
    block
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF))
}

/// Max of |x| over a block, as f32 bits: non-negative floats order like their bits, and
/// NaN bits sort above Inf, so the result says "non-finite" by itself.
#[inline(always)]
fn amax_bits<T: Element>(block: &[T]) -> u32 {
    block
        .iter()
        .fold(0u32, |m, v| m.max(v.to_f32().to_bits() & 0x7FFF_FFFF))
}

/// Max |x| over a whole tensor (NaN if any element is NaN), in parallel.
pub fn tensor_amax<T: Element>(x: &[T]) -> f32 {
    let bits = x
        .par_chunks(1 << 16)
        .map(amax_bits)
        .reduce(|| 0u32, u32::max);
    if bits > NON_FINITE_ABS_BITS {
        f32::NAN
    } else {
        f32::from_bits(bits)
    }
}

/// Quantize-dequantize `x` into `out` (same layout).
pub fn fake_quant<T: Element, R: BlockRule>(
    rule: &R,
    layout: Layout,
    x: &[T],
    out: &mut [T],
) -> Result<()> {
    const { assert!(R::BLOCK <= MAX_BLOCK && R::BLOCK % 2 == 0) };
    layout.check_len("input", layout.numel(), x.len())?;
    layout.check_len("output", layout.numel(), out.len())?;
    if layout.numel() == 0 {
        return Ok(());
    }
    let chunk = layout.rows_per_task() * layout.k;
    x.par_chunks(chunk)
        .zip(out.par_chunks_mut(chunk))
        .for_each(|(xs, os)| {
            let mut buf = [0f32; MAX_BLOCK];
            for (xr, or) in xs.chunks(layout.k).zip(os.chunks_mut(layout.k)) {
                for (xb, ob) in xr.chunks(R::BLOCK).zip(or.chunks_mut(R::BLOCK)) {
                    // Widen the block once, work in f32, narrow once: SIMD-friendly.
                    let v = &mut buf[..xb.len()];
                    T::widen(xb, v);
                    let m = amax_bits_f32(v);
                    if m >= NON_FINITE_ABS_BITS {
                        ob.fill(T::canonical_nan());
                        continue;
                    }
                    let s = rule.scale(f32::from_bits(m));
                    for y in v.iter_mut() {
                        *y = e2m1_round(rule.scaled(*y, &s)) * s.dec;
                    }
                    T::narrow(v, ob);
                }
            }
        });
    Ok(())
}

/// Quantize `x` to packed codes (`rows * ceil(k/2)` bytes) and scale bytes
/// (`rows * ceil(k/block)`).
pub fn quantize<T: Element, R: BlockRule>(
    rule: &R,
    layout: Layout,
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u8],
) -> Result<()> {
    let (pk, nb) = (layout.packed_per_row(), layout.blocks_per_row());
    layout.check_len("input", layout.numel(), x.len())?;
    layout.check_len("codes", layout.rows * pk, codes.len())?;
    layout.check_len("scales", layout.rows * nb, scales.len())?;
    if layout.numel() == 0 {
        return Ok(());
    }
    let rpt = layout.rows_per_task();
    x.par_chunks(rpt * layout.k)
        .zip(codes.par_chunks_mut(rpt * pk))
        .zip(scales.par_chunks_mut(rpt * nb))
        .for_each(|((xs, cs), ss)| {
            let rows = xs
                .chunks(layout.k)
                .zip(cs.chunks_mut(pk))
                .zip(ss.chunks_mut(nb));
            for ((xr, cr), sr) in rows {
                // Blocks have even length, so block j's codes start at byte j * BLOCK / 2.
                let blocks = xr
                    .chunks(R::BLOCK)
                    .zip(cr.chunks_mut(R::BLOCK / 2))
                    .zip(sr.iter_mut());
                for ((xb, cb), sb) in blocks {
                    let m = amax_bits(xb);
                    if m >= NON_FINITE_ABS_BITS {
                        *sb = R::NAN_BYTE;
                        cb.fill(0);
                        continue;
                    }
                    let s = rule.scale(f32::from_bits(m));
                    *sb = s.byte;
                    for (c, pair) in cb.iter_mut().zip(xb.chunks(2)) {
                        let lo = e2m1_encode(rule.scaled(pair[0].to_f32(), &s));
                        let hi = pair
                            .get(1)
                            .map_or(0, |v| e2m1_encode(rule.scaled(v.to_f32(), &s)));
                        *c = lo | (hi << 4);
                    }
                }
            }
        });
    Ok(())
}

/// Dequantize packed codes and scale bytes into `out`.
pub fn dequantize<T: Element, R: BlockRule>(
    rule: &R,
    layout: Layout,
    codes: &[u8],
    scales: &[u8],
    out: &mut [T],
) -> Result<()> {
    let (pk, nb) = (layout.packed_per_row(), layout.blocks_per_row());
    layout.check_len("codes", layout.rows * pk, codes.len())?;
    layout.check_len("scales", layout.rows * nb, scales.len())?;
    layout.check_len("output", layout.numel(), out.len())?;
    if layout.numel() == 0 {
        return Ok(());
    }
    let rpt = layout.rows_per_task();
    out.par_chunks_mut(rpt * layout.k)
        .zip(codes.par_chunks(rpt * pk))
        .zip(scales.par_chunks(rpt * nb))
        .for_each(|((os, cs), ss)| {
            let rows = os
                .chunks_mut(layout.k)
                .zip(cs.chunks(pk))
                .zip(ss.chunks(nb));
            for ((or, cr), sr) in rows {
                let blocks = or
                    .chunks_mut(R::BLOCK)
                    .zip(cr.chunks(R::BLOCK / 2))
                    .zip(sr.iter());
                for ((ob, cb), &sb) in blocks {
                    let Some(dec) = rule.dec_from_byte(sb) else {
                        ob.fill(T::canonical_nan());
                        continue;
                    };
                    for (i, o) in ob.iter_mut().enumerate() {
                        let code = cb[i / 2] >> ((i % 2) * 4);
                        *o = T::from_f32(e2m1_decode(code) * dec);
                    }
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mxfp4::{Mxfp4, ScaleMode};
    use crate::nvfp4::{global_scale, Nvfp4};
    use half::{bf16, f16};
    use proptest::prelude::*;

    /// Any f32 bit pattern, weighted towards the interesting ones.
    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => any::<u32>().prop_map(f32::from_bits),
            4 => -8.0f32..8.0,
            1 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => prop::sample::select(vec![0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -6.0, f32::INFINITY, f32::NAN, 1e-45, f32::MAX]),
        ]
    }

    fn check_rule<T: Element, R: BlockRule>(
        rule: &R,
        shape: (usize, usize),
        x: &[T],
    ) -> std::result::Result<(), TestCaseError> {
        let layout = Layout {
            rows: shape.0,
            k: shape.1,
            block: R::BLOCK,
        };
        let mut fq = vec![T::from_f32(0.0); x.len()];
        fake_quant(rule, layout, x, &mut fq).unwrap();
        let mut codes = vec![0u8; layout.rows * layout.packed_per_row()];
        let mut scales = vec![0u8; layout.rows * layout.blocks_per_row()];
        quantize(rule, layout, x, &mut codes, &mut scales).unwrap();
        let mut back = vec![T::from_f32(0.0); x.len()];
        dequantize(rule, layout, &codes, &scales, &mut back).unwrap();
        for (i, (a, b)) in fq.iter().zip(&back).enumerate() {
            // Same bits, canonical NaNs included: the fused path equals the two-step path.
            prop_assert_eq!(a.to_f32().to_bits(), b.to_f32().to_bits(), "element {}", i);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// fake_quant == dequantize(quantize) for every rule, dtype and shape (short tails too).
        #[test]
        fn fused_equals_two_step(rows in 1usize..4, k in 1usize..70, vals in prop::collection::vec(any_f32(), 280), mode in 0usize..4) {
            let x: Vec<f32> = vals[..rows * k].to_vec();
            let mx = Mxfp4 { mode: ScaleMode::ALL[mode] };
            check_rule(&mx, (rows, k), &x)?;
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            check_rule(&mx, (rows, k), &xb)?;
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let nv = Nvfp4 { gs: global_scale(tensor_amax(&xh)) };
            check_rule(&nv, (rows, k), &xh)?;
            check_rule(&Nvfp4 { gs: global_scale(tensor_amax(&x)) }, (rows, k), &x)?;
        }
    }
}
