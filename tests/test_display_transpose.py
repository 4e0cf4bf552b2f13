"""Coronal/sagittal volumes: napari gets a transposed view it can slice; voxels keep their LPS positions."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import real_path

from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage

CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # rows run head -> foot
SAGITTAL = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)


def _volume(direction: np.ndarray) -> sitk.Image:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(size=(6, 8, 10)).astype(np.float32))
    img.SetDirection(tuple(direction.reshape(-1)))
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    return img


@pytest.mark.parametrize("direction", [CORONAL, SAGITTAL, np.eye(3), np.diag([-1.0, -1.0, 1.0])])
def test_transposed_view_keeps_every_voxel_in_place(direction):
    img = _volume(direction)
    m = MedicalImage(sitk.GetArrayFromImage(img), Geometry.from_sitk(img))
    data, kwargs, _ = m.layer_data()
    axes = kwargs["metadata"].get("display_transpose")
    if np.allclose(np.abs(direction), np.eye(3)):
        assert axes is None and data is m.data
    else:
        assert axes is not None
        assert np.shares_memory(data, m.data)  # a view, no copy
    if "affine" in kwargs:
        g = Geometry.from_napari_affine(kwargs["affine"])
    else:
        g = Geometry(kwargs["scale"][::-1], kwargs["translate"][::-1], np.eye(3))
    # display geometry is diagonal-dominant: each image axis along its own patient axis
    assert np.argmax(np.abs(g.direction), axis=0).tolist() == [0, 1, 2]
    for idx in np.ndindex(*m.data.shape):
        if sum(idx) % 7:
            continue
        pt = img.TransformIndexToPhysicalPoint([int(v) for v in idx[::-1]])
        j = tuple(np.rint(g.physical_to_index(pt)).astype(int)[::-1])
        assert data[j] == m.data[idx]


def test_real_coronal_dicom_in_napari_round_trips(make_napari_viewer):
    from napari_medfm.io import read

    path = real_path("dicom_edge/ct_j2k_lossless_coronal_pixrep_mismatch_TOSHIBA.dcm")
    (img,) = read(path)
    assert img.geometry.display_transpose() is not None  # really coronal
    viewer = make_napari_viewer()
    data, kwargs, _ = img.layer_data()
    layer = viewer.add_image(data, **kwargs)
    viewer.dims.ndisplay = 2
    viewer.screenshot(canvas_only=True)  # napari must be able to slice and draw it
    sitk_img = img.to_sitk()
    for idx in [(0, 0, 0), (0, 100, 200), (0, 511, 300)]:
        disp = tuple(np.asarray(idx)[kwargs["metadata"]["display_transpose"]])
        world = np.asarray(layer.data_to_world(disp))[::-1]
        expected = sitk_img.TransformIndexToPhysicalPoint([int(v) for v in idx[::-1]])
        np.testing.assert_allclose(world, expected, atol=1e-4)
    back = MedicalImage.from_layer(layer)
    assert back.geometry == img.geometry
    assert back.data.shape == img.data.shape
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(img.data))
