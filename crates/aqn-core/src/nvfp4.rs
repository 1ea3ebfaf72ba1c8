//! NVFP4: blocks of 16 E2M1 elements with an E4M3 block scale and an f32 per-tensor global
//! scale, by the compressed-tensors / vLLM checkpoint convention
//! (docs/reference/FORMATS.md, "NVFP4").

use crate::blockwise::{self, BlockRule, BlockScale};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::formats::{
    e4m3_decode, e4m3_encode, E4M3_EPS_CODE, E4M3_NAN, F4_E2M1_MAX, NVFP4_GS_NUMERATOR,
};
use crate::layout::Layout;

/// NVFP4 block size.
pub const BLOCK: usize = 16;

/// Encode-direction global scale from the tensor amax: `(1 / max(amax, tiny)) * 2688`,
/// replaced by 1.0 when amax is NaN or the result is not a finite positive number
/// (compressed-tensors `generate_gparam`: clamp to `finfo.tiny`, divide, `nan_to_num(1.0)`).
pub fn global_scale(amax: f32) -> f32 {
    if amax.is_nan() {
        return 1.0;
    }
    // Reciprocal first, then the multiply: how torch evaluates `2688 / tensor`.
    let g = (1.0 / amax.max(f32::MIN_POSITIVE)) * NVFP4_GS_NUMERATOR;
    if g.is_finite() && g > 0.0 {
        g
    } else {
        1.0
    }
}

/// Check a caller-given amax: it must not be negative (NaN and Inf are allowed and give gs = 1).
pub fn validate_amax(amax: f32) -> Result<()> {
    if amax < 0.0 {
        Err(Error::Argument(format!(
            "amax must be >= 0 (it is a max of absolute values), got {amax}"
        )))
    } else {
        Ok(())
    }
}

/// Check a global scale read back for dequantization.
pub fn validate_global_scale(gs: f32) -> Result<()> {
    if gs.is_finite() && gs > 0.0 {
        Ok(())
    } else {
        Err(Error::Argument(format!(
            "global_scale must be a finite positive f32, got {gs}"
        )))
    }
}

/// The NVFP4 block rule for one global scale.
#[derive(Debug, Clone, Copy)]
pub struct Nvfp4 {
    /// Encode-direction global scale.
    pub gs: f32,
}

impl BlockRule for Nvfp4 {
    const BLOCK: usize = BLOCK;
    const NAN_BYTE: u8 = E4M3_NAN;

    #[inline(always)]
    fn scale(&self, amax: f32) -> BlockScale {
        let mut byte = e4m3_encode(self.gs * (amax / F4_E2M1_MAX));
        if byte == 0 {
            byte = E4M3_EPS_CODE; // compressed-tensors' eps for a zero scale
        }
        BlockScale {
            byte,
            dec: e4m3_decode(byte) / self.gs,
            enc: 0.0,
        }
    }

    #[inline(always)]
    fn scaled(&self, x: f32, s: &BlockScale) -> f32 {
        // clamp(x / d, -6, 6) in the rule; the E2M1 encoder saturates, so the clamp is implicit.
        x / s.dec
    }

    #[inline(always)]
    fn dec_from_byte(&self, byte: u8) -> Option<f32> {
        let s = e4m3_decode(byte);
        (!s.is_nan()).then(|| s / self.gs)
    }
}

/// Max |x| over the tensor (NaN if any element is NaN; 0 for an empty tensor).
pub fn amax<T: Element>(x: &[T]) -> f32 {
    blockwise::tensor_amax(x)
}

fn rule_for<T: Element>(x: &[T], amax: Option<f32>) -> Result<Nvfp4> {
    let a = match amax {
        Some(a) => {
            validate_amax(a)?;
            a
        }
        None => blockwise::tensor_amax(x),
    };
    Ok(Nvfp4 {
        gs: global_scale(a),
    })
}

/// Fake-quantize into `out`; `amax` overrides the tensor amax (e.g. cached per weight version).
/// Returns the global scale used.
pub fn fake_quant<T: Element>(
    shape: &[usize],
    x: &[T],
    amax: Option<f32>,
    out: &mut [T],
) -> Result<f32> {
    let layout = Layout::from_shape(shape, BLOCK)?;
    layout.check_len("input", layout.numel(), x.len())?;
    let rule = rule_for(x, amax)?;
    blockwise::fake_quant(&rule, layout, x, out)?;
    Ok(rule.gs)
}

/// Quantize to packed codes and E4M3 scale bytes; returns the global scale (encode direction).
pub fn quantize<T: Element>(
    shape: &[usize],
    x: &[T],
    amax: Option<f32>,
    codes: &mut [u8],
    scales: &mut [u8],
) -> Result<f32> {
    let layout = Layout::from_shape(shape, BLOCK)?;
    layout.check_len("input", layout.numel(), x.len())?;
    let rule = rule_for(x, amax)?;
    blockwise::quantize(&rule, layout, x, codes, scales)?;
    Ok(rule.gs)
}

/// Dequantize packed codes, E4M3 scale bytes and the global scale into `out`.
pub fn dequantize<T: Element>(
    shape: &[usize],
    codes: &[u8],
    scales: &[u8],
    global_scale: f32,
    out: &mut [T],
) -> Result<()> {
    validate_global_scale(global_scale)?;
    let layout = Layout::from_shape(shape, BLOCK)?;
    blockwise::dequantize(&Nvfp4 { gs: global_scale }, layout, codes, scales, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_scale_edges() {
        assert_eq!(global_scale(2688.0), 1.0);
        assert_eq!(global_scale(6.0), 448.0);
        assert_eq!(global_scale(f32::NAN), 1.0);
        assert_eq!(global_scale(f32::INFINITY), 1.0); // 1/Inf * 2688 = 0 -> 1
        assert_eq!(global_scale(0.0), 1.0); // overflows to Inf -> 1
        assert_eq!(global_scale(1e-37), 1.0);
        // reciprocal-then-multiply, not the IEEE quotient
        let a = 3.0f32;
        assert_eq!(global_scale(a), (1.0 / a) * 2688.0);
    }

    #[test]
    fn zero_block_uses_eps_scale() {
        let mut x = vec![0.0f32; 32];
        x[20] = 3.0;
        let mut codes = vec![0u8; 16];
        let mut scales = vec![0u8; 2];
        let gs = quantize(&[32], &x, None, &mut codes, &mut scales).unwrap();
        assert_eq!(gs, (1.0 / 3.0f32) * 2688.0);
        assert_eq!(scales[0], E4M3_EPS_CODE);
        // block amax 3: gs * 0.5 = 448 (within rounding) -> 448.
        assert_eq!(e4m3_decode(scales[1]), 448.0);
        let mut out = vec![0.0f32; 32];
        fake_quant(&[32], &x, None, &mut out).unwrap();
        let mut back = vec![0.0f32; 32];
        dequantize(&[32], &codes, &scales, gs, &mut back).unwrap();
        assert_eq!(out, back);
        assert_eq!(out[20], 3.0);
    }

    #[test]
    fn bad_arguments() {
        let x = [1.0f32; 4];
        let mut out = [0.0f32; 4];
        assert!(fake_quant(&[4], &x, Some(-1.0), &mut out).is_err());
        assert!(dequantize(&[4], &[0, 0], &[0x38], 0.0, &mut out).is_err());
        assert!(dequantize(&[4], &[0, 0], &[0x38], f32::NAN, &mut out).is_err());
    }
}
