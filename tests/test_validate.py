"""Agreement metrics: equal to MONAI's own metric functions on the corpus CT's TotalSegmentator
labels, known shifts come out in mm, name mapping (lungs vs lobes), grids, CLI, findings."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
from conftest import real_path

SEG = "ct/totalseg_nifti/example_ct_sm_seg_total.nii.gz"
LOBES = ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
         "lung_middle_lobe_right", "lung_lower_lobe_right"]


@pytest.fixture(scope="module")
def ref():
    from napari_medfm.tasks.validate import load_label_map

    return load_label_map(real_path(SEG))


def _drain(gen):
    from napari_medfm.progress import drain

    return drain(gen)


def _monai(pred, ref_arr, spacing, v, percentile=95):
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
    )

    p = torch.from_numpy(pred == v)[None, None].float()
    r = torch.from_numpy(ref_arr == v)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (float(compute_dice(p, r)[0, 0]),
                float(compute_hausdorff_distance(p, r, percentile=percentile,
                                                 spacing=list(spacing))[0, 0]),
                float(compute_average_surface_distance(p, r, symmetric=True,
                                                       spacing=list(spacing))[0, 0]))


def _write(path, arr, geometry, names):
    from napari_medfm.io.writers import write_labels

    return write_labels(path, arr, geometry, label_names=names)


def test_eroded_copy_matches_monai(ref):
    from scipy import ndimage

    from napari_medfm.tasks.validate import segmentation_metrics, structures_to_score

    r = np.asarray(ref.data)
    names = ref.metadata["label_names"]
    assert names[5] == "liver" and ref.metadata["label_names_source"] == "labels_total.json"
    values = [int(v) for v in np.unique(r) if v]
    pred = r.copy()
    for v in values:  # erode every structure by one voxel (small ones vanish)
        m = r == v
        pred[m & ~ndimage.binary_erosion(m)] = 0
    spacing = tuple(reversed(ref.geometry.spacing))
    structs, _ = structures_to_score(values, values, names, names)
    rows = _drain(segmentation_metrics(pred, r, spacing, structs, case="ct"))
    assert [row["label"] for row in rows] == [names[v] for v in values]
    checked = 0
    for i, (v, row) in enumerate(zip(values, rows, strict=True)):
        n_pred = int((pred == v).sum())
        assert row["volume_ref_ml"] == pytest.approx((r == v).sum() * 27 / 1000, abs=1e-3)
        assert row["volume_pred_ml"] == pytest.approx(n_pred * 27 / 1000, abs=1e-3)
        if n_pred == 0:  # missing in the prediction: dice 0, no distances
            assert row["dice"] == 0.0 and row["hd95_mm"] is None and row["asd_mm"] is None
            continue
        assert row["dice"] < 1.0 and row["hd95_mm"] >= 3.0  # one 3 mm voxel eroded
        if i % 4:
            continue  # MONAI on full-size masks is slow: every fourth structure
        dice, hd, asd = _monai(pred, r, spacing, v)
        assert row["dice"] == pytest.approx(dice, abs=1e-6)
        assert row["hd95_mm"] == pytest.approx(hd, abs=1e-4)
        assert row["asd_mm"] == pytest.approx(asd, abs=1e-4)
        checked += 1
    assert checked >= 6


def test_shift_by_known_mm_through_the_geometry(ref, tmp_path):
    """The prediction is the reference on a grid moved 6 mm along patient x: it is
    resampled (and says so) and every interior structure's Hausdorff distance is 6 mm."""
    from napari_medfm.geometry import Geometry
    from napari_medfm.tasks.validate import compare_label_maps, load_label_map

    g = ref.geometry
    shift = 6.0  # two 3 mm voxels
    moved = Geometry(g.spacing, tuple(np.add(g.origin, (shift, 0.0, 0.0))), g.direction)
    r = np.asarray(ref.data)
    pred = load_label_map(_write(tmp_path / "moved.nii.gz", r, moved, ref.metadata["label_names"]))
    res = _drain(compare_label_maps(pred, ref, hd_percentile=None, case="moved"))
    assert any("resampled onto the reference grid" in n for n in res.notes)
    res95 = _drain(compare_label_maps(pred, ref, case="moved"))
    from scipy import ndimage

    boxes = ndimage.find_objects(r)
    n_interior = 0
    for row, row95 in zip(res.rows, res95.rows, strict=True):
        v = next(k for k, n in ref.metadata["label_names"].items() if n == row["label"])
        b = boxes[v - 1]
        if b[2].start < 3 or b[2].stop > r.shape[2] - 3:  # touches the x border: clipped
            continue
        n_interior += 1
        assert row["hd95_mm"] == pytest.approx(shift, abs=1e-4)  # full Hausdorff = the shift
        assert 0 < row95["hd95_mm"] <= shift + 1e-4
        assert 0 < row95["asd_mm"] <= shift + 1e-4
        assert row["volume_pred_ml"] == pytest.approx(row["volume_ref_ml"])
    assert n_interior >= 15
    # and the values equal MONAI's on the resampled array
    from napari_medfm.tasks.validate import align_to_reference

    arr, _ = align_to_reference(pred, ref)
    row = next(x for x in res95.rows if x["label"] == "liver")
    dice, hd, asd = _monai(arr, r, tuple(reversed(g.spacing)), 5)
    assert (row["dice"], row["hd95_mm"], row["asd_mm"]) == pytest.approx((dice, hd, asd),
                                                                          abs=1e-4)


def test_plate_shifted_along_its_normal_hd95_is_the_shift(ref):
    """A 4-voxel-thick plate moved 2 voxels (6 mm) along its normal: most surface points move
    exactly 6 mm, so HD95 is the shift itself (and equals MONAI's)."""
    from napari_medfm.tasks.validate import segmentation_metrics

    shape = np.asarray(ref.data).shape  # (30, 101, 122), 3 mm voxels
    a = np.zeros(shape, np.uint8)
    b = np.zeros(shape, np.uint8)
    a[4:26, 20:80, 50:54] = 1
    b[4:26, 20:80, 52:56] = 1
    rows = _drain(segmentation_metrics(b, a, (3.0, 3.0, 3.0)))
    assert rows[0]["hd95_mm"] == pytest.approx(6.0, abs=1e-5)
    assert 3.0 < rows[0]["asd_mm"] < 6.0
    assert rows[0]["dice"] == pytest.approx(0.5)
    dice, hd, asd = _monai(b, a, (3.0, 3.0, 3.0), 1)
    assert (rows[0]["dice"], rows[0]["hd95_mm"], rows[0]["asd_mm"]) == pytest.approx(
        (dice, hd, asd), abs=1e-5)


def test_lungs_against_five_lobes_by_name(ref, tmp_path):
    from napari_medfm.tasks.validate import compare_label_maps, load_label_map, read_label_mapping

    r = np.asarray(ref.data)
    names = ref.metadata["label_names"]
    lobe_values = [k for k, n in names.items() if n in LOBES]
    assert len(lobe_values) == 5
    lungs = np.where(np.isin(r, lobe_values), 1, 0).astype(np.uint8)
    lungs[r == 5] = 2
    pred = load_label_map(_write(tmp_path / "model.nii.gz", lungs, ref.geometry,
                                 {1: "lungs", 2: "liver"}))
    mfile = tmp_path / "map.yaml"
    mfile.write_text("lungs: [" + ", ".join(LOBES) + "]\nliver: liver\nspleen: [spleen]\n"
                     "heart: [heart, no_such_structure]\n")
    mapping = read_label_mapping(mfile)
    res = _drain(compare_label_maps(pred, ref, mapping=mapping))
    by = {row["label"]: row for row in res.rows}
    assert set(by) == {"lungs", "liver"}  # spleen/heart: not in the prediction -> skipped
    assert by["lungs"]["dice"] == pytest.approx(1.0)
    assert by["lungs"]["hd95_mm"] == pytest.approx(0.0) and by["lungs"]["asd_mm"] == 0.0
    assert by["lungs"]["volume_ref_ml"] == pytest.approx(np.isin(r, lobe_values).sum() * 0.027,
                                                         abs=1e-3)
    assert any("no label named 'spleen'" in m for m in res.notes)
    # without the mapping, value 1 is scored against the spleen (value 1), not the lungs
    res2 = _drain(compare_label_maps(pred, ref))
    assert next(x for x in res2.rows if x["label"] == "spleen")["dice"] == 0.0


def test_grids_that_do_not_overlap_are_refused(ref):
    from napari_medfm.errors import GeometryError
    from napari_medfm.geometry import Geometry
    from napari_medfm.io.types import MedicalImage
    from napari_medfm.tasks.validate import align_to_reference

    g = ref.geometry
    far = Geometry(g.spacing, tuple(np.add(g.origin, (0.0, 0.0, 5000.0))), g.direction)
    pred = MedicalImage(np.asarray(ref.data), far, name="far", is_label=True)
    with pytest.raises(GeometryError, match="do not overlap"):
        align_to_reference(pred, ref)


def test_cli_seg_folders_json_csv_and_partial_results(ref, tmp_path, capsys):
    from napari_medfm.cli import main

    r = np.asarray(ref.data)
    names = ref.metadata["label_names"]
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    small = np.where(np.isin(r, [1, 5]), r, 0).astype(np.uint8)  # spleen + liver
    _write(tmp_path / "ref" / "a.nii.gz", small, ref.geometry, names)
    _write(tmp_path / "ref" / "b.nii.gz", small, ref.geometry, names)
    _write(tmp_path / "ref" / "c.nii.gz", small, ref.geometry, names)
    only_liver = np.where(r == 5, 5, 0).astype(np.uint8)
    _write(tmp_path / "pred" / "a.seg.nii.gz", small, ref.geometry, names)
    _write(tmp_path / "pred" / "b.nrrd", only_liver, ref.geometry, names)
    out = tmp_path / "metrics.csv"
    rc = main(["validate", "seg", "--pred", str(tmp_path / "pred"), "--ref",
               str(tmp_path / "ref"), "--json", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1  # case c has no prediction: said, and the rest is kept
    assert "1 reference case(s) have no prediction: c" in cap.err
    rows = json.loads(cap.out)
    assert [(x["case"], x["label"]) for x in rows] == [("a", "spleen"), ("a", "liver"),
                                                        ("b", "spleen"), ("b", "liver")]
    assert set(rows[0]) == {"case", "label", "dice", "hd95_mm", "asd_mm", "volume_pred_ml",
                            "volume_ref_ml"}
    assert rows[0]["dice"] == pytest.approx(1.0) and rows[0]["hd95_mm"] == 0.0
    assert rows[2] == {"case": "b", "label": "spleen", "dice": 0.0, "hd95_mm": None,
                       "asd_mm": None, "volume_pred_ml": 0.0,
                       "volume_ref_ml": rows[0]["volume_ref_ml"]}
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 and table[2]["hd95_mm"] == "" and table[2]["dice"] == "0"


def _corpus_scores(rel):
    """Cases and class labels of a corpus labels.csv, plus seeded scores for each class."""
    from napari_medfm.tasks.validate import read_labels_table

    labels = read_labels_table(real_path(rel))
    rng = np.random.default_rng(7)
    preds = {}
    for f, cases in labels.items():
        preds[f] = {c: float(np.clip(0.35 * y + rng.uniform(0, 0.8), 0, 1))
                    for c, y in cases.items()}
    return labels, preds


@pytest.mark.parametrize("rel", ["pathology/labels.csv", "fundus/labels.csv",
                                 "cxr/labels.csv"])
def test_auroc_matches_sklearn_and_monai_on_corpus_labels(rel):
    import torch
    from monai.metrics import ROCAUCMetric
    from sklearn.metrics import roc_auc_score

    from napari_medfm.tasks.validate import findings_metrics

    labels, preds = _corpus_scores(rel)
    res = findings_metrics(preds, labels, n_boot=40, seed=1)
    scored = [r for r in res.rows if r["auroc"] is not None]
    assert scored, res.messages
    for row in res.rows:
        f = row["finding"]
        cases = sorted(labels[f])
        y = np.array([labels[f][c] for c in cases])
        p = np.array([preds[f][c] for c in cases])
        assert row["n"] == len(y) and row["n_pos"] == int(y.sum())
        assert row["sensitivity"] == pytest.approx(float((p[y == 1] >= 0.5).mean()))
        if row["auroc"] is None:
            assert y.min() == y.max() or len(y) < 2
            continue
        assert row["auroc"] == pytest.approx(roc_auc_score(y, p))
        m = ROCAUCMetric()
        m(torch.tensor(p)[:, None], torch.tensor(y)[:, None])
        assert row["auroc"] == pytest.approx(float(m.aggregate()), abs=1e-9)
        if row["auroc_ci_low"] is not None:
            assert row["auroc_ci_low"] <= row["auroc"] + 1e-9 <= row["auroc_ci_high"] + 2e-9
    again = findings_metrics(preds, labels, n_boot=40, seed=1)  # seeded: reproducible
    assert [r["auroc_ci_low"] for r in again.rows] == [r["auroc_ci_low"] for r in res.rows]


def test_cli_findings_long_csv_plots_and_messages(tmp_path, capsys):
    from napari_medfm.cli import main

    rng = np.random.default_rng(0)
    cases = [f"c{i:02d}" for i in range(60)]
    y = {c: int(rng.uniform() < 0.4) for c in cases}
    with open(tmp_path / "preds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "finding", "probability"])
        for c in cases:
            w.writerow([c, "nodule", round(0.25 * y[c] + 0.75 * rng.uniform(), 4)])
            w.writerow([c, "effusion", round(rng.uniform(), 4)])
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "nodule"])
        for c in cases[:-3]:  # three cases without a label
            w.writerow([c, y[c]])
    out = tmp_path / "res" / "findings.csv"
    rc = main(["validate", "findings", "--pred", str(tmp_path / "preds.csv"), "--labels",
               str(tmp_path / "labels.csv"), "--json", "--out", str(out), "--bootstrap", "200"])
    cap = capsys.readouterr()
    assert rc == 0
    rows = json.loads(cap.out)
    assert [r["finding"] for r in rows] == ["nodule"]
    assert rows[0]["n"] == 57 and rows[0]["auroc"] > 0.6
    assert rows[0]["auroc_ci_low"] < rows[0]["auroc"] < rows[0]["auroc_ci_high"]
    assert "effusion: no labels for this finding" in cap.err
    assert "3 predicted case(s) have no label" in cap.err
    for kind in ("roc", "calibration"):
        png = out.with_name(f"findings.{kind}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_seg_dicom_seg_against_nrrd(capsys):
    from napari_medfm.cli import main
    from napari_medfm.tasks.validate import load_label_map

    dcm = real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm")
    nrrd = real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd")
    rc = main(["validate", "seg", "--pred", str(dcm), "--ref", str(nrrd), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["label"] for r in rows] == ["Liver", "label 2"]  # names from the DICOM-SEG
    p = np.asarray(load_label_map(dcm).data)
    r = np.asarray(load_label_map(nrrd).data)
    sp = tuple(reversed(load_label_map(nrrd).geometry.spacing))
    dice, hd, asd = _monai(p, r, sp, 1)
    assert (rows[0]["dice"], rows[0]["hd95_mm"], rows[0]["asd_mm"]) == pytest.approx(
        (dice, hd, asd), abs=1e-4)
    assert rows[1]["dice"] == 0.0 and rows[1]["hd95_mm"] is None  # only in the reference
