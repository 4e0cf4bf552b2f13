"""Plain 2D pictures: PNG / JPEG / BMP and small (non-pyramidal) TIFF patches.

Chest X-ray PNGs, fundus photographs and pathology patches. Decisions (see ``docs/formats.md``):

* Grey stays grey (2D ``(y, x)``); 16-bit PNG/TIFF stays ``uint16``.
* RGB stays RGB ``(y, x, 3)``, except that an RGB file whose three channels are identical (a
  grey picture saved as RGB, e.g. TBX11K chest X-rays) becomes grey, unless the modality is
  pathology (``SM``) or fundus (``OP``) or ``keep_rgb=True``. ``metadata['rgb_collapsed']``.
* Alpha is dropped by default (``metadata['alpha']='dropped'``); if some pixels are not fully
  opaque the picture is first composited on white (``'composited_on_white'``, plus a warning).
  ``keep_alpha=True`` keeps RGBA.
* EXIF orientation is applied (pixels rotated/flipped upright, ``metadata['exif_orientation']``).
  No other EXIF / XMP / comment / text chunk is copied (cameras store dates, serial numbers
  and sometimes names there).
* Spacing is 1 (pixel units) unless given: ``spacing=`` (mm; scalar or (x, y)) or ``mpp=``
  (micrometres per pixel). Print resolutions (dpi in JPEG/PNG/TIFF headers) are ignored: they are
  not physical pixel sizes.
* ``modality=`` maps friendly names: ``"CXR"`` -> ``DX``, ``"fundus"`` -> ``OP``,
  ``"pathology"`` -> ``SM``; DICOM codes pass through; default ``OT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReadError
from ..geometry import Geometry
from .types import MedicalImage

__all__ = ["can_read", "read", "SUFFIXES", "normalize_modality"]

SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
)

_MODALITY_ALIASES = {
    "cxr": "DX", "xray": "DX", "x-ray": "DX", "chest": "DX", "radiograph": "DX",
    "fundus": "OP", "retina": "OP", "retinal": "OP", "ophthalmic": "OP",
    "pathology": "SM", "histology": "SM", "histopathology": "SM", "patch": "SM", "wsi": "SM",
    "slide": "SM",
}
_COLOUR_MODALITIES = {"SM", "OP", "XC", "GM"}


def normalize_modality(modality: str | None) -> str:
    """Friendly modality name -> DICOM-style code (``None`` -> ``"OT"``)."""
    if not modality:
        return "OT"
    return _MODALITY_ALIASES.get(modality.strip().lower(), modality.strip().upper())


def can_read(path: Path) -> bool:
    """PNG/JPEG/BMP/TIFF by suffix and magic bytes; slide TIFFs are left to ``wsi``."""
    try:
        p = Path(path)
        if not p.is_file() or p.suffix.lower() not in SUFFIXES:
            return False
        with open(p, "rb") as fh:
            head = fh.read(8)
        if not head.startswith(_MAGIC):
            return False
        if p.suffix.lower() in _TIFF_SUFFIXES:
            from .wsi import is_wsi_tiff

            return not is_wsi_tiff(p)
        return True
    except OSError:  # unreadable file; anything else is a bug: raise
        return False


# ---------------------------------------------------------------------------------- decoding
def _read_pil(path: Path, notes: dict[str, Any]) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            notes["original_mode"] = img.mode
            orientation = 1
            try:
                orientation = int(img.getexif().get(0x0112, 1) or 1)
            except Exception:  # broken EXIF must not block the pixels
                orientation = 1
            fast = None
            if orientation == 1:
                fast = _fast_jpeg(path, img) if img.format == "JPEG" else _png_16bit_colour(path, img)
            if fast is not None:
                return fast
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
                notes["exif_orientation"] = orientation
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode == "1":
                img = img.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode == "PA":
                img = img.convert("RGBA")
            arr = np.asarray(img)
    except UnidentifiedImageError as exc:
        raise ReadError(path, "not a readable PNG/JPEG/BMP image (unrecognised content)") from exc
    except Image.DecompressionBombError as exc:
        raise ReadError(path, f"image too large for a 2D picture ({exc}); open it as a "
                              "whole-slide image (pyramidal TIFF) instead") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ReadError(path, f"image data is corrupt or truncated: {exc}") from exc
    return arr


def _fast_jpeg(path: Path, img: Any) -> np.ndarray | None:
    """Decode an upright RGB/grey JPEG with libjpeg-turbo via imagecodecs (3-5x faster than
    Pillow for 12-megapixel fundus photos, same pixels). ``None``: let Pillow do it."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    try:
        import imagecodecs
    except ImportError:
        return None
    data = path.read_bytes()
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None  # no end-of-image marker: truncated; Pillow reports it properly
    try:
        arr = imagecodecs.jpeg8_decode(data)
    except Exception:
        return None
    expected = (img.size[1], img.size[0]) + ((3,) if img.mode == "RGB" else ())
    if arr.shape != expected:
        if arr.ndim == 3 and arr.shape[-1] == 1 and arr.shape[:2] == expected:
            return arr[..., 0]
        return None
    return arr


def _png_16bit_colour(path: Path, img: Any) -> np.ndarray | None:
    """16-bit RGB(A) PNG decoded at full depth (Pillow reduces it to 8 bits)."""
    if img.format != "PNG":
        return None
    with open(path, "rb") as fh:
        ihdr = fh.read(26)
    if len(ihdr) < 26 or ihdr[24] != 16 or ihdr[25] not in (2, 4, 6):
        return None  # not 16-bit colour / grey+alpha: Pillow keeps it exactly
    try:
        import imagecodecs

        return imagecodecs.png_decode(path.read_bytes())
    except ImportError:
        return None
    except Exception as exc:
        raise ReadError(path, f"image data is corrupt or truncated: {exc}") from exc


def _read_tiff(path: Path, notes: dict[str, Any]) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            if not tf.series:
                raise ReadError(path, "TIFF holds no image")
            s = tf.series[0]
            axes, arr = s.axes, s.asarray()
            page = tf.pages.first
            notes["original_mode"] = f"TIFF {page.photometric.name} {arr.dtype}"
            if page.photometric.name in ("YCBCR", "CIELAB", "SEPARATED") and page.compression == 1:
                raise ReadError(path, f"TIFF photometric {page.photometric.name} is not supported")
            if page.photometric.name == "MINISWHITE":
                notes["inverted"] = True
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(path, f"TIFF data is corrupt or truncated: {exc}") from exc
    # squeeze singleton axes; move samples last
    keep = [i for i, (a, n) in enumerate(zip(axes, arr.shape, strict=False))
            if n > 1 or a in "YX"]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "SYX":
        arr, axes = np.moveaxis(arr, 0, -1), "YXS"
    if axes not in ("YX", "YXS"):
        raise ReadError(path, f"multi-page / multi-dimensional TIFF (axes {axes}, shape "
                              f"{arr.shape}) is not a 2D picture")
    if notes.get("inverted") and arr.dtype.kind in "ui":
        arr = np.iinfo(arr.dtype).max - arr
    return arr


def _drop_alpha(arr: np.ndarray, keep_alpha: bool, notes: dict[str, Any],
                warnings: list[str]) -> np.ndarray:
    if keep_alpha:
        notes["alpha"] = "kept"
        return arr
    alpha = arr[..., -1]
    colour = arr[..., :-1]
    top = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
    if np.all(alpha == top):
        notes["alpha"] = "dropped"
        out = colour
    else:
        a = alpha.astype(np.float32)[..., None] / float(top)
        out = colour.astype(np.float32) * a + float(top) * (1.0 - a)
        out = np.round(out).astype(arr.dtype) if arr.dtype.kind in "ui" else out.astype(arr.dtype)
        notes["alpha"] = "composited_on_white"
        warnings.append("transparent pixels were composited on white (keep_alpha=True keeps them)")
    return out[..., 0] if out.shape[-1] == 1 else np.ascontiguousarray(out)


def _channels_equal(arr: np.ndarray) -> bool:
    """Whether R == G == B everywhere (cheap sample first: colour photos fail fast)."""
    flat = arr.reshape(-1, arr.shape[-1])
    sample = flat[:: max(1, flat.shape[0] // 4096)]
    if not (np.array_equal(sample[:, 0], sample[:, 1]) and np.array_equal(sample[:, 1], sample[:, 2])):
        return False
    return bool(np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]))


def _geometry(spacing: Any, mpp: Any) -> tuple[Geometry, bool]:
    if spacing is None and mpp is not None:
        m = np.broadcast_to(np.asarray(mpp, dtype=float).reshape(-1), (2,))
        spacing = tuple(m / 1000.0)
    if spacing is None:
        return Geometry.identity(2), False
    sp = np.broadcast_to(np.asarray(spacing, dtype=float).reshape(-1), (2,))
    return Geometry(tuple(float(v) for v in sp), (0.0, 0.0), np.eye(2)), True


def read(
    path: Path,
    modality: str | None = None,
    spacing: float | tuple[float, float] | None = None,
    mpp: float | tuple[float, float] | None = None,
    keep_alpha: bool = False,
    keep_rgb: bool = False,
    **kw: Any,
) -> list[MedicalImage]:
    """Read a PNG/JPEG/BMP/TIFF picture as one 2D :class:`MedicalImage`.

    Parameters
    ----------
    modality
        ``"CXR"``, ``"fundus"``, ``"pathology"`` or a DICOM code; default ``"OT"``.
    spacing, mpp
        Physical pixel size: ``spacing`` in mm or ``mpp`` in micrometres, scalar or (x, y).
    keep_alpha
        Keep an alpha channel (RGBA) instead of dropping it.
    keep_rgb
        Keep RGB files whose channels are all equal as RGB instead of making them grey.

    Other keyword arguments (meant for other readers) are ignored.
    """
    p = Path(path)
    if not p.is_file():
        raise ReadError(p, "no such file")
    notes: dict[str, Any] = {}
    warnings: list[str] = []
    if p.suffix.lower() in _TIFF_SUFFIXES:
        arr = _read_tiff(p, notes)
    else:
        arr = _read_pil(p, notes)
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise ReadError(p, f"unexpected picture shape {arr.shape}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.int32 and arr.min() >= 0 and arr.max() <= 65535:  # PIL mode "I"
        arr = arr.astype(np.uint16)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255

    code = normalize_modality(modality)
    if arr.ndim == 3:
        if arr.shape[-1] in (2, 4):  # LA / RGBA
            arr = _drop_alpha(arr, keep_alpha, notes, warnings)
        elif arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] != 3:
            raise ReadError(p, f"{arr.shape[-1]}-channel pictures are not supported")
    collapsed = False
    if (arr.ndim == 3 and arr.shape[-1] == 3 and not keep_rgb and code not in _COLOUR_MODALITIES
            and _channels_equal(arr)):
        arr = np.ascontiguousarray(arr[..., 0])
        collapsed = True
    rgb = arr.ndim == 3
    arr = np.ascontiguousarray(arr)

    geometry, spacing_known = _geometry(spacing, mpp)
    if not spacing_known:
        warnings.append("pixel size unknown: coordinates are in pixels (pass spacing= or mpp=)")
    window: tuple[float, float] | None = None
    if not rgb:
        if arr.dtype == np.uint8:
            window = (127.5, 255.0)
        else:
            sample = arr.reshape(-1)[:: max(1, arr.size // 1_000_000)]
            lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
            if hi > lo:
                window = ((lo + hi) / 2.0, hi - lo)
    metadata: dict[str, Any] = {
        "source_path": str(p),
        "photometric": ("RGBA" if arr.shape[-1] == 4 else "RGB") if rgb else "MONOCHROME2",
        "bits_allocated": int(arr.dtype.itemsize * 8),
        "rgb_collapsed": collapsed,
        "spacing_known": spacing_known,
        "warnings": warnings,
        **notes,
    }
    if modality:
        metadata["modality_hint"] = modality
    if mpp is not None or spacing is not None:
        metadata["mpp"] = [s * 1000.0 for s in geometry.spacing]
    return [
        MedicalImage(
            data=arr,
            geometry=geometry,
            modality=code,
            kind="image2d",
            name=p.stem,
            rgb=rgb,
            multiscale=False,
            window=window,
            metadata=metadata,
        )
    ]
