"""``medfm segment``: outputs on the input's exact geometry, JSON report, CSV, DICOM-SEG, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import real_path

from napari_medfm.cli import main

CT = "ct/totalseg_nifti/example_ct_sm.nii.gz"


def test_cli_hu_basic_nifti_geometry_sidecar_csv(tmp_path, capsys):
    import SimpleITK as sitk

    from napari_medfm.geometry import Geometry

    src = real_path(CT)
    out = tmp_path / "seg.nii.gz"
    rc = main(["segment", "--model", "hu-basic", str(src), "--output", str(out),
               "--stats-csv", str(tmp_path / "stats.csv"), "--quiet"])
    assert rc == 0
    ct = sitk.ReadImage(str(src))
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == ct.GetSize()
    assert Geometry.from_sitk(seg) == Geometry.from_sitk(ct)
    arr = sitk.GetArrayFromImage(seg)
    assert set(np.unique(arr)) <= {0, 1, 2, 3, 4, 5} and (arr == 3).any()

    doc = json.loads((tmp_path / "seg.json").read_text())
    assert doc["model"] == "hu-basic" and doc["weights_sha256"] is None
    present = {str(v) for v in np.unique(arr) if v}
    assert present <= set(doc["labels"])
    assert doc["labels"]["1"] == "body" and doc["labels"]["3"] == "bone"
    assert all(name and not name.startswith("label ") for name in doc["labels"].values())
    hu = sitk.GetArrayFromImage(ct).astype(float)
    by = {s["name"]: s for s in doc["structures"]}
    n_bone = int((arr == 3).sum())
    assert by["bone"]["voxels"] == n_bone
    assert by["bone"]["volume_ml"] == pytest.approx(n_bone * 27 / 1000, abs=1e-3)
    assert by["bone"]["mean_hu"] == pytest.approx(hu[arr == 3].mean(), abs=0.01)
    assert set(doc["settings"]) >= {"roi_size", "overlap", "sw_batch_size", "device", "precision"}
    assert Geometry.from_dict(doc["input"]["geometry"]) == Geometry.from_sitk(ct)
    assert doc["input"]["shape"] == list(arr.shape)
    assert doc["elapsed_s"] > 0
    rows = list(csv.DictReader((tmp_path / "stats.csv").open()))
    assert {r["name"] for r in rows} == {s["name"] for s in doc["structures"]}


def test_cli_dicom_in_dicom_seg_out(tmp_path, capsys):
    import highdicom as hd

    src = real_path("ct/totalseg_dicom_series")
    out = tmp_path / "seg.dcm"
    rc = main(["segment", "-m", "hu-basic", str(src), "-o", str(out)])
    assert rc == 0
    assert "bone" in capsys.readouterr().out
    seg = hd.seg.segread(str(out))
    labels = {d.SegmentLabel for d in seg.SegmentSequence}
    assert {"body", "bone", "fat"} <= labels
    doc = json.loads((tmp_path / "seg.json").read_text())
    assert doc["output"].endswith("seg.dcm")
    assert "lungs" not in [s["name"] for s in doc["structures"] if s["voxels"]]


def test_cli_errors(tmp_path, capsys):
    src = real_path(CT)
    rc = main(["segment", "-m", "hu-basic", str(src), "-o", str(tmp_path / "x.dcm")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "DICOM-SEG" in err and "example_ct_sm" in err
    assert not list(tmp_path.iterdir())  # nothing half-made
    assert main(["segment", "-m", "hu-basc", str(src), "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "Did you mean: hu-basic" in capsys.readouterr().err
    assert main(["segment", "-m", "totalsegmentator", str(src), "-o",
                 str(tmp_path / "x.nii.gz")]) == 2
    assert "totalsegmentator" in capsys.readouterr().err.lower()
    assert main(["segment", "-m", "hu-basic", str(src), "-o", str(tmp_path / "x.nii.gz"),
                 "--roi-size", "8", "8"]) == 2
    assert not list(tmp_path.iterdir())


def test_cli_bundle_records_weights_hash(tmp_path):
    from napari_medfm.models.segmenters.bundle import write_demo_bundle
    from napari_medfm.runtime.weights import sha256_file

    bundle = write_demo_bundle(tmp_path / "b", roi_size=(32, 32, 32), pixdim=(4, 4, 4))
    out = tmp_path / "seg.nrrd"
    rc = main(["segment", "-m", f"bundle:{bundle}", str(real_path(CT)), "-o", str(out),
               "--roi-size", "48", "--overlap", "0.1", "--sw-batch-size", "3", "--device", "cpu",
               "-q"])
    assert rc == 0 and out.exists()
    doc = json.loads((tmp_path / "seg.json").read_text())
    assert doc["weights_sha256"] == sha256_file(bundle / "models" / "model.pt")
    assert doc["settings"]["roi_size"] == [48, 48, 48]
    assert doc["settings"]["overlap"] == 0.1 and doc["settings"]["sw_batch_size"] == 3
    assert doc["settings"]["device"] == "cpu"
    assert set(doc["labels"].values()) <= {"soft tissue", "dense"}
