"""Every file of the corpus' ``dicom_edge/`` (and the CXR DICOMs): opens correctly or fails clearly."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from napari_medfm.errors import MissingDecoderError, ReadError
from napari_medfm.io import dicom
from tests.conftest import real_path, test_data_dir

EDGE = test_data_dir() / "dicom_edge"
EDGE_FILES = sorted(p.relative_to(test_data_dir()).as_posix() for p in EDGE.rglob("*.dcm")) if EDGE.is_dir() else []
CXR_FILES = ["cxr/dicom/nema_RG1_J2KI_chest_CR.dcm",
             "cxr/dicom/siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]
SIIM = CXR_FILES[1]

#: Files that must fail, with the words the message must contain.
MUST_FAIL = {
    "dicom_edge/mr_truncated_pixeldata.dcm": "truncated pixel data: expected 8192 bytes, found 8130",
}


def _reference_values(path):
    """Stored values decoded by pydicom, with rescale applied (what the header says)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float64)
    return arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0), ds


def test_corpus_has_edge_files():
    real_path("dicom_edge")
    assert len(EDGE_FILES) >= 25


@pytest.mark.parametrize("rel", EDGE_FILES + CXR_FILES)
def test_every_file_opens_or_fails_clearly(rel):
    path = real_path(rel)
    if rel in MUST_FAIL:
        with pytest.raises(ReadError) as info:
            dicom.read(path, series_only=False)
        assert path.name in str(info.value) and MUST_FAIL[rel] in str(info.value)
        return
    try:
        images = dicom.read(path, series_only=False)
    except (ReadError, MissingDecoderError) as exc:
        # only DICOM-SEG files may fail here (their reader is io/dicom_seg, or the codec
        # is unsupported by pydicom); the message names the file and the cause
        assert "/seg/" in rel, f"{rel} failed: {exc}"
        assert path.name in str(exc) and len(str(exc)) > len(path.name) + 10
        return
    assert len(images) == 1
    img = images[0]
    if "/seg/" in rel:
        assert img.is_label
        return
    data = np.asarray(img.data)
    assert data.size > 0 and np.all(np.isfinite(data))
    assert img.kind in ("volume", "image2d")
    assert len(img.spatial_shape) == img.geometry.ndim
    lo, hi = img.contrast_limits() or (None, None)
    if not img.rgb:
        assert lo is not None and hi > lo
    assert "PatientName" not in img.metadata and img.metadata["source_path"] == str(path)


@pytest.mark.parametrize("rel", [
    "dicom_edge/ct_j2k_flippedY_allUN_pancreas.dcm",
    "dicom_edge/ct_j2k_jp2header_ELSCINT.dcm",
    "dicom_edge/ct_j2k_lossless_axial_TOSHIBA.dcm",
    "dicom_edge/ct_j2k_lossy_coronal_MAROTECH.dcm",
    "dicom_edge/ct_jpeg_lossless_sv1_bad_sequence.dcm",
    "dicom_edge/ct_jpegls_nearlossless_CT1_JLSN.dcm",
    "dicom_edge/ct_oblique_tilt_j2k_bitsstored13.dcm",
    "dicom_edge/ct_small_128px.dcm",
    "dicom_edge/mr_small_bigendian.dcm",
    "dicom_edge/mr_rescale_slope_jpeg_lossless_p14.dcm",
    "dicom_edge/mr_rescale_slope_oblique_J2KR.dcm",
])
def test_values_and_geometry_of_single_slices(rel):
    path = real_path(rel)
    [img] = dicom.read(path, series_only=False)
    ref, ds = _reference_values(path)
    assert img.kind == "volume" and img.shape == (1,) + ref.shape
    np.testing.assert_allclose(img.data[0], ref, rtol=1e-6, atol=1e-3)
    if img.modality == "CT":
        assert img.data.dtype == np.int16 and img.metadata["units"] == "HU"
    slope = float(ds.get("RescaleSlope", 1) or 1)
    if not slope.is_integer():
        assert img.data.dtype == np.float32
    assert img.data.dtype.isnative
    # geometry: same as SimpleITK/GDCM reading the file (origin, directions, pixel spacing)
    s = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.geometry.origin, s.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.geometry.direction, np.reshape(s.GetDirection(), (3, 3)), atol=1e-4)
    np.testing.assert_allclose(img.geometry.spacing[:2], s.GetSpacing()[:2], rtol=1e-5)


def test_signed_j2k_with_pixel_representation_0():
    path = real_path("dicom_edge/ct_j2k_lossless_coronal_pixrep_mismatch_TOSHIBA.dcm")
    [img] = dicom.read(path, series_only=False)
    raw = pydicom.dcmread(path).pixel_array  # naive decode: unsigned garbage 0..65535
    assert raw.max() > 60000
    np.testing.assert_array_equal(img.data[0], raw.view(np.int16))
    assert img.data.min() == -2048 and img.data.max() < 4000  # plausible HU
    assert any("signed" in w for w in img.metadata["warnings"])
    assert img.geometry.orientation == "LIP"  # coronal


def test_bits_stored_13_oblique_head_ct():
    path = real_path("dicom_edge/ct_oblique_tilt_j2k_bitsstored13.dcm")
    [img] = dicom.read(path, series_only=False)
    assert img.data.min() == -2000 and img.data.max() == 1896
    col = img.geometry.direction[:, 1]
    np.testing.assert_allclose(col, np.array([0, 0.9272, -0.3746]) / np.hypot(0.9272, 0.3746), atol=1e-4)
    assert img.geometry.obliquity_degrees > 20


def test_monochrome1_twin_is_inverted():
    mono2 = dicom.read(real_path(SIIM))[0]
    mono1 = dicom.read(real_path("dicom_edge/cr_monochrome1_fake_siim.dcm"))[0]
    assert mono1.metadata["photometric"] == "MONOCHROME1" and mono1.metadata["inverted"]
    assert not mono2.metadata["inverted"]
    assert mono1.kind == mono2.kind == "image2d" and mono1.data.dtype == np.uint8
    np.testing.assert_array_equal(mono1.data.astype(int), 255 - mono2.data.astype(int))
    assert mono1.geometry.spacing == pytest.approx((0.168, 0.168))


def test_monochrome1_cr_with_degenerate_spacing_and_window():
    path = real_path("cxr/dicom/nema_RG1_J2KI_chest_CR.dcm")
    [img] = dicom.read(path)
    raw = pydicom.dcmread(path).pixel_array.astype(int)
    assert img.kind == "image2d" and img.modality == "CR" and img.data.dtype in (np.int16, np.uint16)
    np.testing.assert_array_equal(img.data.astype(int), (2**15 - 1) - raw)
    assert img.geometry.spacing == (1.0, 1.0)
    assert any("degenerate pixel spacing" in w for w in img.metadata["warnings"])
    # header window 15000/30000 in MONOCHROME1 terms -> mirrored centre
    assert img.window == pytest.approx((2**15 - 1 - 15000, 30000))


def test_enhanced_ct_functional_groups():
    path = real_path("dicom_edge/ct_enhanced_multiframe_eCT_Supplemental.dcm")
    [img] = dicom.read(path)
    ds = pydicom.dcmread(path)
    assert img.shape == (2, 512, 512) and img.kind == "volume"
    assert img.geometry.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # IOP -1,0,0 / 0,1,0: normal = -z; frames sorted ascending along it (z=-149 first)
    assert img.geometry.orientation == "RPI"
    assert img.geometry.origin == pytest.approx((99.5, -301.5, -149.0))
    per = ds.PerFrameFunctionalGroupsSequence
    zs = [float(it.PlanePositionSequence[0].ImagePositionPatient[2]) for it in per]
    first = int(np.argmax(zs))  # the frame at z=-149
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array[first].astype(int) * int(pvt.RescaleSlope) + int(pvt.RescaleIntercept)
    np.testing.assert_array_equal(img.data[0], hu)
    assert img.metadata["units"] == "HU" and img.metadata["source_files"] == [str(path)]


def test_enhanced_mr_encodings_agree_and_warn():
    paths = sorted(real_path("dicom_edge/multiframe").glob("*.dcm"))
    assert len(paths) == 5
    arrays = []
    for p in paths:
        [img] = dicom.read(p)
        assert img.shape == (10, 64, 64) and img.modality == "MR"
        text = " ".join(img.metadata["warnings"])
        assert "no pixel spacing" in text and "no position" in text
        assert img.geometry.spacing == pytest.approx((1.0, 1.0, 1.2))  # SpacingBetweenSlices
        arrays.append(img.data)
    for a in arrays[1:]:
        np.testing.assert_array_equal(a, arrays[0])
    np.testing.assert_array_equal(arrays[0], pydicom.dcmread(paths[0]).pixel_array)


def test_palette_color_ultrasound_becomes_rgb():
    from pydicom.pixels import apply_color_lut

    path = real_path("dicom_edge/us_palette_rle_2frame.dcm")
    [img] = dicom.read(path)
    assert img.rgb and img.shape == (2, 600, 800, 3) and img.data.dtype == np.uint8
    ds = pydicom.dcmread(path)
    lut = apply_color_lut(ds.pixel_array, ds)  # 16-bit palette entries here
    assert lut.dtype == np.uint16
    np.testing.assert_array_equal(img.data, (lut >> 8).astype(np.uint8))
    _, kwargs, kind = img.layer_data()
    assert kind == "image" and kwargs["rgb"]


@pytest.mark.parametrize("rel,spacing", [
    ("dicom_edge/nm_jpeg_extended_12bit.dcm", (2.26, 2.26)),
    ("dicom_edge/cr_hip_jpegls_nearlossless_RG2.dcm", (0.2, 0.2)),
])
def test_2d_images(rel, spacing):
    path = real_path(rel)
    [img] = dicom.read(path)
    assert img.kind == "image2d" and img.geometry.ndim == 2
    assert img.geometry.spacing == pytest.approx(spacing)
    np.testing.assert_array_equal(img.data, pydicom.dcmread(path).pixel_array)


def test_missing_decoder_message_names_package(monkeypatch):
    """With the JPEG-LS plugins made unavailable, the error says which package to install."""
    from pydicom.pixels import get_decoder

    path = real_path("dicom_edge/ct_jpegls_nearlossless_CT1_JLSN.dcm")
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    saved = dict(decoder._available)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {k: ("pyjpegls",) for k in saved})
    with pytest.raises(MissingDecoderError, match="ct_jpegls_nearlossless_CT1_JLSN.dcm: .*needs package pyjpegls"):
        dicom.read(path, series_only=False)
