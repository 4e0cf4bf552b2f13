"""Report dock in a real napari viewer: streaming into the editor, Stop (partial draft kept),
editing, export (.txt/.md/DICOM SR read back with highdicom), findings insertion."""

from __future__ import annotations

import pytest
from conftest import real_path

from tests._report_helpers import register_echo, tiny_report_folder

pytestmark = pytest.mark.gui

CT_DICOM = "ct/dcmqi_ct3slice"


@pytest.fixture(autouse=True)
def _gui(one_torch_thread):
    from napari_medfm.widgets import block_triton_in_gui

    block_triton_in_gui()


@pytest.fixture(scope="module")
def folder():
    return tiny_report_folder()


def _add_dicom_ct(viewer):
    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.io import read

    img = next(im for im in read(real_path(CT_DICOM)) if im.kind == "volume")
    data, kwargs, _ = layer_tuple(img)
    return img, viewer.add_image(data, **kwargs)


def _dock(viewer, folder, tokens):
    from napari_medfm.widgets.report import ReportWidget

    w = ReportWidget(viewer)
    w.set_model("merlin-report")
    w.weights_edit.setText(str(folder))
    w.device_combo.setCurrentText("cpu")
    w.tokens_spin.setValue(tokens)
    w.stream_interval_s = 0.0  # every piece reaches the editor (default: batched at 10 Hz)
    return w


def test_dock_streams_then_edit_and_export_sr(make_napari_viewer, qtbot, folder, tmp_path):
    from napari_medfm.io.sr import BANNER, read_report_sr

    viewer = make_napari_viewer()
    img, layer = _add_dicom_ct(viewer)
    n_layers = len(viewer.layers)
    w = _dock(viewer, folder, tokens=3)
    assert w.banner.text() == BANNER
    assert [i.text() for i in w.layer_list.selectedItems()] == [layer.name]
    templates = [w.template_combo.itemData(i) for i in range(w.template_combo.count())]
    assert templates == ["full report", "findings", "organs", "question"]
    assert not w.question_edit.isEnabled()

    lengths = []
    worker = w.run()
    assert worker is not None and not w.run_button.isEnabled() and w.editor.isReadOnly()
    # runs on the GUI thread after the dock's own slot: the editor already holds the piece
    worker.yielded.connect(lambda p: lengths.append(len(w.editor.toPlainText()))
                           if p.data is not None else None)
    qtbot.waitUntil(lambda: w.result is not None, timeout=120_000)
    qtbot.waitUntil(lambda: w.worker is None, timeout=10_000)
    res = w.result
    assert len(lengths) > 3 and lengths == sorted(lengths)  # text arrived piece by piece
    assert w.editor.toPlainText() == res.text == "".join(w.pieces)
    assert not w.editor.isReadOnly() and w.save_sr_button.isEnabled()
    assert res.model_id == "merlin-report" and res.settings["max_new_tokens"] == 3
    assert len(viewer.layers) == n_layers  # a report adds no layer

    edited = res.text + "\nLiver: edited by the reader."
    w.editor.setPlainText(edited)
    out = tmp_path / "draft.dcm"
    w.export(out)
    qtbot.waitUntil(lambda: w.last_export == out, timeout=60_000)
    back = read_report_sr(out)
    assert back["text"] == edited and back["banner"] == BANNER
    assert back["provenance"]["edited"] is True
    assert back["provenance"]["weights_sha256"] == res.weights_sha256
    assert back["study_instance_uid"] == img.metadata["study_instance_uid"]
    assert len(back["referenced_sop_instance_uids"]) == len(img.metadata["source_files"])
    import highdicom as hd

    assert hd.sr.srread(out).VerificationFlag == "UNVERIFIED"
    txt = tmp_path / "draft.txt"
    w.export(txt)
    qtbot.waitUntil(lambda: w.last_export == txt, timeout=30_000)
    assert txt.read_text().startswith(BANNER) and "edited by the reader" in txt.read_text()


def test_stop_keeps_the_partial_draft(make_napari_viewer, qtbot, folder):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    _add_dicom_ct(viewer)
    w = _dock(viewer, folder, tokens=64)
    seen = []
    worker = w.run()

    def _stop_in_worker(p):
        # in the worker thread at its first text piece: the task checks the flag right after
        # this yield (a GUI-queued click would race the worker)
        if p.data is not None:
            seen.append(p.data)
            w._stop.set()

    worker.yielded.connect(_stop_in_worker, Qt.ConnectionType.DirectConnection)
    worker.yielded.connect(lambda p: w.stop_button.click() if p.data is not None else None)
    qtbot.waitUntil(lambda: w.result is not None, timeout=120_000)
    qtbot.waitUntil(lambda: w.worker is None, timeout=10_000)
    assert w.result.stopped and len(seen) == 1
    assert w.result.text == seen[0] == w.editor.toPlainText()
    assert "stopped" in w.status.text()
    assert w.run_button.isEnabled() and not w.stop_button.isEnabled()


def test_question_and_findings_inserted(make_napari_viewer, qtbot):
    from napari_medfm.widgets.report import ReportWidget

    register_echo()
    viewer = make_napari_viewer()
    _add_dicom_ct(viewer)
    w = ReportWidget(viewer)
    assert w.stream_interval_s > 0  # batched by default
    w.set_model("test-echo")
    assert w.template_combo.findData("impression") >= 0
    w.set_template("question", "Is there ascites")
    assert w.question_edit.isEnabled()
    w.findings_check.setChecked(True)
    assert w.run() is None and "Findings" in w.status.text()  # nothing to insert yet
    w.set_findings([{"finding": "ascites", "probability": 0.91}])
    w.run()
    qtbot.waitUntil(lambda: w.result is not None, timeout=60_000)
    assert w.result.prompt == "Is there ascites?"
    assert "- ascites: 0.91" in w.editor.toPlainText()
    assert w.result.findings == [{"finding": "ascites", "probability": 0.91}]


def test_dock_recovers_after_a_run_that_fails_at_once(make_napari_viewer, qtbot, tmp_path):
    """Missing weights fail in the worker within milliseconds: the dock still learns that the
    worker finished (its slot is connected before the worker starts) and can run again."""
    from napari_medfm.widgets.report import ReportWidget

    viewer = make_napari_viewer()
    _add_dicom_ct(viewer)
    w = ReportWidget(viewer)
    w.set_model("merlin-report")
    w.weights_edit.setText(str(tmp_path / "no-such-model"))
    w.device_combo.setCurrentText("cpu")
    for _ in range(3):
        assert w.run() is not None
        qtbot.waitUntil(lambda: w.worker is None, timeout=30_000)
        assert w.status.text().startswith("Error:") and w.run_button.isEnabled()
