//! `ModuleSelector`: which modules are quantized or noised, from qualified names and class
//! names. The rules are `aqn_core::selector`'s; this converts arguments and results.

use aqn_core::selector::{self, LayerType, ModuleSelector as CoreSelector, DEFAULT_EXCLUDE};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple, PyType};

use super::args::opt_strings;
use crate::error::Error;

/// Layer type names, in canonical order.
pub const LAYER_TYPES: [&str; 3] = ["linear", "rmsnorm", "embedding"];

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
