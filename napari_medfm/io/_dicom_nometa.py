"""DICOM files without preamble and File Meta (group 0002), as older systems export them.

Such a file starts directly with the data set (usually group 0008, explicit or implicit VR
little endian). Some exporters also leave a few stray bytes before the first element (the
pydicom test file ``no_meta.dcm`` starts with one 0x20 byte): pydicom then parses garbage even
with ``force=True``. :func:`headerless_offset` finds where the data set starts from the first
bytes alone (cheap enough for the sniffer; non-DICOM files are refused on 132 bytes) and
:func:`complete_header` re-reads the data set from there and records the transfer syntax it was
parsed with, so pixel decoding works, with a note for the layer metadata.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

#: stray bytes tolerated before the first data element of a file without preamble/meta
MAX_STRAY_BYTES = 16

#: attribute set on a pydicom data set read by :func:`complete_header` (the note to show)
NOTE_ATTR = "_medfm_no_file_meta"

_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
        b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _at_zero(head: bytes) -> bool:
    """The historical rule for a file starting with a group 0x0002/0x0008 element."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    elem = int.from_bytes(head[2:4], "little")
    if group not in (0x0002, 0x0008) or elem > 0x1FFF:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        return True
    length = int.from_bytes(head[4:8], "little")  # implicit VR: a sane element length
    return length < 1 << 16


def _element(head: bytes, k: int) -> tuple[int, int, int] | None:
    """(group, element, offset of the next element) of a plausible element at ``k``."""
    if k + 8 > len(head):
        return None
    group = int.from_bytes(head[k:k + 2], "little")
    elem = int.from_bytes(head[k + 2:k + 4], "little")
    vr = head[k + 4:k + 6]
    if vr in _VRS:
        if vr in _LONG_VRS:
            if head[k + 6:k + 8] != b"\0\0" or k + 12 > len(head):
                return None
            length = int.from_bytes(head[k + 8:k + 12], "little")
            nxt = k + 12 + length
        else:
            length = int.from_bytes(head[k + 6:k + 8], "little")
            nxt = k + 8 + length
    else:
        length = int.from_bytes(head[k + 4:k + 8], "little")
        nxt = k + 8 + length
    if length == 0xFFFFFFFF or length >= 1 << 16:
        return None
    return group, elem, nxt


def _two_elements(head: bytes, k: int) -> bool:
    """A group 0x0008 element at ``k`` followed by a second one in ascending tag order."""
    first = _element(head, k)
    if first is None or first[0] != 0x0008 or first[1] > 0x1FFF:
        return False
    second = _element(head, first[2])
    if second is None:
        return False
    return (second[0], second[1]) > (first[0], first[1]) and second[0] in (0x0008, 0x0010,
                                                                            0x0018, 0x0020)


def headerless_offset(head: bytes) -> int | None:
    """Where the data set of a file without preamble and File Meta starts, or None.

    ``head`` is the file's first 132 bytes. Offset 0 keeps the historical rule (a group
    0x0002/0x0008 element); an offset of 1-:data:`MAX_STRAY_BYTES` needs two consecutive
    well-formed elements (group 0x0008 first, tags ascending), so text or binary files are not
    taken for DICOM.
    """
    if _at_zero(head):
        return 0
    for k in range(1, MAX_STRAY_BYTES + 1):
        if _two_elements(head, k):
            return k
    return None


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(132)


def complete_header(path: Path, ds: Any, **kw: Any) -> Any:
    """``ds`` (read by pydicom with ``force=True``) when it has a File Meta transfer syntax;
    otherwise the data set of a file without File Meta, re-read from its real start when stray
    bytes precede it, with the transfer syntax it was parsed with and a note (:data:`NOTE_ATTR`).
    """
    fm = getattr(ds, "file_meta", None)
    if fm is not None and fm.get("TransferSyntaxUID"):
        return ds
    head = _head(path)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ds  # a preamble and meta without transfer syntax: leave it to the reader
    off = headerless_offset(head)
    if off is None:
        return ds
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if off > 0:
        kw = {k: v for k, v in kw.items() if k != "defer_size"}  # offsets would be shifted
        with open(path, "rb") as fh:
            fh.seek(off)
            data = fh.read()
        ds = pydicom.dcmread(io.BytesIO(data), force=True, **kw)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit = bool(getattr(ds, "is_implicit_VR", True))
        little = bool(getattr(ds, "is_little_endian", True))
    ts = ImplicitVRLittleEndian if implicit else (
        ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    what = "implicit" if implicit else "explicit"
    stray = f", {off} stray byte(s) before the data set skipped" if off else ""
    object.__setattr__(ds, NOTE_ATTR,
                       f"no DICOM preamble/File Meta (group 0002){stray}: read as {what} VR "
                       f"{'little' if little else 'big'} endian")
    return ds


def note_of(ds: Any) -> str | None:
    """The note :func:`complete_header` left on a data set, if any."""
    return getattr(ds, NOTE_ATTR, None)
