"""Similar cases dock widget in a real napari viewer: whole-image and Shapes-region queries,
gallery with thumbnails, opening a result with its own geometry, CT volume slices, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_mermed import tiny_mermed_checkpoint

from napari_medfm import io as mio
from napari_medfm.progress import drain
from napari_medfm.runtime.registry import load_model
from napari_medfm.tasks.retrieval.build import build_index, collect_inputs
from napari_medfm.tasks.retrieval.query import crop_image

torch.set_num_threads(2)
pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from conftest import REAL

    folders = [REAL / "cxr" / "dicom", REAL / "pathology" / "patches" / "tcga_CHOL_TCGA-3X-AAVA"]
    for f in folders:
        if not f.exists():
            pytest.skip(f"missing corpus folder {f}")
    root = tmp_path_factory.mktemp("w")
    model = load_model("mermed", weights=tiny_mermed_checkpoint(root / "MerMED.pth"))
    items = collect_inputs(folders[:1]) + collect_inputs(folders[1:])
    for it in items[1:]:
        it.modality = "pathology"  # JPEG tiles carry no modality; DICOM CXRs keep theirs
    drain(build_index(root / "ix", model, items, chunk_size=4, batch_size=4))
    return root / "ix"


def _widget(make_napari_viewer, index_dir):
    from napari_medfm.widgets.similar import SimilarCasesWidget

    viewer = make_napari_viewer()
    w = SimilarCasesWidget(viewer)
    w.set_index(index_dir)
    return viewer, w


def _run(qtbot, w):
    worker = w.search()
    assert worker is not None, w.status.text()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: w.search_button.isEnabled(), timeout=10_000)


def test_whole_image_query_gallery_and_open(make_napari_viewer, qtbot, index_dir, real_data):
    viewer, w = _widget(make_napari_viewer, index_dir)
    assert "mermed: 8 cases" in w.index_info.text()
    assert {w.modality_combo.itemText(i) for i in range(w.modality_combo.count())} >= {
        "CXR", "pathology"}
    src = real_data / "pathology/patches/tcga_CHOL_TCGA-3X-AAVA/0_0_2_506.jpg"
    data, kwargs, kind = mio.read(src)[0].layer_data()
    layer = viewer.add_image(data, **kwargs)
    w._refresh_layers()
    w.layer_combo.setCurrentText(layer.name)
    w.k_spin.setValue(4)
    w.query_modality_combo.setCurrentText("pathology")  # a JPEG tile says nothing itself
    _run(qtbot, w)
    assert w.gallery.count() == 4, w.status.text()
    assert w.hits[0].case_id.endswith("0_0_2_506.jpg")
    assert w.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert not w.gallery.item(0).icon().isNull()  # thumbnail shown
    # clicking a DICOM result opens it with its own pixel spacing
    w.modality_combo.setCurrentText("CXR")
    _run(qtbot, w)
    assert w.gallery.count() == 2 and {h.modality for h in w.hits} == {"CXR"}
    n = len(viewer.layers)
    from qtpy.QtCore import Qt

    rect = w.gallery.visualItemRect(w.gallery.item(0))
    qtbot.mouseClick(w.gallery.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    # the case is read in a worker (never on the GUI thread), then added
    qtbot.waitUntil(lambda: len(viewer.layers) == n + 1, timeout=30_000)
    opened = viewer.layers[-1]
    ref = mio.read(w.hits[0].source_path)[0]
    np.testing.assert_array_equal(np.asarray(opened.data), np.asarray(ref.data))
    np.testing.assert_allclose(opened.scale, ref.geometry.spacing[::-1])
    assert opened.name.startswith("similar #1")


def test_shapes_region_crops_by_world_coordinates(make_napari_viewer, qtbot, index_dir,
                                                  real_data):
    viewer, w = _widget(make_napari_viewer, index_dir)
    src = next((real_data / "cxr" / "dicom").glob("siim_*.dcm"))
    img = mio.read(src)[0]
    data, kwargs, _ = img.layer_data()
    layer = viewer.add_image(data, **kwargs)
    h, wd = img.spatial_shape
    y0, x0, y1, x1 = h // 4, wd // 3, h // 2, 2 * wd // 3
    # rectangle drawn in world coordinates (mm): pixel centres of the box corners
    corners = np.array([[y0, x0], [y0, x1 - 1], [y1 - 1, x1 - 1], [y1 - 1, x0]], float)
    world = np.array([layer.data_to_world(c) for c in corners])
    viewer.add_shapes([world], shape_type="rectangle", name="roi")
    w._refresh_layers()
    w.layer_combo.setCurrentText(layer.name)
    w.region_combo.setCurrentText("roi")
    q = w.query_image()
    np.testing.assert_array_equal(q.data, np.asarray(img.data)[y0:y1, x0:x1])
    np.testing.assert_allclose(q.geometry.origin, crop_image(img, [y0, x0, y1, x1]).geometry.origin)
    _run(qtbot, w)
    assert w.gallery.count() == min(10, 8)


def test_volume_layer_uses_the_shown_slice(make_napari_viewer, index_dir, real_data):
    viewer, w = _widget(make_napari_viewer, index_dir)
    ct = real_data / "ct" / "totalseg_nifti" / "example_ct_sm.nii.gz"
    if not ct.exists():
        pytest.skip(f"missing {ct}")
    vol = mio.read(ct)[0]
    data, kwargs, _ = vol.layer_data()
    layer = viewer.add_image(data, **kwargs)
    w._refresh_layers()
    w.layer_combo.setCurrentText(layer.name)
    viewer.dims.set_current_step(0, 7)
    q = w.query_image()
    k = q.metadata["slice_index"]
    assert k == int(round(float(layer.world_to_data(viewer.dims.point)[0])))
    np.testing.assert_array_equal(q.data, np.asarray(vol.data)[k])
    assert q.geometry.spacing == vol.geometry.spacing[:2]


def test_errors_are_shown_not_raised(make_napari_viewer, qtbot, tmp_path):
    from napari_medfm.widgets.similar import SimilarCasesWidget

    viewer = make_napari_viewer()
    w = SimilarCasesWidget(viewer)
    assert w.search() is None and "index" in w.status.text()
    w.set_index(tmp_path / "nothing")
    assert "not a similar-case index" in w.index_info.text()
    assert w.search() is None and "open an image" in w.status.text()


def test_region_on_a_volume_slice(make_napari_viewer, index_dir, real_data):
    viewer, w = _widget(make_napari_viewer, index_dir)
    ct = real_data / "ct" / "totalseg_nifti" / "example_ct_sm.nii.gz"
    if not ct.exists():
        pytest.skip(f"missing {ct}")
    vol = mio.read(ct)[0]
    data, kwargs, _ = vol.layer_data()
    layer = viewer.add_image(data, **kwargs)
    viewer.dims.set_current_step(0, 12)
    k = int(round(float(layer.world_to_data(viewer.dims.point)[0])))
    y0, x0, y1, x1 = 20, 30, 60, 80
    idx = np.array([[k, y0, x0], [k, y0, x1 - 1], [k, y1 - 1, x1 - 1], [k, y1 - 1, x0]], float)
    world = np.array([layer.data_to_world(c) for c in idx])
    viewer.add_shapes([world], shape_type="rectangle", name="roi3d")
    w._refresh_layers()
    w.layer_combo.setCurrentText(layer.name)
    w.region_combo.setCurrentText("roi3d")
    q = w.query_image()
    np.testing.assert_array_equal(q.data, np.asarray(layer.data)[k, y0:y1, x0:x1])


def test_volume_query_for_a_3d_encoder_index(make_napari_viewer, qtbot, real_data, tmp_path):
    from napari_medfm.models.merlin.testing import save_random_checkpoint
    from napari_medfm.tasks.retrieval import query as q
    from napari_medfm.widgets.similar import SimilarCasesWidget

    ct = real_data / "ct" / "totalseg_nifti" / "example_ct_sm.nii.gz"
    if not ct.exists():
        pytest.skip(f"missing {ct}")
    ck = save_random_checkpoint(tmp_path / "m.pt", config="tiny")
    merlin = load_model("merlin", weights=ck, device="cpu", config="tiny", text=False)
    drain(build_index(tmp_path / "ix", merlin, collect_inputs([ct])))
    # the tiny test config cannot be re-created from the index record: hand the loaded model
    # to the query cache the widget's worker uses
    from napari_medfm.runtime.cache import cache_key, model_cache

    model_cache.put(cache_key("merlin", ck, None), merlin)
    viewer = make_napari_viewer()
    w = SimilarCasesWidget(viewer)
    w.set_index(tmp_path / "ix")
    assert w.index_dims == (3,)
    vol = mio.read(ct)[0]
    data, kwargs, _ = vol.layer_data()
    layer = viewer.add_image(data, **kwargs)
    idx = np.array([[5, 20, 30], [5, 20, 79], [5, 59, 79], [5, 59, 30]], float)
    viewer.add_shapes([np.array([layer.data_to_world(c) for c in idx])],
                      shape_type="rectangle", name="roi")
    w._refresh_layers()
    w.layer_combo.setCurrentText(layer.name)
    w.region_combo.setCurrentText("roi")
    image = w.query_image()
    assert image.kind == "volume"
    np.testing.assert_array_equal(image.data, np.asarray(layer.data)[:, 20:60, 30:80])
    try:
        _run(qtbot, w)
        assert w.gallery.count() == 1 and w.hits[0].case_id == "example_ct_sm.nii.gz"
    finally:
        q.clear_model_cache()


def test_dock_widget_from_the_plugin_manifest(make_napari_viewer):
    from napari_medfm.widgets.similar import SimilarCasesWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-medfm", "Similar cases")
    assert isinstance(widget, SimilarCasesWidget)
