"""Type stubs of the compiled core (`aqn_rs._aqn_rs`). Float buffers are C-contiguous numpy
arrays: float32, or uint16 bit patterns of bf16/f16 with `dtype` = "bf16"/"f16". Outputs are
preallocated by the caller. Errors: TypeError (wrong array type/dtype), ValueError (shape,
length, contiguity or argument), RuntimeError (CUDA)."""

from typing import Optional

import numpy as np
import numpy.typing as npt

__version__: str

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
