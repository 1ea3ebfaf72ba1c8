"""Shared constants and input generators for the numerics tests (the fixtures over them are in
``conftest.py``).

Test files in any folder under ``tests/`` import from here by name (``from helpers import
gaussian``): pyproject's ``[tool.pytest.ini_options] pythonpath`` puts ``tests/`` on
``sys.path``. Only generators live here; assertions live in the test files. Everything is
deterministic: every generator takes an explicit ``torch.Generator`` or seed.

``load_reference()`` returns the pure-torch reference (``aqn_rs.reference``). It is importable
without the compiled extension: if ``import aqn_rs`` fails (extension not built), the module is
loaded from its file, so the peer and error-table tests can run on a bare checkout.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import types

import pytest

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]

# Shapes used across the exact tests (docs/reference/FORMATS.md §Tensor layout: arbitrary K,
# short tail).
ODD_KS = (1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000)
LEADING_SHAPES = ((), (3,), (2, 3))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# E2M1 ties (FORMATS.md §E2M1): each is halfway between two grid points.
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def load_reference() -> types.ModuleType:
    """The reference module, through the package if it imports, else from its file."""
    try:
        from aqn_rs import reference  # noqa: PLC0415

        return reference
    except ImportError:
        path = REPO / "python" / "aqn_rs" / "reference.py"
        spec = importlib.util.spec_from_file_location("aqn_rs_reference_standalone", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


# ---------------------------------------------------------------------------------------------
# Generators (all return f32 tensors; callers cast to the dtype under test)
# ---------------------------------------------------------------------------------------------


def gaussian(shape, g):
    return torch.randn(shape, generator=g)


def uniform(shape, g):
    return torch.rand(shape, generator=g) * 2 - 1


def laplace(shape, g):
    # inverse CDF of Laplace(0, 1) from a uniform in (-1/2, 1/2)
    u = torch.rand(shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def student_t(shape, g, df: float = 3.0):
    # Student-t = N(0,1) / sqrt(chi2_df / df), chi2 from a sum of squared normals (df integer)
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((int(df), *shape), generator=g) ** 2).sum(0)
    return z / torch.sqrt(chi2 / df)


def log_uniform(shape, g, lo: float = 1e-30, hi: float = 1e30):
    """Random sign times magnitudes log-uniform over [lo, hi]."""
    e = torch.rand(shape, generator=g) * (math.log(hi) - math.log(lo)) + math.log(lo)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return sign * torch.exp(e.double()).float()


def mixed_blocks(shape, g, block: int = 16, lo_pow2: int = -60, hi_pow2: int = 60):
    """Gaussian values whose magnitude jumps by a random power of two every ``block``
    elements along the last dimension (so neighbouring blocks have unrelated scales)."""
    x = torch.randn(shape, generator=g)
    k = shape[-1] if len(shape) else 1
    nb = -(-k // block)
    pw = torch.randint(lo_pow2, hi_pow2 + 1, (*shape[:-1], nb), generator=g)
    pw = pw.repeat_interleave(block, dim=-1)[..., :k]
    return x * torch.exp2(pw.float())


RANDOM_GENERATORS = {
    "gaussian": gaussian,
    "uniform": uniform,
    "laplace": laplace,
    "student_t3": student_t,
    "log_uniform": log_uniform,
    "mixed_blocks": mixed_blocks,
}


def nextafter(x, direction: float):
    """Elementwise nextafter of an f32 tensor towards +inf (direction > 0) or -inf."""
    return torch.nextafter(x, torch.full_like(x, math.copysign(math.inf, direction)))


def tie_rows(k: int = 32, powers=range(-20, 21, 5)):
    """Rows of ``k`` (<= 32) f32 values that land exactly on E2M1 ties, grid points and
    +-6 after block scaling, plus their f32 neighbours.

    Each row holds one block anchor (``4 * 2**p``: every MX scale mode then picks ``e = p``;
    ``6 * 2**p``: floor picks ``e = p``) and then ties, their nextafter neighbours and grid
    values, all times ``2**p`` with alternating signs. The same rows also land on NVFP4 ties
    when ``gs = 1`` (e.g. ``amax = inf``) and the block scale ``b / 6`` is a power of two.
    """
    rows = []
    for p in powers:
        s = 2.0**p
        for anchor in (4.0, 6.0):
            vals = [anchor] + list(E2M1_TIES) + list(E2M1_GRID[1:])
            t = torch.tensor(vals, dtype=torch.float32) * s
            up = nextafter(t[1:8], 1.0)
            down = nextafter(t[1:8], -1.0)
            row = torch.cat([t, up, down])
            sign = torch.tensor([1.0, -1.0]).repeat(len(row))[: len(row)]
            sign[0] = 1.0
            row = (row * sign)[:k]
            if len(row) < k:
                row = torch.cat([row, torch.zeros(k - len(row))])
            rows.append(row)
    return torch.stack(rows)


def special_rows(k: int = 32):
    """Rows of ``k`` f32 values exercising zeros, signed zeros, subnormals of f32/bf16/f16,
    values near the f32/f16/bf16 maxima, NaN and infinities (one kind per row)."""
    f32_min_sub = 2.0**-149
    f16_min_sub = 2.0**-24
    bf16_min_sub = 2.0**-133
    ar = torch.arange(1, k + 1, dtype=torch.float32)
    rows = [
        torch.zeros(k),
        -torch.zeros(k),
        torch.where(ar % 2 == 0, torch.zeros(k), -torch.zeros(k)),
        ar * f32_min_sub,  # f32 subnormals
        (ar * 1000.0) * f32_min_sub * torch.tensor([-1.0, 1.0]).repeat(k)[:k],
        ar * bf16_min_sub,  # bf16 subnormals
        ar * f16_min_sub,  # f16 subnormals
        ar * 2.0**-126,  # around the smallest normal f32
        torch.full((k,), 3.4028234663852886e38) / ar,  # near f32 max
        torch.full((k,), 65504.0) / ar,  # near f16 max
        torch.full((k,), 3.3895313892515355e38) * torch.tensor([1.0, -1.0]).repeat(k)[:k],
        torch.where(ar == 3, torch.tensor(math.nan), ar),
        torch.where(ar == k, torch.tensor(math.inf), -ar),
        torch.where(ar == 1, torch.tensor(-math.inf), ar * 1e-3),
        torch.full((k,), math.nan),
        torch.full((k,), math.inf),
        torch.where(ar % 2 == 0, torch.tensor(math.inf), torch.tensor(-math.inf)),
        nextafter(torch.full((k,), 6.0), 1.0) * ar,
        torch.full((k,), 1e-45),
    ]
    return torch.stack(rows)


def cast_like_input(x, dtype):
    """Cast an f32 tensor to the dtype under test (RNE, overflow to inf)."""
    return x.to(dtype)
