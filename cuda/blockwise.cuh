// The block engine behind every FP4 kernel, mirroring crates/aqn-core/src/blockwise.rs: per
// block, take the amax, derive the block's scale from a Rule, then encode (and for fake quant,
// decode) every element. MXFP4 (mxfp4.cu) and NVFP4 (nvfp4.cu) differ only in their Rule:
//
//   struct Rule {
//     static constexpr int BLOCK;          // block size along the last dimension
//     static constexpr uint32_t NAN_BYTE;  // scale byte of a block holding NaN or Inf
//     Scale scale(float amax) const;       // scale of a block with finite amax
//     float scaled(float x, Scale) const;  // the value handed to the E2M1 rounding
//     bool dec_from_byte(uint32_t, float& dec) const;  // false for a NaN scale
//   };
//
// Two shapes of each kernel:
// - `*_vec`: the tensor viewed as a flat run of blocks (needs k % BLOCK == 0 and 16-byte
//   aligned element pointers; src/cuda/launch.rs checks). Each thread owns 16-byte vectors (EPV
//   elements), BLOCK / EPV consecutive lanes share one block and combine their amax with
//   shuffles; loads and stores are 16 bytes wide and coalesced across the warp; U vectors per
//   thread are loaded before the first is used, to keep enough bytes in flight.
// - `*_scalar`: any k (short tail blocks), any alignment: one thread per block, row aware.
// All indices are 64-bit (tensors above 2^31 elements).
#pragma once

#include "fp4_common.cuh"

namespace aqn {

struct Scale {
    float enc;      // encode-direction factor (MX: 2^-e; unused by NVFP4)
    float dec;      // decode-direction scale: element = grid value * dec
    uint32_t byte;  // the stored scale byte
};

constexpr int VEC_THREADS = 256;  // block size of the *_vec and *_scalar kernels
constexpr int VEC_UNROLL = 4;     // 16-byte vectors per thread per iteration
AQN_ABI_CONST(VEC_THREADS);
AQN_ABI_CONST(VEC_UNROLL);

// Fake-quantized value of one finite element f of a block with scale s: the E2M1 grid value
// of |scaled(f)| times dec, with f's sign (decode(code) * dec in blockwise.rs; the code's sign
// is the sign of scaled(f), which is f's: the scale is positive).
template <typename Rule>
__device__ __forceinline__ float fake_quant_elem(float f, const Scale& s, const Rule& rule) {
    float q = e2m1_round(fabsf(rule.scaled(f, s)));
    return u2f(f2u(__fmul_rn(q, s.dec)) | (f2u(f) & 0x80000000u));
}

// E2M1 code (sign << 3 | index) of one finite element.
template <typename Rule>
__device__ __forceinline__ uint32_t quantize_elem(float f, const Scale& s, const Rule& rule) {
    float q = e2m1_round(fabsf(rule.scaled(f, s)));
    return e2m1_index(q) | ((f2u(f) >> 31) << 3);
}

// Dequantized value of a 4-bit code with decode scale dec: decode(code) * dec. The code's
// sign flips the product's sign (XOR, not OR: a stored NVFP4 scale byte may be negative).
__device__ __forceinline__ float dequantize_elem(uint32_t code, float dec) {
    float v = __fmul_rn(e2m1_magnitude(code & 7u), dec);
    return u2f(f2u(v) ^ ((code & 8u) << 28));
}

// max over the TPB consecutive lanes that share a block (TPB a power of two <= 32).
template <int TPB>
__device__ __forceinline__ uint32_t group_max(uint32_t m) {
#pragma unroll
    for (int o = 1; o < TPB; o <<= 1) m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    return m;
}

// ---------------------------------------------------------------------------------------
// Vector kernels (flat run of whole blocks).

// Loads this thread's U vectors of iteration `base` (zeros past the end); HINT: with the
// L2 policy h (L2Hint).
template <bool HINT, int U>
__device__ __forceinline__ void load_vecs(const uint4* __restrict__ x, long long base,
                                          long long n_vec, uint4 (&v)[U], L2Hint h) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        long long i = base + (long long)u * blockDim.x + threadIdx.x;
        v[u] = i >= n_vec ? make_uint4(0, 0, 0, 0) : HINT ? ldg_hint(x + i, h) : __ldg(x + i);
    }
}

// out[i] = v; HINT: with the L2 policy h.
template <bool HINT>
__device__ __forceinline__ void store_vec(uint4* __restrict__ out, long long i, const uint4& v,
                                          L2Hint h) {
    if (HINT) {
        stg_hint(out + i, v, h);
    } else {
        out[i] = v;
    }
}

// A kernel's two instantiations: keep != 0 (the amax pass kept bytes in L2, or is asked to)
// runs `run(Hinted<true>{}, evict_first)`, else `run(Hinted<false>{}, none)` (L2Hint). The
// element kernels read and write with that policy; the amax passes read what they do not
// keep with it.
template <typename Run>
__device__ __forceinline__ void with_hint(long long keep, Run run) {
    if (keep != 0) {
        run(Hinted<true>{}, L2Hint::evict_first());
    } else {
        run(Hinted<false>{}, L2Hint{0});
    }
}

// What fake_quant_vec and quantize_vec share: walk the vectors, take each block's amax over
// the lanes that share it, and hand `body(i, v, m, rule)` the index i of each vector in the
// tensor, the vector v and its block's max |x| bits m. HINT: loads with the L2 policy h.
// RuleOf::make(a) builds the rule once per CTA. It runs after the first loads are issued:
// NVFP4's rule folds the amax partials (an L2 round trip and a barrier), which then hides
// behind the latency of those loads instead of stalling every CTA at its start.
template <typename T, typename RuleOf, bool HINT, typename Body>
__device__ __forceinline__ void encode_vec(const Args& a, L2Hint h, Body body) {
    using D = Dtype<T>;
    using Rule = decltype(RuleOf::make(a));
    constexpr int TPB = Rule::BLOCK / D::EPV;
    constexpr int U = VEC_UNROLL;
    const uint4* __restrict__ x = static_cast<const uint4*>(a.x);
    const long long n_vec = a.rows * a.k / D::EPV;
    const long long stride = (long long)gridDim.x * blockDim.x * U;
    const long long base0 = (long long)blockIdx.x * blockDim.x * U;
    uint4 v[U];
    load_vecs<HINT>(x, base0, n_vec, v, h);
    const Rule rule = RuleOf::make(a);  // every thread, before the loop (it may sync)
    // `base` is uniform over the CTA, so every lane reaches the shuffles.
    for (long long base = base0; base < n_vec; base += stride) {
        if (base != base0) load_vecs<HINT>(x, base, n_vec, v, h);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            long long i = base + (long long)u * blockDim.x + threadIdx.x;
            uint32_t m = group_max<TPB>(D::absmax_bits(v[u]));
            if (i < n_vec) body(i, v[u], m, rule);  // whole groups are out together
        }
    }
}

// Fake quant of vector v (index i) whose block has max |x| bits m, into out[i] (HINT: stored
// with the L2 policy h).
template <typename T, bool HINT, typename Rule>
__device__ __forceinline__ void fake_quant_store(uint4* __restrict__ out, long long i,
                                                 const uint4& v, uint32_t m, const Rule& rule,
                                                 L2Hint h) {
    using D = Dtype<T>;
    if (m >= NON_FINITE_ABS_BITS) {
        store_vec<HINT>(out, i, D::nan_vec(), h);
        return;
    }
    Scale s = rule.scale(u2f(m));
    float f[D::EPV];
    D::unpack(v, f);
#pragma unroll
    for (int e = 0; e < D::EPV; ++e) f[e] = fake_quant_elem(f[e], s, rule);
    store_vec<HINT>(out, i, D::pack(f), h);
}

template <typename T, typename RuleOf>
__device__ __forceinline__ void fake_quant_vec(const Args& a) {
    uint4* __restrict__ out = static_cast<uint4*>(a.out);
    with_hint(a.keep_vecs, [&](auto hinted, L2Hint h) {
        constexpr bool H = decltype(hinted)::value;
        encode_vec<T, RuleOf, H>(a, h,
                                 [&](long long i, const uint4& v, uint32_t m, const auto& rule) {
                                     fake_quant_store<T, H>(out, i, v, m, rule, h);
                                 });
    });
}

// Fake quant of every entry of a multi-tensor launch (vector layout only): each CTA
// iteration takes one chunk of VEC_THREADS * VEC_UNROLL vectors of one entry, so a CTA's work
// is that of fake_quant_vec on the same bytes. RuleOfSlot::make(a, slot) builds the rule of
// an entry (NVFP4: from the tensor amax of its slot, as fake_quant_vec with a given device
// amax; the same bits). Chunks start at multiples of the chunk, which whole blocks tile, so
// the lanes of a block are in or out together. HINT: loads and stores with the L2 policy h.
template <typename T, typename RuleOfSlot, bool HINT>
__device__ __forceinline__ void fake_quant_many_body(const ManyArgs& a, L2Hint h) {
    using D = Dtype<T>;
    using Rule = decltype(RuleOfSlot::make(a, 0));
    constexpr int TPB = Rule::BLOCK / D::EPV;
    constexpr int U = VEC_UNROLL;
    const long long chunk = (long long)blockDim.x * U;
    for (long long c = blockIdx.x; c < a.n_chunks; c += gridDim.x) {
        const ManyEntry& en = a.e[many_entry_of(a, c)];
        const uint4* __restrict__ x = static_cast<const uint4*>(en.x);
        uint4* __restrict__ out = static_cast<uint4*>(en.out);
        const long long n_vec = en.n_vec;
        const long long base = (c - en.chunk0) * chunk;
        uint4 v[U];
        load_vecs<HINT>(x, base, n_vec, v, h);
        const Rule rule = RuleOfSlot::make(a, en.slot);  // after the loads: an L2 read
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long long i = base + (long long)u * blockDim.x + threadIdx.x;
            const uint32_t m = group_max<TPB>(D::absmax_bits(v[u]));
            if (i < n_vec) fake_quant_store<T, HINT>(out, i, v[u], m, rule, h);
        }
    }
}

template <typename T, typename RuleOfSlot>
__device__ __forceinline__ void fake_quant_many(const ManyArgs& a) {
    with_hint(a.keep_chunks, [&](auto hinted, L2Hint h) {
        fake_quant_many_body<T, RuleOfSlot, decltype(hinted)::value>(a, h);
    });
}

template <typename T, typename RuleOf>
__device__ __forceinline__ void quantize_vec(const Args& a) {
    using D = Dtype<T>;
    using Rule = decltype(RuleOf::make(a));
    constexpr int TPB = Rule::BLOCK / D::EPV;
    auto body = [&](long long i, const uint4& v, uint32_t m, const auto& rule) {
        uint32_t packed = 0, byte;
        if (m >= NON_FINITE_ABS_BITS) {
            byte = Rule::NAN_BYTE;  // codes stay 0
        } else {
            Scale s = rule.scale(u2f(m));
            byte = s.byte;
            float f[D::EPV];
            D::unpack(v, f);
#pragma unroll
            for (int e = 0; e < D::EPV; ++e) packed |= quantize_elem(f[e], s, rule) << (4 * e);
        }
        // EPV codes = EPV / 2 bytes: element 2j in the low nibble of byte j.
        if (D::EPV == 8) {
            reinterpret_cast<uint32_t*>(a.codes)[i] = packed;
        } else {
            reinterpret_cast<uint16_t*>(a.codes)[i] = uint16_t(packed);
        }
        if (threadIdx.x % TPB == 0) a.scales[i / TPB] = uint8_t(byte);
    };
    // The codes and scales (a quarter of the bytes read, or less) keep plain stores.
    with_hint(a.keep_vecs, [&](auto hinted, L2Hint h) {
        encode_vec<T, RuleOf, decltype(hinted)::value>(a, h, body);
    });
}

template <typename T, typename RuleOf>
__device__ __forceinline__ void dequantize_vec(const Args& a) {
    using D = Dtype<T>;
    using Rule = decltype(RuleOf::make(a));
    const Rule rule = RuleOf::make(a);
    constexpr int EPV = D::EPV;
    constexpr int TPB = Rule::BLOCK / EPV;
    constexpr int U = VEC_UNROLL;
    uint4* __restrict__ out = static_cast<uint4*>(a.out);
    const long long n_vec = a.rows * a.k / EPV;
    const long long stride = (long long)gridDim.x * blockDim.x * U;
    for (long long base = (long long)blockIdx.x * blockDim.x * U; base < n_vec; base += stride) {
        uint32_t c[U], b[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            long long i = base + (long long)u * blockDim.x + threadIdx.x;
            if (i < n_vec) {
                c[u] = EPV == 8 ? __ldg(reinterpret_cast<const uint32_t*>(a.codes) + i)
                                : uint32_t(__ldg(reinterpret_cast<const uint16_t*>(a.codes) + i));
                b[u] = __ldg(a.scales + i / TPB);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            long long i = base + (long long)u * blockDim.x + threadIdx.x;
            if (i >= n_vec) continue;
            float dec;
            if (!rule.dec_from_byte(b[u], dec)) {
                out[i] = D::nan_vec();
                continue;
            }
            float f[EPV];
#pragma unroll
            for (int e = 0; e < EPV; ++e) f[e] = dequantize_elem(c[u] >> (4 * e), dec);
            out[i] = D::pack(f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scalar kernels: any k, one thread per block of a row.

struct BlockPos {
    long long row, start;  // row index, first element of the block (flat)
    long long cb;          // block index within the row
    int len;               // real elements in the block (short tail block: < BLOCK)
};

template <int BLOCK>
__device__ __forceinline__ BlockPos block_pos(const Args& a, long long nb, long long j) {
    BlockPos p;
    p.row = j / nb;
    p.cb = j - p.row * nb;
    p.start = p.row * a.k + p.cb * BLOCK;
    long long rest = a.k - p.cb * BLOCK;
    p.len = rest < BLOCK ? int(rest) : BLOCK;
    return p;
}

template <typename T>
__device__ __forceinline__ uint32_t scalar_block_amax(const Args& a, const BlockPos& p) {
    uint32_t m = 0;
    for (int e = 0; e < p.len; ++e)
        m = max(m, f2u(Dtype<T>::load_scalar(a.x, p.start + e)) & 0x7FFFFFFFu);
    return m;
}

template <typename T, typename Rule>
__device__ __forceinline__ void fake_quant_scalar(const Args& a, const Rule& rule) {
    using D = Dtype<T>;
    const long long nb = (a.k + Rule::BLOCK - 1) / Rule::BLOCK;
    const long long total = a.rows * nb;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        BlockPos p = block_pos<Rule::BLOCK>(a, nb, j);
        uint32_t m = scalar_block_amax<T>(a, p);
        if (m >= NON_FINITE_ABS_BITS) {
            for (int e = 0; e < p.len; ++e) D::store_nan(a.out, p.start + e);
            continue;
        }
        Scale s = rule.scale(u2f(m));
        for (int e = 0; e < p.len; ++e) {
            float f = D::load_scalar(a.x, p.start + e);
            D::store_scalar(a.out, p.start + e, fake_quant_elem(f, s, rule));
        }
    }
}

template <typename T, typename Rule>
__device__ __forceinline__ void quantize_scalar(const Args& a, const Rule& rule) {
    using D = Dtype<T>;
    const long long nb = (a.k + Rule::BLOCK - 1) / Rule::BLOCK;
    const long long pk = (a.k + 1) / 2;  // packed bytes per row
    const long long total = a.rows * nb;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        BlockPos p = block_pos<Rule::BLOCK>(a, nb, j);
        // Blocks have even length, so block cb's codes start at byte cb * BLOCK / 2.
        uint8_t* codes = a.codes + p.row * pk + p.cb * (Rule::BLOCK / 2);
        uint32_t m = scalar_block_amax<T>(a, p);
        if (m >= NON_FINITE_ABS_BITS) {
            a.scales[j] = uint8_t(Rule::NAN_BYTE);
            for (int e = 0; e < p.len; e += 2) codes[e / 2] = 0;
            continue;
        }
        Scale s = rule.scale(u2f(m));
        a.scales[j] = uint8_t(s.byte);
        for (int e = 0; e < p.len; e += 2) {
            uint32_t lo = quantize_elem(D::load_scalar(a.x, p.start + e), s, rule);
            uint32_t hi =
                e + 1 < p.len ? quantize_elem(D::load_scalar(a.x, p.start + e + 1), s, rule) : 0;
            codes[e / 2] = uint8_t(lo | (hi << 4));
        }
    }
}

template <typename T, typename Rule>
__device__ __forceinline__ void dequantize_scalar(const Args& a, const Rule& rule) {
    using D = Dtype<T>;
    const long long nb = (a.k + Rule::BLOCK - 1) / Rule::BLOCK;
    const long long pk = (a.k + 1) / 2;
    const long long total = a.rows * nb;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        BlockPos p = block_pos<Rule::BLOCK>(a, nb, j);
        const uint8_t* codes = a.codes + p.row * pk + p.cb * (Rule::BLOCK / 2);
        float dec;
        if (!rule.dec_from_byte(a.scales[j], dec)) {
            for (int e = 0; e < p.len; ++e) D::store_nan(a.out, p.start + e);
            continue;
        }
        for (int e = 0; e < p.len; ++e) {
            uint32_t code = codes[e / 2] >> ((e & 1) * 4);
            D::store_scalar(a.out, p.start + e, dequantize_elem(code, dec));
        }
    }
}

}  // namespace aqn

// One set of entry points per (format, dtype): extern "C" names `<op>_<format>_<dtype>`
// (vector kernels) and `<op>_<format>_<dtype>_scalar` (any k). RULE_OF and DEQ_RULE_OF are
// types whose static `make(a)` builds the format's rule for the encode and the decode
// direction (it may use shared memory and __syncthreads: every thread calls it once).
// `fake_quant_many_<format>_<dtype>`: the multi-tensor fake quant; MANY_RULE_OF's static
// `make(const ManyArgs&, int slot)` builds an entry's rule.
#define AQN_FP4_MANY_KERNEL(FMT, T, DT, MANY_RULE_OF)                                      \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        fake_quant_many_##FMT##_##DT(const aqn::ManyArgs a) {                             \
        aqn::fake_quant_many<T, MANY_RULE_OF>(a);                                         \
    }

#define AQN_FP4_KERNELS(FMT, T, DT, RULE_OF, DEQ_RULE_OF)                                  \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        fake_quant_##FMT##_##DT(const aqn::Args a) {                                      \
        aqn::fake_quant_vec<T, RULE_OF>(a);                                               \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        quantize_##FMT##_##DT(const aqn::Args a) {                                        \
        aqn::quantize_vec<T, RULE_OF>(a);                                                 \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        dequantize_##FMT##_##DT(const aqn::Args a) {                                      \
        aqn::dequantize_vec<T, DEQ_RULE_OF>(a);                                           \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        fake_quant_##FMT##_##DT##_scalar(const aqn::Args a) {                             \
        aqn::fake_quant_scalar<T>(a, RULE_OF::make(a));                                   \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        quantize_##FMT##_##DT##_scalar(const aqn::Args a) {                               \
        aqn::quantize_scalar<T>(a, RULE_OF::make(a));                                     \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(aqn::VEC_THREADS)                        \
        dequantize_##FMT##_##DT##_scalar(const aqn::Args a) {                             \
        aqn::dequantize_scalar<T>(a, DEQ_RULE_OF::make(a));                               \
    }
