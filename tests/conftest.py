"""Shared fixtures for the tests, over the constants and generators in ``helpers.py``.

Only fixtures live here; the generators are in ``helpers.py`` (tests import those by name, never
from this file) and assertions live in the test files. ``ref`` is the pure-torch reference
(``aqn_rs.reference``), loaded from its file when the compiled extension is not built.
"""

from __future__ import annotations

import types

import pytest

from helpers import (
    DTYPES,
    E2M1_GRID,
    E2M1_TIES,
    LEADING_SHAPES,
    ODD_KS,
    RANDOM_GENERATORS,
    gaussian,
    laplace,
    load_reference,
    log_uniform,
    mixed_blocks,
    nextafter,
    special_rows,
    student_t,
    tie_rows,
    uniform,
)


@pytest.fixture(scope="session")
def ref() -> types.ModuleType:
    return load_reference()


@pytest.fixture(scope="session")
def gen():
    """Namespace of the generators in helpers.py, for tests that prefer a fixture."""
    return types.SimpleNamespace(
        gaussian=gaussian,
        uniform=uniform,
        laplace=laplace,
        student_t=student_t,
        log_uniform=log_uniform,
        mixed_blocks=mixed_blocks,
        random=RANDOM_GENERATORS,
        nextafter=nextafter,
        tie_rows=tie_rows,
        special_rows=special_rows,
        odd_ks=ODD_KS,
        leading_shapes=LEADING_SHAPES,
        dtypes=DTYPES,
        ties=E2M1_TIES,
        grid=E2M1_GRID,
    )
