//! Python binding of the AQN side of aqn-core: `ModuleSelector`, `SigmaScheduler` and the
//! counter-based Gaussian noise. Converts arguments and errors only (STYLE.md 1); the rules
//! live in `aqn_core::{selector, schedule, noise}` and `docs/NOISE.md`.
//!
//! Arguments coming from YAML/hydra are taken leniently where that is unambiguous: a single
//! string where a list of strings is expected is one item (never its characters), and a
//! numeric string (`"5e-4"`, which PyYAML leaves as a string) is accepted for a float.

use aqn_core::noise;
use aqn_core::schedule::{Decay, SigmaSchedule};
use aqn_core::selector::{self, LayerType, ModuleSelector as CoreSelector, DEFAULT_EXCLUDE};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyString, PyTuple, PyType};

use crate::error::Error;

/// Layer type names, in canonical order.
const LAYER_TYPES: [&str; 3] = ["linear", "rmsnorm", "embedding"];
/// Decay names.
const DECAYS: [&str; 4] = ["exponential", "linear", "cosine", "constant"];

/// A list of strings from `None` (-> `None`), a `str` (-> one item) or any iterable of `str`.
fn opt_strings(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Vec<String>>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Some(vec![s.to_cow()?.into_owned()]));
    }
    let iter = obj.try_iter().map_err(|_| {
        Error::Type(format!(
            "{what}: expected a string or a list of strings, got {}",
            type_name(obj)
        ))
    })?;
    let mut out = Vec::new();
    for item in iter {
        let item = item?;
        let s = item.cast::<PyString>().map_err(|_| {
            Error::Type(format!(
                "{what}: expected strings, got an item of type {}",
                type_name(&item)
            ))
        })?;
        out.push(s.to_cow()?.into_owned());
    }
    Ok(Some(out))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A number from a Python object: `extract` for numbers, `str::parse` for a numeric string,
/// never a bool; errors say "expected {kind}".
fn number_arg<T: std::str::FromStr>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    kind: &str,
    extract: impl FnOnce(&Bound<'_, PyAny>) -> Option<T>,
) -> PyResult<T> {
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(Error::Type(format!("{what}: expected {kind}, got a bool")).into());
    }
    if let Some(v) = extract(obj) {
        return Ok(v);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        let s = s.to_cow()?;
        return Ok(s.trim().parse::<T>().map_err(|_| {
            Error::Value(format!("{what}: expected {kind}, got the string {s:?}"))
        })?);
    }
    Err(Error::Type(format!("{what}: expected {kind}, got {}", type_name(obj))).into())
}

/// A float from a Python number or a numeric string.
fn float_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    number_arg(obj, what, "a number", |o| o.extract::<f64>().ok())
}

/// An integer (Python int or anything with `__index__`, or a string of digits).
fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i128> {
    number_arg(obj, what, "an integer", |o| o.extract::<i128>().ok())
}

/// A u64 step, seed or offset; negative or too large values are a ValueError.
fn u64_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    let v = int_arg(obj, what)?;
    Ok(u64::try_from(v)
        .map_err(|_| Error::Value(format!("{what} must be an integer in [0, 2**64), got {v}")))?)
}

// -------------------------------------------------------------------------------------------
// ModuleSelector
// -------------------------------------------------------------------------------------------

/// Decides which modules are quantized or noised, from qualified names and class names.
#[pyclass(module = "aqn_rs._aqn_rs", name = "ModuleSelector", frozen)]
pub struct PyModuleSelector {
    inner: CoreSelector,
    include: Option<Vec<String>>,
    exclude: Vec<String>,
    layer_types: Vec<String>,
}

impl PyModuleSelector {
    fn build(
        include: Option<Vec<String>>,
        exclude: Option<Vec<String>>,
        layer_types: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let exclude = exclude.unwrap_or_else(|| DEFAULT_EXCLUDE.map(String::from).to_vec());
        let layer_types = layer_types.unwrap_or_else(|| vec!["linear".into()]);
        let inner =
            CoreSelector::new(include.as_deref(), &exclude, &layer_types).map_err(Error::Core)?;
        let layer_types = inner
            .layer_types()
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        Ok(Self {
            inner,
            include,
            exclude,
            layer_types,
        })
    }
}

#[pymethods]
impl PyModuleSelector {
    #[new]
    #[pyo3(signature = (include=None, exclude=None, layer_types=None))]
    #[pyo3(
        text_signature = "(include=None, exclude=('lm_head', 'embed_tokens'), layer_types=('linear',))"
    )]
    fn new(
        include: Option<&Bound<'_, PyAny>>,
        exclude: Option<&Bound<'_, PyAny>>,
        layer_types: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Self::build(
            opt_strings(include, "include")?,
            opt_strings(exclude, "exclude")?,
            opt_strings(layer_types, "layer_types")?,
        )
    }

    /// `(selected, rule)` for one module; `rule` is `type:<class>`, `exclude:<pattern>`,
    /// `include:<pattern>`, `not-included` or `default`.
    fn decide(&self, name: &str, class_name: &str) -> (bool, String) {
        let (selected, rule) = self.inner.decide(name, class_name);
        (selected, rule.to_string())
    }

    /// The names of the selected modules among `(name, class_name)` pairs, in order.
    fn select(&self, named: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let mut out = Vec::new();
        for item in named.try_iter()? {
            let (name, class_name): (String, String) = item?.extract().map_err(|_| {
                Error::Type("select: expected an iterable of (name, class_name) pairs".into())
            })?;
            if self.inner.decide(&name, &class_name).0 {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// The layer type (`"linear"`, `"rmsnorm"`, `"embedding"`) of a class name, or `None`.
    #[staticmethod]
    fn layer_type(class_name: &str) -> Option<&'static str> {
        LayerType::of_class(class_name).map(LayerType::name)
    }

    /// A qualified name without torch's wrapper components (`_fsdp_wrapped_module`,
    /// `_checkpoint_wrapped_module`, `_orig_mod`).
    #[staticmethod]
    fn canonical_name(name: &str) -> String {
        selector::canonical_name(name)
    }

    #[getter]
    fn include<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        self.include
            .as_ref()
            .map(|v| PyTuple::new(py, v))
            .transpose()
    }

    #[getter]
    fn exclude<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.exclude)
    }

    #[getter]
    fn layer_types<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.layer_types)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let list = |v: &[String]| {
            let items: Vec<String> = v
                .iter()
                .map(|s| {
                    PyString::new(py, s)
                        .repr()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|_| format!("{s:?}"))
                })
                .collect();
            format!(
                "({}{})",
                items.join(", "),
                if v.len() == 1 { "," } else { "" }
            )
        };
        format!(
            "ModuleSelector(include={}, exclude={}, layer_types={})",
            self.include
                .as_deref()
                .map(list)
                .unwrap_or_else(|| "None".into()),
            list(&self.exclude),
            list(&self.layer_types)
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyModuleSelector>()
            .map(|o| o.get().inner == self.inner)
            .unwrap_or(false)
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyType>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let me = slf.get();
        let args = (
            me.include
                .as_ref()
                .map(|v| PyTuple::new(py, v))
                .transpose()?,
            PyTuple::new(py, &me.exclude)?,
            PyTuple::new(py, &me.layer_types)?,
        )
            .into_pyobject(py)?;
        Ok((slf.get_type(), args))
    }
}

// -------------------------------------------------------------------------------------------
// SigmaScheduler
// -------------------------------------------------------------------------------------------

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

#[allow(clippy::too_many_arguments)]
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

// -------------------------------------------------------------------------------------------
// Noise
// -------------------------------------------------------------------------------------------

/// Fill a C-contiguous float32 array with elements `offset .. offset + out.size` of the noise
/// tensor of `(seed, step, name)`, each `z * float32(sigma)` (docs/NOISE.md).
#[pyfunction]
#[pyo3(signature = (out, seed, step, name, sigma=1.0, offset=None))]
fn noise_fill_f32(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    seed: &Bound<'_, PyAny>,
    step: &Bound<'_, PyAny>,
    name: &str,
    sigma: f64,
    offset: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let seed = u64_arg(seed, "seed")?;
    let step = u64_arg(step, "step")?;
    let offset = match offset {
        Some(o) => u64_arg(o, "offset")?,
        None => 0,
    };
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(
            Error::Value(format!("sigma must be a finite number >= 0, got {sigma}")).into(),
        );
    }
    let key = noise::noise_key(seed, name);
    let mut arr = crate::readwrite::<f32>(out, "out", "float32")?;
    let os = crate::as_slice_mut(&mut arr)?;
    py.detach(|| noise::fill_gaussian(key, step, offset, sigma as f32, os))
        .map_err(Error::Core)?;
    Ok(())
}

/// The 64-bit Philox key of `(seed, name)`: FNV-1a 64 of the seed's 8 little-endian bytes
/// followed by the name's UTF-8 bytes.
#[pyfunction]
fn noise_key(seed: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    Ok(noise::noise_key(u64_arg(seed, "seed")?, name))
}

/// Philox4x32-10 of a 4-word counter under a 2-word key (Random123's `philox4x32`).
#[pyfunction]
fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    noise::philox4x32_10(counter, key)
}

/// 64-bit FNV-1a of a byte string.
#[pyfunction]
fn fnv1a64(data: &[u8]) -> u64 {
    noise::fnv1a64(data)
}

/// Register the AQN classes and functions on the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModuleSelector>()?;
    m.add_class::<PySigmaScheduler>()?;
    m.add("LAYER_TYPES", PyTuple::new(m.py(), LAYER_TYPES)?)?;
    m.add("DECAYS", PyTuple::new(m.py(), DECAYS)?)?;
    m.add_function(wrap_pyfunction!(noise_fill_f32, m)?)?;
    m.add_function(wrap_pyfunction!(noise_key, m)?)?;
    m.add_function(wrap_pyfunction!(philox4x32_10, m)?)?;
    m.add_function(wrap_pyfunction!(fnv1a64, m)?)?;
    Ok(())
}
