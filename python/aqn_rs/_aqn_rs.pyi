"""Type stubs of the compiled core (`aqn_rs._aqn_rs`). Float buffers are C-contiguous numpy
arrays: float32, or uint16 bit patterns of bf16/f16 with `dtype` = "bf16"/"f16". Outputs are
preallocated by the caller. Errors: TypeError (wrong array type/dtype), ValueError (shape,
length, contiguity or argument), RuntimeError (CUDA)."""

from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt

__version__: str
# What the binding registers, in its order; stubtest checks this list against the module's.
__all__ = [
    "__version__",
    "AqnError",
    "mxfp4_fake_quant",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "nvfp4_fake_quant",
    "nvfp4_quantize",
    "nvfp4_dequantize",
    "nvfp4_amax",
    "nvfp4_global_scale",
    "cpu_threads",
    "CUDA_AMAX_SCRATCH",
    "CUDA_MANY_MAX",
    "cuda_built",
    "cuda_build_archs",
    "cuda_available",
    "cuda_device_count",
    "cuda_set_tuning",
    "cuda_probe_overhead",
    "cuda_fake_quant",
    "cuda_fake_quant_t",
    "dlpack_exchange_register",
    "cuda_quantize",
    "cuda_dequantize",
    "cuda_amax",
    "cuda_amax_many",
    "cuda_sq_err_many",
    "cuda_fake_quant_many",
    "cuda_noise",
    "ModuleSelector",
    "SigmaScheduler",
    "LAYER_TYPES",
    "DECAYS",
    "noise_fill_f32",
    "noise_key",
    "philox4x32_10",
    "fnv1a64",
    "scan_tensor",
    "scan_gain_ladder",
]

class AqnError(Exception): ...

def mxfp4_fake_quant(x: np.ndarray, out: np.ndarray, dtype: str, scale_mode: str) -> None: ...
def mxfp4_quantize(
    x: np.ndarray, dtype: str, scale_mode: str, codes: npt.NDArray[np.uint8], scales: npt.NDArray[np.uint8]
) -> None: ...
def mxfp4_dequantize(
    codes: npt.NDArray[np.uint8], scales: npt.NDArray[np.uint8], out: np.ndarray, dtype: str
) -> None: ...
def nvfp4_fake_quant(x: np.ndarray, out: np.ndarray, dtype: str, amax: Optional[float] = None) -> float: ...
def nvfp4_quantize(
    x: np.ndarray,
    dtype: str,
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.uint8],
    amax: Optional[float] = None,
) -> float: ...
def nvfp4_dequantize(
    codes: npt.NDArray[np.uint8], scales: npt.NDArray[np.uint8], global_scale: float, out: np.ndarray, dtype: str
) -> None: ...
def nvfp4_amax(x: np.ndarray, dtype: str) -> float: ...
def nvfp4_global_scale(amax: float) -> float: ...
def cpu_threads() -> int: ...

# =============================================================================================
# AQN: module selection, sigma schedule, noise (src/aqn/). Errors: ValueError for bad values
# and configs (messages say what was expected), TypeError for wrong types.
# =============================================================================================

LAYER_TYPES: Tuple[str, ...]  # ("linear", "rmsnorm", "embedding")
DECAYS: Tuple[str, ...]  # ("exponential", "linear", "cosine", "constant")

_Patterns = Union[str, Iterable[str]]

@final
class ModuleSelector:
    """Which modules are selected, from qualified names and class names (see
    `aqn_rs.selection` for the pattern syntax and the decision order).

    Args:
        include: patterns; None selects every module of the layer types that is not
            excluded (an empty list is an error).
        exclude: patterns; None means the default ("lm_head", "embed_tokens").
        layer_types: "linear", "rmsnorm", "embedding" (case-insensitive); None means ("linear",).
    A single string is one pattern / one layer type."""

    def __new__(
        cls,
        include: Optional[_Patterns] = None,
        exclude: Optional[_Patterns] = ("lm_head", "embed_tokens"),
        layer_types: Optional[_Patterns] = "linear",
    ) -> "ModuleSelector": ...
    def decide(self, name: str, class_name: str) -> Tuple[bool, str]:
        """(selected, rule); rule is "type:<class>", "exclude:<pattern>",
        "include:<pattern>", "not-included" or "default"."""
    def select(self, named: Iterable[Tuple[str, str]]) -> list[str]:
        """Names of the selected modules among (name, class_name) pairs, in order."""
    @staticmethod
    def layer_type(class_name: str) -> Optional[str]:
        """"linear", "rmsnorm", "embedding" or None for a class name."""
    @staticmethod
    def canonical_name(name: str) -> str:
        """The name without _fsdp_wrapped_module / _checkpoint_wrapped_module / _orig_mod."""
    @property
    def include(self) -> Optional[Tuple[str, ...]]: ...
    @property
    def exclude(self) -> Tuple[str, ...]: ...
    @property
    def layer_types(self) -> Tuple[str, ...]: ...
    def __eq__(self, other: object) -> bool: ...
    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]: ...

@final
class SigmaScheduler:
    """QeRL's staged sigma schedule (formulas in `aqn_core::schedule` and docs/reference/NOISE.md).

    Args:
        sigma_start, sigma_end: finite, >= 0 (numeric strings accepted); exponential decay
            needs sigma_end <= sigma_start and sigma_end > 0 unless both are 0.
        num_stages: K >= 1 equal stages of total_steps / K steps.
        total_steps: optimizer steps T, 1..2**53.
        decay: "exponential" (QeRL), "linear", "cosine" or "constant".
        zero_first_stage: stage 0 has sigma 0 (QeRL).
        enabled: False gives sigma 0 at every step (the plan's `enabled: false`)."""

    def __new__(
        cls,
        sigma_start: float,
        sigma_end: float,
        num_stages: int,
        total_steps: int,
        decay: str = "exponential",
        zero_first_stage: bool = True,
        enabled: bool = True,
    ) -> "SigmaScheduler": ...
    @classmethod
    def from_config(cls, config: Mapping[str, Any], total_steps: int) -> "SigmaScheduler":
        """From {enabled, sigma_start, sigma_end, num_stages, layer_types[, decay,
        zero_first_stage]}; AqnNoise keys are ignored, unknown keys raise ValueError."""
    def sigma(self, step: int) -> float:
        """Sigma at an optimizer step >= 0 (steps past total_steps stay in the last stage)."""
    def stage(self, step: int) -> int:
        """Stage of a step, 0..num_stages-1."""
    def schedule(self) -> list[float]:
        """Sigma at steps 0..total_steps inclusive (total_steps + 1 values)."""
    @property
    def trend(self) -> list[float]:
        """The noisy stages' sigmas (QeRL's sigma_trend)."""
    @property
    def sigma_start(self) -> float: ...
    @property
    def sigma_end(self) -> float: ...
    @property
    def num_stages(self) -> int: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def decay(self) -> str: ...
    @property
    def zero_first_stage(self) -> bool: ...
    @property
    def enabled(self) -> bool: ...
    def state_dict(self) -> dict[str, Any]:
        """{version, sigma_start, sigma_end, num_stages, total_steps, decay,
        zero_first_stage, enabled}; floats round-trip exactly."""
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]: ...

def noise_fill_f32(
    out: npt.NDArray[np.float32],
    seed: int,
    step: int,
    name: str,
    sigma: float = 1.0,
    offset: Optional[int] = None,
) -> None:
    """Fill a C-contiguous float32 array with elements offset..offset+out.size of the noise
    of (seed, step, name), each z * float32(sigma) (docs/reference/NOISE.md). GIL released."""

def noise_key(seed: int, name: str) -> int:
    """FNV-1a 64 of the seed's 8 little-endian bytes followed by the UTF-8 name."""

def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> list[int]:
    """Philox4x32-10 of a 4-word counter under a 2-word key."""

def fnv1a64(data: bytes) -> int: ...

# ---- CUDA launch side (src/cuda/: mod.rs binds, ops.rs checks and launches). Pointers are
# device addresses (`tensor.data_ptr()`), `stream` is `torch.cuda.current_stream(device).cuda_stream`;
# buffers are allocated by the caller (python/aqn_rs/_cuda.py). Every pointer, device and size is validated before launch;
# a build without kernels raises RuntimeError from each of these.

CUDA_AMAX_SCRATCH: int
CUDA_MANY_MAX: int

def cuda_built() -> bool: ...
def cuda_build_archs() -> list[str]: ...
def cuda_available() -> bool: ...
def cuda_device_count() -> int: ...
def cuda_set_tuning(
    ctas_per_sm: Optional[int] = None, amax_ctas_per_sm: Optional[int] = None, pdl: Optional[bool] = None,
    many_batch_bytes: Optional[int] = None, l2_keep_bytes: Optional[int] = None,
) -> tuple[int, int, bool, int, int]: ...
def cuda_probe_overhead(device: int, stream: int, ptr: int, reps: int) -> tuple[float, float, float, float]: ...
def cuda_fake_quant(
    fmt: str, mode: str, dtype: str, device: int, stream: int, x: int, out: int, rows: int, k: int,
    amax_ptr: int, amax_value: Optional[float], scratch: int,
) -> None: ...
def cuda_quantize(
    fmt: str, mode: str, dtype: str, device: int, stream: int, x: int, codes: int, scales: int,
    gs_out: int, rows: int, k: int, amax_ptr: int, amax_value: Optional[float], scratch: int,
) -> None: ...
def cuda_dequantize(
    fmt: str, dtype: str, device: int, stream: int, codes: int, scales: int, gs_ptr: int,
    gs_value: Optional[float], out: int, rows: int, k: int,
) -> None: ...
def cuda_amax(dtype: str, device: int, stream: int, x: int, n: int, scratch: int, out: int) -> None: ...
def cuda_amax_many(
    dtype: str, device: int, stream: int, xs: Sequence[int], ns: Sequence[int], scratch: int, scratch_len: int, out: int,
) -> None:
    """One max |x| over the tensors at device pointers `xs` (`ns` elements each, all of `dtype`) into
    the f32 at `out`; `scratch` holds `scratch_len` f32, at least len(xs) * CUDA_AMAX_SCRATCH."""
def cuda_sq_err_many(
    dtype: str, device: int, stream: int, xs: Sequence[int], ys: Sequence[int], ns: Sequence[int], out: int,
    out_len: int,
) -> None:
    """Per pair of tensors at `xs[i]`, `ys[i]` (`ns[i]` elements, all of `dtype`), the per-CTA f32 sums
    of (x - y)^2 and x^2 into stretch i of `out` (`out_len` f32, at least len(xs) * 2 * CUDA_AMAX_SCRATCH:
    CUDA_AMAX_SCRATCH pairs per tensor, the unused ones zero)."""
def cuda_fake_quant_many(
    fmt: str, mode: str, dtype: str, device: int, stream: int, xs: Sequence[int], outs: Sequence[int],
    ns: Sequence[int], ks: Sequence[int], slots: Sequence[int], n_slots: int, amax: int, scratch: int,
    scratch_len: int,
) -> None:
    """Fake quant of the tensors at `xs[i]` into `outs[i]` (`ns[i]` elements, last dimension `ks[i]`,
    whole blocks along it, 16-byte aligned, all of `dtype`), a few launches per CUDA_MANY_MAX tensors.
    NVFP4: tensor i uses the amax of slot `slots[i]` (< `n_slots`), the max |x| over that slot's
    tensors, written to the `n_slots` f32 at `amax`; `scratch` holds `scratch_len` f32, at least
    n_slots * CUDA_AMAX_SCRATCH. MXFP4 takes no slots (`[]`, 0)."""
def cuda_fake_quant_t(
    x: Any, out: Any, fmt: str, mode: str, amax_ptr: int, amax_value: Optional[float], scratch: int,
) -> bool:
    """`cuda_fake_quant` on tensors (x and out are torch tensors read through DLPack's C exchange
    API). False, launching nothing, when that API is not registered or x is not a contiguous
    CUDA tensor of a supported dtype: the caller then takes the pointer path."""
def cuda_noise(
    dtype: str, device: int, stream: int, out: int, n: int, offset: int, seed: int, name: str,
    step: int, sigma: float,
) -> None:
    """Elements `offset .. offset + n` of AQN's noise for `(seed, step, name)`, times float32(sigma),
    cast to `dtype`, into `n` elements at device pointer `out` (the CUDA twin of noise_fill_f32)."""
def dlpack_exchange_register(tensor_type: Any) -> bool:
    """Register `tensor_type`'s (torch.Tensor's) DLPack C exchange API for `cuda_fake_quant_t`;
    False, registering nothing, where the type has none (torch < 2.10)."""

# ---- SRDD scanner reductions (src/scan.rs; docs/guides/SCANNER.md) ----

def scan_tensor(
    x: np.ndarray, dtype: str, format: str, scale_mode: str = "floor", amax: Optional[float] = None
) -> dict: ...
def scan_gain_ladder() -> list[float]: ...
