// Shared device helpers of the FP4 kernels: the element and scale codecs of
// docs/reference/FORMATS.md (mirroring crates/aqn-core/src/formats.rs), the dtype traits
// (element.rs), and the launch argument block shared with src/cuda/abi.rs.
//
// Exactness rules (FORMATS.md "Notation"): every f32 operation is an explicitly rounded
// intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn) so that no FMA contraction or approximate
// division can creep in; the build also passes -fmad=false and never -ftz / --use_fast_math,
// so subnormals are kept. NaNs are written explicitly as the canonical quiet NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "abi.cuh"

namespace aqn {

// ---------------------------------------------------------------------------------------
// Launch arguments. One block for every kernel, passed by value; src/cuda/abi.rs owns the
// layout (its #[repr(C)] `Args`), checked field by field below.
struct Args {
    const void* x;          // input elements (fake_quant, quantize, amax)
    void* out;              // output elements (fake_quant, dequantize) or f32 partials/amax
    uint8_t* codes;         // packed E2M1 codes (quantize: written, dequantize: read)
    uint8_t* scales;        // block scale bytes (quantize: written, dequantize: read)
    const float* amax_src;  // NVFP4: n_amax f32 values (amax partials, or a given amax)
    float* gs_out;          // NVFP4 quantize: the global scale, written by thread 0 of CTA 0
    const float* gs_src;    // NVFP4 dequantize: the global scale (device), or null
    long long rows;         // rows of the [rows, k] view (product of the leading dims)
    long long k;            // last dimension
    int n_amax;             // NVFP4: values at amax_src; 0 = use amax_value
    float amax_value;       // NVFP4: host-given amax (when n_amax == 0)
    float gs_value;         // NVFP4 dequantize: host-given global scale (when gs_src is null)
    int mode;               // MXFP4 scale mode: 0 floor, 1 rceil, 2 even, 3 ceil
    const void* y;          // second input elements (sq_err: the fake quant of x)
    long long keep_vecs;    // L2 hints (see L2Hint; 0: none): amax pass, its first keep_vecs
                            // vectors; element kernels, nonzero = after such an amax pass
};
AQN_ABI_STRUCT(Args);
AQN_ABI_FIELD(Args, x);
AQN_ABI_FIELD(Args, y);
AQN_ABI_FIELD(Args, out);
AQN_ABI_FIELD(Args, codes);
AQN_ABI_FIELD(Args, scales);
AQN_ABI_FIELD(Args, amax_src);
AQN_ABI_FIELD(Args, gs_out);
AQN_ABI_FIELD(Args, gs_src);
AQN_ABI_FIELD(Args, rows);
AQN_ABI_FIELD(Args, k);
AQN_ABI_FIELD(Args, n_amax);
AQN_ABI_FIELD(Args, amax_value);
AQN_ABI_FIELD(Args, gs_value);
AQN_ABI_FIELD(Args, mode);
AQN_ABI_FIELD(Args, keep_vecs);

// The multi-tensor kernels (`*_many_*`): one launch over up to MANY_MAX tensors, each an
// entry of the argument block itself (no table to copy to the device first, so no host
// staging and nothing to synchronize). The block stays within the classic 4 KiB limit of
// kernel parameters. The launch's work is numbered in chunks (one CTA iteration each), entry
// by entry: entry e owns chunks chunk0 .. next entry's chunk0 - 1.
constexpr int MANY_MAX = 126;
AQN_ABI_CONST(MANY_MAX);

struct ManyEntry {
    const void* x;    // input elements (16-byte aligned, whole blocks: the vector layout)
    void* out;        // fake quant output (same size)
    long long n_vec;  // 16-byte vectors of x
    int slot;         // NVFP4: the index of the entry's tensor amax in ManyArgs::amax
    int chunk0;       // the entry's first chunk
};
AQN_ABI_STRUCT(ManyEntry);
AQN_ABI_FIELD(ManyEntry, x);
AQN_ABI_FIELD(ManyEntry, out);
AQN_ABI_FIELD(ManyEntry, n_vec);
AQN_ABI_FIELD(ManyEntry, slot);
AQN_ABI_FIELD(ManyEntry, chunk0);

struct ManyArgs {
    float* amax;          // NVFP4: n_slots tensor amaxes (written by the fold, read by fake quant)
    float* partials;      // NVFP4 amax pass: n_slots * n_partials f32, slot-major
    long long n_chunks;   // chunks of all entries
    int n_entries;        // 1 .. MANY_MAX
    int n_slots;          // NVFP4: amax slots of this launch
    int n_partials;       // NVFP4: CTAs of the amax pass (partials per slot)
    int mode;             // MXFP4 scale mode (Args::mode)
    long long keep_chunks;  // L2 hints (see L2Hint; 0: none): amax pass, its chunks before
                            // this one; fake quant, nonzero = after such an amax pass
    ManyEntry e[MANY_MAX];
};
AQN_ABI_STRUCT(ManyArgs);
AQN_ABI_FIELD(ManyArgs, amax);
AQN_ABI_FIELD(ManyArgs, partials);
AQN_ABI_FIELD(ManyArgs, n_chunks);
AQN_ABI_FIELD(ManyArgs, n_entries);
AQN_ABI_FIELD(ManyArgs, n_slots);
AQN_ABI_FIELD(ManyArgs, n_partials);
AQN_ABI_FIELD(ManyArgs, mode);
AQN_ABI_FIELD(ManyArgs, keep_chunks);
AQN_ABI_FIELD(ManyArgs, e);

// The entry that owns chunk c: the last one whose first chunk is <= c (an empty entry shares
// its first chunk with the next one and so is never picked). Uniform over the CTA.
__device__ __forceinline__ int many_entry_of(const ManyArgs& a, long long c) {
    int lo = 0, hi = a.n_entries - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (a.e[mid].chunk0 <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// A 16-byte read-only load for a pass that reads each byte once and keeps nothing: no L1
// allocation, and a 256-byte L2 prefetch. In the amax pass of 16-bit tensors it took NVFP4
// incl. amax on an H100 from 1.61 to 1.59x the copy time (bf16 4096x14336,
// docs/results/BENCHMARKS.md); for f32 tensors it made the pair slower (1.53 -> 1.56x), and in the
// element kernels it made them slower too: those keep __ldg.
__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// L2 eviction priorities that let the kernel after an NVFP4 amax pass read part of its input
// from L2 instead of HBM (`tuning::l2_keep_bytes`; 0, the default, turns them off and the
// kernels take the plain loads and stores above and below). The amax pass reads the bytes that
// kernel reads first with evict_last and all others with evict_first; that kernel reads and
// writes with evict_first. Neither its own stores nor bytes no one reads again then push the
// kept bytes out before it reads them (with plain stores, its output lines are newer than the
// kept ones and evict them). Hints only: no value depends on them. A policy is an opaque
// 64-bit value that exists only on the device (createpolicy, sm_80+).
struct L2Hint {
    uint64_t pol;
    __device__ __forceinline__ static L2Hint evict_last() {
        L2Hint h;
        asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(h.pol));
        return h;
    }
    __device__ __forceinline__ static L2Hint evict_first() {
        L2Hint h;
        asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(h.pol));
        return h;
    }
};

// ldg_stream with an L2 eviction policy (the amax pass of 16-bit tensors).
__device__ __forceinline__ uint4 ldg_stream_hint(const uint4* p, L2Hint h) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(h.pol));
    return v;
}

// __ldg with an L2 eviction policy.
__device__ __forceinline__ uint4 ldg_hint(const uint4* p, L2Hint h) {
    uint4 v;
    asm("ld.global.nc.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(h.pol));
    return v;
}

// A 16-byte store with an L2 eviction policy.
__device__ __forceinline__ void stg_hint(uint4* p, const uint4& v, L2Hint h) {
    asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(h.pol)
                 : "memory");
}

// A kernel's hint mode as a type: the kernel branches once, at its start, between an unhinted
// instantiation (the code as it was before hints existed) and a hinted one, instead of testing
// a runtime flag in every load of the hot loop.
template <bool B>
struct Hinted {
    static constexpr bool value = B;
};

// ---------------------------------------------------------------------------------------
// f32 bit helpers.

// Bits of |x| at or above this are Inf (equal) or NaN (above): non-negative floats order
// like their bits, so a max over |x| bits says "non-finite" by itself (blockwise.rs).
constexpr uint32_t NON_FINITE_ABS_BITS = 0x7F800000u;
constexpr uint32_t F32_CANONICAL_NAN = 0x7FC00000u;
constexpr uint16_t BF16_CANONICAL_NAN = 0x7FC0u;
constexpr uint16_t F16_CANONICAL_NAN = 0x7E00u;

constexpr float F4_E2M1_MAX = 6.0f;
constexpr int F4_E2M1_MAX_POW2 = 2;  // floor(log2(6)): 6 = 1.5 * 2^2
constexpr float F8_E4M3_MAX = 448.0f;
constexpr uint8_t E4M3_MAX_CODE = 0x7E;
constexpr uint8_t E4M3_NAN = 0x7F;
constexpr uint8_t E4M3_EPS_CODE = 0x20;  // compressed-tensors' eps 0.125 for a zero scale
constexpr int E8M0_BIAS = 127;
constexpr uint8_t E8M0_NAN = 0xFF;
constexpr float NVFP4_GS_NUMERATOR = 2688.0f;  // 448 * 6
constexpr float F32_MIN_NORMAL = 1.17549435e-38f;  // 2^-126, Rust's f32::MIN_POSITIVE

__device__ __forceinline__ float u2f(uint32_t b) { return __uint_as_float(b); }
__device__ __forceinline__ uint32_t f2u(float f) { return __float_as_uint(f); }

// 2^k as an f32, exact for k in [-149, 127] (formats.rs `pow2`).
__device__ __forceinline__ float pow2(int k) {
    return k >= -126 ? u2f(uint32_t(k + 127) << 23) : u2f(1u << (k + 149));
}

// The raw unbiased exponent field: ((bits >> 23) & 0xFF) - 127 (-127 for zero/subnormals).
__device__ __forceinline__ int raw_exponent(float a) {
    return int((f2u(a) >> 23) & 0xFFu) - 127;
}

// ---------------------------------------------------------------------------------------
// E2M1.

// The E2M1 grid value of a magnitude a >= 0 (not NaN; +Inf allowed): round half to even with
// saturation at 6, i.e. the magnitude of e2m1_encode(a) in formats.rs, without its 7
// comparisons. After the clamp to 6, adding M = 2^22, 2^23 or 2^24 (for a below 2, in [2, 4),
// in [4, 6]) rounds a to a multiple of 0.5, 1 or 2 (the f32 quantum next to M): exactly the
// E2M1 grid spacings, and the f32 add rounds half to even in units of that quantum, which on
// this grid is the E2M1 tie rule (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
// 3.5 -> 4, 5 -> 4). Subtracting M back is exact. Checked against the comparison encoder on
// every f32 in [0, Inf] by simulating it in numpy (tests/exact/test_cuda.py, CPU-only part).
__device__ __forceinline__ float e2m1_round(float a) {
    a = fminf(a, F4_E2M1_MAX);
    // M's exponent follows a's: max(exp(a), 127) + 22, i.e. 2^22 * max(1, 2^floor(log2 a)).
    uint32_t mb = max((f2u(a) & 0x7F800000u) + (22u << 23), 0x4A800000u);
    float m = u2f(mb);
    return __fsub_rn(__fadd_rn(a, m), m);
}

// Index 0..7 of a grid value q (q in {0, 0.5, 1, 1.5, 2, 3, 4, 6}).
__device__ __forceinline__ uint32_t e2m1_index(float q) {
    // q < 2: 2q is 0..3 exactly; q >= 2: bits >> 22 is 256..259 (2, 3, 4, 6).
    return q < 2.0f ? uint32_t(__fmul_rn(q, 2.0f)) : (f2u(q) >> 22) - 252u;
}

// Magnitude of index 0..7 (formats.rs E2M1_MAGNITUDES).
__device__ __forceinline__ float e2m1_magnitude(uint32_t idx) {
    return idx < 4u ? __fmul_rn(float(idx), 0.5f) : u2f((idx + 252u) << 22);
}

// ---------------------------------------------------------------------------------------
// E8M0 and E4M3 (formats.rs).

__device__ __forceinline__ float e8m0_decode_finite(uint32_t b) { return pow2(int(b) - E8M0_BIAS); }

// float8_e4m3fn encode, round half to even, saturating at +-448 (Inf too); NaN -> 0x7F.
__device__ __forceinline__ uint32_t e4m3_encode(float v) {
    if (isnan(v)) return E4M3_NAN;
    uint32_t sign = (f2u(v) >> 31) << 7;
    float a = fabsf(v);
    if (a >= F8_E4M3_MAX) return sign | E4M3_MAX_CODE;
    if (a < pow2(-6)) {
        // Subnormal range: quantum 2^-9 (a * 2^9 is exact); n = 8 is the smallest normal.
        return sign | uint32_t(rintf(__fmul_rn(a, 512.0f)));
    }
    int e = raw_exponent(a);
    float m = __fmul_rn(a, pow2(-e));                                   // exact, in [1, 2)
    uint32_t n = uint32_t(rintf(__fmul_rn(__fsub_rn(m, 1.0f), 8.0f)));  // exact then RNE
    // n = 8 carries into the exponent, which this addition does by itself.
    return sign | ((uint32_t(e + 7) << 3) + n);
}

// float8_e4m3fn decode (0x7F and 0xFF are NaN), exact in f32.
__device__ __forceinline__ float e4m3_decode(uint32_t b) {
    uint32_t sign = (b & 0x80u) << 24;
    uint32_t exp = (b >> 3) & 0xFu;
    uint32_t man = b & 0x7u;
    if (exp == 0xFu && man == 0x7u) return u2f(F32_CANONICAL_NAN);
    float mag = exp == 0 ? __fmul_rn(float(man), pow2(-9))
                         : u2f(((exp - 7u + 127u) << 23) | (man << 20));
    return u2f(f2u(mag) | sign);
}

// ---------------------------------------------------------------------------------------
// Dtype traits: how a 16-byte vector of T holds elements, widening to f32 (exact) and
// narrowing from f32 (round to nearest even, subnormals kept, overflow to Inf).

template <typename T>
struct Dtype;

template <>
struct Dtype<float> {
    static constexpr int EPV = 4;  // elements per 16-byte vector
    __device__ __forceinline__ static float load_scalar(const void* p, long long i) {
        return static_cast<const float*>(p)[i];
    }
    __device__ __forceinline__ static void store_scalar(void* p, long long i, float v) {
        static_cast<float*>(p)[i] = v;
    }
    __device__ __forceinline__ static void store_nan(void* p, long long i) {
        static_cast<uint32_t*>(p)[i] = F32_CANONICAL_NAN;
    }
    // The 4 elements of one vector as f32.
    __device__ __forceinline__ static void unpack(const uint4& v, float (&f)[EPV]) {
        f[0] = u2f(v.x); f[1] = u2f(v.y); f[2] = u2f(v.z); f[3] = u2f(v.w);
    }
    __device__ __forceinline__ static uint4 pack(const float (&f)[EPV]) {
        return make_uint4(f2u(f[0]), f2u(f[1]), f2u(f[2]), f2u(f[3]));
    }
    __device__ __forceinline__ static uint4 nan_vec() {
        return make_uint4(F32_CANONICAL_NAN, F32_CANONICAL_NAN, F32_CANONICAL_NAN,
                          F32_CANONICAL_NAN);
    }
    // max |x| over the vector, as f32 bits (NaN sorts above Inf).
    __device__ __forceinline__ static uint32_t absmax_bits(const uint4& v) {
        uint32_t m = max(max(v.x & 0x7FFFFFFFu, v.y & 0x7FFFFFFFu),
                         max(v.z & 0x7FFFFFFFu, v.w & 0x7FFFFFFFu));
        return m;
    }
    __device__ __forceinline__ static uint32_t scalar_abs_bits(float f) {
        return f2u(f) & 0x7FFFFFFFu;
    }
};

// 16-bit dtypes: a 32-bit word holds elements 2i (low half) and 2i+1 (high half).
template <typename Impl>
struct Dtype16 {
    static constexpr int EPV = 8;
    __device__ __forceinline__ static void store_nan(void* p, long long i) {
        static_cast<uint16_t*>(p)[i] = Impl::NAN_BITS;
    }
    __device__ __forceinline__ static float load_scalar(const void* p, long long i) {
        return Impl::to_f32(static_cast<const uint16_t*>(p)[i]);
    }
    __device__ __forceinline__ static void store_scalar(void* p, long long i, float v) {
        static_cast<uint16_t*>(p)[i] = uint16_t(Impl::pack2(v, 0.0f) & 0xFFFFu);
    }
    __device__ __forceinline__ static void unpack(const uint4& v, float (&f)[EPV]) {
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = Impl::to_f32(w[i] & 0xFFFFu);
            f[2 * i + 1] = Impl::to_f32(w[i] >> 16);
        }
    }
    __device__ __forceinline__ static uint4 pack(const float (&f)[EPV]) {
        return make_uint4(Impl::pack2(f[0], f[1]), Impl::pack2(f[2], f[3]),
                          Impl::pack2(f[4], f[5]), Impl::pack2(f[6], f[7]));
    }
    __device__ __forceinline__ static uint4 nan_vec() {
        constexpr uint32_t w = (uint32_t(Impl::NAN_BITS) << 16) | Impl::NAN_BITS;
        return make_uint4(w, w, w, w);
    }
    // max |x| over the 8 elements in the 16-bit domain (NaN sorts above Inf there too),
    // widened once to f32 bits.
    __device__ __forceinline__ static uint32_t absmax_bits(const uint4& v) {
        uint32_t m = __vmaxu2(__vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu),
                              __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
        return Impl::abs16_to_f32_bits(max(m & 0xFFFFu, m >> 16));
    }
    __device__ __forceinline__ static uint32_t scalar_abs_bits(float f) {
        return f2u(f) & 0x7FFFFFFFu;
    }
};

struct Bf16Impl {
    static constexpr uint16_t NAN_BITS = BF16_CANONICAL_NAN;
    __device__ __forceinline__ static float to_f32(uint32_t h) { return u2f(h << 16); }
    __device__ __forceinline__ static uint32_t abs16_to_f32_bits(uint32_t h) { return h << 16; }
    // Two f32 -> bf16x2 (cvt.rn.bf16x2.f32: round to nearest even, subnormals kept).
    __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
        __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&r);
    }
};

struct F16Impl {
    static constexpr uint16_t NAN_BITS = F16_CANONICAL_NAN;
    __device__ __forceinline__ static float to_f32(uint32_t h) {
        return __half2float(__ushort_as_half(uint16_t(h)));
    }
    __device__ __forceinline__ static uint32_t abs16_to_f32_bits(uint32_t h) {
        // NaN stays NaN (bits above Inf), Inf stays Inf: the ordering survives the widening.
        return f2u(to_f32(h));
    }
    // Two f32 -> f16x2 (cvt.rn.f16x2.f32: RNE, subnormals kept, overflow to Inf).
    __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
        __half2 r = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&r);
    }
};

template <>
struct Dtype<__nv_bfloat16> : Dtype16<Bf16Impl> {};
template <>
struct Dtype<__half> : Dtype16<F16Impl> {};

// The host sizes grids and checks alignment for 16-byte vectors of EPV elements.
constexpr int VEC_BYTES = 16;
AQN_ABI_CONST(VEC_BYTES);
static_assert(Dtype<float>::EPV * sizeof(float) == VEC_BYTES, "f32 vector is not 16 bytes");
static_assert(Dtype<__nv_bfloat16>::EPV * sizeof(__nv_bfloat16) == VEC_BYTES,
              "bf16 vector is not 16 bytes");
static_assert(Dtype<__half>::EPV * sizeof(__half) == VEC_BYTES, "f16 vector is not 16 bytes");

// Canonical f32 from |x| max bits (NaN -> canonical NaN).
__device__ __forceinline__ float amax_from_bits(uint32_t m) {
    return m > NON_FINITE_ABS_BITS ? u2f(F32_CANONICAL_NAN) : u2f(m);
}

}  // namespace aqn
