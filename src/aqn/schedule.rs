//! `SigmaScheduler`: QeRL's staged sigma schedule, built from arguments, the plan's config
//! block or a state dict. The rule is `aqn_core::schedule`'s; this converts and validates the
//! mappings (unknown keys are errors: a typo must not fall back to a default).

use aqn_core::schedule::{Decay, SigmaSchedule};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyTuple, PyType};

use super::args::{float_arg, int_arg, type_name, u64_arg};
use crate::error::Error;

/// Decay names.
pub const DECAYS: [&str; 4] = ["exponential", "linear", "cosine", "constant"];

/// Keys of the plan's `noise_injection` block that configure `AqnNoise` rather than the
/// schedule; `from_config` accepts and ignores them.
const NOISE_KEYS: [&str; 7] = [
    "layer_types",
    "apply_to",
    "seed",
    "relative",
    "exclude",
    "include",
    "noise_cache_max_numel",
];
/// Keys of a schedule's state dict and config block.
const SCHEDULE_KEYS: [&str; 7] = [
    "enabled",
    "sigma_start",
    "sigma_end",
    "num_stages",
    "total_steps",
    "decay",
    "zero_first_stage",
];
const STATE_VERSION: u32 = 1;

/// QeRL's staged sigma schedule (docs in `aqn_core::schedule`).
#[pyclass(module = "aqn_rs._aqn_rs", name = "SigmaScheduler")]
pub struct PySigmaScheduler {
    inner: SigmaSchedule,
}

fn num_stages_arg(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    let v = int_arg(obj, "num_stages")?;
    if v < 1 {
        return Err(Error::Value(format!(
            "invalid argument: num_stages must be >= 1, got {v}"
        ))
        .into());
    }
    Ok(u32::try_from(v).map_err(|_| Error::Value(format!("num_stages is too large: {v}")))?)
}

fn total_steps_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    let v = int_arg(obj, "total_steps")?;
    if v < 1 {
        return Err(Error::Value(format!(
            "invalid argument: total_steps must be in 1..=2^53, got {v}"
        ))
        .into());
    }
    Ok(u64::try_from(v)
        .map_err(|_| Error::Value(format!("total_steps must be in 1..=2^53, got {v}")))?)
}

fn step_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    u64_arg(obj, "step")
}

fn build_schedule(
    sigma_start: &Bound<'_, PyAny>,
    sigma_end: &Bound<'_, PyAny>,
    num_stages: &Bound<'_, PyAny>,
    total_steps: &Bound<'_, PyAny>,
    decay: &str,
    zero_first_stage: bool,
    enabled: bool,
) -> PyResult<SigmaSchedule> {
    let decay: Decay = decay.parse().map_err(Error::Core)?;
    Ok(SigmaSchedule::new(
        float_arg(sigma_start, "sigma_start")?,
        float_arg(sigma_end, "sigma_end")?,
        num_stages_arg(num_stages)?,
        total_steps_arg(total_steps)?,
        decay,
        zero_first_stage,
        enabled,
    )
    .map_err(Error::Core)?)
}

/// A mapping (dict, omegaconf DictConfig, ...) as a dict of str keys.
fn as_dict<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyDict>> {
    if let Ok(d) = obj.cast::<PyDict>() {
        return Ok(d.clone());
    }
    let py = obj.py();
    let dict = py
        .import("builtins")?
        .getattr("dict")?
        .call1((obj,))
        .map_err(|_| {
            Error::Type(format!(
                "{what}: expected a mapping, got {}",
                type_name(obj)
            ))
        })?;
    Ok(dict.cast_into::<PyDict>()?)
}

fn bool_item(d: &Bound<'_, PyDict>, key: &str, default: bool) -> PyResult<bool> {
    match d.get_item(key)? {
        None => Ok(default),
        Some(v) if v.is_none() => Ok(default),
        Some(v) => Ok(v
            .extract::<bool>()
            .map_err(|_| Error::Type(format!("{key}: expected a bool, got {}", type_name(&v))))?),
    }
}

impl PySigmaScheduler {
    /// Build from a mapping with the schedule keys; `extra_ok` keys are ignored, any other
    /// key is an error (a typo must not silently fall back to a default).
    fn from_mapping(
        d: &Bound<'_, PyDict>,
        total_steps: Option<&Bound<'_, PyAny>>,
        extra_ok: &[&str],
        what: &str,
    ) -> PyResult<SigmaSchedule> {
        for key in d.keys() {
            let k: String = key
                .extract()
                .map_err(|_| Error::Type(format!("{what}: keys must be strings")))?;
            if !SCHEDULE_KEYS.contains(&k.as_str()) && !extra_ok.contains(&k.as_str()) {
                let mut known: Vec<&str> = SCHEDULE_KEYS.to_vec();
                known.extend_from_slice(extra_ok);
                return Err(Error::Value(format!(
                    "{what}: unknown key {k:?}; known keys: {}",
                    known.join(", ")
                ))
                .into());
            }
        }
        let enabled = bool_item(d, "enabled", true)?;
        let zero_first_stage = bool_item(d, "zero_first_stage", true)?;
        let decay: String = match d.get_item("decay")? {
            None => "exponential".into(),
            Some(v) => v
                .extract()
                .map_err(|_| Error::Type("decay: expected a string".into()))?,
        };
        let py = d.py();
        fn get<'py>(
            d: &Bound<'py, PyDict>,
            key: &str,
            enabled: bool,
            disabled_default: Bound<'py, PyAny>,
            what: &str,
        ) -> PyResult<Bound<'py, PyAny>> {
            match d.get_item(key)? {
                Some(v) if !v.is_none() => Ok(v),
                _ if !enabled => Ok(disabled_default),
                _ => Err(Error::Value(format!(
                    "{what}: missing key {key:?} (needed when enabled is true)"
                ))
                .into()),
            }
        }
        let zero = PyFloat::new(py, 0.0).into_any();
        let sigma_start = get(d, "sigma_start", enabled, zero.clone(), what)?;
        let sigma_end = get(d, "sigma_end", enabled, zero, what)?;
        let one = 1i64.into_pyobject(py)?.into_any();
        let num_stages = get(d, "num_stages", enabled, one, what)?;
        let total_steps = match total_steps {
            Some(t) => t.clone(),
            None => d
                .get_item("total_steps")?
                .ok_or_else(|| Error::Value(format!("{what}: missing key \"total_steps\"")))?,
        };
        build_schedule(
            &sigma_start,
            &sigma_end,
            &num_stages,
            &total_steps,
            &decay,
            zero_first_stage,
            enabled,
        )
    }

    fn py_float_repr(py: Python<'_>, v: f64) -> String {
        PyFloat::new(py, v)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| v.to_string())
    }
}

#[pymethods]
impl PySigmaScheduler {
    #[new]
    #[pyo3(signature = (sigma_start, sigma_end, num_stages, total_steps, decay="exponential", zero_first_stage=true, enabled=true))]
    fn new(
        sigma_start: &Bound<'_, PyAny>,
        sigma_end: &Bound<'_, PyAny>,
        num_stages: &Bound<'_, PyAny>,
        total_steps: &Bound<'_, PyAny>,
        decay: &str,
        zero_first_stage: bool,
        enabled: bool,
    ) -> PyResult<Self> {
        Ok(Self {
            inner: build_schedule(
                sigma_start,
                sigma_end,
                num_stages,
                total_steps,
                decay,
                zero_first_stage,
                enabled,
            )?,
        })
    }

    /// Build from the plan's config block `{enabled, sigma_start, sigma_end, num_stages,
    /// layer_types}` (optionally `decay`, `zero_first_stage`); `AqnNoise` keys are ignored,
    /// unknown keys are an error. `enabled: false` gives sigma 0 at every step.
    #[classmethod]
    fn from_config(
        _cls: &Bound<'_, PyType>,
        config: &Bound<'_, PyAny>,
        total_steps: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let d = as_dict(config, "noise_injection config")?;
        Ok(Self {
            inner: Self::from_mapping(
                &d,
                Some(total_steps),
                &NOISE_KEYS,
                "noise_injection config",
            )?,
        })
    }

    /// Sigma at `step` (an optimizer step, >= 0; steps past total_steps stay in the last stage).
    fn sigma(&self, step: &Bound<'_, PyAny>) -> PyResult<f64> {
        Ok(self.inner.sigma(step_arg(step)?))
    }

    /// Stage of `step`, in `0..num_stages` (stage 0 is noiseless with zero_first_stage).
    fn stage(&self, step: &Bound<'_, PyAny>) -> PyResult<u32> {
        Ok(self.inner.stage(step_arg(step)?))
    }

    /// Sigma at every step `0..=total_steps` (`total_steps + 1` values).
    fn schedule(&self) -> Vec<f64> {
        self.inner.schedule()
    }

    /// The noisy stages' sigmas (QeRL's `sigma_trend`).
    #[getter]
    fn trend(&self) -> Vec<f64> {
        self.inner.trend().to_vec()
    }

    #[getter]
    fn sigma_start(&self) -> f64 {
        self.inner.sigma_start()
    }
    #[getter]
    fn sigma_end(&self) -> f64 {
        self.inner.sigma_end()
    }
    #[getter]
    fn num_stages(&self) -> u32 {
        self.inner.num_stages()
    }
    #[getter]
    fn total_steps(&self) -> u64 {
        self.inner.total_steps()
    }
    #[getter]
    fn decay(&self) -> &'static str {
        self.inner.decay().name()
    }
    #[getter]
    fn zero_first_stage(&self) -> bool {
        self.inner.zero_first_stage()
    }
    #[getter]
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    /// The whole configuration as plain Python values (floats round-trip exactly).
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", STATE_VERSION)?;
        d.set_item("sigma_start", self.inner.sigma_start())?;
        d.set_item("sigma_end", self.inner.sigma_end())?;
        d.set_item("num_stages", self.inner.num_stages())?;
        d.set_item("total_steps", self.inner.total_steps())?;
        d.set_item("decay", self.inner.decay().name())?;
        d.set_item("zero_first_stage", self.inner.zero_first_stage())?;
        d.set_item("enabled", self.inner.enabled())?;
        Ok(d)
    }

    /// Replace the configuration with a `state_dict()`'s (validated; unknown keys are errors).
    fn load_state_dict(&mut self, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = as_dict(state, "state_dict")?;
        if let Some(v) = d.get_item("version")? {
            let v: u32 = v
                .extract()
                .map_err(|_| Error::Value("state_dict: version must be an integer".into()))?;
            if v != STATE_VERSION {
                return Err(Error::Value(format!(
                    "state_dict: unsupported version {v}; this build reads version {STATE_VERSION}"
                ))
                .into());
            }
        }
        self.inner = Self::from_mapping(&d, None, &["version"], "state_dict")?;
        Ok(())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let s = &self.inner;
        let mut r = format!(
            "SigmaScheduler(sigma_start={}, sigma_end={}, num_stages={}, total_steps={}, decay='{}', zero_first_stage={}",
            Self::py_float_repr(py, s.sigma_start()),
            Self::py_float_repr(py, s.sigma_end()),
            s.num_stages(),
            s.total_steps(),
            s.decay().name(),
            if s.zero_first_stage() { "True" } else { "False" },
        );
        if !s.enabled() {
            r.push_str(", enabled=False");
        }
        r.push(')');
        r
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PySigmaScheduler>()
            .map(|o| o.borrow().inner == self.inner)
            .unwrap_or(false)
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyType>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let me = slf.borrow();
        let s = &me.inner;
        let args = (
            s.sigma_start(),
            s.sigma_end(),
            s.num_stages(),
            s.total_steps(),
            s.decay().name(),
            s.zero_first_stage(),
            s.enabled(),
        )
            .into_pyobject(py)?;
        Ok((slf.get_type(), args))
    }
}
