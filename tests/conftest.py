"""Shared fixtures. Real files come from ``$MEDFM_TEST_DATA`` or ``../shared/data/real``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_medfm.widgets import block_triton_in_gui

# The test process runs napari viewers: Triton's LLVM and Mesa's (llvmpipe) GL in one process
# segfault, and the GUI never needs Triton (set here, for this process only: importing the
# widgets does not do it).
block_triton_in_gui()


def test_data_dir() -> Path:
    """Real test corpus: ``$MEDFM_TEST_DATA`` or ``../shared/data/real`` beside the checkout."""
    env = os.environ.get("MEDFM_TEST_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


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
    """Never touch the user's cache or settings: every test gets its own $MEDFM_HOME/$MEDFM_CONFIG."""
    home = tmp_path_factory.mktemp("medfm_home")
    monkeypatch.setenv("MEDFM_HOME", str(home))
    monkeypatch.setenv("MEDFM_CONFIG", str(home / "config"))  # trusted bundles etc.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield home


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): small models run faster and the
    arithmetic is the same as in the 1-thread subprocesses some tests compare against. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    os.environ.setdefault("NAPARI_ASYNC", "0")
