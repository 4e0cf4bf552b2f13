"""Review dock in a real napari viewer (Xvfb): five cases with verdicts and an edit, agreement
table and findings plots; then a reviewing process is SIGKILLed and a restart finds it all."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_review import SHA, _sha, make_cohort

pytestmark = pytest.mark.gui


def _wait_loaded(qtbot, w, index):
    qtbot.waitUntil(lambda: w.index == index and w.worker is None, timeout=60_000)


def test_review_dock_five_cases_edit_kill_and_resume(make_napari_viewer, qtbot, tmp_path):
    from napari_medfm.geometry import geometry_of_layer
    from napari_medfm.widgets.review import ReviewWidget

    csv_path = make_cohort(tmp_path / "c")
    db = tmp_path / "review.db"
    original = tmp_path / "c" / "case0.seg.nii.gz"
    before = _sha(original)
    viewer = make_napari_viewer()
    _dock, w = viewer.window.add_plugin_dock_widget("napari-medfm", "Review")  # napari.yaml
    assert isinstance(w, ReviewWidget)
    w.set_reviewer("Dr Test")
    w.open_cohort(csv_path, db)
    _wait_loaded(qtbot, w, 0)
    img_layer, lab = w.layers[0], w.labels_layer
    assert img_layer.name == "case0" and lab.name == "case0 segmentation"
    for idx in [(0, 0, 0), (29, 100, 121), (12, 50, 60)]:  # the image's exact transform
        np.testing.assert_allclose(lab.data_to_world(idx), img_layer.data_to_world(idx),
                                   atol=1e-6)
    assert geometry_of_layer(lab) == geometry_of_layer(img_layer)
    assert "totalsegmentator" in w.case_label.text()
    # edit with napari's own label tools (paint in data coordinates), save a new version
    lab.paint((12, 45, 45), 5, refresh=True)
    lab.brush_size = 5
    lab.paint((12, 60, 60), 5, refresh=True)
    painted = int((np.asarray(lab.data) == 5).sum())
    worker = w.save_edit()
    assert worker is not None
    qtbot.waitUntil(lambda: w.last_edit is not None and w.worker is None, timeout=30_000)
    rec = w.last_edit
    assert Path(rec["path"]).name == "case0.seg.edit-1.nii.gz"
    assert rec["model"] == "totalsegmentator" and rec["weights_sha256"] == SHA
    assert rec["reviewer"] == "Dr Test"
    assert _sha(original) == before
    w.note_edit.setText("liver ok")
    assert w.set_verdict("accept", output="findings")["note"] == "liver ok"
    verdicts = {1: ("findings", "accept"), 2: ("report", "reject"), 3: ("segmentation", "accept"),
                4: ("report", "accept")}
    for i in range(1, 5):
        if i == 1:
            w.shortcuts[0].activated.emit()  # Alt+Right
        else:
            w.next_case()
        _wait_loaded(qtbot, w, i)
        out, v = verdicts[i]
        w.output_combo.setCurrentText(out)
        w.set_verdict(v, note=f"note {i}")
    assert w.findings_table.rowCount() == 0 and "No acute findings." in w.report_view.toPlainText()
    assert w.labels_layer is None  # case 4 has no segmentation: run a model on demand
    w.run_model("hu-basic")
    qtbot.waitUntil(lambda: w.labels_layer is not None and w.worker is None, timeout=60_000)
    assert w.labels_layer.name == "case4 segmentation" and "hu-basic" in w.case_label.text()
    assert (db.with_name("review.db.outputs") / "case4.seg.nii.gz").is_file()
    w.previous_case()
    _wait_loaded(qtbot, w, 3)
    assert w.labels_layer.name == "case3 segmentation"
    w.previous_case()
    _wait_loaded(qtbot, w, 2)
    assert "no focal liver lesion" in w.report_view.toPlainText()
    w.go_to(1)
    _wait_loaded(qtbot, w, 1)
    assert w.findings_table.item(0, 0).text() == "pleural effusion"
    assert not [x for x in viewer.layers if x.name.startswith(("case0", "case2"))]  # cleared
    # back on case 0: the edit is loaded for editing, the model output beside it (hidden)
    w.go_to(0)
    _wait_loaded(qtbot, w, 0)
    assert w.labels_layer.name == "case0 edit"
    assert int((np.asarray(w.labels_layer.data) == 5).sum()) == painted
    w.compare("case0 model", "case0 edit")
    qtbot.waitUntil(lambda: bool(w.seg_rows) and w.worker is None, timeout=60_000)
    liver = next(r for r in w.seg_rows if r["label"] == "liver")
    assert liver["dice"] < 1.0 and liver["volume_ref_ml"] > liver["volume_pred_ml"]
    assert next(r for r in w.seg_rows if r["label"] == "spleen")["dice"] == pytest.approx(1.0)
    assert w.seg_table.rowCount() == len(w.seg_rows)
    # findings over a cohort: plots shown in the dock and saved next to the CSV
    rng = np.random.default_rng(3)
    with open(tmp_path / "p.csv", "w", newline="") as fh, \
            open(tmp_path / "l.csv", "w", newline="") as fl:
        pw, lw = csv.writer(fh), csv.writer(fl)
        pw.writerow(["case", "effusion"])
        lw.writerow(["case", "effusion"])
        for i in range(40):
            y = int(i % 3 == 0)
            pw.writerow([f"c{i}", round(0.3 * y + 0.7 * rng.uniform(), 3)])
            lw.writerow([f"c{i}", y])
    w.validate_findings(tmp_path / "p.csv", tmp_path / "l.csv", tmp_path / "m" / "f.csv",
                        n_boot=100)
    qtbot.waitUntil(lambda: w.findings_result is not None and w.worker is None, timeout=60_000)
    assert not w.plot_label.pixmap().isNull() and not w.calibration_label.pixmap().isNull()
    assert (tmp_path / "m" / "f.roc.png").is_file()
    assert (tmp_path / "m" / "f.calibration.png").is_file()
    w.go_to(2)  # leave the dock on case 2
    _wait_loaded(qtbot, w, 2)
    w.close()

    # ---- a second process reviews on, and is killed with SIGKILL mid-review
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from napari_medfm.widgets import block_triton_in_gui
        block_triton_in_gui()
        import napari
        from qtpy.QtWidgets import QApplication
        from napari_medfm.widgets.review import ReviewWidget

        def wait(cond, timeout=90):
            t0 = time.monotonic()
            while not cond():
                QApplication.processEvents()
                time.sleep(0.01)
                if time.monotonic() - t0 > timeout:
                    raise SystemExit("timeout")

        viewer = napari.Viewer(show=False)
        w = ReviewWidget(viewer)
        w.open_store({str(db)!r})
        wait(lambda: w.index == 2 and w.worker is None)
        print("resumed", w.index, w.reviewer_edit.text(), flush=True)
        w.go_to(3)
        wait(lambda: w.index == 3 and w.worker is None)
        w.labels_layer.paint((15, 50, 50), 7, refresh=True)
        w.note_edit.setText("added a structure")
        w.save_edit()
        wait(lambda: w.last_edit is not None and w.worker is None)
        w.next_case()
        wait(lambda: w.index == 4 and w.worker is None)
        w.set_verdict("reject", output="report", note="wrong side")
        print("READY", w.last_edit["path"], flush=True)
        while True:
            QApplication.processEvents()
            time.sleep(0.05)
    """)
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 150:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("READY"):
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lines and lines[-1].startswith("READY"), (lines, proc.stderr.read()[-3000:])
    assert lines[0] == "resumed 2 Dr Test"
    edit3 = Path(lines[-1].split(" ", 1)[1])
    assert edit3.is_file() and edit3.name == "c3_pred.edit-1.nii.gz"

    # ---- restart: everything is found
    w2 = ReviewWidget(viewer)
    w2.open_store(db)
    _wait_loaded(qtbot, w2, 4)  # resumes at the case the killed process was on
    v = w2.store.verdicts()
    assert v[("case4", "report")]["verdict"] == "reject"
    assert v[("case4", "report")]["note"] == "wrong side"
    assert v[("case3", "segmentation")]["verdict"] == "edit"
    assert v[("case3", "segmentation")]["note"] == "added a structure"
    assert v[("case2", "report")]["verdict"] == "reject"
    assert v[("case0", "segmentation")]["verdict"] == "edit"
    assert [e["case_id"] for e in w2.store.edits()] == ["case0", "case3"]
    prov = json.loads(edit3.with_name("c3_pred.edit-1.json").read_text())
    assert prov["reviewer"] == "Dr Test" and prov["edited_from"].endswith("c3_pred.nii.gz")
    w2.go_to(3)
    _wait_loaded(qtbot, w2, 3)
    assert w2.labels_layer.name == "case3 edit"
    assert int(np.asarray(w2.labels_layer.data)[15, 50, 50]) == 7
    out = w2.export_csv(tmp_path / "review.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["reviewer"] for r in rows} == {"Dr Test"}
    w2.close()
