"""Segmentation dock widget in a real napari viewer: run, layer placement, table, saving, cancel."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import real_path

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _few_threads():
    from napari_medfm.widgets import block_triton_in_gui

    block_triton_in_gui()  # Triton's LLVM + Mesa's GL in one process segfault (see the docstring)
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _add_ct(viewer, rel="ct/totalseg_nifti/example_ct_sm.nii.gz"):
    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.io import volume

    img = volume.read(real_path(rel))[0]
    data, kwargs, kind = layer_tuple(img)
    assert kind == "image"
    return img, viewer.add_image(data, **kwargs)


def test_widget_hu_basic_layer_table_and_saving(make_napari_viewer, qtbot, tmp_path):
    import SimpleITK as sitk

    from napari_medfm.geometry import Geometry, geometry_of_layer
    from napari_medfm.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    img, layer = _add_ct(viewer)
    layer.metadata["source_files"] = []  # NIfTI: no DICOM sources
    w = SegmentWidget(viewer)
    assert w.image_combo.currentText() == layer.name
    assert w.model_combo.findData("hu-basic") >= 0
    assert w.model_combo.findText("bundle folder...") >= 0
    w.model_combo.setCurrentIndex(w.model_combo.findData("hu-basic"))
    worker = w.run()
    assert worker is not None
    qtbot.waitUntil(lambda: w.labels_layer is not None, timeout=60_000)
    qtbot.waitUntil(lambda: w.worker is None, timeout=10_000)

    lab = w.labels_layer
    assert lab.name == f"{layer.name} hu-basic"
    assert lab.data.shape == layer.data.shape
    # exactly the image's transform: the same voxel maps to the same world point
    for idx in [(0, 0, 0), (29, 100, 121), (10, 50, 60)]:
        np.testing.assert_allclose(lab.data_to_world(idx), layer.data_to_world(idx), atol=1e-6)
    assert geometry_of_layer(lab) == img.geometry
    # metadata: source keys kept, names/colours added; hovering names come from features
    assert lab.metadata["source_path"] == img.metadata["source_path"]
    assert lab.metadata["label_names"][2] == "lungs"
    assert set(lab.metadata["label_colors"]) >= {1, 2, 3, 4, 5}
    feats = lab.features
    assert dict(zip(feats["index"], feats["name"], strict=True))[3] == "bone"
    # statistics table matches the data
    names = [w.table.item(i, 1).text() for i in range(w.table.rowCount())]
    assert "bone" in names and "fat" in names
    row = names.index("bone")
    n_bone = int((lab.data == 3).sum())
    assert int(w.table.item(row, 2).text()) == n_bone
    assert float(w.table.item(row, 3).text()) == pytest.approx(n_bone * 27 / 1000, abs=0.01)
    mean_bone = float(np.asarray(layer.data)[lab.data == 3].mean())
    assert float(w.table.item(row, 4).text()) == pytest.approx(mean_bone, abs=0.1)
    assert not w.save_seg_button.isEnabled()  # not a DICOM input

    out_csv = w.save_csv(tmp_path / "stats.csv")
    rows = list(csv.DictReader(out_csv.open()))
    assert {r["name"] for r in rows} >= {"body", "bone", "fat"}
    out = w.save_nifti(tmp_path / "seg.nii.gz")
    back = sitk.ReadImage(str(out))
    assert Geometry.from_sitk(back) == img.geometry
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lab.data)
    from napari_medfm.errors import MedfmError

    with pytest.raises(MedfmError, match="DICOM"):
        w.save_dicom_seg(tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_widget_cancel_mid_run_leaves_no_layer(make_napari_viewer, qtbot, tmp_path):
    from napari_medfm.models.segmenters.bundle import write_demo_bundle
    from napari_medfm.widgets.segment import SegmentWidget

    # tiny network, many small windows: cancel after the first window batch
    bundle = write_demo_bundle(tmp_path / "bundle", roi_size=(8, 8, 8), pixdim=(3, 3, 3),
                               sw_batch_size=1, overlap=0.5)
    viewer = make_napari_viewer()
    _img, layer = _add_ct(viewer)
    n_layers = len(viewer.layers)
    w = SegmentWidget(viewer)
    w.set_bundle(bundle)
    from qtpy.QtCore import Qt

    seen = []
    worker = w.run()

    def _quit_in_worker_thread(p):
        # runs in the worker thread at its first yield: the cancel flag is set before the
        # worker computes another window batch (GUI-queued slots would race the worker)
        seen.append(p)
        worker.quit()

    worker.yielded.connect(_quit_in_worker_thread, Qt.ConnectionType.DirectConnection)
    worker.yielded.connect(lambda _p: w.cancel())  # the button's path, queued in the GUI
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    assert seen, "the worker never reported progress"
    assert seen[-1].step < seen[-1].total  # stopped early, not at the end
    assert len(seen) == 1  # the generator stops at the yield after the cancel
    assert len(viewer.layers) == n_layers
    assert w.labels_layer is None and w.result is None
    assert "Cancel" in w.status.text()
    assert w.run_button.isEnabled()


def test_widget_bundle_result_on_grid(make_napari_viewer, qtbot, tmp_path):
    from napari_medfm.models.segmenters.bundle import write_demo_bundle
    from napari_medfm.widgets.segment import SegmentWidget

    bundle = write_demo_bundle(tmp_path / "bundle", roi_size=(32, 32, 32), pixdim=(4, 4, 4))
    viewer = make_napari_viewer()
    _img, layer = _add_ct(viewer)
    w = SegmentWidget(viewer)
    mid = w.set_bundle(bundle)
    assert mid == f"bundle:{Path(bundle)}"
    progress = []
    worker = w.run()
    worker.yielded.connect(progress.append)
    qtbot.waitUntil(lambda: w.labels_layer is not None, timeout=60_000)
    lab = w.labels_layer
    assert lab.data.shape == layer.data.shape
    np.testing.assert_allclose(lab.data_to_world((5, 7, 9)), layer.data_to_world((5, 7, 9)))
    assert lab.metadata["label_names"] == {1: "soft tissue", 2: "dense"}
    assert len(progress) >= 3  # pre, >= 1 window batch, post


def test_widget_dicom_input_saves_dicom_seg(make_napari_viewer, qtbot, tmp_path):
    import highdicom as hd

    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.io import dicom
    from napari_medfm.widgets.segment import SegmentWidget

    img = dicom.read(real_path("ct/totalseg_dicom_series"))[0]
    data, kwargs, _ = layer_tuple(img)
    viewer = make_napari_viewer()
    layer = viewer.add_image(data, **kwargs)
    w = SegmentWidget(viewer)
    w.model_combo.setCurrentIndex(w.model_combo.findData("hu-basic"))
    w.run()
    qtbot.waitUntil(lambda: w.labels_layer is not None, timeout=120_000)
    lab = w.labels_layer
    assert lab.metadata["source_files"] == layer.metadata["source_files"]
    assert w.save_seg_button.isEnabled()
    lab.data[0, :5, :5] = 4  # a user edit is saved too
    out = w.save_dicom_seg(tmp_path / "seg.dcm")
    assert (w.result.labels[0, :5, :5] == 4).all()
    seg = hd.seg.segread(str(out))
    assert {"body", "bone", "fat"} <= {d.SegmentLabel for d in seg.SegmentSequence}
    ref_uids = {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                for r in s.ReferencedInstanceSequence}
    assert len(ref_uids) == len(img.metadata["source_files"])


def test_widget_coronal_volume_labels_sit_on_the_scan(make_napari_viewer, qtbot):
    """A coronal acquisition (rows run head->foot) is shown transposed; labels follow it exactly."""
    import SimpleITK as sitk

    from napari_medfm.io import volume
    from napari_medfm.io.types import MedicalImage
    from napari_medfm.progress import drain
    from napari_medfm.tasks.segment import SegmentSettings, load_segmenter, segment
    from napari_medfm.widgets.segment import SegmentWidget

    axial = volume.read(real_path("ct/totalseg_nifti/example_ct_sm.nii.gz"))[0]
    ax = axial.to_sitk()
    # resample nothing: permute the axes so image y runs along -S (a coronal stack)
    cor = sitk.PermuteAxes(ax, [0, 2, 1])
    cor = sitk.Flip(cor, [False, True, False])
    coronal = MedicalImage.from_sitk(cor, modality="CT", name="coronal CT",
                                     metadata={"modality": "CT", "units": "HU"})
    assert coronal.geometry.display_transpose() is not None

    viewer = make_napari_viewer()
    data, kwargs, _ = coronal.layer_data()
    layer = viewer.add_image(data, **kwargs)
    w = SegmentWidget(viewer)
    w.model_combo.setCurrentIndex(w.model_combo.findData("hu-basic"))
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.labels_layer is not None, timeout=60_000)
    qtbot.waitUntil(lambda: w.worker is None, timeout=10_000)
    viewer.screenshot(canvas_only=True)  # napari can slice and draw both layers

    lab = w.labels_layer
    assert lab.data.shape == layer.data.shape
    np.testing.assert_allclose(lab.affine.affine_matrix, layer.affine.affine_matrix)
    # in source order the labels equal a direct (library) run on the coronal image
    direct = drain(segment(coronal, load_segmenter("hu-basic"), SegmentSettings()))
    back = MedicalImage.from_layer(lab)
    np.testing.assert_array_equal(np.asarray(back.data), direct.labels)
    assert back.geometry == coronal.geometry
