"""Every error the package raises on purpose derives from `aqn_rs.AqnError` and keeps the
builtin base it had, and each stays importable from where it was defined before."""

from __future__ import annotations

import pytest

import aqn_rs
from aqn_rs import errors


def _public_errors():
    from aqn_rs import scan
    from aqn_rs.experiments import ExperimentError
    from aqn_rs.experiments.errors import ExperimentError as ExperimentError2
    from aqn_rs.integrations.verl import VerlPluginError

    assert ExperimentError is ExperimentError2 is errors.ExperimentError
    assert scan.ScanError is errors.ScanError and VerlPluginError is errors.VerlPluginError
    return {
        "ScanError": (scan.ScanError, ValueError),
        "ExperimentError": (ExperimentError, Exception),
        "VerlPluginError": (VerlPluginError, RuntimeError),
    }


@pytest.mark.parametrize("name", ["ScanError", "ExperimentError", "VerlPluginError"])
def test_errors_derive_from_the_root_and_keep_their_base(name):
    cls, base = _public_errors()[name]
    assert issubclass(cls, aqn_rs.AqnError) and issubclass(cls, base)
    with pytest.raises(aqn_rs.AqnError):
        raise cls("x")


def test_the_root_is_the_cores():
    assert aqn_rs.AqnError is errors.AqnError is aqn_rs._aqn_rs.AqnError


def test_every_error_class_in_the_package_has_the_root():
    # Any Exception subclass defined in an aqn_rs module (not re-exported from elsewhere).
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.walk_packages(aqn_rs.__path__, "aqn_rs."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__.startswith("aqn_rs"):
                found.append(obj)
    assert found and all(issubclass(c, aqn_rs.AqnError) for c in found), found


def test_raised_errors_are_aqn_errors(tmp_path):
    from aqn_rs import scan
    from aqn_rs.experiments import presets
    from aqn_rs.integrations import verl

    with pytest.raises(aqn_rs.AqnError):
        scan.resolve_model(tmp_path / "missing")
    with pytest.raises(aqn_rs.AqnError):
        presets.load_preset("no-such-preset")
    with pytest.raises(aqn_rs.AqnError):
        verl.parse_config({"format": "fp3"}, None, None)
