//! Element and scale codecs (docs/reference/FORMATS.md): E2M1 elements, E8M0 and E4M3 block scales,
//! and packing two 4-bit codes per byte.

/// Largest E2M1 magnitude.
pub const F4_E2M1_MAX: f32 = 6.0;
/// `floor(log2(F4_E2M1_MAX))`: 6 = 1.5 * 2^2 (torchao `F4_E2M1_MAX_POW2`).
pub const F4_E2M1_MAX_POW2: i32 = 2;
/// Largest finite float8_e4m3fn value.
pub const F8_E4M3_MAX: f32 = 448.0;
/// E4M3 byte of the largest finite value (0 1111 110).
pub const E4M3_MAX_CODE: u8 = 0x7E;
/// E4M3 NaN byte (0 1111 111); 0xFF is NaN too but we always write 0x7F.
pub const E4M3_NAN: u8 = 0x7F;
/// compressed-tensors replaces a zero E4M3 block scale by its eps, 0.125 (0 0100 000).
pub const E4M3_EPS_CODE: u8 = 0x20;
/// E8M0 bias (OCP MX v1.0, section 5.4.1).
pub const E8M0_BIAS: i32 = 127;
/// E8M0 NaN byte.
pub const E8M0_NAN: u8 = 0xFF;
/// 2688 = 448 * 6: the NVFP4 global scale maps the tensor amax to E4M3 max times E2M1 max.
pub const NVFP4_GS_NUMERATOR: f32 = F8_E4M3_MAX * F4_E2M1_MAX;

/// E2M1 magnitudes by index 0..7.
pub const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// All 16 E2M1 codes decoded (code = sign << 3 | index).
pub const E2M1_DECODE: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// E2M1 encode of a finite f32 (or ±Inf): round half to even, saturating at ±6.
///
/// The index is the number of grid midpoints below `|y|`; a midpoint counts with `>` when the
/// tie goes down (to the even neighbour below: 0.25, 1.25, 2.5, 5) and with `>=` when it goes
/// up (0.75, 1.75, 3.5). Branch-free so that it vectorizes. NaN gives magnitude 0 (callers never
/// pass NaN: non-finite blocks are handled whole).
#[inline(always)]
pub fn e2m1_encode(y: f32) -> u8 {
    let sign = ((y.to_bits() >> 31) as u8) << 3;
    let a = y.abs();
    let idx = (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8;
    sign | idx
}

/// `e2m1_decode(e2m1_encode(y))` computed arithmetically (vectorizes; no table gather).
///
/// Round-half-to-even to the grid spacing of `|y|`'s binade — 0.5 below 2, 1 below 4, 2 above —
/// by the add-and-subtract trick (`a + 2^(23+k) - 2^(23+k)` rounds `a` to a multiple of `2^k`
/// with the FPU's RNE), then saturate at 6. Ties land exactly as in [`e2m1_encode`]: 5 -> 4
/// (2*2 even), 2.5 -> 2, 0.25 -> 0, 0.75 -> 1, 1.75 -> 2, 3.5 -> 4. The sign is copied from `y`,
/// so values that round to zero keep it (-0.1 -> -0.0, as code 0x8 decodes).
#[inline(always)]
pub fn e2m1_round(y: f32) -> f32 {
    let a = y.abs();
    let c = if a < 2.0 {
        4_194_304.0 // 2^22: spacing 0.5
    } else if a < 4.0 {
        8_388_608.0 // 2^23: spacing 1
    } else {
        16_777_216.0 // 2^24: spacing 2
    };
    ((a + c) - c).min(F4_E2M1_MAX).copysign(y)
}

/// E2M1 decode of a 4-bit code (the high nibble of `code` is ignored).
#[inline(always)]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_DECODE[(code & 0xF) as usize]
}

/// `2^k` as an f32, exact for `k` in [-149, 127] (subnormal below -126).
#[inline(always)]
pub fn pow2(k: i32) -> f32 {
    debug_assert!((-149..=127).contains(&k));
    if k >= -126 {
        f32::from_bits(((k + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (k + 149))
    }
}

/// The raw unbiased exponent field of an f32: `((bits >> 23) & 0xFF) - 127`
/// (so every subnormal, and zero, gives -127).
#[inline(always)]
pub fn raw_exponent(a: f32) -> i32 {
    ((a.to_bits() >> 23) & 0xFF) as i32 - 127
}

/// E8M0 byte for an unbiased exponent, which must lie in [-127, 127].
#[inline(always)]
pub fn e8m0_encode(e: i32) -> u8 {
    debug_assert!((-E8M0_BIAS..=E8M0_BIAS).contains(&e));
    (e + E8M0_BIAS) as u8
}

/// E8M0 decode: `2^(b - 127)`, NaN for 0xFF.
#[inline(always)]
pub fn e8m0_decode(b: u8) -> f32 {
    if b == E8M0_NAN {
        f32::NAN
    } else {
        pow2(b as i32 - E8M0_BIAS)
    }
}

/// float8_e4m3fn encode with round-half-to-even, saturating at ±448 (Inf too); NaN -> 0x7F.
#[inline]
pub fn e4m3_encode(v: f32) -> u8 {
    if v.is_nan() {
        return E4M3_NAN;
    }
    let sign = ((v.to_bits() >> 31) as u8) << 7;
    let a = v.abs();
    if a >= F8_E4M3_MAX {
        return sign | E4M3_MAX_CODE;
    }
    if a < pow2(-6) {
        // Subnormal range: quantum 2^-9; n = 8 is the smallest normal, whose code is 8.
        let n = (a * pow2(9)).round_ties_even() as u8;
        return sign | n;
    }
    let e = raw_exponent(a); // a is a normal f32 here
    let m = a * pow2(-e); // exact, in [1, 2)
    let n = ((m - 1.0) * 8.0).round_ties_even() as u8; // (m - 1) * 8 is exact
                                                       // n = 8 carries into the exponent, which this addition does by itself.
    sign | ((((e + 7) as u8) << 3) + n)
}

/// float8_e4m3fn decode (0x7F and 0xFF are NaN).
#[inline]
pub fn e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0xF) as i32;
    let man = (b & 0x7) as f32;
    if exp == 0xF && (b & 0x7) == 0x7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man * pow2(-9)
    } else {
        sign * (1.0 + man / 8.0) * pow2(exp - 7)
    }
}

/// Number of packed bytes for `k` codes.
#[inline(always)]
pub const fn packed_len(k: usize) -> usize {
    k.div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2m1_table_every_tie_and_saturation() {
        let cases: &[(f32, f32)] = &[
            (0.0, 0.0),
            (0.1, 0.0),
            (0.25, 0.0), // tie to even (0)
            (0.2500001, 0.5),
            (0.5, 0.5),
            (0.7499999, 0.5),
            (0.75, 1.0), // tie to even (1.0)
            (1.0, 1.0),
            (1.25, 1.0), // tie to even (1.0)
            (1.2500001, 1.5),
            (1.5, 1.5),
            (1.75, 2.0), // tie to even (2.0)
            (2.0, 2.0),
            (2.5, 2.0), // tie to even (2.0)
            (2.5000002, 3.0),
            (3.0, 3.0),
            (3.4999998, 3.0),
            (3.5, 4.0), // tie to even (4.0)
            (4.0, 4.0),
            (5.0, 4.0), // tie to even (4.0)
            (5.0000005, 6.0),
            (6.0, 6.0),
            (6.5, 6.0), // saturation
            (1e30, 6.0),
            (f32::INFINITY, 6.0),
        ];
        for &(x, want) in cases {
            assert_eq!(e2m1_decode(e2m1_encode(x)), want, "x = {x}");
            assert_eq!(
                e2m1_decode(e2m1_encode(-x)).to_bits(),
                (-want).to_bits(),
                "x = -{x}"
            );
        }
        assert_eq!(e2m1_encode(-0.0), 0x8);
        assert_eq!(e2m1_encode(-0.1), 0x8);
    }

    #[test]
    fn e2m1_round_equals_decode_of_encode() {
        // Every f32 in [0, 8] at a 2^-12 step (all ties and neighbours), then spot values.
        let mut xs: Vec<f32> = (0..=(8 << 12)).map(|i| i as f32 / 4096.0).collect();
        xs.extend([
            1e-45,
            1e-30,
            5.0000005,
            4.9999995,
            1e30,
            f32::INFINITY,
            f32::MAX,
        ]);
        for x in xs {
            for y in [x, -x] {
                assert_eq!(
                    e2m1_round(y).to_bits(),
                    e2m1_decode(e2m1_encode(y)).to_bits(),
                    "y = {y}"
                );
            }
        }
    }

    #[test]
    fn e2m1_all_sixteen_codes_round_trip() {
        for code in 0u8..16 {
            assert_eq!(e2m1_encode(e2m1_decode(code)), code);
        }
        assert_eq!(E2M1_DECODE[7], F4_E2M1_MAX);
        assert_eq!(E2M1_DECODE[15], -F4_E2M1_MAX);
    }

    #[test]
    fn e8m0_edges() {
        assert_eq!(e8m0_decode(127), 1.0);
        assert_eq!(e8m0_decode(0).to_bits(), 0x0040_0000); // 2^-127, subnormal
        assert_eq!(e8m0_decode(1), f32::MIN_POSITIVE); // 2^-126
        assert_eq!(e8m0_decode(254), 2f32.powi(127));
        assert!(e8m0_decode(255).is_nan());
        assert_eq!(e8m0_encode(-127), 0);
        assert_eq!(e8m0_encode(127), 254);
        assert_eq!(pow2(-149).to_bits(), 1);
    }

    #[test]
    fn e4m3_edges() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (448.0, 0x7E),
            (464.0, 0x7E), // would round to 480: saturates
            (1e9, 0x7E),
            (f32::INFINITY, 0x7E),
            (2f32.powi(-9), 0x01),        // smallest subnormal
            (2f32.powi(-10), 0x00),       // tie to even (0)
            (3.0 * 2f32.powi(-10), 0x02), // 1.5 quanta: tie to even (2)
            (7.0 * 2f32.powi(-9), 0x07),  // largest subnormal
            (7.5 * 2f32.powi(-9), 0x08),  // ties up into the smallest normal
            (2f32.powi(-6), 0x08),
            (0.125, 0x20),
            (1.0, 0x38),
            (1.0625, 0x38), // 1 + 1/16: tie to even (1.0)
            (1.1875, 0x3A), // 1 + 3/16: tie to even (1.25)
            (1.9375, 0x40), // 1 + 15/16: ties up to 2.0, exponent carries
            (240.0, 0x77),
            (416.0, 0x7D),
            (432.0, 0x7E), // halfway between 416 and 448: tie to even (448, mantissa 6)
            (440.0, 0x7E),
        ];
        for &(v, b) in cases {
            assert_eq!(e4m3_encode(v), b, "v = {v}");
            assert_eq!(e4m3_encode(-v), b | 0x80, "v = -{v}");
        }
        assert_eq!(e4m3_encode(f32::NAN), 0x7F);
        assert!(e4m3_decode(0x7F).is_nan() && e4m3_decode(0xFF).is_nan());
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_decode(0x20), 0.125);
    }

    #[test]
    fn e4m3_decode_encode_round_trip_all_bytes() {
        for b in 0u8..=255 {
            if b & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(e4m3_encode(e4m3_decode(b)), b, "byte {b:#x}");
        }
    }
}
