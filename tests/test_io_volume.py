"""NIfTI / NRRD / MetaImage reader against the real corpus (SimpleITK and nibabel as references)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm.errors import ReadError
from napari_medfm.io import volume
from tests.conftest import real_path

VOLUMES = [
    "ct/totalseg_nifti/example_ct.nii.gz",
    "ct/totalseg_nifti/example_ct_sm.nii.gz",
    "ct/totalseg_nifti/example_ct_seg_total_fast_forcesplit.nii.gz",
    "ct/totalseg_nifti/example_ct_sm_seg_total.nii.gz",
    "ct/totalseg_dicom_series_seg.nii.gz",
    "ct/dcmqi_ct3slice_seg/heart_seg.nrrd",
    "ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd",
]
CT_SM = "ct/totalseg_nifti/example_ct_sm.nii.gz"
SEG_SM = "ct/totalseg_nifti/example_ct_sm_seg_total.nii.gz"


@pytest.mark.parametrize("rel", VOLUMES)
def test_geometry_and_voxels_equal_simpleitk(rel):
    path = real_path(rel)
    assert volume.can_read(path)
    (img,) = volume.read(path)
    ref = sitk.ReadImage(str(path))
    assert img.kind == "volume" and img.geometry.ndim == 3
    assert img.geometry.spacing == pytest.approx(ref.GetSpacing())
    assert img.geometry.origin == pytest.approx(ref.GetOrigin())
    np.testing.assert_allclose(img.geometry.direction.reshape(-1), ref.GetDirection(), atol=1e-9)
    arr = sitk.GetArrayFromImage(ref)
    assert img.data.shape == arr.shape
    np.testing.assert_array_equal(img.data, arr)  # exact values even when narrowed
    assert img.data.dtype.itemsize <= arr.dtype.itemsize
    assert img.data.flags.writeable and img.data.flags.owndata  # paintable, not ITK's buffer
    # voxel -> LPS mapping agrees with ITK at a far corner
    idx = np.array(arr.shape) - 1
    lps = img.geometry.index_to_physical(idx[::-1])
    assert lps == pytest.approx(ref.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]))


@pytest.mark.parametrize("rel", [v for v in VOLUMES if v.endswith(".nii.gz")])
def test_nifti_geometry_matches_nibabel_affine(rel):
    nib = pytest.importorskip("nibabel")
    path = real_path(rel)
    (img,) = volume.read(path)
    np.testing.assert_allclose(img.geometry.affine_ras(), nib.load(str(path)).affine, atol=1e-4)


def test_las_nifti_orientation_is_kept():
    nib = pytest.importorskip("nibabel")
    path = real_path("ct/totalseg_dicom_series_seg.nii.gz")
    (img,) = volume.read(path)
    # both codes name the patient direction toward which each axis increases
    code = "".join(nib.aff2axcodes(nib.load(str(path)).affine))
    assert code == "LAS"
    assert img.geometry.orientation == code == img.metadata["orientation"]


def test_int32_ct_is_narrowed_losslessly_and_recognised_as_ct():
    path = real_path("ct/totalseg_nifti/example_ct.nii.gz")
    (img,) = volume.read(path)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert ref.dtype == np.int32
    assert img.data.dtype == np.int16
    np.testing.assert_array_equal(img.data.astype(np.int32), ref)
    assert img.metadata["original_dtype"] == "int32"
    assert img.modality == "CT" and img.metadata["units"] == "HU"
    assert img.window == (40.0, 400.0)
    assert img.contrast_limits() == (-160.0, 240.0)
    assert img.is_label is False
    assert img.name == "example_ct"


def test_modality_override_and_percentile_window():
    (img,) = volume.read(real_path(CT_SM), modality="MR")
    assert img.modality == "MR" and "units" not in img.metadata
    lo, hi = img.contrast_limits()
    data = img.data.astype(float)
    assert lo == pytest.approx(np.percentile(data, 0.5), abs=1.0)
    assert hi == pytest.approx(np.percentile(data, 99.5), abs=1.0)


def test_totalsegmentator_labels_get_names_from_sidecar():
    path = real_path(SEG_SM)
    (img,) = volume.read(path)
    assert img.is_label and img.data.dtype == np.uint8
    table = json.loads((path.parent / "labels_total.json").read_text())["labels"]
    assert img.metadata["label_names"] == {int(k): v for k, v in table.items()}
    assert img.metadata["label_names"][5] == "liver"
    assert img.metadata["label_names_source"] == "labels_total.json"
    present = set(np.unique(img.data).tolist()) - {0}
    assert present <= set(img.metadata["label_names"])
    data, kwargs, layer_type = img.layer_data()
    assert layer_type == "labels" and "contrast_limits" not in kwargs


def test_label_detection_auto_and_forced():
    (heart,) = volume.read(real_path("ct/dcmqi_ct3slice_seg/heart_seg.nrrd"))
    assert heart.is_label and heart.data.dtype == np.uint8
    assert "label_names" not in heart.metadata  # no sidecar there
    assert heart.metadata["original_dtype"] == "int16"
    (ct,) = volume.read(real_path(CT_SM))
    assert ct.is_label is False
    (forced,) = volume.read(real_path(SEG_SM), as_labels=False)
    assert forced.is_label is False
    (forced_lab,) = volume.read(real_path("ct/totalseg_nifti/example_ct_sm.nii.gz"), as_labels=True)
    assert forced_lab.is_label and forced_lab.data.dtype == np.int16


def test_label_names_from_stem_json_in_nnunet_layout(tmp_path):
    src = real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd")
    dst = tmp_path / "case7_mask.nrrd"
    dst.write_bytes(src.read_bytes())
    (tmp_path / "case7_mask.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1,
                                                                     "spine": 2}}))
    (img,) = volume.read(dst)
    assert img.is_label
    assert img.metadata["label_names"] == {0: "background", 1: "liver", 2: "spine"}
    (explicit,) = volume.read(dst, label_names={"1": "L", "2": "S"})
    assert explicit.metadata["label_names"] == {1: "L", 2: "S"}


def _slicer_seg(tmp_path: Path, multi_layer: bool) -> tuple[Path, np.ndarray]:
    nrrd = pytest.importorskip("nrrd")
    data, header = nrrd.read(str(real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd")))
    h = {k: v for k, v in header.items()}
    fields = {
        "Segment0_Name": "liver", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
        "Segment0_Color": "0.8 0.2 0.4",
        "Segment1_Name": "spine", "Segment1_LabelValue": "2", "Segment1_Layer": "0",
        "Segment1_Color": "0.2 0.4 1.0",
    }
    out = tmp_path / ("layers.seg.nrrd" if multi_layer else "case.seg.nrrd")
    if multi_layer:
        layers = np.stack([(data == 1), (data == 2)]).astype(np.uint8)
        h["kinds"] = ["list", "domain", "domain", "domain"]
        h["space directions"] = np.vstack([[np.nan] * 3, header["space directions"]])
        fields.update({"Segment1_Layer": "1", "Segment1_LabelValue": "1"})
        nrrd.write(str(out), layers, {**h, **fields})
    else:
        nrrd.write(str(out), data, {**h, **fields})
    return out, data


def test_slicer_seg_nrrd_segment_names_and_colors(tmp_path):
    path, data = _slicer_seg(tmp_path, multi_layer=False)
    (img,) = volume.read(path)
    assert img.is_label and img.name == "case"
    assert img.metadata["label_names"] == {1: "liver", 2: "spine"}
    assert img.metadata["label_colors"] == {1: [204, 51, 102], 2: [51, 102, 255]}
    np.testing.assert_array_equal(img.data, np.transpose(data, (2, 1, 0)))


def test_slicer_multilayer_seg_nrrd_is_merged(tmp_path):
    path, data = _slicer_seg(tmp_path, multi_layer=True)
    (img,) = volume.read(path)
    assert img.is_label and img.data.ndim == 3
    assert img.metadata["label_names"] == {1: "liver", 2: "spine"}
    np.testing.assert_array_equal(img.data, np.transpose(data, (2, 1, 0)))
    (ref,) = volume.read(real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd"))
    assert img.geometry == ref.geometry


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii"])
def test_written_copies_keep_geometry(tmp_path, suffix):
    (orig,) = volume.read(real_path(CT_SM))
    out = tmp_path / f"copy{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(real_path(CT_SM))), str(out), True)
    (img,) = volume.read(out)
    assert img.geometry.same_grid(orig.geometry, img.shape, orig.shape, atol=1e-4)
    np.testing.assert_array_equal(img.data, orig.data)


def test_4d_needs_channel_and_keeps_3d_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    src = nib.load(str(real_path(CT_SM)))
    vol = np.asarray(src.dataobj)
    four = nib.Nifti1Image(np.stack([vol, vol + 7], axis=-1), src.affine)
    out = tmp_path / "dyn.nii.gz"
    nib.save(four, str(out))
    with pytest.raises(ReadError, match="channel=") as exc:
        volume.read(out)
    assert "dyn.nii.gz" in str(exc.value)
    (img,) = volume.read(out, channel=1)
    (ref,) = volume.read(real_path(CT_SM))
    assert img.geometry.same_grid(ref.geometry, img.shape, ref.shape, atol=1e-4)
    np.testing.assert_array_equal(img.data.astype(np.int32), ref.data.astype(np.int32) + 7)
    with pytest.raises(ReadError, match="out of range"):
        volume.read(out, channel=2)


def test_vector_volume_needs_channel(tmp_path):
    ref = sitk.ReadImage(str(real_path(CT_SM)), sitk.sitkFloat32)
    vec = sitk.Compose(ref, ref * 2, ref * 3)
    out = tmp_path / "field.nrrd"
    sitk.WriteImage(vec, str(out))
    with pytest.raises(ReadError, match="components"):
        volume.read(out)
    (img,) = volume.read(out, channel=2)
    np.testing.assert_allclose(img.data, sitk.GetArrayFromImage(ref) * 3)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_files_raise_read_error_naming_the_file(tmp_path, suffix):
    src = sitk.ReadImage(str(real_path(CT_SM)))
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(src, str(full), suffix != ".nii")
    bad = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ReadError) as exc:
        volume.read(bad)
    assert bad.name in str(exc.value) and exc.value.path == bad


def test_garbage_and_missing_data_file(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(ReadError, match="junk.nii.gz"):
        volume.read(junk)
    mhd = tmp_path / "scan.mhd"
    sitk.WriteImage(sitk.ReadImage(str(real_path(CT_SM))), str(mhd))
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(ReadError, match=r"scan\.raw.*missing"):
        volume.read(mhd)


def test_can_read_by_suffix_never_raises(tmp_path):
    for rel in VOLUMES:
        assert volume.can_read(real_path(rel))
    assert not volume.can_read(real_path("cxr/nih_chestxray14/00000001_000.png"))
    assert not volume.can_read(real_path("pathology/wsi/CMU-1-Small-Region.svs"))
    assert not volume.can_read(real_path("ct/totalseg_nifti/labels_total.json"))
    assert not volume.can_read(tmp_path)
    assert not volume.can_read(tmp_path / "missing.nii.gz")
    assert volume.volume_stem("a/b/case.seg.nrrd") == "case"
    assert volume.volume_stem("ct.nii.gz") == "ct"


@pytest.mark.gui
def test_volume_lands_in_lps_world_in_napari(make_napari_viewer):
    path = real_path("ct/totalseg_dicom_series_seg.nii.gz")  # LAS: flipped axis
    (img,) = volume.read(path)
    ref = sitk.ReadImage(str(path))
    viewer = make_napari_viewer()
    data, kwargs, layer_type = img.layer_data()
    layer = viewer.add_labels(data, **{k: v for k, v in kwargs.items() if k != "multiscale"})
    for idx in [(0, 0, 0), (19, 511, 0), (7, 100, 400)]:
        world = np.asarray(layer.data_to_world(idx))[::-1]
        assert world == pytest.approx(ref.TransformIndexToPhysicalPoint(list(idx[::-1])), abs=1e-4)


def test_scaled_integer_nifti_comes_back_as_exact_int16(tmp_path):
    """uint16 storage + scl_inter -2048: ITK returns floats; they are exact HU integers."""
    import struct

    nib = pytest.importorskip("nibabel")
    src = nib.load(str(real_path(CT_SM)))
    hu = np.asarray(src.dataobj).astype(np.int32)
    out = tmp_path / "scaled.nii"
    nib.Nifti1Image((hu + 2048).astype(np.uint16), src.affine).to_filename(str(out))
    raw = bytearray(out.read_bytes())
    raw[112:120] = struct.pack("<ff", 1.0, -2048.0)  # NIfTI-1 scl_slope, scl_inter
    out.write_bytes(bytes(raw))
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkFloat32
    (img,) = volume.read(out)
    (ref,) = volume.read(real_path(CT_SM))
    assert img.data.dtype == np.int16
    np.testing.assert_array_equal(img.data, ref.data)
    assert img.metadata["rescale"] == {"slope": 1.0, "intercept": -2048.0}
    assert img.modality == "CT"
