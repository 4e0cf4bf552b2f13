"""Readers and writers (no Qt). ``read(path)`` returns a list of :class:`MedicalImage`.

Dispatch order: DICOM (folders, extensionless files, .dcm incl. whole-slide DICOM), whole-slide
TIFF/SVS/OME-TIFF, volume formats (NIfTI/NRRD/MHA/MHD), plain 2D images (PNG/JPEG/TIFF patches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UnsupportedFormatError
from .types import MedicalImage

__all__ = ["MedicalImage", "read", "can_read"]


def _readers():
    # imported lazily: each module imports its own heavy libraries on use
    from . import dicom, image2d, volume, wsi

    return (
        ("wsi", wsi.can_read, wsi.read),
        ("dicom", dicom.can_read, dicom.read),
        ("volume", volume.can_read, volume.read),
        ("image2d", image2d.can_read, image2d.read),
    )


def can_read(path: str | Path) -> bool:
    """Whether some reader of ours handles ``path`` (cheap: extension/magic sniffing)."""
    p = Path(path)
    if not p.exists():
        return False
    return any(ok(p) for _, ok, _ in _readers())


def read(path: str | Path, **kwargs: Any) -> list[MedicalImage]:
    """Read a file or folder into one or more images with geometry and header facts.

    Raises :class:`~napari_medfm.errors.UnsupportedFormatError` when no reader handles the
    path and :class:`~napari_medfm.errors.ReadError` (naming file and cause) when reading fails.
    """
    p = Path(path)
    if not p.exists():
        raise UnsupportedFormatError(f"{p}: no such file or folder")
    for _name, ok, reader in _readers():
        if ok(p):
            return reader(p, **kwargs)
    if p.is_dir():
        raise UnsupportedFormatError(f"{p.name}: folder holds no DICOM or image files we can read")
    raise UnsupportedFormatError(
        f"{p.name}: not a supported medical image (DICOM, NIfTI, NRRD, MHA/MHD, PNG/JPEG, "
        "TIFF/SVS/OME-TIFF)"
    )
