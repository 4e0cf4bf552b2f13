"""Opening a whole slide through napari does no eager work (issue 9): the overview level is one
lazy chunk decoded once, on first display; the full-resolution levels are never read at open.
(The time figures are in benchmarks/bench_wsi_open.py, viewer.open table.)"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medfm.io import wsi
from tests.conftest import real_path

TCGA = "pathology/wsi/TCGA-CR-7395-01A-01-TS1_small.svs"  # 2 file levels + scanner thumbnail


def _thumbnail_pixels(path):
    with tifffile.TiffFile(str(path)) as tf:
        s = next(s for s in tf.series if (s.name or "").lower() == "thumbnail")
        return s.asarray()


def test_overview_level_is_one_lazy_chunk_decoded_once():
    path = real_path(TCGA)
    wsi._series_pixels.cache_clear()
    (img,) = wsi.read(path)
    assert img.metadata["thumbnail_level"] == len(img.data) - 1
    assert wsi._series_pixels.cache_info().misses == 0  # nothing decoded at open
    ov = img.data[-1]
    assert ov.numblocks[:2] == (1, 1)
    np.testing.assert_array_equal(np.asarray(ov), _thumbnail_pixels(path))
    np.asarray(ov[::4, ::4])  # e.g. napari's layer thumbnail
    info = wsi._series_pixels.cache_info()
    assert info.misses == 1 and info.hits >= 1
    # a file rewritten in place is a new key (no stale pixels)
    assert wsi._file_key(path) == wsi._file_key(path)


@pytest.mark.gui
def test_viewer_open_shows_the_overview_first_without_reading_full_resolution(
        make_napari_viewer):
    from dask.callbacks import Callback

    path = real_path(TCGA)
    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1000, 800)
    wsi._series_pixels.cache_clear()
    tasks: list[str] = []

    def pretask(key, dsk, state):
        name = key[0] if isinstance(key, tuple) else key
        tasks.append(str(name))

    with Callback(pretask=pretask):
        (layer,) = viewer.open(str(path), plugin="napari-medfm")
        viewer.reset_view()
        viewer.screenshot(canvas_only=True)
    assert layer.multiscale and layer.data_level == len(layer.data) - 1
    assert wsi._series_pixels.cache_info().misses == 1  # overview decoded once for napari
    # tiles of the file's own levels: only the reader's one probe tile, no level decoded
    tile_reads = [t for t in tasks if "zarr" in t]
    assert len(tile_reads) <= 2, tile_reads
