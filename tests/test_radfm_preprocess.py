"""RadFM preprocessing from MedicalImage: 2D (512x512, [0, 1], depth 4) and 3D (depth snapped to
{4..64}, global min-max, optional window), deterministic; on real files of the corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import real_path

from napari_medfm.geometry import Geometry
from napari_medfm.io import read
from napari_medfm.io.types import MedicalImage
from napari_medfm.models.radfm.preprocess import (
    image_dims,
    modality_group,
    preprocess_2d,
    preprocess_3d,
    preprocess_image,
    snap_depth,
)


def test_snap_depth_rule():
    assert [snap_depth(d) for d in (1, 3, 4, 5, 6, 7, 20, 30, 62, 64, 65, 300)] == \
        [4, 4, 4, 4, 8, 8, 20, 32, 64, 64, 64, 64]
    assert all(snap_depth(d) % 4 == 0 and 4 <= snap_depth(d) <= 64 for d in range(1, 200))


def test_2d_real_cxr_png_and_rgb_fundus():
    cxr = read(real_path("cxr/nih_chestxray14/00000001_000.png"))[0]
    t = preprocess_image(cxr)
    assert t.shape == (3, 512, 512, 4) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    a = np.asarray(cxr.data)
    # already 512x512 uint8: exactly /255, grey replicated to 3 channels and 4 depths
    assert torch.equal(t[0, :, :, 0], torch.from_numpy(a.astype(np.float32) / 255.0))
    assert torch.equal(t[0], t[2]) and torch.equal(t[..., 0], t[..., 3])
    fundus = read(real_path("fundus/skimage_retina.jpg"))[0]
    assert image_dims(fundus) == 2 and modality_group(cxr) in ("CXR", None)
    f1 = preprocess_image(fundus)
    assert f1.shape == (3, 512, 512, 4) and not torch.equal(f1[0], f1[1])  # real colour
    assert torch.equal(f1, preprocess_image(fundus))  # deterministic


def test_3d_real_ct_minmax_window_and_depth():
    ct = read(real_path("ct/totalseg_nifti/example_ct_sm.nii.gz"))[0]
    assert image_dims(ct) == 3
    z = ct.shape[0]
    t = preprocess_3d(ct, image_size=64)
    assert z == 30 and t.shape == (3, 64, 64, 32)  # 30 slices snapped to 32
    assert 0.0 <= float(t.min()) < 0.05 and 0.95 < float(t.max()) <= 1.0
    t28 = preprocess_3d(MedicalImage(data=np.asarray(ct.data)[:28], geometry=ct.geometry),
                        image_size=64)
    assert t28.shape[-1] == 28 and float(t28.min()) == 0.0 and float(t28.max()) == 1.0
    w = preprocess_3d(ct, image_size=64, window=(40, 400))
    assert not torch.equal(t, w) and float(w.min()) < 0.05
    assert torch.equal(w, preprocess_3d(ct, image_size=64, window=(40, 400)))
    # depth > 64 is zoomed to 64; H = y, W = x, D = z
    vol = np.zeros((100, 40, 30), np.int16)
    vol[:, 10, 5] = 1000
    img = MedicalImage(data=vol, geometry=Geometry.identity(3), modality="CT")
    out = preprocess_3d(img, image_size=64)
    assert out.shape == (3, 64, 64, 64)
    yx = out[0].mean(-1)
    iy, ix = np.unravel_index(int(yx.argmax()), yx.shape)
    assert abs(iy - 10 * 64 / 40 - 0.8) < 2 and abs(ix - 5 * 64 / 30 - 1) < 2
    assert modality_group(img) == "CT"


def test_2d_other_dtypes_use_window_or_minmax():
    a = np.arange(100 * 80, dtype=np.uint16).reshape(100, 80)
    img = MedicalImage(data=a, geometry=Geometry.identity(2), modality="DX", kind="image2d")
    t = preprocess_2d(img, image_size=64)
    assert t.shape == (3, 64, 64, 4) and float(t.min()) >= 0 and float(t.max()) <= 1
    img.window = (100.0, 100.0)
    assert float(preprocess_2d(img, image_size=64).mean()) > 0.98  # ~98% of the pixels lie above the window
    assert modality_group(img) == "CXR"
    with pytest.raises(Exception, match="2D image expected"):
        preprocess_2d(np.zeros((2, 3, 4, 5)))
