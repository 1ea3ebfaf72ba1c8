//! Python binding of the AQN side of aqn-core; converts arguments and errors only, the rules
//! live in `aqn_core::{selector, schedule, noise}` and `docs/reference/NOISE.md`:
//!
//! - `selector`: `ModuleSelector` and `LAYER_TYPES`;
//! - `schedule`: `SigmaScheduler` and `DECAYS`;
//! - `noise`: the counter-based Gaussian noise and its building blocks;
//! - `args`: the lenient conversion of config values the three share.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

mod args;
mod noise;
mod schedule;
mod selector;

/// Register the AQN classes and functions on the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Both classes, then their name tuples: the order `_aqn_rs.__all__` has always had.
    m.add_class::<selector::PyModuleSelector>()?;
    m.add_class::<schedule::PySigmaScheduler>()?;
    m.add("LAYER_TYPES", PyTuple::new(m.py(), selector::LAYER_TYPES)?)?;
    m.add("DECAYS", PyTuple::new(m.py(), schedule::DECAYS)?)?;
    noise::register(m)?;
    Ok(())
}
