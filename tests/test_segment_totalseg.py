"""TotalSegmentator extra: availability is checked up front, with messages saying what to do."""

from __future__ import annotations

import importlib.util

import pytest


def test_weights_dir_follows_totalsegmentator_env(monkeypatch, tmp_path):
    from napari_medfm.models.segmenters import totalseg

    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts"))
    assert totalseg.weights_dir() == tmp_path / "ts" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "w"))
    assert totalseg.weights_dir() == tmp_path / "w"


def test_unavailable_extra_or_weights_is_a_clear_error(monkeypatch, tmp_path):
    from napari_medfm.errors import WeightsError
    from napari_medfm.models.segmenters import totalseg
    from napari_medfm.tasks.segment import load_segmenter

    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "empty"))
    ok, msg = totalseg.availability()
    assert not ok
    if importlib.util.find_spec("totalsegmentator") is None:
        assert "pip install napari-medfm[totalsegmentator]" in msg
    else:  # package present, weights absent: never downloaded for the user
        assert "totalseg_download_weights" in msg and "Dataset291" in msg
    with pytest.raises(WeightsError, match="TotalSegmentator"):
        load_segmenter("totalsegmentator")


def test_spec_is_registered_as_optional_117_structures():
    from napari_medfm.runtime.registry import get_spec

    spec = get_spec("totalsegmentator")
    assert "segment" in spec.tasks and spec.extras["n_structures"] == 117
    assert spec.extras["optional_extra"] == "totalsegmentator"
    hu = get_spec("hu-basic")
    assert hu.needs_weights is False and hu.extras["labels"][5] == "air"
