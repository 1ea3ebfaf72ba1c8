//! The kernel ABI, Rust side: what the host and the kernels of `cuda/` must agree on without
//! a compiler to check it across the boundary. The `#[repr(C)]` argument blocks each kernel
//! takes by value, the launch constants (threads per CTA, vectors per thread, block sizes,
//! MXFP4 mode numbers) and the kernel names. This file is the one owner of that contract on
//! the Rust side: the driver, launch and op code use these items, never their own numbers.
//!
//! Plain `std` only: build.rs compiles this file too and writes [`ARGS_LAYOUT`],
//! [`NOISE_ARGS_LAYOUT`] and [`CONSTANTS`] into the header `aqn_abi.h` that nvcc sees, where
//! cuda/abi.cuh's `static_assert`s check the C structs and constants against them. A field
//! added, moved or retyped to another size on one side only, or a constant changed on one
//! side only, fails the build instead of corrupting a launch.

/// Floats of the per-CTA amax scratch that Python allocates for NVFP4 without a given amax
/// (and for `amax`); the amax pass never launches more CTAs than this, so `amax_partials_*`
/// writes at most this many partials and `n_amax` never exceeds it, except in `amax_many`'s
/// fold (`amax_finalize`, a loop over any count), where it is at most members x this.
pub const AMAX_SCRATCH: usize = 1024;

/// Bytes per vector load/store of the vector kernels (a `uint4`).
pub const VEC_BYTES: usize = 16;
/// Threads per CTA of the element kernels (`__launch_bounds__` of every
/// `<op>_<format>_<dtype>[_scalar]` kernel: more would fail to launch).
pub const VEC_THREADS: u32 = 256;
/// 16-byte vectors each thread of a vector kernel loads per iteration: the grid covers
/// `VEC_THREADS * VEC_UNROLL` vectors per CTA per pass.
pub const VEC_UNROLL: u64 = 4;
/// Threads per CTA of `amax_partials_*` (its `__launch_bounds__` and the size of its
/// per-warp shared array).
pub const AMAX_THREADS: u32 = 512;
/// 16-byte loads per thread per iteration of `amax_partials_*`.
pub const AMAX_UNROLL: u64 = 4;
/// Threads of `amax_finalize`: one warp.
pub const FINALIZE_THREADS: u32 = 32;
/// Threads per CTA of `noise_*`.
pub const NOISE_THREADS: u32 = 256;
/// Elements per block of MXFP4 and NVFP4: the kernels' `MxRule::BLOCK` and `NvRule::BLOCK`
/// (a vector kernel needs `k` to be a multiple; the scale buffers hold one byte per block).
pub const MXFP4_BLOCK: usize = 32;
pub const NVFP4_BLOCK: usize = 16;
/// MXFP4 scale modes as `Args::mode` numbers them (`MxMode` in cuda/mxfp4.cu).
pub const MX_FLOOR: i32 = 0;
pub const MX_RCEIL: i32 = 1;
pub const MX_EVEN: i32 = 2;
pub const MX_CEIL: i32 = 3;

/// Element dtype of a tensor; its name is the kernel-name suffix (and `_cuda.py`'s tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
    /// Elements per 16-byte vector in the vector kernels (`Dtype<T>::EPV`).
    pub fn epv(self) -> usize {
        VEC_BYTES / self.size()
    }
}

/// FP4 format family: one `.cu` file and one CUDA module each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    Mxfp4 = 0,
    Nvfp4 = 1,
}

impl Fmt {
    pub fn block(self) -> usize {
        match self {
            Self::Mxfp4 => MXFP4_BLOCK,
            Self::Nvfp4 => NVFP4_BLOCK,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Mxfp4 => "mxfp4",
            Self::Nvfp4 => "nvfp4",
        }
    }
}

/// The three element ops every format has a kernel for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    FakeQuant = 0,
    Quantize = 1,
    Dequantize = 2,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::FakeQuant => "fake_quant",
            Op::Quantize => "quantize",
            Op::Dequantize => "dequantize",
        }
    }
}

/// The element kernel `<op>_<format>_<dtype>` (vector) or `<op>_<format>_<dtype>_scalar`,
/// as `AQN_FP4_KERNELS` in cuda/blockwise.cuh names them.
pub fn elem_kernel(op: Op, fmt: Fmt, dt: Dt, scalar: bool) -> String {
    format!(
        "{}_{}_{}{}",
        op.name(),
        fmt.name(),
        dt.name(),
        if scalar { "_scalar" } else { "" }
    )
}

/// The per-CTA amax pass of a dtype (cuda/nvfp4.cu `AQN_REDUCTION_KERNELS`).
pub fn amax_partials_kernel(dt: Dt) -> String {
    format!("amax_partials_{}", dt.name())
}

/// The per-CTA sums of (x - y)^2 and x^2 of a dtype (cuda/nvfp4.cu `AQN_REDUCTION_KERNELS`).
pub fn sq_err_partials_kernel(dt: Dt) -> String {
    format!("sq_err_partials_{}", dt.name())
}

/// Folds the partials into one f32 (cuda/nvfp4.cu).
pub const AMAX_FINALIZE_KERNEL: &str = "amax_finalize";

/// The multi-tensor fake quant of a format and dtype (`AQN_FP4_MANY_KERNEL` in
/// cuda/blockwise.cuh).
pub fn fake_quant_many_kernel(fmt: Fmt, dt: Dt) -> String {
    format!("fake_quant_many_{}_{}", fmt.name(), dt.name())
}

/// The multi-tensor amax pass of a dtype (cuda/nvfp4.cu `AQN_AMAX_MANY_KERNEL`).
pub fn amax_many_partials_kernel(dt: Dt) -> String {
    format!("amax_many_partials_{}", dt.name())
}

/// Folds the multi-tensor amax pass into one amax per slot (cuda/nvfp4.cu).
pub const AMAX_MANY_FINALIZE_KERNEL: &str = "amax_many_finalize";

/// Entries of one multi-tensor launch: the `ManyArgs` block must fit the 4 KiB of kernel
/// parameters every driver and device take.
pub const MANY_MAX: usize = 126;
const _: () = assert!(std::mem::size_of::<ManyArgs>() <= 4096);

/// One tensor of a multi-tensor launch (`aqn::ManyEntry` in cuda/fp4_common.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ManyEntry {
    pub x: u64,
    pub out: u64,
    pub n_vec: i64,
    pub slot: i32,
    pub chunk0: i32,
}

/// The one by-value argument of the multi-tensor kernels (`aqn::ManyArgs`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ManyArgs {
    pub amax: u64,
    pub partials: u64,
    pub n_chunks: i64,
    pub n_entries: i32,
    pub n_slots: i32,
    pub n_partials: i32,
    pub mode: i32,
    /// L2 hints (0: none): the amax pass keeps its chunks before this one in L2; the fake
    /// quant after it, nonzero, reads and writes with evict_first (`aqn::L2Hint`).
    pub keep_chunks: i64,
    pub e: [ManyEntry; MANY_MAX],
}

impl ManyArgs {
    /// No entries, every pointer null.
    pub fn new(mode: i32) -> Self {
        Self {
            amax: 0,
            partials: 0,
            n_chunks: 0,
            n_entries: 0,
            n_slots: 0,
            n_partials: 0,
            mode,
            keep_chunks: 0,
            e: [ManyEntry {
                x: 0,
                out: 0,
                n_vec: 0,
                slot: 0,
                chunk0: 0,
            }; MANY_MAX],
        }
    }
}

/// AQN's noise of a dtype (cuda/noise.cu `AQN_NOISE_KERNEL`).
pub fn noise_kernel(dt: Dt) -> String {
    format!("noise_{}", dt.name())
}

/// The one by-value argument of every FP4 kernel (`aqn::Args` in cuda/fp4_common.cuh):
/// same fields, order and C types (device pointers as u64, `long long` as i64).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Args {
    pub x: u64,
    pub out: u64,
    pub codes: u64,
    pub scales: u64,
    pub amax_src: u64,
    pub gs_out: u64,
    pub gs_src: u64,
    pub rows: i64,
    pub k: i64,
    pub n_amax: i32,
    pub amax_value: f32,
    pub gs_value: f32,
    pub mode: i32,
    pub y: u64,
    /// L2 hints (0: none): the amax pass keeps its first `keep_vecs` vectors in L2; the
    /// element kernel after it, nonzero, reads and writes with evict_first (`aqn::L2Hint`).
    pub keep_vecs: i64,
}

impl Args {
    /// A `[rows, k]` view with every pointer null and every other field 0.
    pub fn new(rows: u64, k: u64) -> Self {
        Self {
            x: 0,
            out: 0,
            codes: 0,
            scales: 0,
            amax_src: 0,
            gs_out: 0,
            gs_src: 0,
            rows: rows as i64,
            k: k as i64,
            n_amax: 0,
            amax_value: 0.0,
            gs_value: 0.0,
            mode: 0,
            y: 0,
            keep_vecs: 0,
        }
    }
}

/// The one by-value argument of `noise_*` (`aqn_noise::NoiseArgs` in cuda/noise.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NoiseArgs {
    pub out: u64,
    pub n: u64,
    pub offset: u64,
    pub key: u64,
    pub step: u64,
    pub sigma: f32,
    pub pad: i32,
}

/// A kernel's by-value parameter block.
///
/// # Safety
/// Implemented only for `#[repr(C)]` structs whose layout is asserted against the CUDA
/// struct of the same name (below and in cuda/abi.cuh): `cuLaunchKernel` copies
/// `size_of::<Self>()` bytes from the pointer it is given into the kernel's parameter.
pub unsafe trait KernelParam: Copy {}
// SAFETY: `Args` is #[repr(C)] and its layout is asserted against `aqn::Args` (ARGS_LAYOUT).
unsafe impl KernelParam for Args {}
// SAFETY: as for Args, against `aqn_noise::NoiseArgs` (NOISE_ARGS_LAYOUT).
unsafe impl KernelParam for NoiseArgs {}
// SAFETY: as for Args, against `aqn::ManyArgs` (MANY_ARGS_LAYOUT; its entries against
// `aqn::ManyEntry`, MANY_ENTRY_LAYOUT).
unsafe impl KernelParam for ManyArgs {}

/// The C layout of a parameter block: what build.rs writes into `aqn_abi.h` as
/// `AQN_ABI_<name>_SIZE`, `AQN_ABI_<name>_ALIGN` and `AQN_ABI_<name>_<field>` (offsets).
// Read by build.rs, which compiles this file too; the extension needs only the asserts.
#[allow(dead_code)]
pub struct CLayout {
    pub name: &'static str,
    pub size: usize,
    pub align: usize,
    pub fields: &'static [(&'static str, usize)],
}

/// A [`CLayout`] of struct `$S` with the given size, alignment and field offsets, each
/// asserted at compile time against the Rust struct itself (`size_of`, `align_of`,
/// `offset_of!`). Both blocks have no padding, so a field missing from the list (or added to
/// the struct) changes the size and fails the size assert.
macro_rules! c_layout {
    ($S:ident, size $size:literal, align $align:literal, [$($field:ident: $off:literal),* $(,)?]) => {{
        assert!(std::mem::size_of::<$S>() == $size);
        assert!(std::mem::align_of::<$S>() == $align);
        $(assert!(std::mem::offset_of!($S, $field) == $off);)*
        CLayout {
            name: stringify!($S),
            size: $size,
            align: $align,
            fields: &[$((stringify!($field), $off)),*],
        }
    }};
}

/// The layout of `Args` (and so of `aqn::Args`).
// Read by build.rs, which compiles this file too; the extension needs only the asserts.
#[allow(dead_code)]
pub const ARGS_LAYOUT: CLayout = c_layout!(Args, size 104, align 8, [
    x: 0,
    out: 8,
    codes: 16,
    scales: 24,
    amax_src: 32,
    gs_out: 40,
    gs_src: 48,
    rows: 56,
    k: 64,
    n_amax: 72,
    amax_value: 76,
    gs_value: 80,
    mode: 84,
    y: 88,
    keep_vecs: 96,
]);

/// The layout of `NoiseArgs` (and so of `aqn_noise::NoiseArgs`).
// Read by build.rs, which compiles this file too; the extension needs only the asserts.
#[allow(dead_code)]
pub const NOISE_ARGS_LAYOUT: CLayout = c_layout!(NoiseArgs, size 48, align 8, [
    out: 0,
    n: 8,
    offset: 16,
    key: 24,
    step: 32,
    sigma: 40,
    pad: 44,
]);

/// The layout of `ManyEntry` (and so of `aqn::ManyEntry`).
// Read by build.rs, which compiles this file too; the extension needs only the asserts.
#[allow(dead_code)]
pub const MANY_ENTRY_LAYOUT: CLayout = c_layout!(ManyEntry, size 32, align 8, [
    x: 0,
    out: 8,
    n_vec: 16,
    slot: 24,
    chunk0: 28,
]);

/// The layout of `ManyArgs` (and so of `aqn::ManyArgs`): 48 bytes and MANY_MAX entries.
// Read by build.rs, which compiles this file too; the extension needs only the asserts.
#[allow(dead_code)]
pub const MANY_ARGS_LAYOUT: CLayout = c_layout!(ManyArgs, size 4080, align 8, [
    amax: 0,
    partials: 8,
    n_chunks: 16,
    n_entries: 24,
    n_slots: 28,
    n_partials: 32,
    mode: 36,
    keep_chunks: 40,
    e: 48,
]);

/// The launch constants under their CUDA names, written into `aqn_abi.h` as `AQN_ABI_<name>`.
// Read by build.rs, which compiles this file too; the extension needs only the asserts.
#[allow(dead_code)]
pub const CONSTANTS: [(&str, i64); 14] = [
    ("VEC_BYTES", VEC_BYTES as i64),
    ("VEC_THREADS", VEC_THREADS as i64),
    ("VEC_UNROLL", VEC_UNROLL as i64),
    ("AMAX_THREADS", AMAX_THREADS as i64),
    ("AMAX_UNROLL", AMAX_UNROLL as i64),
    ("FINALIZE_THREADS", FINALIZE_THREADS as i64),
    ("NOISE_THREADS", NOISE_THREADS as i64),
    ("MXFP4_BLOCK", MXFP4_BLOCK as i64),
    ("NVFP4_BLOCK", NVFP4_BLOCK as i64),
    ("MX_FLOOR", MX_FLOOR as i64),
    ("MX_RCEIL", MX_RCEIL as i64),
    ("MX_EVEN", MX_EVEN as i64),
    ("MX_CEIL", MX_CEIL as i64),
    ("MANY_MAX", MANY_MAX as i64),
];
