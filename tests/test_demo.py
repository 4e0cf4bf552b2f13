"""``medfm demo`` and ``medfm open``: real viewer, docked widgets, screenshot, --info."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from napari_medfm.cli import main
from napari_medfm.cli.demo import (
    choose_sample,
    dock_all_widgets,
    load_demo_case,
    plugin_dock_widgets,
)
from tests.conftest import real_path


def test_manifest_lists_the_dock_widgets():
    names = [n for n, _ in plugin_dock_widgets()]
    assert "Window / level" in names and "Review" in names and len(names) >= 5


def test_auto_sample_is_phantom_offline():
    assert choose_sample("auto") == "phantom"  # fresh $MEDFM_HOME: nothing cached
    assert choose_sample("cxr") == "cxr"


def test_demo_case_and_docks_in_real_viewer(make_napari_viewer, caplog):
    viewer = make_napari_viewer()
    layers = load_demo_case(viewer, "phantom", window="lung")
    assert [type(lyr).__name__ for lyr in layers] == ["Image", "Labels"]
    assert tuple(layers[0].contrast_limits) == (-1350.0, 150.0)
    assert viewer.layers.selection.active is layers[0]
    with caplog.at_level("WARNING"):
        docked, skipped = dock_all_widgets(viewer)
    assert "Window / level" in docked
    assert set(docked) | set(skipped) == {n for n, _ in plugin_dock_widgets()}
    for name in skipped:  # widgets of other areas not written yet: warned, not fatal
        assert name in caplog.text
    dock_names = set(viewer.window.dock_widgets.keys())
    assert any("Window / level" in d for d in dock_names)


def _run_cli(args, env_extra=None, timeout=240):
    env = dict(os.environ)
    env.update(env_extra or {})
    code = "import sys; from napari_medfm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.gui
def test_demo_screenshot_subprocess(tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("no X display (pytest-xvfb provides one)")
    from PIL import Image

    png = tmp_path / "demo.png"
    res = _run_cli(["demo", "--screenshot", str(png)], {"NAPARI_ASYNC": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "docked widgets:" in res.stdout and "Window / level" in res.stdout
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 500  # whole window, docks included
    assert img.std() > 10  # not blank
    # the CT slice is drawn: many distinct grey levels in the canvas
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200


def test_cli_errors_are_clean(capsys, tmp_path):
    assert main(["demo", "--window", "spleen", "--screenshot", str(tmp_path / "x.png")]) == 2
    assert "unknown window preset" in capsys.readouterr().err
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert main(["open", str(txt)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "Traceback" not in err
    assert main(["open", str(tmp_path / "missing.nii.gz"), "--info"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_no_display_is_a_clean_error(capsys, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("the $DISPLAY check is for Linux/X11")
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    assert main(["demo"]) == 2
    assert "xvfb-run" in capsys.readouterr().err
    nii = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    assert main(["open", str(nii)]) == 2
    assert "--info" in capsys.readouterr().err


def test_open_info_nifti(capsys):
    pytest.importorskip("napari_medfm.io.image2d", reason="io/image2d.py not written yet")
    path = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    assert main(["open", str(path), "--info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (img,) = report[0]["images"]
    assert img["shape"] == [30, 101, 122]
    assert img["spacing_xyz_mm"] == pytest.approx([3.0, 3.0, 3.0])
    assert img["orientation"] == "RAS" and img["modality"] in ("CT", "OT")
    assert main(["open", str(path), "--info"]) == 0
    text = capsys.readouterr().out
    assert "orientation RAS" in text and "30 x 101 x 122" in text


def test_open_info_dicom_prints_no_phi(capsys):
    pytest.importorskip("napari_medfm.io.image2d", reason="io/image2d.py not written yet")
    path = real_path("ct/dcmqi_ct3slice")
    assert main(["open", str(path), "--info"]) == 0
    out = capsys.readouterr().out
    assert "(CT, volume)" in out and "3 x 512 x 512" in out
    for phi in ("JANCT000", "99000"):  # PatientName / PatientID in that series
        assert phi not in out


def test_open_in_viewer_with_window(make_napari_viewer):
    pytest.importorskip("napari_medfm.io.image2d", reason="io/image2d.py not written yet")
    from napari_medfm.cli.open import open_in_viewer

    viewer = make_napari_viewer()
    path = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    layers = open_in_viewer(viewer, [path], window="bone")
    assert len(layers) == 1 and tuple(layers[0].contrast_limits) == (-500.0, 1300.0)
