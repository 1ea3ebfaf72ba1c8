// AQN's counter-based Gaussian noise (docs/reference/NOISE.md), bit-identical to the Rust CPU path
// (crates/aqn-core/src/noise.rs) and to the pure-torch reference (aqn_rs.aqn._reference_gaussian).
//
// One thread per Philox block of four elements: the block's counter is
// (lo32(b), hi32(b), lo32(step), hi32(step)) under the key (lo32(key), hi32(key)); Box-Muller
// with the polynomial ln/sin/cos of NOISE.md, every operation one IEEE f32 operation rounded to
// nearest even (explicit __f*_rn intrinsics; the build also passes -fmad=false -ftz=false).
// Elements [offset, offset + n) of the tensor's noise go to out[0 .. n), z * sigma in f32, then
// cast to the output dtype (round to nearest even).

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "abi.cuh"

namespace aqn_noise {

// Launch arguments; src/cuda/abi.rs owns the layout (its #[repr(C)] `NoiseArgs`), checked
// field by field below.
struct NoiseArgs {
    void* out;                 // n elements of the output dtype
    unsigned long long n;      // elements to write
    unsigned long long offset; // flat index of out[0] in the full tensor (offset + n < 2^64)
    unsigned long long key;    // fnv1a64(seed ++ name), computed on the host
    unsigned long long step;   // optimizer step
    float sigma;               // float32(sigma)
    int pad;
};
AQN_ABI_STRUCT(NoiseArgs);
AQN_ABI_FIELD(NoiseArgs, out);
AQN_ABI_FIELD(NoiseArgs, n);
AQN_ABI_FIELD(NoiseArgs, offset);
AQN_ABI_FIELD(NoiseArgs, key);
AQN_ABI_FIELD(NoiseArgs, step);
AQN_ABI_FIELD(NoiseArgs, sigma);
AQN_ABI_FIELD(NoiseArgs, pad);

constexpr int NOISE_THREADS = 256;  // block size of noise_*
AQN_ABI_CONST(NOISE_THREADS);

constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;

__device__ __forceinline__ float f(uint32_t bits) { return __uint_as_float(bits); }

__device__ __forceinline__ void philox(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                       uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += W0;
            k1 += W1;
        }
        const uint32_t hi0 = __umulhi(M0, c0), lo0 = M0 * c0;
        const uint32_t hi1 = __umulhi(M1, c2), lo1 = M1 * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
}

// -2 ln(u), u = ((x >> 8) + 1) * 2^-24 (NOISE.md "radius").
__device__ __forceinline__ float minus_two_log_uniform(uint32_t x) {
    const float U24 = f(0x33800000u), SQRT2 = f(0x3fb504f3u);
    const float LN2_HI = f(0x3f317180u), LN2_LO = f(0x3717f7d1u);
    const float LG1 = f(0x3f2aaaabu), LG2 = f(0x3ecccccdu), LG3 = f(0x3e924925u), LG4 = f(0x3e638e39u);
    const float u = __fmul_rn(__uint2float_rn((x >> 8) + 1u), U24);  // exact
    const uint32_t ub = __float_as_uint(u);
    int e = (int)(ub >> 23) - 127;
    float m = __uint_as_float((ub & 0x007fffffu) | 0x3f800000u);
    if (m > SQRT2) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float fm = __fsub_rn(m, 1.0f);
    const float s = __fdiv_rn(fm, __fadd_rn(2.0f, fm));
    const float z = __fmul_rn(s, s);
    float r = LG4;
    r = __fadd_rn(LG3, __fmul_rn(z, r));
    r = __fadd_rn(LG2, __fmul_rn(z, r));
    r = __fadd_rn(LG1, __fmul_rn(z, r));
    r = __fmul_rn(r, z);
    const float hfsq = __fmul_rn(__fmul_rn(0.5f, fm), fm);
    const float ef = __int2float_rn(e);  // exact
    const float inner = __fadd_rn(__fmul_rn(s, __fadd_rn(hfsq, r)), __fmul_rn(ef, LN2_LO));
    const float ln_u = __fsub_rn(__fmul_rn(ef, LN2_HI), __fsub_rn(__fsub_rn(hfsq, inner), fm));
    return __fmul_rn(-2.0f, ln_u);
}

// (sin, cos) of 2 pi (x >> 8) / 2^24 (NOISE.md "angle").
__device__ __forceinline__ void sincos_turns(uint32_t x, float& sn_out, float& cs_out) {
    const float S1 = f(0xbe2aaaabu), S2 = f(0x3c088889u), S3 = f(0xb9500d01u), S4 = f(0x3638ef1du);
    const float C1 = f(0xbf000000u), C2 = f(0x3d2aaaabu), C3 = f(0xbab60b61u), C4 = f(0x37d00d01u),
                C5 = f(0xb493f27eu);
    const float ANGLE_UNIT = f(0x34c90fdbu);
    const uint32_t k = x >> 8;
    const uint32_t q = (k + (1u << 21)) >> 22;
    const int32_t r = (int32_t)k - (int32_t)(q << 22);
    const float a = __fmul_rn(__int2float_rn(r), ANGLE_UNIT);  // r exact in f32
    const float z = __fmul_rn(a, a);
    float p = S4;
    p = __fadd_rn(S3, __fmul_rn(z, p));
    p = __fadd_rn(S2, __fmul_rn(z, p));
    p = __fadd_rn(S1, __fmul_rn(z, p));
    p = __fmul_rn(p, z);
    const float sn = __fadd_rn(a, __fmul_rn(a, p));
    float c = C5;
    c = __fadd_rn(C4, __fmul_rn(z, c));
    c = __fadd_rn(C3, __fmul_rn(z, c));
    c = __fadd_rn(C2, __fmul_rn(z, c));
    c = __fadd_rn(C1, __fmul_rn(z, c));
    c = __fadd_rn(1.0f, __fmul_rn(z, c));
    switch (q & 3u) {
        case 0: sn_out = sn; cs_out = c; break;
        case 1: sn_out = c; cs_out = -sn; break;
        case 2: sn_out = -sn; cs_out = -c; break;
        default: sn_out = -c; cs_out = sn; break;
    }
}

template <typename T> __device__ __forceinline__ T cast_out(float v);
template <> __device__ __forceinline__ float cast_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half cast_out<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ void noise(const NoiseArgs& a) {
    if (a.n == 0) return;
    T* out = static_cast<T*>(a.out);
    const unsigned long long last = a.offset + (a.n - 1);  // no overflow: checked on the host
    const unsigned long long b0 = a.offset >> 2, nb = (last >> 2) - b0 + 1;
    const uint32_t k0 = (uint32_t)a.key, k1 = (uint32_t)(a.key >> 32);
    const uint32_t s0 = (uint32_t)a.step, s1 = (uint32_t)(a.step >> 32);
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; t < nb;
         t += stride) {
        const unsigned long long b = b0 + t;
        uint32_t c0 = (uint32_t)b, c1 = (uint32_t)(b >> 32), c2 = s0, c3 = s1;
        philox(c0, c1, c2, c3, k0, k1);
        const float r0 = __fsqrt_rn(minus_two_log_uniform(c0));
        const float r1 = __fsqrt_rn(minus_two_log_uniform(c2));
        float sa, ca, sb, cb;
        sincos_turns(c1, sa, ca);
        sincos_turns(c3, sb, cb);
        const float z[4] = {__fmul_rn(r0, ca), __fmul_rn(r0, sa), __fmul_rn(r1, cb), __fmul_rn(r1, sb)};
        const unsigned long long e0 = b << 2;
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
            const unsigned long long e = e0 + lane;
            if (e >= a.offset && e <= last) out[e - a.offset] = cast_out<T>(__fmul_rn(z[lane], a.sigma));
        }
    }
}

}  // namespace aqn_noise

#define AQN_NOISE_KERNEL(T, DT)                                                     \
    extern "C" __global__ void __launch_bounds__(aqn_noise::NOISE_THREADS) noise_##DT(const aqn_noise::NoiseArgs a) { \
        aqn_noise::noise<T>(a);                                                     \
    }
AQN_NOISE_KERNEL(float, f32)
AQN_NOISE_KERNEL(__nv_bfloat16, bf16)
AQN_NOISE_KERNEL(__half, f16)
