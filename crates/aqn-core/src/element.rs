//! The dtypes a tensor may have: f32, bf16 and f16. Inputs widen to f32 exactly; outputs
//! round to nearest even (docs/reference/FORMATS.md, "Output dtype rounding").

use half::{bf16, f16};

/// A floating-point element type that the quantizers read and write.
pub trait Element: Copy + Send + Sync + 'static {
    /// Short dtype name used in messages ("f32", "bf16", "f16").
    const NAME: &'static str;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32.
    fn from_f32(v: f32) -> Self;
    /// The canonical quiet NaN of this dtype (written explicitly so CPU and GPU agree).
    fn canonical_nan() -> Self;
    /// Widen a short slice (one block) into `dst`; bulk form so SIMD conversions apply.
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    /// Narrow a short slice (one block) into `dst` (round to nearest even).
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn canonical_nan() -> Self {
        f32::from_bits(0x7FC0_0000)
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn canonical_nan() -> Self {
        bf16::from_bits(0x7FC0)
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn canonical_nan() -> Self {
        f16::from_bits(0x7E00)
    }
    // half's slice conversions use F16C when the CPU has it (checked once per call).
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_is_round_half_even_with_subnormals() {
        // 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125: even mantissa wins.
        assert_eq!(bf16::from_f32(1.0 + 2f32.powi(-8)).to_bits(), 0x3F80);
        // 1 + 3*2^-8 ties upward to the even neighbour 1.015625.
        assert_eq!(bf16::from_f32(1.0 + 3.0 * 2f32.powi(-8)).to_bits(), 0x3F82);
        // f16 smallest subnormal survives, half of it ties to zero.
        assert_eq!(f16::from_f32(2f32.powi(-24)).to_bits(), 0x0001);
        assert_eq!(f16::from_f32(2f32.powi(-25)).to_bits(), 0x0000);
        assert_eq!(f16::from_f32(3.0 * 2f32.powi(-25)).to_bits(), 0x0002);
        // Overflow goes to Inf.
        assert_eq!(f16::from_f32(65520.0).to_bits(), 0x7C00);
        assert_eq!(<f16 as Element>::from_f32(-0.0).to_bits(), 0x8000);
    }
}
