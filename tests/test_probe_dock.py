"""A probe trained with `medfm train probe` in the generic Findings dock (real napari viewer under
Xvfb). Needs the generic dock of helper "shells" (FINDINGS_TASKS with "probe"): skipped before
that branch is merged."""

from __future__ import annotations

import json

import pytest
from conftest import real_path
from test_probe import trained_probe  # noqa: F401  (module fixture: the real weak-label probe)

from napari_medfm.widgets import findings as wf

if "probe" not in getattr(wf, "FINDINGS_TASKS", ()):
    pytest.skip("the generic Findings dock (helper 'shells') is not merged in this branch",
                allow_module_level=True)


def test_probe_in_the_findings_dock(make_napari_viewer, qtbot, trained_probe, tmp_path):  # noqa: F811
    from napari_medfm import io

    img = io.read(real_path("cxr/tbx11k/tb0005.png"))[0]
    data, kwargs, _ = img.layer_data()
    viewer = make_napari_viewer()
    viewer.add_image(data, **kwargs)
    w = wf.FindingsWidget(viewer)
    w.model_combo.setCurrentText("probe")
    assert w.weights_label.text() == "Probe folder"
    w.weights_edit.setText(str(trained_probe["dir"]))
    w.device_combo.setCurrentText("cpu")
    w.modality_combo.setCurrentText("CXR")
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.result is not None or "rror" in w.status.text(), timeout=120_000)
    assert w.result is not None, w.status.text()
    assert w.table.rowCount() == 2
    names = {f["finding"] for f in w.result.findings}
    assert names == {"abnormal", "tumor"}
    # the dock's numbers are the CLI's
    from napari_medfm.cli import main

    out = tmp_path / "cli.json"
    import contextlib
    import io as _io

    buf = _io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["findings", "--probe", str(trained_probe["dir"]),
                     str(real_path("cxr/tbx11k/tb0005.png")), "--modality", "CXR", "--json"]) == 0
    out.write_text(buf.getvalue())
    cli = {r["finding"]: r["probability"] for r in json.loads(out.read_text())["findings"]}
    for f in w.result.findings:
        assert f["probability"] == pytest.approx(cli[f["finding"]], rel=1e-5)
    exported = json.loads(w.export(tmp_path / "dock.json").read_text())
    assert exported["provenance"]["model"] == "probe"
