"""MerMED-FM preprocessing matches the release (issue 9): the whole image squashed to 224 x 224
(torchvision ``Resize((224, 224), antialias=True)``), and the modality is never guessed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.models import encoder2d
from napari_medfm.runtime.registry import load_model
from tests.conftest import real_path
from tests.test_mermed import grey_image, tiny_mermed_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_enc(tmp_path_factory):
    path = tiny_mermed_checkpoint(tmp_path_factory.mktemp("mermed") / "MerMED.pth")
    return load_model("mermed", weights=path)


def test_release_resize_on_a_real_non_square_fundus_photo(tiny_enc):
    from torchvision.transforms import Resize

    from napari_medfm import io as mio

    img = mio.read(real_path("fundus/hrf/01_dr.JPG"))[0]  # 3504 x 2336 RGB, no modality
    plane = np.asarray(img.data)
    assert plane.shape[0] != plane.shape[1]
    got = tiny_enc.preprocess(img, modality="fundus")
    # the release: ToTensor (uint8 / 255, CHW) -> Resize((224, 224)) -> Normalize(fundus)
    t = torch.from_numpy(np.ascontiguousarray(plane)).permute(2, 0, 1).float() / 255.0
    ref = Resize((224, 224), antialias=True)(t)
    mean, std = encoder2d.MODALITY_NORMS["fundus"]
    ref = (ref - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    # the sides of the photo are kept (a centre crop would cut a sixth off each side)
    e = tiny_enc.embed(img, modality="OP")
    assert e["modality"] == "fundus"


def test_squash_keeps_the_whole_wide_image():
    wide = np.zeros((20, 60), np.uint8)
    wide[:, :20] = 255  # left third only
    img = grey_image(wide)
    sq = encoder2d.preprocess(img, size=20, resize="squash", mean=(0,) * 3, std=(1,) * 3)
    cr = encoder2d.preprocess(img, size=20, resize="crop", mean=(0,) * 3, std=(1,) * 3)
    assert sq[0, :, :5].min() > 0.99 and sq[0, :, 8:].max() < 0.01  # left third -> left third
    assert cr.max() < 0.01  # the centre crop loses it


def test_unknown_or_missing_modality_is_an_error_listing_the_modalities(tiny_enc):
    png = MedicalImage(np.full((40, 50), 100, np.uint8), Geometry.identity(2), modality="OT",
                       kind="image2d", name="chest.png")
    for bad in (None, "OT", "MR"):
        with pytest.raises(encoder2d.UnknownModalityError) as ei:
            tiny_enc.embed(png, modality=bad)
        msg = str(ei.value)
        assert "chest.png" in msg and all(m in msg for m in encoder2d.MODALITY_NORMS)
    with pytest.raises(encoder2d.UnknownModalityError):
        tiny_enc.embed_batch([png], modality=[None])
    with pytest.raises(encoder2d.UnknownModalityError):
        encoder2d.preprocess(png)
    # named: the modality used is reported, DICOM codes canonicalised
    assert tiny_enc.embed(png, modality="CXR")["modality"] == "CXR"
    assert tiny_enc.modality_for(png, "DX") == "CXR"
    assert tiny_enc.modalities_for([png, png], ["SM", "oct"]) == ["pathology", "OCT"]
    # an image that says what it is needs no modality; HU data without a modality is CT
    assert tiny_enc.embed(grey_image(np.zeros((30, 30), np.uint8), "CR"))["modality"] == "CXR"
    hu = MedicalImage(np.zeros((30, 30), np.int16), Geometry.identity(2), modality=None,
                      kind="image2d", metadata={"units": "HU"})
    assert tiny_enc.modality_for(hu) == "CT"


def test_forced_fallback_warns_and_is_reported(tiny_enc, caplog):
    png = MedicalImage(np.full((40, 50), 100, np.uint8), Geometry.identity(2), modality="OT",
                       kind="image2d", name="x.png")
    with pytest.warns(encoder2d.ModalityFallbackWarning, match="ImageNet"):
        res = tiny_enc.embed(png, modality="imagenet")
    assert res["modality"] == "imagenet"
    with pytest.warns(encoder2d.ModalityFallbackWarning, match="'OT'"):
        res2 = tiny_enc.embed(png, allow_fallback=True)
    assert res2["modality"] == "imagenet"
    np.testing.assert_allclose(res["image_embedding"], res2["image_embedding"], rtol=1e-5)
    # the fallback really uses the ImageNet statistics, not another modality's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", encoder2d.ModalityFallbackWarning)
        x = tiny_enc.preprocess(png, modality="imagenet")
    m, s = encoder2d.IMAGENET_NORM
    np.testing.assert_allclose(x[:, 0, 0], (100 / 255 - np.array(m)) / np.array(s), atol=1e-5)
    assert "ImageNet" in caplog.text


def test_builder_checks_its_default_modality(tmp_path):
    path = tiny_mermed_checkpoint(tmp_path / "MerMED.pth")
    with pytest.raises(encoder2d.UnknownModalityError, match="fundus"):
        load_model("mermed", weights=path, modality="xray-ish")
    enc = load_model("mermed", weights=path, modality="cr")
    png = MedicalImage(np.zeros((32, 32), np.uint8), Geometry.identity(2), modality="OT",
                       kind="image2d")
    assert enc.embed(png)["modality"] == "CXR"
    lax = load_model("mermed", weights=path, allow_fallback=True)
    with pytest.warns(encoder2d.ModalityFallbackWarning):
        assert lax.embed(png)["modality"] == "imagenet"
