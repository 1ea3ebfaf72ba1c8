// NVFP4: blocks of 16 E2M1 elements with an E4M3 block scale and an f32 per-tensor global
// scale, by the compressed-tensors / vLLM checkpoint convention. docs/reference/FORMATS.md "NVFP4";
// mirrors crates/aqn-core/src/nvfp4.rs. Also the per-tensor amax reduction.
//
// The tensor amax never visits the host: `amax_partials_<dtype>` writes one f32 per CTA
// (max |x|, NaN if the CTA saw a NaN), and every CTA of the quantizing kernel folds those
// partials (a few hundred floats, L2 resident) into the amax itself before it starts, so
// there is no host sync and no counter to reset (CUDA-graph safe, any stream). A given amax
// (a device f32, or a host value passed by value) skips the reduction.
#include "blockwise.cuh"

namespace aqn {

constexpr int AMAX_THREADS = 512;  // block size of amax_partials_*
constexpr int AMAX_UNROLL = 4;  // 16-byte loads per thread per iteration (8: same time on H100)
constexpr int FINALIZE_THREADS = 32;  // amax_finalize: one warp
AQN_ABI_CONST(AMAX_THREADS);
AQN_ABI_CONST(AMAX_UNROLL);
AQN_ABI_CONST(FINALIZE_THREADS);

// Encode-direction global scale (nvfp4.rs `global_scale`): (1 / max(A, tiny)) * 2688,
// reciprocal first as torch evaluates `2688 / tensor`; 1.0 for NaN or a non-finite/zero result.
__device__ __forceinline__ float global_scale(float amax) {
    if (isnan(amax)) return 1.0f;
    float g = __fmul_rn(__fdiv_rn(1.0f, fmaxf(amax, F32_MIN_NORMAL)), NVFP4_GS_NUMERATOR);
    return (isfinite(g) && g > 0.0f) ? g : 1.0f;
}

struct NvRule {
    static constexpr int BLOCK = 16;
    static constexpr uint32_t NAN_BYTE = E4M3_NAN;
    float gs;    // encode-direction global scale
    bool valid;  // decode direction: a global scale that is not finite positive gives NaN

    __device__ __forceinline__ Scale scale(float amax) const {
        uint32_t byte = e4m3_encode(__fmul_rn(gs, __fdiv_rn(amax, F4_E2M1_MAX)));
        if (byte == 0) byte = E4M3_EPS_CODE;  // compressed-tensors' eps for a zero scale
        return Scale{0.0f, __fdiv_rn(e4m3_decode(byte), gs), byte};
    }
    // clamp(x / d, -6, 6) in the rule; e2m1_round saturates, so the clamp is implicit.
    __device__ __forceinline__ float scaled(float x, const Scale& s) const {
        return __fdiv_rn(x, s.dec);
    }
    __device__ __forceinline__ bool dec_from_byte(uint32_t b, float& dec) const {
        float s = e4m3_decode(b);
        if (!valid || isnan(s)) return false;
        dec = __fdiv_rn(s, gs);
        return true;
    }
};

// The host sizes scale buffers and picks the vector kernel by this block size.
constexpr int NVFP4_BLOCK = NvRule::BLOCK;
AQN_ABI_CONST(NVFP4_BLOCK);

// Programmatic dependent launch (sm_90+): the amax pass lets the quantizing kernel start
// early (`launch_dependents`), whose CTAs issue their first loads of x and then wait here for
// the amax pass to finish and its partials to be visible. A no-op when launched normally.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The tensor amax of this launch: the host value (n_amax == 0), the given device value
// (n_amax == 1, used as is), or the fold of n_amax partials (non-negative or NaN, so their
// bits order like their values). Uniform over the CTA.
__device__ __forceinline__ float launch_amax(const Args& a) {
    if (a.n_amax == 0) return a.amax_value;
    if (a.n_amax == 1) return __ldg(a.amax_src);
    wait_for_prerequisite();  // the partials come from the amax pass just before
    // Every thread of the CTA loads a few partials (one L2 round trip, not n_amax / 32 of
    // them in a row: this runs at the start of every CTA), then warps and CTA combine.
    __shared__ uint32_t s_warp[32];
    uint32_t m = 0;
    for (int i = threadIdx.x; i < a.n_amax; i += blockDim.x) m = max(m, f2u(__ldcg(a.amax_src + i)));  // coherent: written by the previous grid
    m = group_max<32>(m);
    if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x / 32] = m;
    __syncthreads();
    m = 0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) m = max(m, s_warp[w]);
    return amax_from_bits(m);
}

// Encode direction: the global scale from this launch's amax (thread 0 of CTA 0 also
// stores it for `quantize`).
struct NvRuleOf {
    __device__ __forceinline__ static NvRule make(const Args& a) {
        float gs = global_scale(launch_amax(a));
        if (a.gs_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *a.gs_out = gs;
        return NvRule{gs, true};
    }
};

// Multi-tensor encode direction: the global scale from the entry's slot amax (the fold's
// output, written by the launch before), as NvRuleOf with a given device amax.
struct NvManyRuleOf {
    __device__ __forceinline__ static NvRule make(const ManyArgs& a, int slot) {
        return NvRule{global_scale(__ldg(a.amax + slot)), true};
    }
};

// Decode direction: the stored global scale (device or host value).
struct NvDequantRuleOf {
    __device__ __forceinline__ static NvRule make(const Args& a) {
        float gs = a.gs_src != nullptr ? __ldg(a.gs_src) : a.gs_value;
        return NvRule{gs, isfinite(gs) && gs > 0.0f};
    }
};

// A 16-byte load of the amax passes: HINT, with the L2 policy `keep` or `drop` (L2Hint).
template <typename T, bool HINT>
__device__ __forceinline__ uint4 amax_load(const uint4* p, bool kept, L2Hint keep, L2Hint drop) {
    if (HINT) {
        const L2Hint h = kept ? keep : drop;
        return sizeof(T) == 2 ? ldg_stream_hint(p, h) : ldg_hint(p, h);
    }
    return sizeof(T) == 2 ? ldg_stream(p)  // 16-bit only: see ldg_stream
                          : __ldg(p);
}

// Per-CTA max |x| over a flat tensor of rows * k elements; out[blockIdx.x] = the CTA's amax.
// HINT: vectors below a.keep_vecs are read with evict_last, the others with `drop`
// (evict_first, from with_hint).
template <typename T, bool HINT>
__device__ __forceinline__ void amax_partials_body(const Args& a, L2Hint drop) {
    using D = Dtype<T>;
    constexpr int EPV = D::EPV;
    allow_dependents();
    const long long n = a.rows * a.k;
    const char* p = static_cast<const char*>(a.x);
    // Elements before the first 16-byte boundary go one by one, and so do the last n % EPV.
    long long head = (long long)(((16u - (uintptr_t(p) & 15u)) & 15u) / sizeof(T));
    head = head < n ? head : n;
    const long long n_vec = (n - head) / EPV;
    const long long tail = head + n_vec * EPV;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    uint32_t m = 0;
    for (long long i = tid; i < head; i += nthreads)
        m = max(m, f2u(D::load_scalar(a.x, i)) & 0x7FFFFFFFu);
    for (long long i = tail + tid; i < n; i += nthreads)
        m = max(m, f2u(D::load_scalar(a.x, i)) & 0x7FFFFFFFu);
    const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(p + head * sizeof(T));
    // The chunks (one CTA's AMAX_UNROLL vectors per thread) from the last to the first: the
    // kernel that follows this pass (fake quant, quantize) walks the tensor from its start, so
    // the bytes read last here, still in L2, are the ones it reads first. Same chunks per CTA
    // as a forward walk, in mirrored positions; a max does not depend on the order.
    const long long chunk = (long long)blockDim.x * AMAX_UNROLL;
    const long long n_chunks = (n_vec + chunk - 1) / chunk;
    const L2Hint keep = HINT ? L2Hint::evict_last() : L2Hint{0};
    for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const long long base = (n_chunks - 1 - c) * chunk;
        uint4 v[AMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) {
            long long i = base + (long long)u * blockDim.x + threadIdx.x;
            v[u] = i >= n_vec ? make_uint4(0, 0, 0, 0)
                              : amax_load<T, HINT>(xv + i, i < a.keep_vecs, keep, drop);
        }
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) m = max(m, D::absmax_bits(v[u]));
    }
    __shared__ uint32_t s_warp[AMAX_THREADS / 32];
    m = group_max<32>(m);
    if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < blockDim.x / 32 ? s_warp[threadIdx.x] : 0;
        m = group_max<32>(m);
        if (threadIdx.x == 0) static_cast<float*>(a.out)[blockIdx.x] = amax_from_bits(m);
    }
}

template <typename T>
__device__ __forceinline__ void amax_partials(const Args& a) {
    with_hint(a.keep_vecs, [&](auto hinted, L2Hint drop) {
        amax_partials_body<T, decltype(hinted)::value>(a, drop);
    });
}

// The amax pass of a multi-tensor launch: per CTA and slot, max |x| over the CTA's chunks of
// the slot's entries, into partials[slot * n_partials + blockIdx.x] (0 where the CTA read
// none of them: thread 0 zeroes its column first and is the only writer of it). The chunks
// (AMAX_THREADS * AMAX_UNROLL vectors) go from the launch's last to its first, so the first
// entry's first bytes, which the fake quant after reads first, were read last. A CTA's
// chunks of one slot usually come in one run (the host orders entries by slot); where not,
// the flush folds into the value already there, so any order gives the same max.
template <typename T>
__device__ __forceinline__ void amax_many_flush(const ManyArgs& a, int slot, uint32_t m) {
    __shared__ uint32_t s_warp[AMAX_THREADS / 32];
    m = group_max<32>(m);
    if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 0; w < int(blockDim.x / 32); ++w) m = max(m, s_warp[w]);
        float* p = a.partials + (long long)slot * a.n_partials + blockIdx.x;
        *p = amax_from_bits(max(m, f2u(*p)));
    }
    __syncthreads();  // s_warp is reused by the next flush
}

// HINT: chunks below a.keep_chunks are read with evict_last, the others with `drop`
// (evict_first, from with_hint).
template <typename T, bool HINT>
__device__ __forceinline__ void amax_many_partials_body(const ManyArgs& a, L2Hint drop) {
    using D = Dtype<T>;
    const L2Hint keep = HINT ? L2Hint::evict_last() : L2Hint{0};
    if (threadIdx.x == 0)
        for (int s = 0; s < a.n_slots; ++s) a.partials[(long long)s * a.n_partials + blockIdx.x] = 0.0f;
    const long long chunk = (long long)blockDim.x * AMAX_UNROLL;
    int cur = -1;
    uint32_t m = 0;
    for (long long c = blockIdx.x; c < a.n_chunks; c += gridDim.x) {
        const long long g = a.n_chunks - 1 - c;
        const ManyEntry& en = a.e[many_entry_of(a, g)];
        if (en.slot != cur) {  // uniform over the CTA
            if (cur >= 0) amax_many_flush<T>(a, cur, m);
            cur = en.slot;
            m = 0;
        }
        const uint4* __restrict__ xv = static_cast<const uint4*>(en.x);
        const long long base = (g - en.chunk0) * chunk;
        uint4 v[AMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) {
            const long long i = base + (long long)u * blockDim.x + threadIdx.x;
            v[u] = i >= en.n_vec ? make_uint4(0, 0, 0, 0)
                                 : amax_load<T, HINT>(xv + i, g < a.keep_chunks, keep, drop);
        }
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) m = max(m, D::absmax_bits(v[u]));
    }
    if (cur >= 0) amax_many_flush<T>(a, cur, m);
}

template <typename T>
__device__ __forceinline__ void amax_many_partials(const ManyArgs& a) {
    with_hint(a.keep_chunks, [&](auto hinted, L2Hint drop) {
        amax_many_partials_body<T, decltype(hinted)::value>(a, drop);
    });
}

// Per-CTA sums, in f32, of (x - y)^2 and x^2 over two flat tensors of rows * k elements (x a
// weight, y its fake quant: the weight sync's error statistics) into out[2 * blockIdx.x] and
// out[2 * blockIdx.x + 1]; CTA 0 also zeroes the pairs from gridDim.x to n_amax, so the caller
// folds a fixed stretch of n_amax pairs per tensor. One read of each input (a subtraction, a
// norm of it and a norm of x in torch are five passes over the bytes). The vector path needs
// both inputs 16-byte aligned; otherwise every element goes one by one. Sums in f32 per
// thread: the statistics are diagnostics (relative error, SQNR), not bit-exact values.
template <typename T>
__device__ __forceinline__ void sq_err_partials(const Args& a) {
    using D = Dtype<T>;
    constexpr int EPV = D::EPV;
    const long long n = a.rows * a.k;
    const bool vec = ((uintptr_t(a.x) | uintptr_t(a.y)) & 15u) == 0;
    const long long n_vec = vec ? n / EPV : 0;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    float se = 0.0f, sr = 0.0f;
    for (long long i = n_vec * EPV + tid; i < n; i += nthreads) {
        const float w = D::load_scalar(a.x, i);
        const float d = w - D::load_scalar(a.y, i);
        se = fmaf(d, d, se);
        sr = fmaf(w, w, sr);
    }
    const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(a.x);
    const uint4* __restrict__ yv = reinterpret_cast<const uint4*>(a.y);
    for (long long base = (long long)blockIdx.x * blockDim.x * AMAX_UNROLL; base < n_vec;
         base += nthreads * AMAX_UNROLL) {
        uint4 vx[AMAX_UNROLL], vy[AMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) {
            const long long i = base + (long long)u * blockDim.x + threadIdx.x;
            const bool in = i < n_vec;
            vx[u] = in ? __ldg(xv + i) : make_uint4(0, 0, 0, 0);
            vy[u] = in ? __ldg(yv + i) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < AMAX_UNROLL; ++u) {
            float w[EPV], q[EPV];
            D::unpack(vx[u], w);
            D::unpack(vy[u], q);
#pragma unroll
            for (int e = 0; e < EPV; ++e) {
                const float d = w[e] - q[e];
                se = fmaf(d, d, se);
                sr = fmaf(w[e], w[e], sr);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        se += __shfl_xor_sync(0xFFFFFFFFu, se, o);
        sr += __shfl_xor_sync(0xFFFFFFFFu, sr, o);
    }
    __shared__ float s_e[AMAX_THREADS / 32], s_r[AMAX_THREADS / 32];
    if ((threadIdx.x & 31) == 0) {
        s_e[threadIdx.x / 32] = se;
        s_r[threadIdx.x / 32] = sr;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const bool have = threadIdx.x < blockDim.x / 32;
        se = have ? s_e[threadIdx.x] : 0.0f;
        sr = have ? s_r[threadIdx.x] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            se += __shfl_xor_sync(0xFFFFFFFFu, se, o);
            sr += __shfl_xor_sync(0xFFFFFFFFu, sr, o);
        }
        if (threadIdx.x == 0) {
            static_cast<float*>(a.out)[2 * blockIdx.x] = se;
            static_cast<float*>(a.out)[2 * blockIdx.x + 1] = sr;
        }
    }
    if (blockIdx.x == 0)
        for (int i = 2 * gridDim.x + threadIdx.x; i < 2 * a.n_amax; i += blockDim.x)
            static_cast<float*>(a.out)[i] = 0.0f;
}

}  // namespace aqn

AQN_FP4_KERNELS(nvfp4, float, f32, aqn::NvRuleOf, aqn::NvDequantRuleOf)
AQN_FP4_KERNELS(nvfp4, __nv_bfloat16, bf16, aqn::NvRuleOf, aqn::NvDequantRuleOf)
AQN_FP4_KERNELS(nvfp4, __half, f16, aqn::NvRuleOf, aqn::NvDequantRuleOf)

// The per-CTA reduction passes (AMAX_THREADS threads each), one kernel per dtype:
// `NAME_<dtype>` runs `aqn::NAME<T>`.
#define AQN_REDUCTION_KERNEL(NAME, T, DT)                                           \
    extern "C" __global__ void __launch_bounds__(aqn::AMAX_THREADS)                \
        NAME##_##DT(const aqn::Args a) {                                           \
        aqn::NAME<T>(a);                                                           \
    }
#define AQN_REDUCTION_KERNELS(NAME)                                                 \
    AQN_REDUCTION_KERNEL(NAME, float, f32)                                          \
    AQN_REDUCTION_KERNEL(NAME, __nv_bfloat16, bf16)                                 \
    AQN_REDUCTION_KERNEL(NAME, __half, f16)
AQN_REDUCTION_KERNELS(amax_partials)
AQN_REDUCTION_KERNELS(sq_err_partials)

AQN_FP4_MANY_KERNEL(nvfp4, float, f32, aqn::NvManyRuleOf)
AQN_FP4_MANY_KERNEL(nvfp4, __nv_bfloat16, bf16, aqn::NvManyRuleOf)
AQN_FP4_MANY_KERNEL(nvfp4, __half, f16, aqn::NvManyRuleOf)

#define AQN_AMAX_MANY_KERNEL(T, DT)                                                 \
    extern "C" __global__ void __launch_bounds__(aqn::AMAX_THREADS)                \
        amax_many_partials_##DT(const aqn::ManyArgs a) {                           \
        aqn::amax_many_partials<T>(a);                                             \
    }
AQN_AMAX_MANY_KERNEL(float, f32)
AQN_AMAX_MANY_KERNEL(__nv_bfloat16, bf16)
AQN_AMAX_MANY_KERNEL(__half, f16)

// Folds each slot's n_partials partials into amax[slot]: one warp per slot (CTA = slot).
extern "C" __global__ void __launch_bounds__(aqn::FINALIZE_THREADS)
    amax_many_finalize(const aqn::ManyArgs a) {
    const float* p = a.partials + (long long)blockIdx.x * a.n_partials;
    uint32_t m = 0;
    for (int i = threadIdx.x; i < a.n_partials; i += aqn::FINALIZE_THREADS) m = max(m, aqn::f2u(p[i]));
    m = aqn::group_max<32>(m);
    if (threadIdx.x == 0) a.amax[blockIdx.x] = aqn::amax_from_bits(m);
}

// Folds n_amax partials into out[0] (0 for none): the `amax` op's second launch. One warp.
extern "C" __global__ void __launch_bounds__(aqn::FINALIZE_THREADS) amax_finalize(const aqn::Args a) {
    uint32_t m = 0;
    for (int i = threadIdx.x; i < a.n_amax; i += aqn::FINALIZE_THREADS) m = max(m, aqn::f2u(a.amax_src[i]));
    m = aqn::group_max<32>(m);
    if (threadIdx.x == 0) static_cast<float*>(a.out)[0] = aqn::amax_from_bits(m);
}
