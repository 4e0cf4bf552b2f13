"""npe2 writer contributions: Labels -> NIfTI/NRRD/MHA/DICOM-SEG with exact source geometry."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm._napari.writer import (
    geometry_from_attributes,
    write_labels_dicom_seg,
    write_labels_nifti,
)
from napari_medfm.errors import MedfmError
from napari_medfm.geometry import Geometry, ObliqueGeometryWarning
from napari_medfm.sample_data import make_phantom
from tests.conftest import real_path

PLUGIN = "napari-medfm"


def _assert_same_geometry(sitk_img, geom: Geometry, atol=1e-4):
    assert Geometry.from_sitk(sitk_img).same_grid(geom, atol=atol), (
        Geometry.from_sitk(sitk_img), geom)


@pytest.fixture
def phantom_small():
    return make_phantom(shape=(12, 40, 48), spacing=(1.5, 1.25, 2.5), seed=2)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
def test_save_labels_through_viewer_round_trips(make_napari_viewer, tmp_path, phantom_small, ext):
    ct, lab = phantom_small
    viewer = make_napari_viewer()
    viewer.add_image(ct.data, **ct.layer_data()[1])
    layer = viewer.add_labels(lab.data, **lab.layer_data()[1])
    viewer.layers.selection = {layer}
    out = tmp_path / f"organs{ext}"
    written = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    assert [str(out)] == written
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), lab.data)
    _assert_same_geometry(back, lab.geometry)
    # and our reader gets a Labels layer back with the names
    from napari_medfm.io import read

    (img,) = read(out, as_labels=True) if ext != ".seg.nrrd" else read(out)
    assert img.is_label and img.geometry.same_grid(lab.geometry, atol=1e-4)
    assert {int(k): v for k, v in img.metadata["label_names"].items()}[1] == "liver"


@pytest.mark.parametrize("direction", ["oblique", "flipped"])
def test_oriented_labels_keep_their_geometry(tmp_path, direction):
    a = np.radians(20.0)
    d = (np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
         if direction == "oblique" else np.diag([-1.0, -1.0, 1.0]))
    g = Geometry((0.8, 0.6, 3.0), (-12.0, 40.5, -300.0), d)
    labels = np.zeros((5, 7, 9), np.uint8)
    labels[1:4, 2:5, 3:8] = 2
    labels[0, 0, 0] = 1
    from napari.layers import Labels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        layer = Labels(labels, **g.napari_kwargs(), metadata={"geometry": g.to_dict()})
    out = write_labels_nifti(str(tmp_path / "lab.nii.gz"), layer.data, layer._get_state())
    back = sitk.ReadImage(out[0])
    _assert_same_geometry(back, g)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    for idx in [(0, 0, 0), (4, 6, 8), (2, 3, 5)]:  # same physical point per voxel
        np.testing.assert_allclose(back.TransformIndexToPhysicalPoint(idx[::-1]),
                                   np.asarray(layer.data_to_world(idx))[::-1], atol=1e-4)


def test_moved_layer_is_written_where_it_is_shown(tmp_path, phantom_small):
    from napari.layers import Labels

    _ct, lab = phantom_small
    layer = Labels(lab.data, **lab.layer_data()[1])
    layer.translate = np.asarray(layer.translate) + np.array([5.0, 0.0, 0.0])  # user moved it
    attrs = layer._get_state()
    g = geometry_from_attributes(layer.data, attrs)
    assert g.origin[2] == pytest.approx(lab.geometry.origin[2] + 5.0)
    # an untouched layer uses the exact stored geometry
    fresh = Labels(lab.data, **lab.layer_data()[1])
    assert geometry_from_attributes(fresh.data, fresh._get_state()) == lab.geometry


def test_writer_rejects_bad_labels(tmp_path):
    from napari.layers import Labels

    layer = Labels(np.zeros((2, 3, 4), np.int32))
    attrs = layer._get_state()
    bad = np.full((2, 3, 4), -1, np.int32)
    with pytest.raises(MedfmError, match="negative"):
        write_labels_nifti(str(tmp_path / "x.nii.gz"), bad, attrs)
    assert not list(tmp_path.iterdir())  # nothing half-written
    attrs["shear"] = [0.5, 0.0, 0.0]
    with pytest.raises(MedfmError, match="voxel grid"):
        write_labels_nifti(str(tmp_path / "x.nii.gz"), layer.data, attrs)


# ------------------------------------------------------------------ DICOM-SEG

def _open_ct3slice(viewer):
    (ct,) = viewer.open(str(real_path("ct/dcmqi_ct3slice")), plugin=PLUGIN)
    return ct


def _painted(shape):
    lab = np.zeros(shape, np.uint8)
    lab[:, 200:300, 150:260] = 1
    lab[1, 320:360, 240:300] = 2
    return lab


def test_dicom_seg_for_labels_painted_on_a_dicom_series(make_napari_viewer, tmp_path):
    pytest.importorskip("napari_medfm.io.dicom_seg", reason="io/dicom_seg.py not written yet")
    import highdicom as hd

    viewer = make_napari_viewer()
    ct = _open_ct3slice(viewer)
    painted = _painted(ct.data.shape)
    # a hand-painted layer: same transform as the CT, but no metadata at all
    layer = viewer.add_labels(painted, affine=ct.affine.affine_matrix, scale=ct.scale,
                              translate=ct.translate, name="my painting")
    layer.metadata = {"label_names": {1: "liver", 2: "lesion"}}
    viewer.layers.selection = {layer}
    out = tmp_path / "painting.dcm"
    written = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    assert written == [str(out)]
    seg = hd.seg.segread(str(out))
    src_uid = ct.metadata["series_instance_uid"]
    assert seg.get_source_image_uids()[0][1] == src_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "lesion"]
    # read back with our reader: labels on the CT grid, same voxels
    from napari_medfm.io import read

    (back,) = read(out)
    assert back.is_label
    assert back.geometry.same_grid(Geometry.from_dict(ct.metadata["geometry"]), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(back.data) > 0, painted > 0)


def test_dicom_seg_needs_a_dicom_source(make_napari_viewer, tmp_path, phantom_small):
    viewer = make_napari_viewer()
    _ct, lab = phantom_small
    viewer.add_image(_ct.data, **_ct.layer_data()[1])
    layer = viewer.add_labels(lab.data, **lab.layer_data()[1])
    with pytest.raises(MedfmError, match="DICOM-SEG needs the labels to come from a DICOM series"):
        write_labels_dicom_seg(str(tmp_path / "seg.dcm"), layer.data, layer._get_state(),
                               viewer=viewer)
    assert not (tmp_path / "seg.dcm").exists()


def test_coronal_labels_saved_in_source_order(make_napari_viewer, tmp_path):
    """Labels on a coronal DICOM (shown transposed in napari) save onto the source grid."""
    from conftest import real_path

    from napari_medfm._napari.writer import write_labels_dicom_seg, write_labels_nifti
    from napari_medfm.io import read
    from napari_medfm.io.dicom_seg import read_dicom_seg
    from napari_medfm.io.types import MedicalImage

    (img,) = read(real_path("dicom_edge/ct_j2k_lossless_coronal_pixrep_mismatch_TOSHIBA.dcm"))
    assert img.geometry.display_transpose() is not None
    labels = np.zeros(img.data.shape, np.uint8)
    labels[0, 100:200, 150:260] = 1
    labels[0, 300:320, 10:40] = 2
    md = dict(img.metadata, label_names={1: "liver", 2: "spleen"})
    lab = MedicalImage(labels, img.geometry, kind="volume", name="seg", metadata=md, is_label=True)
    viewer = make_napari_viewer()
    layer = viewer.add_labels(*lab.layer_data()[:2][:1], **lab.layer_data()[1])
    assert layer.data.shape != labels.shape  # napari holds the transposed view

    (nii,) = write_labels_nifti(str(tmp_path / "seg.nii.gz"), layer.data, layer._get_state())
    back = read(nii, as_labels=True)[0]
    np.testing.assert_array_equal(np.asarray(back.data), labels)
    assert back.geometry.same_grid(img.geometry, atol=1e-4)

    (dcm,) = write_labels_dicom_seg(str(tmp_path / "seg.dcm"), layer.data, layer._get_state())
    seg = read_dicom_seg(dcm, reference=img)
    np.testing.assert_array_equal(np.asarray(seg.data) > 0, labels > 0)
