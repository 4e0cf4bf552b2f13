"""Shared fixtures. Real files come from ``$MEDFM_TEST_DATA`` or ``../shared/data/real``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_medfm.runtime.paths import test_data_dir
from napari_medfm.widgets import block_triton_in_gui

# Triton's LLVM and Mesa's (llvmpipe) GL in one process segfault: the GUI never needs Triton.
block_triton_in_gui()

REAL = test_data_dir()


def real_path(rel: str) -> Path:
    """Path of a file of the real corpus, skipping the test (with the reason) when absent."""
    p = REAL / rel
    if not p.exists():
        pytest.skip(f"real test corpus file missing: {p} (set $MEDFM_TEST_DATA to the corpus folder)")
    return p


@pytest.fixture
def real_data() -> Path:
    """Root of the real medical-image corpus (skips when absent)."""
    if not REAL.is_dir():
        pytest.skip(f"real test corpus not found at {REAL} (set $MEDFM_TEST_DATA)")
    return REAL


@pytest.fixture(autouse=True)
def _isolated_medfm_home(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: every test gets its own $MEDFM_HOME."""
    home = tmp_path_factory.mktemp("medfm_home")
    monkeypatch.setenv("MEDFM_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield home


def pytest_configure(config):
    os.environ.setdefault("NAPARI_ASYNC", "0")
