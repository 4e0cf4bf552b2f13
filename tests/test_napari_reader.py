"""npe2 reader contribution on a real napari viewer: geometry contract, labels, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm._napari.reader import napari_get_reader
from napari_medfm.errors import MedfmError, ReadError
from napari_medfm.geometry import ObliqueGeometryWarning
from tests.conftest import real_path

PLUGIN = "napari-medfm"


def _open(viewer, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        return viewer.open(str(path), plugin=PLUGIN)


def _sample_indices(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    idx = [tuple(0 for _ in shape), tuple(s - 1 for s in shape)]
    idx += [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(n)]
    return idx


def assert_geometry_contract(layer, sitk_image, n=8):
    """``layer.data_to_world(idx)[::-1] == TransformIndexToPhysicalPoint(idx[::-1])``."""
    shape = tuple(layer.data.shape)
    assert shape == tuple(reversed(sitk_image.GetSize()))
    for idx in _sample_indices(shape, n):
        world = np.asarray(layer.data_to_world(idx), dtype=float)
        expected = sitk_image.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx[::-1]))
        np.testing.assert_allclose(world[::-1], expected, atol=1e-3, err_msg=str(idx))


# ------------------------------------------------------------------ sniffing

def test_get_reader_declines_what_it_does_not_read(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    folder = tmp_path / "misc"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    assert napari_get_reader(str(txt)) is None
    assert napari_get_reader(str(folder)) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    nii = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    assert callable(napari_get_reader(str(nii)))
    assert callable(napari_get_reader([str(nii), str(nii)]))
    assert napari_get_reader([str(nii), str(txt)]) is None  # all or nothing


def test_reader_function_returns_layer_tuples():
    nii = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    seg = real_path("ct/totalseg_nifti/example_ct_sm_seg_total.nii.gz")
    tuples = napari_get_reader([str(nii), str(seg)])([str(nii), str(seg)])
    assert [t[2] for t in tuples] == ["image", "labels"]
    assert tuples[0][1]["metadata"]["geometry"]["space"] == "LPS"


# ------------------------------------------------------------------ real viewer + geometry

def test_open_nifti_ct_and_labels_geometry(make_napari_viewer):
    viewer = make_napari_viewer()
    nii = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    seg = real_path("ct/totalseg_nifti/example_ct_sm_seg_total.nii.gz")
    (ct,) = _open(viewer, nii)
    (lab,) = _open(viewer, seg)
    assert type(ct).__name__ == "Image" and type(lab).__name__ == "Labels"
    assert_geometry_contract(ct, sitk.ReadImage(str(nii)))
    assert_geometry_contract(lab, sitk.ReadImage(str(seg)))
    # label names from the sidecar table reach the status bar
    if lab.metadata.get("label_names"):
        v = int(np.max(lab.data))
        z, y, x = np.argwhere(np.asarray(lab.data) == v)[0]
        world = lab.data_to_world((z, y, x))
        viewer.dims.point = tuple(world)  # go to that slice
        status = lab.get_status(world, world=True)["value"]
        assert status.startswith(f"{v};")
        assert str(lab.metadata["label_names"][v]) in status


@pytest.mark.parametrize("case", ["oblique", "las", "ras"])
def test_open_synthetic_oriented_volumes(make_napari_viewer, tmp_path, case):
    """Oblique and flipped NIfTI volumes land where SimpleITK says each voxel is."""
    a = np.radians(17.0)
    directions = {
        "oblique": np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        @ np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]]),
        "las": np.diag([-1.0, 1.0, 1.0]),  # x toward patient right (LPS -x), y posterior
        "ras": np.diag([-1.0, -1.0, 1.0]),
    }
    arr = np.random.default_rng(0).integers(-1000, 1000, size=(9, 14, 11)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((12.5, -40.0, 77.0))
    img.SetDirection(tuple(directions[case].reshape(-1)))
    path = tmp_path / f"{case}.nii.gz"
    sitk.WriteImage(img, str(path))
    viewer = make_napari_viewer()
    if case == "oblique":
        with pytest.warns(ObliqueGeometryWarning):
            (layer,) = viewer.open(str(path), plugin=PLUGIN)
    else:
        (layer,) = _open(viewer, path)
    on_disk = sitk.ReadImage(str(path))  # what NIfTI kept (qform/sform precision)
    assert_geometry_contract(layer, on_disk, n=12)
    np.testing.assert_array_equal(np.asarray(layer.data), arr)
    expected_code = {"las": "RPS", "ras": "RAS"}.get(case)
    if expected_code:
        from napari_medfm.geometry import geometry_of_layer

        assert geometry_of_layer(layer).orientation == expected_code


def test_open_dicom_series_folder(make_napari_viewer):
    folder = real_path("ct/dcmqi_ct3slice")
    viewer = make_napari_viewer()
    (layer,) = _open(viewer, folder)
    assert type(layer).__name__ == "Image"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    assert_geometry_contract(layer, reader.Execute())
    assert len(layer.metadata["source_files"]) == 3
    assert layer.metadata["modality"] == "CT"


def test_dicom_series_and_its_nifti_seg_share_world_space(make_napari_viewer):
    """The TotalSegmentator DICOM series (LPS) and its seg NIfTI (LAS) overlap voxel for voxel."""
    folder = real_path("ct/totalseg_dicom_series")
    seg = real_path("ct/totalseg_dicom_series_seg.nii.gz")
    viewer = make_napari_viewer()
    (ct,) = _open(viewer, folder)
    (lab,) = _open(viewer, seg)
    assert ct.data.shape == lab.data.shape == (20, 512, 512)
    for idx in _sample_indices(ct.data.shape, 6):
        world = ct.data_to_world(idx)
        back = np.asarray(lab.world_to_data(world), dtype=float)
        np.testing.assert_allclose(back, np.round(back), atol=1e-3)  # lands on a voxel centre
        assert np.all(back > -0.5) and np.all(back < np.array(lab.data.shape) - 0.5)


def test_open_2d_png(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = _open(viewer, real_path("cxr/nih_chestxray14/00000001_000.png"))
    assert layer.ndim == 2 and layer.data.shape == (512, 512)


# ------------------------------------------------------------------ errors

def _medfm_cause(exc):
    cur, seen = exc, set()
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MedfmError):
            return cur
        seen.add(id(cur))
        cur = getattr(cur, "original_error", None) or cur.__cause__ or cur.__context__
    return None


@pytest.mark.parametrize("make_bad", ["truncated_nifti", "truncated_dicom"])
def test_read_errors_name_the_file_and_add_no_layer(make_napari_viewer, tmp_path, make_bad):
    if make_bad == "truncated_nifti":
        src = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz").read_bytes()
        bad = tmp_path / "broken_ct.nii.gz"
        bad.write_bytes(src[: len(src) // 3])
    else:
        bad = real_path("dicom_edge/mr_truncated_pixeldata.dcm")
    viewer = make_napari_viewer()
    assert callable(napari_get_reader(str(bad)))  # sniffing accepts it; reading fails
    with pytest.raises(Exception) as err:
        viewer.open(str(bad), plugin=PLUGIN)
    cause = _medfm_cause(err.value)
    assert isinstance(cause, ReadError), repr(err.value)
    assert bad.name in str(cause) and "Traceback" not in str(cause)
    assert len(viewer.layers) == 0
