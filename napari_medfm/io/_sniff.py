"""What a format sniffer may expect when a file is not (quite) its format.

Sniffers (``can_read``, ``is_wsi_tiff``, ``is_wsi_dicom`` ...) catch only these: an unreadable
file, a truncated or garbled header, or the parsing library's own "not my format" error. Any
other exception is a bug in our code or a library and propagates, so it is not mistaken for
"unsupported format"; the napari reader hook (:mod:`napari_medfm._napari.reader`) logs it at
debug level with the file name and lets other readers try.
"""

from __future__ import annotations

import struct
from functools import cache


@cache
def sniff_errors() -> tuple[type[BaseException], ...]:
    """OSError, EOFError, ValueError (incl. UnicodeError), struct.error, OverflowError,
    KeyError, IndexError, and pydicom's / tifffile's "not this format" errors when installed."""
    errs: list[type[BaseException]] = [OSError, EOFError, ValueError, struct.error,
                                       OverflowError, KeyError, IndexError]
    try:
        from pydicom.errors import InvalidDicomError

        errs.append(InvalidDicomError)
    except ImportError:  # pragma: no cover - pydicom is a dependency
        pass
    try:
        from tifffile import TiffFileError

        errs.append(TiffFileError)
    except ImportError:  # pragma: no cover - optional
        pass
    return tuple(errs)
