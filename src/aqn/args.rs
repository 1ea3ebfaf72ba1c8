//! Lenient conversion of the AQN arguments that come from YAML/hydra configs, where that is
//! unambiguous: a single string where a list of strings is expected is one item (never its
//! characters), and a numeric string (`"5e-4"`, which PyYAML leaves as a string) is accepted
//! for a number. A bool is never a number.

use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::error::Error;

/// A list of strings from `None` (-> `None`), a `str` (-> one item) or any iterable of `str`.
pub fn opt_strings(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Vec<String>>> {
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

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
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
pub fn float_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    number_arg(obj, what, "a number", |o| o.extract::<f64>().ok())
}

/// An integer (Python int or anything with `__index__`, or a string of digits).
pub fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i128> {
    number_arg(obj, what, "an integer", |o| o.extract::<i128>().ok())
}

/// A u64 step, seed or offset; negative or too large values are a ValueError.
pub fn u64_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    let v = int_arg(obj, what)?;
    Ok(u64::try_from(v)
        .map_err(|_| Error::Value(format!("{what} must be an integer in [0, 2**64), got {v}")))?)
}
