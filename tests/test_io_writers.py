"""Label-map and image writers: exact round trips on real and synthetic geometries, sidecars,
Slicer keys, dtype choice, atomic writes and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import real_path

from napari_medfm.errors import MedfmError, UnsupportedFormatError
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.io.writers import (
    WriteError,
    read_labels_sidecar,
    sidecar_path,
    write_image,
    write_labels,
)

EXTS = [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd"]


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    "LPS": Geometry((0.8105, 0.8105, 1.25), (-235.2, -226.8, -128.69), np.eye(3)),
    "LAS": Geometry((0.9766, 0.9766, 2.0), (-249.5, 61.5, -804.5), np.diag([1.0, -1.0, 1.0])),
    "RAS": Geometry((3.0, 3.0, 3.0), (180.0, 150.0, -300.0), np.diag([-1.0, -1.0, 1.0])),
    "oblique": Geometry((0.7123, 0.6543, 2.5), (12.25, -40.125, 77.5), _rotation(0.3, -0.2, 0.45)),
}


def _labels(shape=(5, 7, 9), seed=0, high=4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, high, size=shape).astype(np.uint8)


def _geom_err(a: Geometry, b: Geometry) -> float:
    return float(max(np.max(np.abs(np.subtract(a.spacing, b.spacing))),
                     np.max(np.abs(np.subtract(a.origin, b.origin))),
                     np.max(np.abs(a.direction - b.direction))))


def _read(path: Path) -> tuple[np.ndarray, Geometry, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), Geometry.from_sitk(img), img


# NIfTI stores the affine as float32: geometry survives to float32 precision (~1e-6 relative);
# NRRD/MetaImage store %.17g doubles: exact up to float64 round-off.
def _tol(ext: str) -> float:
    return 1e-5 if ext.startswith(".nii") else 1e-12


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("gname", list(GEOMETRIES))
def test_labels_round_trip_every_format_and_orientation(tmp_path, ext, gname):
    geom = GEOMETRIES[gname]
    labels = _labels()
    out = write_labels(tmp_path / f"seg{ext}", labels, geom, label_names={1: "liver"})
    assert out == tmp_path / f"seg{ext}"
    arr, g, _ = _read(out)
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, labels)
    assert _geom_err(g, geom) < _tol(ext), (g, geom)
    assert g.orientation == geom.orientation
    # read -> write -> read is exact (the stored values reproduce themselves)
    again = write_labels(tmp_path / f"again{ext}", arr, g)
    arr2, g2, _ = _read(again)
    np.testing.assert_array_equal(arr2, arr)
    assert _geom_err(g2, g) < (1e-7 if ext.startswith(".nii") else 1e-12)
    # physical position of an arbitrary voxel agrees with SimpleITK's own mapping
    idx = (6, 3, 2)  # (x, y, z)
    _, _, img = _read(out)
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(idx),
                               geom.index_to_physical(idx), atol=1e-3)
    # nothing but the file (+ .zraw for .mhd) and the sidecar is left behind
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".medfm-tmp")]
    assert leftovers == []


@pytest.mark.parametrize("ext", EXTS)
def test_real_nrrd_labels_round_trip_exact(tmp_path, ext):
    src = real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd")
    arr0, g0, _ = _read(src)
    out = write_labels(tmp_path / f"liver_spine{ext}", arr0, g0,
                       label_names={1: "liver", 2: "spine"})
    arr1, g1, _ = _read(out)
    np.testing.assert_array_equal(arr1, arr0)
    assert _geom_err(g1, g0) < _tol(ext)
    if not ext.startswith(".nii"):
        assert g1 == g0 and g1.spacing == g0.spacing and g1.origin == g0.origin


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_real_las_nifti_labels_round_trip_exact(tmp_path, ext):
    src = real_path("ct/totalseg_dicom_series_seg.nii.gz")
    arr0, g0, _ = _read(src)
    assert g0.orientation == "LAS"
    out = write_labels(tmp_path / f"ts{ext}", arr0, g0)
    arr1, g1, _ = _read(out)
    np.testing.assert_array_equal(arr1, arr0)
    assert g1.orientation == "LAS"
    # the file came from float32 NIfTI fields, so even NIfTI reproduces it exactly
    assert g1.spacing == g0.spacing and g1.origin == g0.origin
    np.testing.assert_array_equal(g1.direction, g0.direction)


def test_real_ras_multilabel_round_trip_with_label_table(tmp_path):
    src = real_path("ct/totalseg_nifti/example_ct_seg_total_fast_forcesplit.nii.gz")
    table = json.loads(real_path("ct/totalseg_nifti/labels_total.json").read_text())["labels"]
    names = {int(k): v for k, v in table.items()}
    arr0, g0, _ = _read(src)
    assert g0.orientation == "RAS"
    out = write_labels(tmp_path / "total.seg.nrrd", arr0, g0, label_names=names)
    arr1, g1, img = _read(out)
    np.testing.assert_array_equal(arr1, arr0)
    assert g1 == g0
    got_names, _ = read_labels_sidecar(out)
    assert got_names == names  # all 117 names, also those of absent structures
    present = {int(v) for v in np.unique(arr0) if v}
    slicer = {int(img.GetMetaData(f"Segment{i}_LabelValue")): img.GetMetaData(f"Segment{i}_Name")
              for i in range(len(names))}
    assert slicer == names
    # Slicer extents are the bounding boxes, in x y z order, of each present value
    i = sorted(names).index(5)  # liver
    zz, yy, xx = np.nonzero(arr0 == 5)
    assert img.GetMetaData(f"Segment{i}_Extent").split() == [
        str(v) for v in (xx.min(), xx.max(), yy.min(), yy.max(), zz.min(), zz.max())]
    assert 5 in present


def test_sidecar_names_colours_and_volume_reader_compat(tmp_path):
    labels = _labels(high=3)
    out = write_labels(tmp_path / "organs.nii.gz", labels, GEOMETRIES["LPS"],
                       label_names={1: "liver", 2: "spleen", 7: "absent"},
                       label_colors={1: (220, 40, 40), 2: (0.0, 0.5, 1.0)})
    side = sidecar_path(out)
    assert side == tmp_path / "organs.labels.json"
    doc = json.loads(side.read_text())
    assert doc["format"] == "napari-medfm-labels/1"
    assert [e["value"] for e in doc["labels"]] == [1, 2, 7]
    names, colors = read_labels_sidecar(out)
    assert names == {1: "liver", 2: "spleen", 7: "absent"}
    assert colors == {1: (220, 40, 40), 2: (0, 128, 255)}  # 0-1 floats scaled to 0-255
    # a later save without names rewrites the sidecar: no stale names survive
    write_labels(out, labels, GEOMETRIES["LPS"])
    assert read_labels_sidecar(out) == ({}, {})
    assert [e["value"] for e in json.loads(side.read_text())["labels"]] == [1, 2]


def test_volume_reader_reads_our_sidecar(tmp_path):
    volume = pytest.importorskip("napari_medfm.io.volume")
    labels = _labels(high=3)
    out = write_labels(tmp_path / "organs_seg.nii.gz", labels, GEOMETRIES["oblique"],
                       label_names={1: "liver", 2: "spleen"})
    (img,) = volume.read(out, as_labels=True)
    assert img.is_label
    np.testing.assert_array_equal(np.asarray(img.data), labels)
    assert img.metadata.get("label_names") == {1: "liver", 2: "spleen"}
    assert _geom_err(img.geometry, GEOMETRIES["oblique"]) < 1e-5


@pytest.mark.parametrize(("high", "dtype"), [(255, np.uint8), (300, np.uint16),
                                             (70000, np.int32)])
def test_label_dtype_chosen_from_max(tmp_path, high, dtype):
    labels = np.zeros((2, 3, 4), dtype=np.int64)
    labels[1, 2, 3] = high
    labels[0, 0, 0] = 1
    arr, _, _ = _read(write_labels(tmp_path / "x.nrrd", labels, Geometry.identity()))
    assert arr.dtype == dtype
    np.testing.assert_array_equal(arr, labels)


def test_bool_and_whole_float_labels_accepted(tmp_path):
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 1:3, 2:4] = True
    arr, _, _ = _read(write_labels(tmp_path / "m.mha", mask, Geometry.identity()))
    np.testing.assert_array_equal(arr, mask.astype(np.uint8))
    arr, _, _ = _read(write_labels(tmp_path / "f.mha", mask * 2.0, Geometry.identity()))
    np.testing.assert_array_equal(arr, mask * 2)


def test_2d_labels(tmp_path):
    geom = Geometry((0.5, 0.25), (10.0, -3.0), np.array([[0.0, 1.0], [1.0, 0.0]]))
    labels = _labels(shape=(6, 8))
    arr, g, _ = _read(write_labels(tmp_path / "slice.nrrd", labels, geom))
    np.testing.assert_array_equal(arr, labels)
    assert g == geom


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.full((2, 3, 4), -1, dtype=np.int16), "must be >= 0"),
        (np.full((2, 3, 4), 1.5), "whole numbers"),
        (np.zeros((3, 4), dtype=np.uint8), "2 dimensions"),
        (np.array([[["a"]]]), "integer array"),
    ],
)
def test_bad_labels_raise_clear_error_and_write_nothing(tmp_path, labels, match):
    target = tmp_path / "bad.nii.gz"
    with pytest.raises(WriteError, match=match) as info:
        write_labels(target, labels, Geometry.identity())
    assert "bad.nii.gz" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_extension_and_missing_folder(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="seg.png"):
        write_labels(tmp_path / "seg.png", _labels(), Geometry.identity())
    with pytest.raises(WriteError, match="does not exist"):
        write_labels(tmp_path / "nope" / "seg.nrrd", _labels(), Geometry.identity())
    assert issubclass(WriteError, MedfmError)


def test_failed_replace_keeps_target_and_leaves_no_temp(tmp_path):
    # a folder squats the target name: the rename fails after the data were written
    (tmp_path / "seg.nrrd").mkdir()
    (tmp_path / "seg.nrrd" / "keep.txt").write_text("x")
    with pytest.raises(OSError):
        write_labels(tmp_path / "seg.nrrd", _labels(), Geometry.identity())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nrrd"]
    assert (tmp_path / "seg.nrrd" / "keep.txt").read_text() == "x"


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "seg.mha"
    write_labels(target, _labels(seed=1), Geometry.identity())
    before = target.read_bytes()

    real_write = sitk.WriteImage

    def half_write(image, path, *args, **kwargs):  # simulate a crash mid-write (disk full)
        real_write(image, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:50])
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(WriteError, match="No space left"):
        write_labels(target, _labels(seed=2), Geometry.identity())
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".medfm-tmp")]


@pytest.mark.parametrize("ext", EXTS)
def test_write_image_real_ct_round_trip(tmp_path, ext):
    src = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    img = MedicalImage.from_sitk(sitk.ReadImage(str(src)), modality="CT", name="ct")
    out = write_image(tmp_path / f"ct{ext}", img)
    arr, g, _ = _read(out)
    assert arr.dtype == np.asarray(img.data).dtype
    np.testing.assert_array_equal(arr, img.data)
    assert _geom_err(g, img.geometry) < _tol(ext)
    assert not sidecar_path(out).exists()  # intensity images get no label table


def test_write_image_float_oblique_and_rgb(tmp_path):
    rng = np.random.default_rng(3)
    vol = MedicalImage(rng.normal(size=(4, 5, 6)).astype(np.float16), GEOMETRIES["oblique"])
    arr, g, _ = _read(write_image(tmp_path / "f.nrrd", vol))
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, vol.data.astype(np.float32))
    assert _geom_err(g, vol.geometry) < 1e-12
    rgb = MedicalImage(rng.integers(0, 255, (8, 9, 3), dtype=np.uint8),
                       Geometry.identity(2, (0.1, 0.1)), kind="image2d", rgb=True)
    img = sitk.ReadImage(str(write_image(tmp_path / "rgb.mha", rgb)))
    assert img.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), rgb.data)


def test_write_image_label_map_delegates_and_multiscale_refused(tmp_path):
    lab = MedicalImage(_labels(high=3), GEOMETRIES["LAS"], is_label=True,
                       metadata={"label_names": {"1": "liver"}, "label_colors": {1: [1, 2, 3]}})
    out = write_image(tmp_path / "lab.nii.gz", lab)
    assert read_labels_sidecar(out) == ({1: "liver"}, {1: (1, 2, 3)})
    wsi = MedicalImage([np.zeros((4, 4, 3), np.uint8)], Geometry.identity(2), kind="wsi",
                       rgb=True, multiscale=True)
    with pytest.raises(WriteError, match="multiscale"):
        write_image(tmp_path / "wsi.nrrd", wsi)
