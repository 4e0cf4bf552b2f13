"""DICOM files without preamble and File Meta (issue 9): opened with a note, while files that are
not DICOM are still refused on their first bytes."""

from __future__ import annotations

import io as _io
import shutil

import numpy as np
import pydicom
import pytest

from napari_medfm import io as mio
from napari_medfm.errors import UnsupportedFormatError
from napari_medfm.io import dicom
from tests.conftest import real_path

NO_META = "dicom_edge/ct_small_no_file_meta.dcm"


def _reference(path):
    """pydicom's reading of the data set once the stray leading byte is skipped."""
    raw = path.read_bytes()
    assert raw[128:132] != b"DICM" and raw[:1] == b" "  # no preamble, one stray byte
    ds = pydicom.dcmread(_io.BytesIO(raw[1:]), force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def test_corpus_file_without_file_meta_opens_with_a_note(tmp_path):
    src = real_path(NO_META)
    p = tmp_path / src.name  # alone in its folder (the corpus holds a copy of the same CT)
    shutil.copy(src, p)
    assert dicom.is_dicom_file(p) and mio.can_read(p)
    images = mio.read(p)
    assert len(images) == 1
    img = images[0]
    ref = _reference(p)
    hu = ref.pixel_array.astype(np.float64) * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
    np.testing.assert_array_equal(np.asarray(img.data).reshape(hu.shape), hu)
    assert img.modality == "CT" and img.metadata["units"] == "HU"
    np.testing.assert_allclose(img.geometry.spacing[:2], [float(v) for v in ref.PixelSpacing])
    note = img.metadata["file_meta"]
    assert "no DICOM preamble/File Meta" in note and "stray byte" in note
    assert note in img.metadata["warnings"]


def test_clean_headerless_files_both_vr_encodings(tmp_path):
    src = real_path("dicom_edge/ct_small_128px.dcm")
    base = pydicom.dcmread(src)
    want = base.pixel_array
    for implicit in (True, False):
        ds = pydicom.dcmread(src)
        del ds.file_meta
        ds.preamble = None
        out = tmp_path / f"nometa_{'ivr' if implicit else 'evr'}.dcm"
        ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        raw = out.read_bytes()
        assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"
        solo = tmp_path / f"solo_{out.stem}"
        solo.mkdir()
        shutil.move(out, solo / out.name)
        img = mio.read(solo / out.name)[0]
        assert np.asarray(img.data).reshape(want.shape).tolist() == (
            want.astype(np.int64) * int(base.RescaleSlope) + int(base.RescaleIntercept)).tolist()
        assert ("implicit" if implicit else "explicit") in img.metadata["file_meta"]


@pytest.mark.parametrize("content", [
    b"hello, this is a plain text file\n" * 20,
    b"\x89PNG\r\n\x1a\n" + bytes(200),
    b" " + b"\x08\x00\x05\x00" + bytes(200),  # one plausible tag then zeros: not two elements
    bytes(range(256)) * 4,
])
def test_non_dicom_files_are_refused_without_parsing(tmp_path, monkeypatch, content):
    p = tmp_path / "thing.dcm"
    p.write_bytes(content)
    calls = []
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a) or 1 / 0)
    assert not dicom.is_dicom_file(p)
    with pytest.raises(UnsupportedFormatError):
        mio.read(p)
    assert calls == []  # refused on the first bytes, never handed to the DICOM parser


def test_napari_reader_puts_the_note_in_the_layer_metadata(tmp_path):
    from napari_medfm._napari.reader import napari_get_reader

    p = tmp_path / "old_export.dcm"
    shutil.copy(real_path(NO_META), p)
    reader = napari_get_reader(str(p))
    assert reader is not None
    (_data, kwargs, kind), = reader(str(p))
    assert kind == "image"
    assert "no DICOM preamble/File Meta" in kwargs["metadata"]["file_meta"]
