"""Series whose slices are not an even orthogonal stack: gantry tilt and uneven spacing.

The series are real slices of the corpus with edited headers (written to a temp folder).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_medfm.io import dicom
from tests.conftest import real_path

TOTALSEG = "ct/totalseg_dicom_series"


@pytest.fixture(scope="module")
def original():
    folder = real_path(TOTALSEG)
    [img] = dicom.read(folder)
    return folder, img


def _ipp(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return np.array([float(v) for v in ds.ImagePositionPatient])


def test_gantry_tilt_is_resampled_onto_true_geometry(original, tmp_path):
    folder, orig = original
    theta = math.radians(15.0)
    # gantry tilted about x: the image plane tips, slices stay stacked along the table (z)
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{math.cos(theta):.6f}", f"{-math.sin(theta):.6f}"]
        ds.save_as(tmp_path / f.name)
    [img] = dicom.read(tmp_path)
    text = " ".join(img.metadata["warnings"])
    assert "gantry tilt of 15.00 deg" in text
    g = img.geometry
    np.testing.assert_allclose(g.direction[:, 1], [0, math.cos(theta), -math.sin(theta)], atol=1e-5)
    np.testing.assert_allclose(g.direction.T @ g.direction, np.eye(3), atol=1e-6)
    assert g.spacing[2] == pytest.approx(2.0 * math.cos(theta), rel=1e-4)  # along the normal
    assert img.shape[1] > orig.shape[1]  # grown in plane to hold the sheared stack
    assert img.metadata["source_files"] == []  # slices no longer map to files one to one

    # every original pixel sits at IPP_k + i*sx*row + j*sy*col: sample there and compare
    rng = np.random.default_rng(0)
    r = np.array([1.0, 0, 0])
    c = np.array([0, math.cos(theta), -math.sin(theta)])
    n = np.cross(r, c)
    sx, sy = orig.geometry.spacing[:2]
    files = [Path(f) for f in orig.metadata["source_files"]]
    ipp0 = _ipp(files[0])
    truth, true_map, naive_map = [], [], []
    for k in range(2, 18):
        ij = rng.integers(100, 400, size=(200, 2))
        inplane = ij[:, 0:1] * sx * r + ij[:, 1:2] * sy * c
        true_pts = _ipp(files[k]) + inplane
        # what a reader ignoring the tilt would assume: slices stacked along the normal
        naive_pts = ipp0 + k * g.spacing[2] * n + inplane
        for pts, out in ((true_pts, true_map), (naive_pts, naive_map)):
            idx = np.rint(g.physical_to_index(pts)).astype(int)
            out.append(img.data[idx[:, 2], idx[:, 1], idx[:, 0]])
        truth.append(orig.data[k, ij[:, 1], ij[:, 0]])
    truth = np.concatenate(truth).astype(float)
    corr_true = np.corrcoef(truth, np.concatenate(true_map))[0, 1]
    corr_naive = np.corrcoef(truth, np.concatenate(naive_map))[0, 1]
    assert corr_true > 0.99
    assert corr_naive < corr_true - 0.05
    assert np.median(np.abs(truth - np.concatenate(true_map))) < 10  # HU, linear interpolation


def test_uneven_spacing_is_resampled_to_even_grid(original, tmp_path):
    folder, orig = original
    files = [Path(f) for f in orig.metadata["source_files"]]
    gone = 9
    for k, f in enumerate(files):
        if k != gone:
            shutil.copy(f, tmp_path / f.name)
    [img] = dicom.read(tmp_path)
    text = " ".join(img.metadata["warnings"])
    assert "non-uniform slice spacing (2-4 mm)" in text
    assert img.shape == orig.shape
    assert img.geometry.same_grid(orig.geometry, atol=1e-4)
    keep = [k for k in range(orig.shape[0]) if k != gone]
    np.testing.assert_array_equal(img.data[keep], orig.data[keep])
    expect = np.rint((orig.data[gone - 1].astype(np.float32) + orig.data[gone + 1]) / 2)
    np.testing.assert_array_equal(img.data[gone], expect.astype(np.int16))


def test_duplicate_positions_split_by_acquisition(original, tmp_path):
    folder, orig = original
    files = [Path(f) for f in orig.metadata["source_files"]][:6]
    for acq in (1, 2):
        for f in files:
            ds = pydicom.dcmread(f)
            ds.AcquisitionNumber = acq
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(tmp_path / f"{acq}_{f.name}")
    images = dicom.read(tmp_path)
    assert len(images) == 2
    assert sorted(im.name for im in images) == ["CT Body 3.0 [1]", "CT Body 3.0 [2]"]
    for im in images:
        assert im.shape == (6, 512, 512)
        assert any("split into 2 stacks by AcquisitionNumber" in w for w in im.metadata["warnings"])
        np.testing.assert_array_equal(im.data, orig.data[:6])
