"""MONAI bundles run only once trusted (their config is code): library, CLI and dock."""

from __future__ import annotations

import json

import pytest
from conftest import real_path

CT = "ct/totalseg_nifti/example_ct_sm.nii.gz"


@pytest.fixture
def untrusted(tmp_path):
    from napari_medfm.models.segmenters.bundle import write_demo_bundle

    return write_demo_bundle(tmp_path / "bundle", roi_size=(32, 32, 32), pixdim=(4, 4, 4),
                             trust=False)


def test_trust_is_remembered_by_content_hash(untrusted, tmp_path):
    from napari_medfm.io import volume
    from napari_medfm.progress import drain
    from napari_medfm.runtime.trust import (
        UntrustedBundleError,
        is_trusted,
        trust_bundle,
        trust_file,
    )
    from napari_medfm.tasks.segment import segment

    img = volume.read(real_path(CT))[0]
    assert not is_trusted(untrusted)
    with pytest.raises(UntrustedBundleError, match="--trust-bundle"):
        drain(segment(img, f"bundle:{untrusted}"))
    trust_bundle(untrusted)
    assert is_trusted(untrusted) and trust_file().is_file()
    assert str(tmp_path) in trust_file().read_text()  # under $MEDFM_CONFIG (conftest)
    res = drain(segment(img, f"bundle:{untrusted}"))
    assert res.labels.shape == img.shape
    cfg = untrusted / "configs" / "inference.json"
    doc = json.loads(cfg.read_text())
    doc["imports"].append("$import os")  # any change to the code-bearing files
    cfg.write_text(json.dumps(doc))
    assert not is_trusted(untrusted)
    with pytest.raises(UntrustedBundleError, match="changed since you trusted it"):
        drain(segment(img, f"bundle:{untrusted}"))


def test_cli_refuses_without_trust_bundle(untrusted, tmp_path, capsys):
    from napari_medfm.cli import main
    from napari_medfm.runtime.trust import is_trusted

    out = tmp_path / "seg.nii.gz"
    args = ["segment", "-m", f"bundle:{untrusted}", str(real_path(CT)), "-o", str(out),
            "--device", "cpu", "-q"]
    assert main(args) == 2
    assert "--trust-bundle" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--trust-bundle"]) == 0 and out.exists()
    assert is_trusted(untrusted)
    assert main(args) == 0  # remembered


@pytest.mark.gui
def test_dock_asks_once(untrusted, make_napari_viewer, qtbot):
    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.io import volume
    from napari_medfm.runtime.trust import is_trusted
    from napari_medfm.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    data, kwargs, _ = layer_tuple(volume.read(real_path(CT))[0])
    viewer.add_image(data, **kwargs)
    w = SegmentWidget(viewer)
    w.set_bundle(untrusted)
    asked = []
    w.ask_trust = lambda folder: asked.append(folder) or False  # "No" in the dialog
    assert w.run() is None
    assert "not trusted" in w.status.text() and not is_trusted(untrusted)
    w.ask_trust = lambda folder: asked.append(folder) or True  # "Yes"
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.labels_layer is not None, timeout=120_000)
    assert is_trusted(untrusted) and len(asked) == 2
    qtbot.waitUntil(lambda: w.worker is None, timeout=10_000)
    w.labels_layer = None
    assert w.run() is not None and len(asked) == 2  # not asked again
    qtbot.waitUntil(lambda: w.labels_layer is not None, timeout=120_000)
