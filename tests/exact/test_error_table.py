"""Relative quantization error ||x - q(x)|| / ||x|| on realistic data: the third layer of the
numerics tests (after exact tables and bit-exact comparison with the pure-torch reference).

Prints the table for MXFP4 (floor) and NVFP4 on a 4096x4096 f32 tensor with a fixed seed
(Gaussian, Laplace, Student-t(3)), computed by the package API and checked bit for bit against
the reference, and pins the Gaussian numbers measured with the pure-torch reference on an H100
(MXFP4 11.5%, NVFP4 9.5%, each +-0.5 points). These are the numbers the research plan got
wrong (~21% / ~1%): no E2M1 format reaches 1%.

Run with ``-s`` to see the table.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers import gaussian, laplace, load_reference, student_t  # noqa: E402

R = load_reference()
SHAPE = (4096, 4096)
SEED = 20240611
DISTRIBUTIONS = {"gaussian": gaussian, "laplace": laplace, "student_t3": student_t}
# Measured (H100, pure-torch reference): Gaussian MXFP4 11.5%, NVFP4 9.5%; +-0.5 points.
EXPECTED_GAUSSIAN = {"mxfp4": (11.5, 0.5), "nvfp4": (9.5, 0.5)}


def _rel_err(x, y):
    x64, y64 = x.double(), y.double()
    return float((x64 - y64).norm() / x64.norm())


def _bits_equal(a, b):
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


@pytest.fixture(scope="module")
def table():
    try:
        import aqn_rs
    except ImportError:  # extension not built: the table still comes from the reference
        aqn_rs = None
    rows = {}
    for name, fn in DISTRIBUTIONS.items():
        x = fn(SHAPE, torch.Generator().manual_seed(SEED)).float().contiguous()
        y_mx = R.mxfp4_fake_quant(x, "floor")
        y_nv = R.nvfp4_fake_quant(x)
        if aqn_rs is not None:
            api_mx = aqn_rs.Mxfp4Quantizer(scale_mode="floor").fake_quant(x)
            api_nv = aqn_rs.Nvfp4Quantizer().fake_quant(x)
            assert _bits_equal(api_mx, y_mx), f"{name}: MXFP4 API != reference"
            assert _bits_equal(api_nv, y_nv), f"{name}: NVFP4 API != reference"
        rows[name] = {"mxfp4": 100 * _rel_err(x, y_mx), "nvfp4": 100 * _rel_err(x, y_nv)}
    lines = [
        f"relative error ||x - q(x)|| / ||x||, f32 {SHAPE[0]}x{SHAPE[1]}, seed {SEED}"
        + ("" if aqn_rs is not None else " (reference only: aqn_rs not built)"),
        f"{'distribution':<14}{'MXFP4 floor':>13}{'NVFP4':>9}",
    ]
    for name, r in rows.items():
        lines.append(f"{name:<14}{r['mxfp4']:>12.2f}%{r['nvfp4']:>8.2f}%")
    print("\n" + "\n".join(lines))
    return rows


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gaussian_error_matches_design(table, fmt):
    want, tol = EXPECTED_GAUSSIAN[fmt]
    got = table["gaussian"][fmt]
    assert abs(got - want) <= tol, f"{fmt}: {got:.2f}% vs the measured {want}% +- {tol}"


def test_error_ordering(table):
    # NVFP4 (block 16, E4M3 scales) beats MXFP4 (block 32, power-of-two scales) on every
    # distribution, and neither comes anywhere near the plan's claimed 1%.
    for name, r in table.items():
        assert r["nvfp4"] < r["mxfp4"], name
        assert r["nvfp4"] > 5.0 and r["mxfp4"] > 5.0, name
