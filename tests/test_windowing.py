"""HU window presets, their helpers and the Window / level dock widget on a real viewer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medfm.sample_data import make_phantom
from napari_medfm.windowing import (
    PRESETS,
    apply_window,
    auto_window,
    header_window,
    limits_to_window,
    preset_names,
    resolve_window,
    window_to_limits,
)


def test_standard_preset_values():
    expected = {  # (center, width), Radiopaedia "Windowing (CT)" + liver W160/L60
        "soft_tissue": (40, 400), "lung": (-600, 1500), "bone": (400, 1800),
        "brain": (40, 80), "liver": (60, 160), "mediastinum": (50, 350),
    }
    assert {k: (p.center, p.width) for k, p in PRESETS.items()} == expected
    assert PRESETS["lung"].limits == (-1350.0, 150.0)
    assert preset_names()[-2:] == ["header", "auto"]


def test_window_limits_round_trip_and_errors():
    assert window_to_limits(40, 400) == (-160.0, 240.0)
    assert limits_to_window(-160, 240) == (40.0, 400.0)
    for bad in (0, -10, float("nan")):
        with pytest.raises(ValueError):
            window_to_limits(40, bad)
    with pytest.raises(ValueError):
        limits_to_window(10, 10)


def test_header_and_auto_windows():
    ct, lab = make_phantom(shape=(16, 32, 32))
    assert header_window(ct) == (40.0, 400.0)
    md = ct.full_metadata()
    assert header_window(md) == (40.0, 400.0)
    assert header_window({"window": [100, -5]}) is None  # invalid width ignored
    assert header_window(lab) is None
    c, w = auto_window(ct.data)
    lo, hi = np.percentile(ct.data, [1, 99])
    assert (c - w / 2, c + w / 2) == pytest.approx((lo, hi))
    # "header" falls back to "auto" when the image has no window
    assert resolve_window("header", lab) == auto_window(lab.data)
    assert resolve_window("Soft tissue") == (40.0, 400.0)
    with pytest.raises(ValueError, match="unknown window preset"):
        resolve_window("spleen")


def test_apply_window_widens_range_on_real_layer():
    from napari.layers import Image

    layer = Image(np.linspace(-100, 100, 64, dtype=np.float32).reshape(8, 8))
    assert apply_window(layer, -600, 1500) == (-1350.0, 150.0)
    assert tuple(layer.contrast_limits) == (-1350.0, 150.0)
    assert layer.contrast_limits_range[0] <= -1350.0
    rgb = Image(np.zeros((4, 4, 3), np.uint8), rgb=True)
    with pytest.raises(ValueError, match="RGB"):
        apply_window(rgb, 40, 400)


def test_window_widget_presets(make_napari_viewer, qtbot):
    from napari_medfm.widgets.window import WindowWidget

    viewer = make_napari_viewer()
    ct, lab = make_phantom(shape=(16, 48, 48))
    ct_layer = viewer.add_image(ct.data, **ct.layer_data()[1])
    viewer.add_labels(lab.data, **lab.layer_data()[1])
    other = viewer.add_image(np.random.default_rng(0).normal(size=(16, 48, 48)).astype(np.float32),
                             name="other")
    w = WindowWidget(viewer)
    qtbot.addWidget(w)
    # the combo lists grey image layers only (not labels)
    names = [w.layer_combo.itemText(i) for i in range(w.layer_combo.count())]
    assert names[1:] == ["phantom CT", "other"]

    viewer.layers.selection.active = ct_layer
    assert w.apply_preset("lung") == (-1350.0, 150.0)
    assert tuple(ct_layer.contrast_limits) == (-1350.0, 150.0)
    assert w.center_spin.value() == -600 and w.width_spin.value() == 1500
    w.apply_preset("bone")
    assert tuple(ct_layer.contrast_limits) == (-500.0, 1300.0)
    w.apply_preset("header")  # back to the file's soft-tissue window
    assert tuple(ct_layer.contrast_limits) == (-160.0, 240.0)
    assert tuple(other.contrast_limits) != (-160.0, 240.0)  # untouched

    # choosing a layer by name windows that one even when another is active
    w.layer_combo.setCurrentText("other")
    w.apply_preset("brain")
    assert tuple(other.contrast_limits) == (0.0, 80.0)
    assert tuple(ct_layer.contrast_limits) == (-160.0, 240.0)
    w.apply_center_width(10, 20)
    assert tuple(other.contrast_limits) == (0.0, 20.0)

    # the combo follows layer removal
    viewer.layers.remove(other)
    names = [w.layer_combo.itemText(i) for i in range(w.layer_combo.count())]
    assert "other" not in names


def test_window_widget_without_images(make_napari_viewer, qtbot):
    from napari_medfm.widgets.window import WindowWidget

    viewer = make_napari_viewer()
    w = WindowWidget(viewer)
    qtbot.addWidget(w)
    assert w.apply_preset("lung") is None
    assert "No grey-level image" in w.status.text()
