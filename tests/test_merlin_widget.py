"""Findings dock widget in a real napari viewer (tiny random Merlin checkpoint, real CT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm.geometry import Geometry, layer_world_matrix
from napari_medfm.io.types import MedicalImage
from napari_medfm.models.merlin.testing import save_random_checkpoint, train_tokenizer
from tests.conftest import real_path

pytestmark = pytest.mark.gui

CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("merlin_widget")
    ck = save_random_checkpoint(d / "merlin_tiny.pt", config="tiny", seed=4)
    train_tokenizer(d)
    return ck


def _viewer_with_ct(make_napari_viewer):
    viewer = make_napari_viewer()
    img = MedicalImage.from_sitk(sitk.ReadImage(str(real_path(CT_SMALL))), modality="CT",
                                 name="ct")
    # store it in LPI so the layer carries a real affine (flip), not just scale/translate
    img = MedicalImage.from_sitk(sitk.DICOMOrient(img.to_sitk(), "LPI"), modality="CT", name="ct")
    data, kwargs, _ = img.layer_data()
    layer = viewer.add_image(data, **kwargs)
    return viewer, layer, img


def test_run_table_why_overlay_and_export(make_napari_viewer, qtbot, ckpt, tmp_path):
    from napari_medfm.widgets.findings import FindingsWidget, image_from_layer

    viewer, layer, img = _viewer_with_ct(make_napari_viewer)
    w = FindingsWidget(viewer)
    assert w.layer_combo.currentText() == "ct"
    assert w.model_combo.currentText() == "merlin"
    back = image_from_layer(layer)
    assert back.geometry == img.geometry and back.modality == "CT"

    w.weights_edit.setText(str(ckpt))
    w.device_combo.setCurrentText("cpu")
    w.topk_spin.setValue(7)
    w.config_name = "tiny"
    worker = w.run()
    assert worker is not None
    qtbot.waitUntil(lambda: w.result is not None or "Error" in w.status.text(), timeout=180_000)
    assert w.result is not None, w.status.text()
    assert w.table.rowCount() == 31 + 7
    probs = [float(w.table.item(r, 2).text()) for r in range(w.table.rowCount())]
    assert probs == sorted(probs, reverse=True)  # sorted by probability
    assert all(0 <= p <= 1 for p in probs)
    n_layers = len(viewer.layers)  # nothing added by the run itself
    assert n_layers == 1

    # why-map of the first finding row
    row = next(r for r in range(w.table.rowCount()) if w.table.item(r, 0).text() == "finding")
    w.table.selectRow(row)
    key = w.selected_key()
    assert key in w.result.prompts.findings
    w.show_why()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)
    why = viewer.layers[-1]
    assert why.name == f"why: {key}"
    assert why.data.shape == layer.data.shape
    np.testing.assert_allclose(layer_world_matrix(why), layer_world_matrix(layer), atol=1e-9)
    assert float(why.data.max()) <= 1.0 + 1e-6 and why.opacity < 1
    assert Geometry.from_napari_affine(layer_world_matrix(why)) == img.geometry
    assert w.layer_combo.findText(why.name) < 0  # overlays are not offered as CT input

    # exports carry provenance (model, weights sha256, preprocessing, time)
    js = json.loads(w.export(tmp_path / "f.json").read_text())
    assert js["provenance"]["model"] == "merlin"
    assert len(js["provenance"]["weights_sha256"]) == 64
    assert js["provenance"]["preprocessing"]["spatial_size"] == [224, 224, 160]
    assert "time" in js["provenance"] and len(js["findings"]) == 31
    csv_text = w.export(tmp_path / "f.csv").read_text()
    assert csv_text.startswith("# model=merlin") and "finding,ascites" in csv_text
    assert w.copy() == csv_text


def test_cancel_leaves_nothing(make_napari_viewer, qtbot, ckpt):
    from napari_medfm.widgets.findings import FindingsWidget

    viewer, _layer, _ = _viewer_with_ct(make_napari_viewer)
    w = FindingsWidget(viewer)
    w.weights_edit.setText(str(ckpt))
    w.device_combo.setCurrentText("cpu")
    w.config_name = "tiny"
    worker = w.run()
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert w.result is None
    assert w.status.text() in ("Cancelled.",) or w.status.text().startswith("Error")
    assert len(viewer.layers) == 1 and w.table.rowCount() == 0
    assert worker.abort_requested


def test_wrong_layer_gives_a_clear_message(make_napari_viewer, qtbot, ckpt):
    from napari_medfm.widgets.findings import FindingsWidget

    viewer = make_napari_viewer()
    w = FindingsWidget(viewer)
    assert w.run() is None and "open a CT" in w.status.text()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 500, (12, 40, 40)).astype(np.int16), name="mr",
                     metadata={"modality": "MR", "kind": "volume"})
    # RadFM also serves MR volumes (and lists MR first): this test is about Merlin refusing MR
    w.model_combo.setCurrentText("merlin")
    w.weights_edit.setText(str(ckpt))
    w.device_combo.setCurrentText("cpu")
    w.config_name = "tiny"
    # start_task lets napari re-raise worker errors in the GUI thread as well (a notification);
    # the widget's own status line is what is checked here
    with qtbot.capture_exceptions():
        w.run()
        qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    assert "Error" in w.status.text() and "MR" in w.status.text()
    assert len(viewer.layers) == 1 and w.table.rowCount() == 0
