"""The package's import rule, checked on the source (`ast`, nothing is imported):

    constants, errors, models, _plot, _aqn_rs          (bottom floor)
      -> reference, selection, quantizers, _cuda, aqn  (the formats, the selector, the noise)
      -> ops, hooks                                    (the fake-quant op and its STE;
                                                          quantize_model, attach_noise)
      -> checkpoint, export, scan, integrations,       (what is built on the hooks: the one
         experiments                                    checkpoint reader, the export, ...)
      -> cli, experiments.cli, the package root        (the command line, its old
                                                          `python -m` path, the facade)

A module may import from its own floor or a lower one, never from a higher one, and the
imports between the package's modules form no cycle: so each floor can be read, tested and
changed knowing only the floors below it.

An import inside a function hides a dependency from the module's header. It is allowed only
where it buys something: for an optional third-party integration (verl, vLLM, transformers,
trl, ray, matplotlib, ...) that may be absent, and for a package module that imports torch or
such an integration when it loads, from a module that does not (so `import aqn_rs`, the
scanner's CLI and the verl plugin's config parsing stay light). A function-level import of a
light package module (one that imports neither when it loads) is an error: it buys nothing,
and it is how import cycles get hidden.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[2] / "python" / "aqn_rs"

FLOORS: Dict[str, int] = {
    "_aqn_rs": 0, "constants": 0, "errors": 0, "models": 0, "_plot": 0,
    "reference": 1, "selection": 1, "quantizers": 1, "_cuda": 1, "aqn": 1,
    "ops": 2, "hooks": 2,
    "checkpoint": 3, "export": 3, "scan": 3, "integrations": 3, "experiments": 3,
    "experiments.cli": 4, "cli": 4, "__main__": 4, "": 4,
}

# Third-party packages the package may import at the top of a module without making it heavy:
# its one hard dependency.
LIGHT_THIRD_PARTY = {"numpy"}


def floor_of(mod: str) -> int:
    """The floor of a module (dotted, without the `aqn_rs.` prefix): its own entry or that of
    the nearest package above it."""
    parts = mod.split(".") if mod else [""]
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in FLOORS:
            return FLOORS[key]
    raise AssertionError(f"aqn_rs.{mod} has no floor: add it to FLOORS in tests/unit/test_layering.py")


def _modules() -> Dict[str, Path]:
    mods = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()
KNOWN = set(MODULES) | {"_aqn_rs"}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


class Import:
    def __init__(self, target: str, package: bool, in_function: bool, line: int) -> None:
        self.target, self.package, self.in_function, self.line = target, package, in_function, line


def _imports(mod: str, path: Path) -> List[Import]:
    """Every import of `mod`: package modules by dotted name (no `aqn_rs.` prefix), others by
    their top-level name; whether it sits inside a function."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if mod else []
    if not is_pkg:
        base = base[:-1]
    out: List[Import] = []

    def visit(node: ast.AST, in_fn: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    name = a.name
                    if name == "aqn_rs" or name.startswith("aqn_rs."):
                        out.append(Import(name[len("aqn_rs."):] if "." in name else "", True, in_fn, child.lineno))
                    else:
                        out.append(Import(name.split(".")[0], False, in_fn, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parent = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join(parent + ([child.module] if child.module else []))
                elif child.module == "aqn_rs" or (child.module or "").startswith("aqn_rs."):
                    target = child.module[len("aqn_rs."):] if "." in child.module else ""
                else:
                    out.append(Import((child.module or "").split(".")[0], False, in_fn, child.lineno))
                    continue
                # `from . import x` / `from aqn_rs import x` names a submodule where one exists.
                for a in child.names:
                    sub = f"{target}.{a.name}" if target else a.name
                    out.append(Import(sub if sub in KNOWN else target, True, in_fn, child.lineno))
            visit(child, fn)

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


IMPORTS = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def _heavy() -> Set[str]:
    """Package modules that import torch or an optional third-party package when they load,
    directly or through another package module."""
    stdlib = set(sys.stdlib_module_names)
    heavy = {m for m, imps in IMPORTS.items()
             if any(not i.package and not i.in_function and i.target not in stdlib | LIGHT_THIRD_PARTY
                    and i.target != "__future__" for i in imps)}
    changed = True
    while changed:
        changed = False
        for m, imps in IMPORTS.items():
            if m not in heavy and any(i.package and not i.in_function and i.target in heavy for i in imps):
                heavy.add(m)
                changed = True
    return heavy


HEAVY = _heavy()


def _name(mod: str) -> str:
    return f"aqn_rs.{mod}" if mod else "aqn_rs"


def test_every_module_has_a_floor():
    for mod in MODULES:
        floor_of(mod)


def test_nothing_imports_upward():
    bad = [f"{_name(m)} (floor {floor_of(m)}) imports {_name(i.target)} (floor {floor_of(i.target)}), line {i.line}"
           for m, imps in IMPORTS.items() for i in imps
           if i.package and i.target != m and floor_of(i.target) > floor_of(m)
           # a package's __init__ importing its own submodules is not an upward import
           and not i.target.startswith(m + ".")]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycle() -> Optional[List[str]]:
    graph = {m: sorted({i.target for i in imps if i.package and i.target != m and i.target in MODULES
                        # a module's import of its own package runs that package's __init__ first
                        # anyway; the edge says nothing about the module's own dependencies
                        and not m.startswith(i.target + ".")})
             for m, imps in IMPORTS.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def dfs(m: str) -> Optional[List[str]]:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = dfs(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(_name(m) for m in cycle)


def test_function_level_imports_are_only_for_heavy_modules():
    bad = [f"{_name(m)}:{i.line} imports {_name(i.target)} inside a function (it is torch-free: import it at the top)"
           for m, imps in IMPORTS.items() for i in imps
           if i.package and i.in_function and i.target not in HEAVY and i.target != m]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", ["", "constants", "errors", "models", "_plot", "selection", "quantizers", "_cuda",
                                 "aqn", "checkpoint", "scan", "cli", "cli.scan", "integrations.verl",
                                 "integrations.verl_probe"])
def test_light_modules_stay_light(mod):
    # What `import aqn_rs`, `aqn-rs --help`, the scanner (with the checkpoint reader it imports)
    # and the verl plugin's config parsing load: none of them may pull torch or an optional
    # package in when it is imported.
    assert mod not in HEAVY, f"{_name(mod)} imports torch or an optional package when it loads"
