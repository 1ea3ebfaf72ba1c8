// MXFP4 (OCP Microscaling v1.0): blocks of 32 E2M1 elements sharing one E8M0 scale.
// docs/reference/FORMATS.md "MXFP4"; mirrors crates/aqn-core/src/mxfp4.rs.
#include "blockwise.cuh"

namespace aqn {

// Scale modes, numbered as src/cuda/abi.rs passes them (Args::mode).
enum MxMode : int { MX_FLOOR = 0, MX_RCEIL = 1, MX_EVEN = 2, MX_CEIL = 3 };
AQN_ABI_CONST(MX_FLOOR);
AQN_ABI_CONST(MX_RCEIL);
AQN_ABI_CONST(MX_EVEN);
AQN_ABI_CONST(MX_CEIL);

// Exact ceil(log2(d)) for a positive finite f32 (subnormals included); -127 for 0.
__device__ __forceinline__ int ceil_log2(float d) {
    uint32_t b = f2u(d) & 0x7FFFFFFFu;
    int ef = int(b >> 23);
    uint32_t m = b & 0x7FFFFFu;
    if (ef != 0) return ef - 127 + (m != 0);
    if (m == 0) return -E8M0_BIAS;
    int top = 31 - __clz(m);  // position of the leading bit, 0..22
    return -149 + top + ((m & (m - 1)) != 0);
}

// The unbiased shared exponent of a block with finite amax, clamped to [-127, 127].
__device__ __forceinline__ int shared_exponent(float amax, int mode) {
    int e;
    switch (mode) {
        case MX_RCEIL:
            e = ceil_log2(__fdiv_rn(amax, F4_E2M1_MAX));
            break;
        case MX_EVEN: {
            // Add half an E2M1 ulp (mantissa bit 21) and drop the mantissa: torchao EVEN.
            float rounded = u2f((f2u(amax) + (1u << 21)) & 0xFF800000u);
            e = raw_exponent(rounded) - F4_E2M1_MAX_POW2;
            break;
        }
        case MX_CEIL:
            e = raw_exponent(amax) + ((f2u(amax) & 0x7FFFFFu) != 0) - F4_E2M1_MAX_POW2;
            break;
        default:  // MX_FLOOR: the OCP spec
            e = raw_exponent(amax) - F4_E2M1_MAX_POW2;
            break;
    }
    return min(max(e, -E8M0_BIAS), E8M0_BIAS);
}

struct MxRule {
    static constexpr int BLOCK = 32;
    static constexpr uint32_t NAN_BYTE = E8M0_NAN;
    int mode;

    __device__ __forceinline__ Scale scale(float amax) const {
        int e = shared_exponent(amax, mode);
        return Scale{pow2(-e), pow2(e), uint32_t(e + E8M0_BIAS)};
    }
    // x * 2^-e rounds exactly like x / 2^e (same real number), see FORMATS.md.
    __device__ __forceinline__ float scaled(float x, const Scale& s) const {
        return __fmul_rn(x, s.enc);
    }
    __device__ __forceinline__ bool dec_from_byte(uint32_t b, float& dec) const {
        if (b == E8M0_NAN) return false;
        dec = e8m0_decode_finite(b);
        return true;
    }
};

// The host sizes scale buffers and picks the vector kernel by this block size.
constexpr int MXFP4_BLOCK = MxRule::BLOCK;
AQN_ABI_CONST(MXFP4_BLOCK);

struct MxRuleOf {
    __device__ __forceinline__ static MxRule make(const Args& a) { return MxRule{a.mode}; }
};
struct MxManyRuleOf {
    __device__ __forceinline__ static MxRule make(const ManyArgs& a, int) { return MxRule{a.mode}; }
};

}  // namespace aqn

AQN_FP4_KERNELS(mxfp4, float, f32, aqn::MxRuleOf, aqn::MxRuleOf)
AQN_FP4_KERNELS(mxfp4, __nv_bfloat16, bf16, aqn::MxRuleOf, aqn::MxRuleOf)
AQN_FP4_KERNELS(mxfp4, __half, f16, aqn::MxRuleOf, aqn::MxRuleOf)
AQN_FP4_MANY_KERNEL(mxfp4, float, f32, aqn::MxManyRuleOf)
AQN_FP4_MANY_KERNEL(mxfp4, __nv_bfloat16, bf16, aqn::MxManyRuleOf)
AQN_FP4_MANY_KERNEL(mxfp4, __half, f16, aqn::MxManyRuleOf)
