//! MXFP4 (OCP Microscaling v1.0): blocks of 32 E2M1 elements sharing one E8M0 scale.
//! docs/reference/FORMATS.md, "MXFP4".

use std::fmt;
use std::str::FromStr;

use crate::blockwise::{self, BlockRule, BlockScale};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::formats::{e8m0_encode, pow2, raw_exponent, E8M0_BIAS, E8M0_NAN, F4_E2M1_MAX_POW2};
use crate::layout::Layout;

/// MX block size (OCP MX v1.0, section 5.2).
pub const BLOCK: usize = 32;

/// How the shared exponent is derived from the block amax (torchao `ScaleCalculationMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleMode {
    /// `floor(log2(amax)) - 2`: the OCP spec; values up to 25% of the range saturate at 6.
    #[default]
    Floor,
    /// `ceil(log2(amax/6))`, exact: NVIDIA cuBLAS / Transformer Engine; never saturates.
    Rceil,
    /// torchao `EVEN`: round the amax to E2M1's 1-bit mantissa first, then floor.
    Even,
    /// torchao `CEIL`: `ceil(log2(amax)) - 2`.
    Ceil,
}

impl ScaleMode {
    /// All modes, in a stable order.
    pub const ALL: [ScaleMode; 4] = [Self::Floor, Self::Rceil, Self::Even, Self::Ceil];

    /// The mode's name as the Python API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Rceil => "rceil",
            Self::Even => "even",
            Self::Ceil => "ceil",
        }
    }
}

impl fmt::Display for ScaleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScaleMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                Error::Argument(format!(
                    "unknown MXFP4 scale_mode {s:?}; expected one of \"floor\", \"rceil\", \"even\", \"ceil\""
                ))
            })
    }
}

/// Exact `ceil(log2(d))` for a positive finite f32 (subnormals included); -127 for 0
/// (the caller clamps to -127 anyway).
#[inline(always)]
fn ceil_log2(d: f32) -> i32 {
    let b = d.to_bits() & 0x7FFF_FFFF;
    let ef = (b >> 23) as i32;
    let m = b & 0x7F_FFFF;
    if ef != 0 {
        ef - 127 + (m != 0) as i32
    } else if m == 0 {
        -E8M0_BIAS
    } else {
        let top = 31 - m.leading_zeros() as i32; // position of the leading bit, 0..=22
        -149 + top + (!m.is_power_of_two()) as i32
    }
}

/// The unbiased shared exponent of a block with finite amax `amax`, clamped to [-127, 127].
#[inline(always)]
pub fn shared_exponent(amax: f32, mode: ScaleMode) -> i32 {
    let e = match mode {
        ScaleMode::Floor => raw_exponent(amax) - F4_E2M1_MAX_POW2,
        ScaleMode::Ceil => {
            let mantissa_nonzero = (amax.to_bits() & 0x7F_FFFF) != 0;
            raw_exponent(amax) + mantissa_nonzero as i32 - F4_E2M1_MAX_POW2
        }
        ScaleMode::Even => {
            // Add half an E2M1 ulp (mantissa bit 21) and drop the mantissa: torchao EVEN.
            let rounded = f32::from_bits((amax.to_bits() + (1 << 21)) & 0xFF80_0000);
            raw_exponent(rounded) - F4_E2M1_MAX_POW2
        }
        ScaleMode::Rceil => ceil_log2(amax / 6.0),
    };
    e.clamp(-E8M0_BIAS, E8M0_BIAS)
}

/// The MXFP4 block rule for one scale mode.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mxfp4 {
    pub mode: ScaleMode,
}

impl BlockRule for Mxfp4 {
    const BLOCK: usize = BLOCK;
    const NAN_BYTE: u8 = E8M0_NAN;

    #[inline(always)]
    fn scale(&self, amax: f32) -> BlockScale {
        let e = shared_exponent(amax, self.mode);
        BlockScale {
            byte: e8m0_encode(e),
            dec: pow2(e),
            enc: pow2(-e),
        }
    }

    #[inline(always)]
    fn scaled(&self, x: f32, s: &BlockScale) -> f32 {
        // x * 2^-e rounds exactly like x / 2^e (same real number), see FORMATS.md.
        x * s.enc
    }

    #[inline(always)]
    fn dec_from_byte(&self, byte: u8) -> Option<f32> {
        (byte != E8M0_NAN).then(|| pow2(byte as i32 - E8M0_BIAS))
    }
}

/// Fake-quantize (quantize then dequantize) a tensor of shape `shape` into `out`.
pub fn fake_quant<T: Element>(
    mode: ScaleMode,
    shape: &[usize],
    x: &[T],
    out: &mut [T],
) -> Result<()> {
    blockwise::fake_quant(&Mxfp4 { mode }, Layout::from_shape(shape, BLOCK)?, x, out)
}

/// Quantize to packed E2M1 codes (`[..., ceil(K/2)]`) and E8M0 scale bytes (`[..., ceil(K/32)]`).
pub fn quantize<T: Element>(
    mode: ScaleMode,
    shape: &[usize],
    x: &[T],
    codes: &mut [u8],
    scales: &mut [u8],
) -> Result<()> {
    let layout = Layout::from_shape(shape, BLOCK)?;
    blockwise::quantize(&Mxfp4 { mode }, layout, x, codes, scales)
}

/// Dequantize packed codes and E8M0 scales of a tensor of shape `shape` into `out`.
pub fn dequantize<T: Element>(
    shape: &[usize],
    codes: &[u8],
    scales: &[u8],
    out: &mut [T],
) -> Result<()> {
    let layout = Layout::from_shape(shape, BLOCK)?;
    blockwise::dequantize(&Mxfp4::default(), layout, codes, scales, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn shared_exponent_by_mode() {
        // amax 6: floor log2 = 2 -> e = 0; rceil: 6/6 = 1 -> 0.
        for m in ScaleMode::ALL {
            let want = if m == ScaleMode::Ceil { 1 } else { 0 };
            assert_eq!(shared_exponent(6.0, m), want, "{m}");
        }
        // amax 7.5 (1.875 * 4): floor 0, even rounds to 8 -> 1, ceil 1, rceil 7.5/6=1.25 -> 1.
        assert_eq!(shared_exponent(7.5, ScaleMode::Floor), 0);
        assert_eq!(shared_exponent(7.5, ScaleMode::Even), 1);
        assert_eq!(shared_exponent(7.5, ScaleMode::Ceil), 1);
        assert_eq!(shared_exponent(7.5, ScaleMode::Rceil), 1);
        // amax 4: all powers of two agree.
        assert_eq!(shared_exponent(4.0, ScaleMode::Ceil), 0);
        assert_eq!(shared_exponent(4.0, ScaleMode::Rceil), 0); // 4/6 -> ceil(log2 0.667) = 0
                                                               // zero and subnormal amax clamp to -127.
        for m in ScaleMode::ALL {
            assert_eq!(shared_exponent(0.0, m), -127, "{m}");
            assert_eq!(shared_exponent(f32::from_bits(1), m), -127, "{m}");
        }
        // rceil with a subnormal d in (2^-127, 2^-126): ceil(log2 d) = -126.
        let d = 0.75 * f32::MIN_POSITIVE;
        assert_eq!(ceil_log2(d), -126);
        assert_eq!(ceil_log2(0.5 * f32::MIN_POSITIVE), -127);
        assert_eq!(ceil_log2(f32::from_bits(3)), -147);
        // largest finite: floor 127 - 2 = 125.
        assert_eq!(shared_exponent(f32::MAX, ScaleMode::Floor), 125);
    }

    #[test]
    fn fake_quant_block_saturates_and_nan_blocks() {
        let mut x = vec![0.0f32; 40];
        x[0] = 7.0; // amax 7: floor e = 0; 7 saturates to 6
        x[1] = 1.25; // tie -> 1
        x[2] = -0.3; // -> -0.5
        x[32] = f32::INFINITY; // second (short) block is non-finite
        x[33] = 1.0;
        let mut out = vec![0.0f32; 40];
        fake_quant(ScaleMode::Floor, &[40], &x, &mut out).unwrap();
        assert_eq!(&out[..3], &[6.0, 1.0, -0.5]);
        assert!(out[32..].iter().all(|v| v.to_bits() == 0x7FC0_0000));
        let mut codes = vec![0u8; 20];
        let mut scales = vec![0u8; 2];
        quantize(ScaleMode::Floor, &[40], &x, &mut codes, &mut scales).unwrap();
        assert_eq!(scales, [127, 0xFF]);
        assert_eq!(codes[0], 0x7 | (0x2 << 4));
        assert_eq!(codes[1], 0x9); // -0.5 low nibble, 0 high nibble
        let mut back = vec![bf16::ZERO; 40];
        dequantize(&[40], &codes, &scales, &mut back).unwrap();
        assert_eq!(back[0].to_f32(), 6.0);
        assert!(back[39].is_nan());
    }

    #[test]
    fn unknown_mode_is_an_error() {
        assert!("round".parse::<ScaleMode>().is_err());
        assert_eq!("rceil".parse::<ScaleMode>().unwrap(), ScaleMode::Rceil);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let x = [0.0f32; 10];
        let mut out = [0.0f32; 9];
        assert!(fake_quant(ScaleMode::Floor, &[10], &x, &mut out).is_err());
        assert!(fake_quant(ScaleMode::Floor, &[], &x[..0], &mut out[..0]).is_err());
    }
}
