"""The Findings dock on 2D layers (BiomedCLIP and any other FindingsModel, no dock change per
model) and the Similar cases dock's text search, in a real napari viewer under Xvfb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_medfm import io as mio
from napari_medfm.geometry import layer_world_matrix
from napari_medfm.runtime.registry import ModelSpec, register
from tests.conftest import real_path
from tests.test_biomedclip import hub  # noqa: F401  (the session's random-weight hub folder)

torch.set_num_threads(2)
pytestmark = pytest.mark.gui

CXR = "cxr/tbx11k/h0001.png"


class _FakeFindings:
    """A FindingsModel that is neither Merlin nor BiomedCLIP (stands for RadFM/probes)."""

    model_id = "fake-findings"
    weights_sha256 = "0" * 64

    def __init__(self, spec):
        self.spec = spec

    def describe(self):
        return {"model": self.model_id, "weights_sha256": self.weights_sha256}

    def findings(self, image, *, prompts=None):
        m = float(np.asarray(image.data, np.float64).mean() / 255.0)
        return [{"finding": "bright", "probability": m}, {"finding": "dark", "probability": 1 - m}]


def build_fake(spec, weights=None, device=None):
    return _FakeFindings(spec)


@pytest.fixture(autouse=True, scope="module")
def fake_specs():
    """Two registry entries that are neither Merlin nor BiomedCLIP (removed afterwards)."""
    from napari_medfm.runtime import registry

    registry.list_specs()  # the packaged specs first
    register(ModelSpec(id="fake-findings", family="fake", tasks=("findings",),
                       modalities=("CXR",), dims=(2,),
                       builder="tests.test_biomedclip_widgets:build_fake",
                       needs_weights=False), replace=True)
    register(ModelSpec(id="fake-probe", family="fake", tasks=("probe", "findings"),
                       modalities=("CXR",), dims=(2,),
                       builder="tests.test_biomedclip_widgets:build_fake"), replace=True)
    yield
    for k in ("fake-findings", "fake-probe"):
        registry._REGISTRY.pop(k, None)


def _viewer_with(make_napari_viewer, rel):
    viewer = make_napari_viewer()
    img = mio.read(real_path(rel))[0]
    data, kwargs, _ = img.layer_data()
    return viewer, viewer.add_image(data, **kwargs), img


def test_findings_dock_biomedclip_on_a_cxr(make_napari_viewer, qtbot, hub, tmp_path):  # noqa: F811
    from napari_medfm.widgets.findings import FindingsWidget

    viewer, layer, img = _viewer_with(make_napari_viewer, CXR)
    w = FindingsWidget(viewer)
    models = [w.model_combo.itemText(i) for i in range(w.model_combo.count())]
    assert "biomedclip" in models and "merlin" not in models  # 2D layer: 2D models only
    w.model_combo.setCurrentText("biomedclip")
    assert not w.topk_spin.isVisibleTo(w) and not w.tokenizer_edit.isVisibleTo(w)
    w.weights_edit.setText(str(hub))
    w.device_combo.setCurrentText("cpu")
    w.modality_combo.setCurrentText("CXR")
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.result is not None or "Error" in w.status.text(), timeout=120_000)
    assert w.result is not None, w.status.text()
    assert w.table.rowCount() == 14 and len(viewer.layers) == 1
    js = json.loads(w.export(tmp_path / "f.json").read_text())
    assert js["provenance"]["modality"] == "CXR"
    assert js["provenance"]["prompts"] == "biomedclip/cxr.yaml"
    assert js["provenance"]["model"] == "biomedclip"
    # why map of the top row: an overlay on the layer's own grid
    w.table.selectRow(0)
    key = w.selected_key()
    w.show_why()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)
    why = viewer.layers[-1]
    assert why.name == f"why: {key}" and why.data.shape == layer.data.shape
    np.testing.assert_allclose(layer_world_matrix(why), layer_world_matrix(layer), atol=1e-9)
    assert w.layer_combo.findText(why.name) < 0


def test_findings_dock_takes_any_findings_model(make_napari_viewer, qtbot):
    from napari_medfm.widgets.findings import FindingsWidget

    viewer, layer, img = _viewer_with(make_napari_viewer, CXR)
    h, wd = img.spatial_shape
    corners = np.array([[0, 0], [0, wd // 2 - 1], [h // 2 - 1, wd // 2 - 1], [h // 2 - 1, 0]],
                       float)
    viewer.add_shapes([np.array([layer.data_to_world(c) for c in corners])],
                      shape_type="rectangle", name="roi")
    w = FindingsWidget(viewer)
    w.layer_combo.setCurrentText(layer.name)
    models = [w.model_combo.itemText(i) for i in range(w.model_combo.count())]
    assert {"fake-findings", "fake-probe", "biomedclip"} <= set(models)
    w.model_combo.setCurrentText("fake-probe")
    assert w.weights_label.text() == "Probe folder"
    w.model_combo.setCurrentText("fake-findings")
    assert w.weights_label.text() == "Weights"
    w.region_combo.setCurrentText("roi")
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.result is not None or "Error" in w.status.text(), timeout=30_000)
    assert w.result is not None, w.status.text()
    assert w.table.rowCount() == 2
    want = float(np.asarray(img.data)[: h // 2, : wd // 2].mean() / 255.0)
    bright = next(f for f in w.result.findings if f["finding"] == "bright")
    assert bright["probability"] == pytest.approx(want, abs=1e-9)  # on the region only
    assert not w.why_button.isEnabled()  # this model draws no why-maps


def test_findings_worker_takes_plain_inputs():
    """The worker body runs with no widget at all: it reads no Qt state."""
    from napari_medfm.progress import drain
    from napari_medfm.widgets.findings import FindingsRequest, findings_job

    img = mio.read(real_path(CXR))[0]
    model, used, res = drain(findings_job(FindingsRequest("fake-findings"), img))
    assert [f["finding"] for f in res.findings] == ["bright", "dark"]
    assert res.provenance["model"] == "fake-findings" and res.provenance["modality"] == "OT"


def test_similar_dock_text_search(make_napari_viewer, qtbot, hub, tmp_path):  # noqa: F811
    from napari_medfm.progress import drain
    from napari_medfm.runtime.cache import get_model
    from napari_medfm.tasks.retrieval.build import build_index, collect_inputs
    from napari_medfm.widgets.similar import SimilarCasesWidget

    model = get_model("biomedclip", weights=hub, device=None)
    items = collect_inputs([real_path("cxr/tbx11k"), real_path("pathology/patches/histolab")])
    drain(build_index(tmp_path / "ix", model, items, chunk_size=8, batch_size=8))
    viewer = make_napari_viewer()
    w = SimilarCasesWidget(viewer)
    w.set_index(tmp_path / "ix")
    assert "biomedclip" in w.index_info.text()
    w.k_spin.setValue(2)
    text = "tumour-infiltrating lymphocytes"
    w.text_edit.setText(text)
    worker = w.search_text()
    assert worker is not None, w.status.text()
    qtbot.waitUntil(lambda: w.text_button.isEnabled(), timeout=60_000)
    assert w.gallery.count() == 2, w.status.text()
    embs = np.stack([model.embed(mio.read(it.path)[0])["image_embedding"] for it in items])
    best = items[int(np.argmax(embs @ model.embed_text([text])[0]))].case_id
    assert w.hits[0].case_id == best
    w.text_edit.setText("")
    assert w.search_text() is None and "sentence" in w.status.text()


def test_similar_dock_text_search_on_image_only_index(make_napari_viewer, qtbot, tmp_path):
    from test_mermed import tiny_mermed_checkpoint

    from napari_medfm.progress import drain
    from napari_medfm.runtime.registry import load_model
    from napari_medfm.tasks.retrieval.build import build_index, collect_inputs
    from napari_medfm.widgets.similar import SimilarCasesWidget

    mm = load_model("mermed", weights=tiny_mermed_checkpoint(tmp_path / "MerMED.pth"))
    items = collect_inputs([real_path("cxr/tbx11k")])
    for it in items:
        it.modality = "CXR"  # PNGs carry no modality (MerMED-FM refuses to guess)
    drain(build_index(tmp_path / "ix", mm, items))
    viewer = make_napari_viewer()
    w = SimilarCasesWidget(viewer)
    w.set_index(tmp_path / "ix")
    assert "image-only" in w.text_edit.toolTip()
    with qtbot.capture_exceptions():
        w.search_text("pleural effusion")
        qtbot.waitUntil(lambda: w.text_button.isEnabled(), timeout=30_000)
    assert "image-only" in w.status.text() and "biomedclip" in w.status.text()
