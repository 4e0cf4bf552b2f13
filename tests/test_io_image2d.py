"""2D picture reader (CXR PNG, fundus JPEG, pathology patches) against the real corpus."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from napari_medfm.errors import ReadError
from napari_medfm.io import image2d, wsi
from tests.conftest import real_path

CXR_GREY = ["cxr/nih_chestxray14/00000001_000.png"]
CXR_RGB_SAVED = ["cxr/tbx11k/h0001.png", "cxr/tbx11k/tb0005.png"]
FUNDUS = [
    "fundus/hrf/01_dr.JPG",
    "fundus/hrf/01_g.jpg",
    "fundus/hrf/01_h.jpg",
    "fundus/idrid_codras/0001.jpg",
    "fundus/idrid_codras/0002.jpg",
    "fundus/idrid_codras/0050.jpg",
    "fundus/skimage_retina.jpg",
]
PATCHES = [
    "pathology/patches/histolab/high-nuclei-score-level0.png",
    "pathology/patches/histolab/low-nuclei-score-level0.png",
    "pathology/patches/histolab/no-tissue.png",
    "pathology/patches/histolab/tcga-lung-rgb.png",
    "pathology/patches/histolab/tissue-level0-4302-10273-4814-10785.png",
    "pathology/patches/histolab/tissue-level2-1784-6289-5880-10386.png",
    "pathology/patches/skimage_ihc.png",
    "pathology/patches/tiatoolbox_target_image.png",
    "pathology/patches/tcga_CHOL_TCGA-3X-AAVA/0_0_0_506.jpg",
    "pathology/patches/tcga_COAD_TCGA-AD-6964/Tile_(16896,20480).jpg",
]


def _pil(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im))


@pytest.mark.parametrize("rel", CXR_GREY + ["fundus/skimage_microaneurysms.png"])
def test_grey_png_stays_grey(rel):
    path = real_path(rel)
    assert image2d.can_read(path) and not wsi.can_read(path)
    (img,) = image2d.read(path, modality="CXR")
    assert img.kind == "image2d" and not img.rgb and not img.multiscale
    assert img.data.dtype == np.uint8 and img.data.ndim == 2
    np.testing.assert_array_equal(img.data, _pil(path))
    assert img.modality == "DX" and img.metadata["modality_hint"] == "CXR"
    assert img.geometry.spacing == (1.0, 1.0) and img.metadata["spacing_known"] is False
    assert img.contrast_limits() == (0.0, 255.0)


@pytest.mark.parametrize("rel", CXR_RGB_SAVED)
def test_rgb_saved_chest_xray_becomes_grey_unless_asked(rel):
    path = real_path(rel)
    ref = _pil(path)
    assert ref.ndim == 3 and ref.shape[-1] == 3
    (img,) = image2d.read(path)
    assert not img.rgb and img.data.shape == ref.shape[:2]
    assert img.metadata["rgb_collapsed"] is True
    np.testing.assert_array_equal(img.data, ref[..., 0])
    (kept,) = image2d.read(path, keep_rgb=True)
    assert kept.rgb and kept.metadata["rgb_collapsed"] is False
    np.testing.assert_array_equal(kept.data, ref)


@pytest.mark.parametrize("rel", FUNDUS)
def test_fundus_jpeg_rgb_pixels_equal_pillow(rel):
    path = real_path(rel)
    (img,) = image2d.read(path, modality="fundus")
    ref = _pil(path)
    assert img.rgb and img.data.dtype == np.uint8 and img.data.shape == ref.shape
    np.testing.assert_array_equal(img.data, ref)
    assert img.modality == "OP" and img.name == path.stem
    assert img.layer_data()[1]["rgb"] is True


@pytest.mark.parametrize("rel", ["fundus/hrf/01_dr.JPG", "fundus/idrid_codras/0001.jpg"])
def test_camera_exif_never_reaches_metadata(rel):
    path = real_path(rel)
    with Image.open(path) as im:
        exif = im.getexif()
        stamps = [str(v) for k, v in exif.items() if k in (0x0132, 0x010F, 0x0110, 0x013B)]
        stamps += [str(v) for v in exif.get_ifd(0x8769).values() if isinstance(v, str) and v.strip()]
    stamps = [s for s in stamps if len(s.strip()) >= 4]  # dates, camera make/model, ...
    assert stamps, "expected camera EXIF in this corpus file"
    (img,) = image2d.read(path)
    text = repr(img.full_metadata())
    for s in stamps:
        assert s not in text
    assert "exif" not in {k.lower() for k in img.metadata}


@pytest.mark.parametrize("rel", PATCHES)
def test_pathology_patches_open_rgb(rel):
    path = real_path(rel)
    (img,) = image2d.read(path, modality="pathology")
    ref = _pil(path)
    assert img.rgb and img.data.shape == ref.shape[:2] + (3,) and img.data.dtype == np.uint8
    np.testing.assert_array_equal(img.data, ref[..., :3])  # corpus RGBA tiles are opaque
    assert img.modality == "SM"
    if ref.shape[-1] == 4:
        assert img.metadata["alpha"] == "dropped"


def test_small_plain_tiff_patch_is_image2d_not_wsi():
    import tifffile

    path = real_path("pathology/patches/CRC-VAL-HE-7K_NORM-TCGA-YLVCMEHK.tif")
    assert image2d.can_read(path) and not wsi.can_read(path)
    (img,) = image2d.read(path, modality="pathology", mpp=0.5)
    np.testing.assert_array_equal(img.data, tifffile.imread(str(path)))
    assert img.rgb and img.data.shape == (224, 224, 3)
    assert img.geometry.spacing == pytest.approx((0.0005, 0.0005))
    assert img.metadata["mpp"] == pytest.approx([0.5, 0.5])


def test_slide_tiffs_are_left_to_wsi():
    assert not image2d.can_read(real_path("pathology/wsi/CMU-1-Small-Region.svs"))
    assert not image2d.can_read(real_path("pathology/wsi/OS-1-detail.ome.tif"))


def test_transparent_rgba_is_composited_on_white_or_kept(tmp_path):
    src = real_path("pathology/patches/histolab/low-nuclei-score-level0.png")
    rgba = np.asarray(Image.open(src)).copy()
    rgba[:100, :50, 3] = 0
    rgba[200:210, :, 3] = 128
    out = tmp_path / "holes.png"
    Image.fromarray(rgba, "RGBA").save(out)
    (img,) = image2d.read(out)
    assert img.rgb and img.data.shape[-1] == 3
    assert img.metadata["alpha"] == "composited_on_white"
    assert np.all(img.data[:100, :50] == 255)
    np.testing.assert_array_equal(img.data[300:], rgba[300:, :, :3])
    half = rgba[200:210, :, :3].astype(float) * (128 / 255) + 255 * (1 - 128 / 255)
    assert np.abs(img.data[200:210].astype(float) - half).max() <= 0.5 + 1e-6
    assert any("white" in w for w in img.metadata["warnings"])
    (kept,) = image2d.read(out, keep_alpha=True)
    assert kept.data.shape[-1] == 4 and kept.metadata["alpha"] == "kept"
    np.testing.assert_array_equal(kept.data, rgba)


def test_16bit_png_is_kept(tmp_path):
    grey = np.asarray(Image.open(real_path(CXR_GREY[0])))
    deep = grey.astype(np.uint16) * 257 + 3
    out = tmp_path / "deep.png"
    Image.fromarray(deep).save(out)
    (img,) = image2d.read(out)
    assert img.data.dtype == np.uint16 and not img.rgb
    np.testing.assert_array_equal(img.data, deep)
    lo, hi = img.contrast_limits()
    assert lo == pytest.approx(np.percentile(deep, 0.5)) and hi == pytest.approx(np.percentile(deep, 99.5))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    src = np.asarray(Image.open(real_path(FUNDUS[-1])))[100:300, 200:500]  # 200 x 300, not square
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(src).save(out, exif=exif, quality=95)
    with Image.open(out) as im:
        stored = np.asarray(im)  # pixels as stored, before orientation
    (img,) = image2d.read(out)
    expect = {3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}[orientation]
    np.testing.assert_array_equal(img.data, expect)
    np.testing.assert_array_equal(img.data, _pil(out))
    assert img.metadata["exif_orientation"] == orientation


@pytest.mark.parametrize("rel", ["fundus/idrid_codras/0002.jpg", CXR_GREY[0]])
def test_truncated_picture_raises_read_error_naming_the_file(tmp_path, rel):
    src = real_path(rel)
    data = src.read_bytes()
    bad = tmp_path / f"cut_{src.name}"
    bad.write_bytes(data[: len(data) // 2])
    assert image2d.can_read(bad)  # still sniffs as a picture...
    with pytest.raises(ReadError) as exc:  # ...but reading fails cleanly
        image2d.read(bad)
    assert bad.name in str(exc.value) and exc.value.path == bad


def test_can_read_never_raises_and_checks_magic(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is text, not a PNG")
    assert image2d.can_read(fake) is False
    with pytest.raises(ReadError, match="fake.png"):
        image2d.read(fake)
    assert image2d.can_read(tmp_path) is False
    assert image2d.can_read(tmp_path / "missing.jpg") is False
    assert image2d.can_read(real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")) is False
    assert image2d.normalize_modality(None) == "OT"
    assert image2d.normalize_modality("mr") == "MR"


@pytest.mark.gui
def test_fundus_and_cxr_layers_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    (fundus,) = image2d.read(real_path("fundus/skimage_retina.jpg"), modality="fundus")
    (cxr,) = image2d.read(real_path(CXR_GREY[0]), modality="CXR")
    for img in (fundus, cxr):
        data, kwargs, layer_type = img.layer_data()
        layer = viewer.add_image(data, **kwargs)
        assert layer.rgb == img.rgb
        assert layer.metadata["modality"] == img.modality
    assert tuple(viewer.layers[-1].contrast_limits) == (0.0, 255.0)


def test_16bit_colour_png_keeps_its_depth(tmp_path):
    imagecodecs = pytest.importorskip("imagecodecs")
    rgb = np.asarray(Image.open(real_path("fundus/skimage_retina.jpg")))[300:500, 200:500]
    deep = rgb.astype(np.uint16) * 257 + 1
    out = tmp_path / "deep_rgb.png"
    out.write_bytes(imagecodecs.png_encode(deep))
    assert np.asarray(Image.open(out)).dtype == np.uint8  # what Pillow alone would give
    (img,) = image2d.read(out, modality="fundus")
    assert img.rgb and img.data.dtype == np.uint16
    np.testing.assert_array_equal(img.data, deep)
