//! The Python extension `aqn_rs._aqn_rs`: a binding of aqn-core that converts buffers,
//! arguments and errors and nothing else. The numerics live in aqn-core, which has no pyo3
//! and is tested with `cargo test`; the binding is tested from Python (tests/).
//!
//! - `quant`: MXFP4/NVFP4 fake quant, quantize, dequantize and amax on CPU buffers;
//! - `aqn`: `ModuleSelector`, `SigmaScheduler` and AQN's noise;
//! - `scan`: the SRDD scanner's metric reductions;
//! - `cuda`: the same ops (and the noise) launched on CUDA device pointers;
//! - `buffer`: numpy buffers to typed slices; `dlpack`: tensors through DLPack's C API;
//! - `error`: the one error enum and its one mapping to Python exceptions.

use pyo3::prelude::*;

mod aqn;
mod buffer;
mod cuda;
mod dlpack;
mod error;
mod quant;
mod scan;

#[pymodule]
fn _aqn_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("AqnError", m.py().get_type::<error::AqnError>())?;
    quant::register(m)?;
    cuda::register(m)?;
    aqn::register(m)?;
    scan::register(m)?;
    Ok(())
}
