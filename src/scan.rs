//! Python binding of `aqn_core::scan` (the SRDD scanner's metric reductions): converts the
//! input buffer and returns the raw sums and counts as a dict; `python/aqn_rs/scan/metrics.py`
//! (`metrics_from_raw`) derives the metrics from them. The GIL is released around the pass, so
//! other Python threads run while a large tensor is scanned.

use aqn_core::scan::{self, TensorScan};
use aqn_core::ScaleMode;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer::{with_float_in, Dtype};
use crate::error::Error;

/// The raw scan as a dict (see `aqn_core::scan::TensorScan` for every field).
fn to_dict<'py>(
    py: Python<'py>,
    st: &TensorScan,
    global_scale: Option<f32>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("numel", st.numel)?;
    d.set_item("blocks", st.blocks)?;
    d.set_item("nonfinite_blocks", st.nonfinite_blocks)?;
    d.set_item("nonfinite_elements", st.nonfinite_elements)?;
    d.set_item("zero_blocks", st.zero_blocks)?;
    d.set_item("zeros", st.zeros)?;
    d.set_item("sum_x2", st.sum_x2)?;
    d.set_item("sum_err2", st.sum_err2)?;
    d.set_item("max_abs_err", st.max_abs_err)?;
    d.set_item("amax", st.amax)?;
    d.set_item("deadzone", st.deadzone)?;
    d.set_item("saturated", st.saturated)?;
    d.set_item("codes", st.codes.to_vec())?;
    d.set_item("scale_bytes", st.scale_bytes.clone())?;
    d.set_item("dec_min", st.dec_min)?;
    d.set_item("dec_max", st.dec_max)?;
    d.set_item("dec_sum", st.dec_sum)?;
    d.set_item("gain_blocks", st.gain_blocks)?;
    d.set_item("response_sum", st.response_sum.to_vec())?;
    d.set_item("probe_dead", st.probe_dead.to_vec())?;
    d.set_item("probe_clipped", st.probe_clipped.to_vec())?;
    d.set_item("global_scale", global_scale)?;
    Ok(d)
}

fn run<T: aqn_core::Element>(
    py: Python<'_>,
    xs: &[T],
    shape: &[usize],
    format: &str,
    mode: ScaleMode,
    amax: Option<f32>,
) -> PyResult<(TensorScan, Option<f32>)> {
    match format {
        "mxfp4" => Ok((
            py.detach(|| scan::scan_mxfp4(mode, shape, xs))
                .map_err(Error::Core)?,
            None,
        )),
        "nvfp4" => {
            let (st, gs) = py
                .detach(|| scan::scan_nvfp4(shape, xs, amax))
                .map_err(Error::Core)?;
            Ok((st, Some(gs)))
        }
        _ => Err(Error::Value(format!(
            "unknown format {format:?}; expected \"mxfp4\" or \"nvfp4\""
        ))
        .into()),
    }
}

/// Scan one tensor: the raw sums and counts of the SRDD metrics under one format.
///
/// Args: `x` a C-contiguous numpy array (float32, or uint16 bits for bf16/f16), `dtype` its
/// tag ("f32", "bf16", "f16"), `format` "mxfp4" or "nvfp4", `scale_mode` the MXFP4 scale
/// mode, `amax` NVFP4's tensor amax override (a fused group's shared amax).
#[pyfunction]
#[pyo3(signature = (x, dtype, format, scale_mode="floor", amax=None))]
fn scan_tensor<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    format: &str,
    scale_mode: &str,
    amax: Option<f32>,
) -> PyResult<Bound<'py, PyDict>> {
    let dtype = Dtype::parse(dtype)?;
    let mode = scale_mode.parse::<ScaleMode>().map_err(Error::Core)?;
    let (st, gs) = with_float_in!(dtype, x, "input", |xs, shape| run(
        py, xs, &shape, format, mode, amax
    )?);
    to_dict(py, &st, gs)
}

/// The gain-scan ladder: probe magnitudes relative to a block's amax (f32 values, ascending,
/// the last one 1.0).
#[pyfunction]
fn scan_gain_ladder() -> Vec<f32> {
    scan::gain_ladder().to_vec()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(scan_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(scan_gain_ladder, m)?)?;
    Ok(())
}
