//! Counter-based Gaussian noise for AQN: the same `(seed, step, module name)` gives the same
//! noise in every process and on every device, with no tensors sent between them.
//!
//! The exact algorithm is written down in `docs/reference/NOISE.md` (the contract for the CUDA port
//! and for `aqn_rs.aqn._reference_gaussian`, the pure-torch reference). In short:
//!
//! 1. `key = fnv1a64(seed as 8 little-endian bytes ++ UTF-8 name)` ([`noise_key`]);
//! 2. element `e` of the (flattened, row-major) tensor belongs to block `b = e / 4`, lane
//!    `e % 4`; the block's four u32 words are Philox4x32-10 of the counter
//!    `(lo32(b), hi32(b), lo32(step), hi32(step))` under the key `(lo32(key), hi32(key))`;
//! 3. Box–Muller turns words `(x0, x1)` into lanes 0 and 1 and `(x2, x3)` into lanes 2 and 3,
//!    with `ln`, `sin`, `cos` evaluated by fixed polynomials in f32 using only `+ - * /`,
//!    `sqrt` and exact integer/bit operations, in a fixed order, with no FMA;
//! 4. the value is `z * sigma` in f32.
//!
//! Rust never contracts `a * b + c` into an FMA, so every line below is one IEEE-754 f32
//! operation with round-to-nearest-even, as the docs require.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Philox4x32 round multipliers (Salmon et al. 2011; Random123 `PHILOX_M4x32_0/1`, as in
/// curand and PyTorch).
pub const PHILOX_M0: u32 = 0xD251_1F53;
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Philox key schedule increments (golden ratio and sqrt(3) - 1; `PHILOX_W32_0/1`).
pub const PHILOX_W0: u32 = 0x9E37_79B9;
pub const PHILOX_W1: u32 = 0xBB67_AE85;
/// Rounds of Philox4x32-10.
pub const PHILOX_ROUNDS: usize = 10;

/// FNV-1a 64-bit offset basis and prime (Fowler–Noll–Vo).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

// f32 constants of the transcendental approximations, given by their bit patterns: the table
// in docs/reference/NOISE.md, "Constants", which the CUDA port and the torch reference use as they
// are. `constants_are_what_they_say` checks each against its mathematical value.
/// 2^-24: one unit of the 24-bit uniform grid.
pub const U24: f32 = f32::from_bits(0x3380_0000);
/// sqrt(2) rounded to f32: mantissas above it are halved so `m` lies in [sqrt(2)/2, sqrt(2)].
pub const SQRT2: f32 = f32::from_bits(0x3fb5_04f3);
/// ln(2) split so that `e * LN2_HI` is exact for |e| < 2^7 (its low 7 bits are zero; here
/// |e| <= 25).
pub const LN2_HI: f32 = f32::from_bits(0x3f31_7180);
pub const LN2_LO: f32 = f32::from_bits(0x3717_f7d1);
/// Taylor coefficients of `2 atanh(s) = 2s + s^3 (2/3) + s^5 (2/5) + ...` past the first term.
pub const LG1: f32 = f32::from_bits(0x3f2a_aaab); // 2/3
pub const LG2: f32 = f32::from_bits(0x3ecc_cccd); // 2/5
pub const LG3: f32 = f32::from_bits(0x3e92_4925); // 2/7
pub const LG4: f32 = f32::from_bits(0x3e63_8e39); // 2/9
/// Taylor coefficients of sin on [-pi/4, pi/4].
pub const S1: f32 = f32::from_bits(0xbe2a_aaab); // -1/3!
pub const S2: f32 = f32::from_bits(0x3c08_8889); // 1/5!
pub const S3: f32 = f32::from_bits(0xb950_0d01); // -1/7!
pub const S4: f32 = f32::from_bits(0x3638_ef1d); // 1/9!
/// Taylor coefficients of cos on [-pi/4, pi/4].
pub const C1: f32 = f32::from_bits(0xbf00_0000); // -1/2!
pub const C2: f32 = f32::from_bits(0x3d2a_aaab); // 1/4!
pub const C3: f32 = f32::from_bits(0xbab6_0b61); // -1/6!
pub const C4: f32 = f32::from_bits(0x37d0_0d01); // 1/8!
pub const C5: f32 = f32::from_bits(0xb493_f27e); // -1/10!
/// float(2 pi) / 2^24: the angle of one unit of the 24-bit angle grid.
pub const ANGLE_UNIT: f32 = f32::from_bits(0x34c9_0fdb);

/// 64-bit FNV-1a of a byte string.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The Philox key of a `(seed, name)` pair: FNV-1a 64 over the seed's 8 little-endian bytes
/// followed by the name's UTF-8 bytes. The step goes into the counter, not the key.
pub fn noise_key(seed: u64, name: &str) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in seed.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32-10 (Random123 `philox4x32_R(10, ctr, key)`): ten rounds, the key bumped by
/// `(W0, W1)` between rounds.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for r in 0..PHILOX_ROUNDS {
        if r > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c0);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// `-2 ln(u)` for `u = ((x >> 8) + 1) * 2^-24` in `[2^-24, 1]` (docs/reference/NOISE.md, "radius").
#[inline]
pub fn minus_two_log_uniform(x: u32) -> f32 {
    let u = ((x >> 8) + 1) as f32 * U24; // exact: an integer <= 2^24 times a power of two
    let bits = u.to_bits();
    let mut e = ((bits >> 23) as i32) - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut r = LG4;
    r = LG3 + z * r;
    r = LG2 + z * r;
    r = LG1 + z * r;
    r *= z;
    let hfsq = (0.5 * f) * f;
    let ef = e as f32;
    let ln_u = ef * LN2_HI - ((hfsq - (s * (hfsq + r) + ef * LN2_LO)) - f);
    -2.0 * ln_u
}

/// `(sin, cos)` of the angle `2 pi k / 2^24` with `k = x >> 8` (docs/reference/NOISE.md, "angle").
#[inline]
pub fn sincos_turns(x: u32) -> (f32, f32) {
    let k = x >> 8; // 24-bit angle in units of 2 pi / 2^24
    let q = (k + (1 << 21)) >> 22; // nearest quarter turn, 0..=4
    let r = k as i32 - (q << 22) as i32; // [-2^21, 2^21)
    let a = r as f32 * ANGLE_UNIT; // [-pi/4, pi/4)
    let z = a * a;
    let mut p = S4;
    p = S3 + z * p;
    p = S2 + z * p;
    p = S1 + z * p;
    p *= z;
    let s = a + a * p;
    let mut c = C5;
    c = C4 + z * c;
    c = C3 + z * c;
    c = C2 + z * c;
    c = C1 + z * c;
    let c = 1.0 + z * c;
    match q & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// Four standard normals from four Philox words (Box–Muller on `(x0, x1)` and `(x2, x3)`).
#[inline]
pub fn box_muller4(x: [u32; 4]) -> [f32; 4] {
    let r0 = minus_two_log_uniform(x[0]).sqrt();
    let (s0, c0) = sincos_turns(x[1]);
    let r1 = minus_two_log_uniform(x[2]).sqrt();
    let (s1, c1) = sincos_turns(x[3]);
    [r0 * c0, r0 * s0, r1 * c1, r1 * s1]
}

/// The four standard normals of block `block` (elements `4*block .. 4*block+4`).
#[inline]
pub fn gaussian_block(key: u64, step: u64, block: u64) -> [f32; 4] {
    let ctr = [
        block as u32,
        (block >> 32) as u32,
        step as u32,
        (step >> 32) as u32,
    ];
    box_muller4(philox4x32_10(ctr, [key as u32, (key >> 32) as u32]))
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// Fill `out` with elements `offset .. offset + out.len()` of the noise tensor of
/// `(key, step)`, each `z * sigma` in f32. Any slice of a tensor's noise can be generated
/// alone: elements `[a, b)` are `fill(key, step, a, sigma, &mut out[..b - a])`.
pub fn fill_gaussian(key: u64, step: u64, offset: u64, sigma: f32, out: &mut [f32]) -> Result<()> {
    if offset.checked_add(out.len() as u64).is_none() {
        return Err(Error::Argument(format!(
            "noise element range overflows u64: offset {offset} + {} elements",
            out.len()
        )));
    }
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let start = offset + (ci * CHUNK) as u64;
            let mut cur = u64::MAX;
            let mut z = [0f32; 4];
            for (i, o) in chunk.iter_mut().enumerate() {
                let e = start + i as u64;
                let b = e >> 2;
                if b != cur {
                    z = gaussian_block(key, step, b);
                    cur = b;
                }
                *o = z[(e & 3) as usize] * sigma;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Random123 kat_vectors, philox4x32 with 10 rounds.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn fnv_known_answers() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        let mut v = 7u64.to_le_bytes().to_vec();
        v.extend_from_slice("model.norm".as_bytes());
        assert_eq!(noise_key(7, "model.norm"), fnv1a64(&v));
    }

    #[test]
    fn constants_are_what_they_say() {
        // each is its mathematical value rounded to nearest f32 (LN2_HI/LO: a split of ln 2)
        let f = |x: f64| x as f32;
        let table: [(f32, f64); 16] = [
            (U24, 2f64.powi(-24)),
            (SQRT2, 2f64.sqrt()),
            (LG1, 2.0 / 3.0),
            (LG2, 2.0 / 5.0),
            (LG3, 2.0 / 7.0),
            (LG4, 2.0 / 9.0),
            (S1, -1.0 / 6.0),
            (S2, 1.0 / 120.0),
            (S3, -1.0 / 5040.0),
            (S4, 1.0 / 362_880.0),
            (C1, -0.5),
            (C2, 1.0 / 24.0),
            (C3, -1.0 / 720.0),
            (C4, 1.0 / 40_320.0),
            (C5, -1.0 / 3_628_800.0),
            (ANGLE_UNIT, f(std::f64::consts::TAU) as f64 / 2f64.powi(24)),
        ];
        for (i, (c, v)) in table.iter().enumerate() {
            assert_eq!(c.to_bits(), f(*v).to_bits(), "constant {i}");
        }
        assert_eq!(LN2_HI.to_bits() & 0x7f, 0);
        let ln2 = LN2_HI as f64 + LN2_LO as f64;
        assert!((ln2 - std::f64::consts::LN_2).abs() < 1e-12);
    }

    #[test]
    fn log_is_accurate() {
        let mut worst = 0f64;
        for k in (0u32..(1 << 24))
            .step_by(97)
            .chain([0, 1, 2, (1 << 24) - 1])
        {
            let x = k << 8;
            let got = minus_two_log_uniform(x) as f64;
            let u = (k as f64 + 1.0) / (1u64 << 24) as f64;
            let want = -2.0 * u.ln();
            let err = (got - want).abs() / want.abs().max(1e-30);
            if want != 0.0 {
                worst = worst.max(err);
            } else {
                assert_eq!(got, 0.0);
            }
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn sincos_is_accurate() {
        let mut worst = 0f64;
        for k in (0u32..(1 << 24))
            .step_by(89)
            .chain([0, (1 << 21) - 1, 1 << 21, (1 << 24) - 1])
        {
            let (s, c) = sincos_turns(k << 8);
            let a = 2.0 * std::f64::consts::PI * k as f64 / (1u64 << 24) as f64;
            worst = worst.max((s as f64 - a.sin()).abs());
            worst = worst.max((c as f64 - a.cos()).abs());
        }
        assert!(worst < 2e-7, "worst absolute error {worst:e}");
    }

    #[test]
    fn slices_equal_the_whole() {
        let key = noise_key(3, "model.layers.0.input_layernorm");
        let mut whole = vec![0f32; 1037];
        fill_gaussian(key, 11, 0, 0.5, &mut whole).unwrap();
        for (a, b) in [(0, 1), (1, 6), (3, 4), (5, 1037), (400, 1000)] {
            let mut part = vec![0f32; b - a];
            fill_gaussian(key, 11, a as u64, 0.5, &mut part).unwrap();
            assert_eq!(
                part.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                whole[a..b].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        // across a chunk boundary of the parallel fill
        let mut big = vec![0f32; CHUNK + 9];
        fill_gaussian(key, 11, 3, 1.0, &mut big).unwrap();
        let mut tail = vec![0f32; 9];
        fill_gaussian(key, 11, 3 + CHUNK as u64, 1.0, &mut tail).unwrap();
        assert_eq!(&big[CHUNK..], &tail[..]);
    }

    #[test]
    fn moments() {
        let mut v = vec![0f32; 1 << 20];
        fill_gaussian(noise_key(0, "w"), 1, 0, 1.0, &mut v).unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let m4 = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n;
        // 5 standard errors: sd(mean) = 1/sqrt(n), sd(var) = sqrt(2/n), sd(m4) ~ sqrt(96/n)
        assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "var {var}");
        assert!((m4 - 3.0).abs() < 5.0 * (96.0 / n).sqrt(), "kurtosis {m4}");
    }

    #[test]
    fn overflow_is_an_error() {
        let mut v = vec![0f32; 2];
        assert!(fill_gaussian(1, 1, u64::MAX, 1.0, &mut v).is_err());
    }
}
