"""Format sniffers catch only the errors a foreign file causes; a bug is not "unsupported"."""

from __future__ import annotations

import logging

import pytest


def test_foreign_files_are_refused_quietly(tmp_path):
    from napari_medfm.io import can_read, dicom, image2d, volume, wsi

    fake_tif = tmp_path / "slide.tif"
    fake_tif.write_bytes(b"II*\x00" + b"\xff" * 60)  # TIFF magic, garbage after it
    fake_dcm = tmp_path / "x.dcm"
    fake_dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")  # truncated
    for f in (fake_tif, fake_dcm):
        assert wsi.can_read(f) is False
    assert dicom.is_wsi_dicom(fake_dcm) is False
    assert volume.can_read(tmp_path / "missing.nii.gz") is False
    assert image2d.can_read(tmp_path) is False
    assert can_read(tmp_path / "missing.png") is False


def test_a_sniffer_bug_propagates_and_the_napari_hook_logs_it(tmp_path, monkeypatch, caplog):
    import tifffile

    from napari_medfm._napari.reader import napari_get_reader
    from napari_medfm.io import wsi

    tif = tmp_path / "case_0042.tif"
    tifffile.imwrite(tif, [[1, 2], [3, 4]])

    def broken(*_a, **_k):
        raise AttributeError("a bug in a sniffer")

    monkeypatch.setattr(tifffile, "TiffFile", broken)
    with pytest.raises(AttributeError, match="a bug"):
        wsi.can_read(tif)  # not silently "unsupported format"
    with caplog.at_level(logging.DEBUG, logger="napari_medfm._napari.reader"):
        assert napari_get_reader(str(tif)) is None  # napari's reader loop goes on
    assert "case_0042.tif" in caplog.text and "AttributeError" in caplog.text
