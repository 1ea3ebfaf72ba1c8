//! The arguments of the CUDA functions as Python passes them, checked before any driver call
//! (in the CPU-only build too, so a bad argument says what is wrong before "not built"):
//! dtype, format and scale-mode strings, the `[rows, k]` size, the NVFP4 amax source, and a
//! DLPack dtype.

use super::abi::{self, Dt, Fmt};
use crate::dlpack::{DLDataType, DL_BFLOAT, DL_FLOAT};
use crate::error::{Error, Result};

// The kernels' block sizes are the core's: the CPU path and the kernels tile alike.
const _: () = assert!(abi::MXFP4_BLOCK == aqn_core::mxfp4::BLOCK);
const _: () = assert!(abi::NVFP4_BLOCK == aqn_core::nvfp4::BLOCK);

/// The dtype tag `_cuda.py` passes.
pub fn dtype(s: &str) -> Result<Dt> {
    match s {
        "f32" => Ok(Dt::F32),
        "bf16" => Ok(Dt::Bf16),
        "f16" => Ok(Dt::F16),
        _ => Err(Error::Type(format!(
            "unsupported dtype {s:?}; expected \"f32\", \"bf16\" or \"f16\" \
             (torch.float32, torch.bfloat16, torch.float16)"
        ))),
    }
}

/// The format name.
pub fn format(s: &str) -> Result<Fmt> {
    match s {
        "mxfp4" => Ok(Fmt::Mxfp4),
        "nvfp4" => Ok(Fmt::Nvfp4),
        _ => Err(Error::Value(format!(
            "unknown format {s:?}; expected \"mxfp4\" or \"nvfp4\""
        ))),
    }
}

/// MXFP4 scale mode number as the kernels take it (`Args::mode`).
pub fn mode_number(fmt: Fmt, mode: &str) -> Result<i32> {
    if fmt == Fmt::Nvfp4 {
        return Ok(0); // NVFP4 has one rule; the mode argument is ignored
    }
    let m: aqn_core::ScaleMode = mode.parse()?;
    Ok(match m {
        aqn_core::ScaleMode::Floor => abi::MX_FLOOR,
        aqn_core::ScaleMode::Rceil => abi::MX_RCEIL,
        aqn_core::ScaleMode::Even => abi::MX_EVEN,
        aqn_core::ScaleMode::Ceil => abi::MX_CEIL,
    })
}

/// The `[rows, k]` view: checks that the sizes multiply without overflow.
pub fn numel(rows: u64, k: u64) -> Result<usize> {
    let layout = aqn_core::Layout::from_shape(&[rows as usize, k as usize], 1)?;
    Ok(layout.numel())
}

/// Where the caller's NVFP4 tensor amax comes from (exactly one of the three).
#[derive(Clone, Copy, Debug)]
pub enum AmaxSource {
    /// Reduce it on the device into this scratch (AMAX_SCRATCH f32).
    Compute { scratch: u64 },
    /// A device f32 (a 0-d tensor): used as is, never read on the host.
    Device { ptr: u64 },
    /// A host value, validated here.
    Host { value: f32 },
}

/// The amax source from the three optional arguments (0 = not given for the pointers).
pub fn amax_source(amax_ptr: u64, amax_value: Option<f32>, scratch: u64) -> Result<AmaxSource> {
    match (amax_ptr != 0, amax_value, scratch != 0) {
        (true, None, false) => Ok(AmaxSource::Device { ptr: amax_ptr }),
        (false, Some(v), false) => {
            aqn_core::nvfp4::validate_amax(v)?;
            Ok(AmaxSource::Host { value: v })
        }
        (false, None, true) => Ok(AmaxSource::Compute { scratch }),
        _ => Err(Error::Value(
            "NVFP4 needs exactly one amax source: a device pointer, a host value, or a \
             scratch buffer to compute it in"
                .into(),
        )),
    }
}

/// Dtype of a DLPack dtype, if the kernels take it.
pub fn dt_of(d: DLDataType) -> Option<Dt> {
    match (d.code, d.bits, d.lanes) {
        (DL_FLOAT, 32, 1) => Some(Dt::F32),
        (DL_BFLOAT, 16, 1) => Some(Dt::Bf16),
        (DL_FLOAT, 16, 1) => Some(Dt::F16),
        _ => None,
    }
}
