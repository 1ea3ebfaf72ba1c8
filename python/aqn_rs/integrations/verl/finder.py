"""Installing the patch points in a process: at once on the verl modules it has imported, and on
the rest through a meta-path finder that patches each module as verl imports it, before anyone
can use it (`_install`, run when the package is imported). `patched_points` says what is done.
"""

from __future__ import annotations

import importlib.abc
import inspect
import os
import sys
from typing import Any, Dict, List

from ...errors import VerlPluginError
from .config import CHECKED_VERL, ENV_MODULES, MIN_VERL, PLUGIN
from .patches import _WORKERS, PATCH_POINTS, PatchPoint, _missing_error, _verl_version, _version_tuple

# Marks a wrapper (and a class extended) as the plugin's, so a second import patches nothing twice.
_MARK = "__aqn_rs_patched__"


_PENDING: Dict[str, List[PatchPoint]] = {}
_APPLIED: List[str] = []


def patched_points() -> List[str]:
    """Qualified names of the verl attributes patched so far in this process."""
    return list(_APPLIED)


def _apply(point: PatchPoint, module: Any) -> None:
    cls = getattr(module, point.cls, None)
    if cls is None:
        if point.optional:
            return
        raise _missing_error(point, "class not found")
    if point.attr is None:
        if point.wrap is not None and not cls.__dict__.get(_MARK):
            point.wrap(cls)
            setattr(cls, _MARK, True)
        _APPLIED.append(point.qualname)
        return
    current = inspect.getattr_static(cls, point.attr, None)
    if current is None:
        if point.optional:
            return
        raise _missing_error(point, "method not found")
    if point.wrap is None or getattr(current, _MARK, False):
        _APPLIED.append(point.qualname)
        return
    if isinstance(current, (staticmethod, classmethod, property)):
        raise _missing_error(point, f"it is a {type(current).__name__}, not a method")
    wrapped = point.wrap(current)
    setattr(wrapped, _MARK, True)
    setattr(cls, point.attr, wrapped)
    _APPLIED.append(point.qualname)


def _run_pending(name: str, module: Any) -> None:
    for point in _PENDING.pop(name, []):
        _apply(point, module)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module before anyone can use it."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec) if hasattr(self._inner, "create_module") else None

    def exec_module(self, module) -> None:
        module.__loader__ = self._inner
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        _run_pending(self._name, module)

    def __getattr__(self, item):
        return getattr(self._inner, item)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


_FINDER = _PatchingFinder()


def _install() -> None:
    """Patch what is imported already; patch the rest when verl imports it."""
    v = _verl_version()
    if v is not None and _version_tuple(v) < MIN_VERL:
        raise VerlPluginError(f"verl {v} is older than 0.8.0, the first release with the engine workers the "
                              f"aqn_rs plugin patches (checked: {', '.join(CHECKED_VERL)})")
    late = []
    for point in PATCH_POINTS:
        mod = sys.modules.get(point.module)
        spec = getattr(mod, "__spec__", None)
        if mod is not None and not getattr(spec, "_initializing", False):
            late.append(point.module)
            _apply(point, mod)
        else:
            _PENDING.setdefault(point.module, []).append(point)
    if _PENDING and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    if _WORKERS in late and PLUGIN not in os.environ.get(ENV_MODULES, "").split(","):
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            raise VerlPluginError(
                f"{PLUGIN} was imported after verl's workers (through external_lib only?): set "
                f"+ray_kwargs.ray_init.runtime_env.env_vars.{ENV_MODULES}={PLUGIN} so the trainer and the vLLM "
                "worker processes import it too"
            )
