"""Whole-slide images (pyramidal TIFF/SVS/OME-TIFF and DICOM VL Whole Slide) as lazy pyramids.

Nothing is decoded at open time except one small tile (to prove the decoder works): every level
is a :mod:`dask` array whose chunks are the file's own tiles, read on demand when napari (or a
model tiler) asks for a region.

* TIFF family: ``tifffile``'s zarr store (``TiffFile.series[0].aszarr()``), one dask array per
  pyramid level, full resolution first.
* DICOM VL Whole Slide Microscopy (SOP class ``1.2.840.10008.5.1.4.1.1.77.1.6``): one instance
  per level, frames read one by one with :class:`highdicom.io.ImageFileReader`; the other levels
  of the same series beside the opened file are gathered into the pyramid.
* Slides whose file holds fewer levels than napari needs for a fast overview get one more level
  from the scanner's own *thumbnail* (when it covers the same field of view: SVS), then
  **derived** levels (2x2 mean of the previous level, computed lazily) until the smallest level
  is at most ``min_level_size`` pixels. ``metadata['file_levels']`` counts the file's own levels
  (the ones to use for analysis), ``thumbnail_level`` is the index of the thumbnail level (or
  None) and ``derived_levels`` counts the derived ones.

Geometry is 2D, in mm (``spacing = mpp / 1000``) when the pixel size is known, else pixel units
with a warning in ``metadata['warnings']``. Metadata keys specific to slides: ``mpp`` ((x, y)
micrometres per pixel or None), ``mpp_source``, ``objective_power``, ``vendor``, ``level_shapes``,
``level_downsamples``, ``tile_size``, ``associated_images`` ({name: [h, w, c]}: label / macro /
thumbnail, *listed, never loaded*: slide labels can carry patient identifiers; use
:func:`read_associated` to load one explicitly).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDecoderError, ReadError
from ..geometry import Geometry
from ._sniff import sniff_errors
from .types import MedicalImage

__all__ = ["can_read", "read", "read_associated", "is_wsi_tiff", "WSI_DICOM_SOP_CLASS"]

#: SOP Class UID of DICOM VL Whole Slide Microscopy Image Storage.
WSI_DICOM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"

#: TIFF-based slide suffixes always claimed (when the file really is a TIFF).
_SLIDE_SUFFIXES = {".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8", ".tf2"}
_TIFF_SUFFIXES = {".tif", ".tiff"} | _SLIDE_SUFFIXES
_DICOM_SUFFIXES = {".dcm", ".dicom", ""}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

#: A plain tiled TIFF at least this large (pixels, either side) is treated as a slide.
_LARGE_TIFF_SIDE = 8192

#: Default: add derived levels until the smallest level fits in this many pixels (each side).
DEFAULT_MIN_LEVEL_SIZE = 1024


# ---------------------------------------------------------------------------------- sniffing
def _head(path: Path, n: int = 132) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _is_dicom_wsi(path: Path) -> bool:
    head = _head(path)
    if len(head) < 132 or head[128:132] != b"DICM":
        return False
    try:
        import pydicom

        meta = pydicom.filereader.read_file_meta_info(str(path))
        uid = str(getattr(meta, "MediaStorageSOPClassUID", ""))
        if uid == WSI_DICOM_SOP_CLASS:
            return True
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(ds.get("SOPClassUID", "")) == WSI_DICOM_SOP_CLASS
    except sniff_errors():  # not DICOM / truncated header; anything else is a bug: raise
        return False


def is_wsi_tiff(path: Path) -> bool:
    """Whether ``path`` is a TIFF we treat as a whole slide (False for unreadable/non-TIFF files).

    True for Aperio SVS / NDPI / SCN / Ventana BIF / QPTIFF, for any TIFF whose first series is
    a pyramid, for 2D (YX or YXS) OME-TIFFs, and for tiled TIFFs of at least 8192 pixels on a
    side. Small plain TIFF patches are left to :mod:`napari_medfm.io.image2d`.
    """
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in _TIFF_SUFFIXES:
        return False
    if not _head(p, 4).startswith(_TIFF_MAGIC):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(str(p)) as tf:
            if tf.is_svs or tf.is_ndpi or tf.is_scn or tf.is_bif or tf.is_qpi:
                return True
            if not tf.series:
                return False
            s = tf.series[0]
            if len(s.levels) > 1:
                return True
            axes = _squeezed_axes(s.axes, s.shape)
            if tf.is_ome and axes in ("YX", "YXS"):
                return True
            page = tf.pages.first
            return bool(page.is_tiled and max(page.imagelength, page.imagewidth) >= _LARGE_TIFF_SIDE)
    except sniff_errors():  # not a readable TIFF; anything else is a bug: raise
        return False


def can_read(path: Path) -> bool:
    """Cheap sniff: pyramidal/slide TIFF or a DICOM VL Whole Slide Microscopy file."""
    try:
        p = Path(path)
        if not p.is_file():
            return False
        suffix = p.suffix.lower()
        if suffix in _TIFF_SUFFIXES:
            return is_wsi_tiff(p)
        if suffix in _DICOM_SUFFIXES or suffix.lstrip(".").isdigit():
            return _is_dicom_wsi(p)
        return False
    except OSError:  # unreadable path
        return False


# ---------------------------------------------------------------------------------- helpers
def _squeezed_axes(axes: str, shape: tuple[int, ...]) -> str:
    return "".join(a for a, n in zip(axes, shape, strict=False) if not (n == 1 and a not in "YX"))


def _svs_fields(description: str) -> dict[str, str]:
    """Key/value fields of an Aperio ImageDescription (``header|Key = value|...``)."""
    out: dict[str, str] = {}
    for part in description.split("|")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
                   "Å": 1e-4, "pm": 1e-6}


def _ome_facts(ome_xml: str) -> dict[str, Any]:
    import tifffile

    facts: dict[str, Any] = {}
    try:
        d = tifffile.xml2dict(ome_xml)
    except Exception:
        return facts
    ome = d.get("OME", {})
    images = ome.get("Image", {})
    image = images[0] if isinstance(images, list) else images
    pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
    sx, sy = _float_or_none(pixels.get("PhysicalSizeX")), _float_or_none(pixels.get("PhysicalSizeY"))
    if sx is not None:
        fx = _OME_UNIT_TO_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")))
        fy = _OME_UNIT_TO_UM.get(str(pixels.get("PhysicalSizeYUnit", "µm")))
        if fx is not None:
            sy_um = sy * fy if (sy is not None and fy is not None) else sx * fx
            facts["mpp"] = (sx * fx, sy_um)
            facts["mpp_source"] = "OME PhysicalSizeX/Y"
    instr = ome.get("Instrument", {})
    instr = instr[0] if isinstance(instr, list) else instr
    obj = instr.get("Objective", {}) if isinstance(instr, dict) else {}
    obj = obj[0] if isinstance(obj, list) else obj
    mag = _float_or_none(obj.get("NominalMagnification")) if isinstance(obj, dict) else None
    if mag is not None:
        facts["objective_power"] = mag
    return facts


def _tiff_facts(tf: Any) -> dict[str, Any]:
    """Vendor, pixel size and objective power of a TIFF slide (no identifiers copied)."""
    facts: dict[str, Any] = {"mpp": None, "mpp_source": None, "objective_power": None}
    page = tf.pages.first
    if tf.is_svs:
        facts["vendor"] = "aperio"
        fields = _svs_fields(page.description)
        mpp = _float_or_none(fields.get("MPP"))
        if mpp is not None:
            facts["mpp"] = (mpp, mpp)
            facts["mpp_source"] = "Aperio ImageDescription MPP"
        facts["objective_power"] = _float_or_none(fields.get("AppMag"))
    elif tf.is_ome:
        facts["vendor"] = "ome"
        facts.update(_ome_facts(tf.ome_metadata or ""))
    else:
        for flag in ("ndpi", "scn", "bif", "qpi"):
            if getattr(tf, f"is_{flag}", False):
                facts["vendor"] = {"ndpi": "hamamatsu", "scn": "leica", "bif": "ventana",
                                   "qpi": "perkinelmer"}[flag]
        if facts.get("vendor") == "hamamatsu":
            tag = page.tags.get(65421)  # NDPI magnification
            if tag is not None:
                facts["objective_power"] = _float_or_none(tag.value)
    if facts["mpp"] is None:
        # TIFF resolution tags, trusted only with centimetre units (slide scanners write
        # these; inch-based 72/96/300 dpi values are print hints, not pixel sizes).
        try:
            unit = int(page.tags["ResolutionUnit"].value)
            xr = page.tags["XResolution"].value
            yr = page.tags["YResolution"].value
            xres, yres = xr[0] / xr[1], yr[0] / yr[1]
            if unit == 3 and xres > 0 and yres > 0:
                facts["mpp"] = (1e4 / xres, 1e4 / yres)
                facts["mpp_source"] = "TIFF X/YResolution (centimetre)"
        except (KeyError, ZeroDivisionError, TypeError, ValueError, IndexError):
            pass
    return facts


def _check_tiff_complete(path: Path, series: Any, size: int) -> None:
    """Raise ReadError when a level's tiles/strips point past the end of the file."""
    for i, level in enumerate(series.levels):
        for page in level.pages:
            if page is None:
                continue
            offsets, counts = page.dataoffsets, page.databytecounts
            if len(offsets) == 0:
                continue
            end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
            if end > size:
                raise ReadError(
                    path,
                    f"file is truncated: level {i} needs {end} bytes but the file has {size}",
                )


def _decoder_error(path: Path, exc: Exception) -> ReadError:
    msg = str(exc)
    if "imagecodecs" in msg or "requires" in msg and "package" in msg:
        return MissingDecoderError(path, f"cannot decode slide tiles: {msg} (pip install imagecodecs)")
    return ReadError(path, f"cannot decode slide tiles: {type(exc).__name__}: {msg}")


def _halve_block(block: np.ndarray) -> np.ndarray:
    """2x2 mean of an even-sized block (rounded half up for integer data)."""
    dtype = block.dtype
    if dtype.kind == "f":
        acc = block.astype(np.float64)
    elif dtype.kind == "u" and dtype.itemsize == 1:
        acc = block.astype(np.uint16)  # 4 * 255 fits
    else:
        acc = block.astype(np.int64)
    rows = acc[0::2] + acc[1::2]
    s = rows[:, 0::2] + rows[:, 1::2]
    if dtype.kind == "f":
        return (s / 4).astype(dtype)
    s += 2
    s //= 4
    return s.astype(dtype)


def _even_chunks(chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Shift chunk borders so every chunk has an even size (total must be even)."""
    out: list[int] = []
    carry = 0
    for c in chunks:
        c += carry
        carry = c % 2
        if c - carry > 0:
            out.append(c - carry)
    return tuple(out)


def _halve(level: Any) -> Any:
    """Lazy 2x2-mean downsample of a dask level (odd last row/column dropped)."""
    h, w = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
    even = level[:h, :w]
    even = even.rechunk((_even_chunks(even.chunks[0]), _even_chunks(even.chunks[1]))
                        + tuple(even.chunks[2:]))
    out_chunks = (tuple(c // 2 for c in even.chunks[0]), tuple(c // 2 for c in even.chunks[1]))
    out_chunks += tuple(even.chunks[2:])
    return even.map_blocks(_halve_block, chunks=out_chunks, dtype=even.dtype)


def _derive_levels(levels: list[Any], min_level_size: int) -> int:
    """Append lazy 2x2-mean levels until the smallest fits ``min_level_size``; return count."""
    n = 0
    while max(levels[-1].shape[:2]) > min_level_size and min(levels[-1].shape[:2]) >= 4:
        levels.append(_halve(levels[-1]))
        n += 1
    return n


def _thumbnail_level(path: Path, tf: Any, levels_shape: tuple[int, ...]) -> int | None:
    """Index of a 'Thumbnail' series usable as an overview level (same aspect, smaller)."""
    h0, w0 = levels_shape[:2]
    for i, s in enumerate(tf.series[1:], start=1):
        if (s.name or "").lower() != "thumbnail" or len(s.shape) != len(levels_shape):
            continue
        th, tw = s.shape[:2]
        if s.shape[2:] != tuple(levels_shape[2:]) or th >= h0 or tw >= w0:
            continue
        if abs((h0 / th) / (w0 / tw) - 1.0) < 0.01:  # same field of view
            return i
    return None


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _series_pixels(key: tuple[str, int, int], series: int) -> np.ndarray:
    """All pixels of a small TIFF series (a slide's thumbnail), decoded once per file version.

    napari reads the overview level twice when a slide opens (layer thumbnail, then the first
    screen); one ``tifffile`` decode of the whole image (its strips at once) is several times
    faster than one dask task per 16-row strip, and the second read is a cache hit.
    """
    import tifffile

    with tifffile.TiffFile(key[0]) as tf:
        arr = tf.series[series].asarray()
    arr.setflags(write=False)
    return arr


def _overview_level(path: Path, series: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """A lazy single-chunk dask level for a small series (nothing is decoded here).

    The task key is fresh for every open (``pure=False``), like the zarr-backed levels, so
    napari's dask cache never serves a stale result; the decode itself is cached by file version.
    """
    import dask
    import dask.array as da

    key = _file_key(path)
    return da.from_delayed(dask.delayed(_series_pixels, pure=False)(key, series),
                           shape=shape, dtype=dtype)


# ---------------------------------------------------------------------------------- TIFF
def _read_tiff(path: Path, min_level_size: int) -> MedicalImage:
    import dask.array as da
    import tifffile
    import zarr

    try:
        tf = tifffile.TiffFile(str(path))
    except Exception as exc:
        raise ReadError(path, f"not a readable TIFF slide: {exc}") from exc
    try:
        if not tf.series:
            raise ReadError(path, "TIFF holds no image series")
        series = tf.series[0]
        axes = _squeezed_axes(series.axes, series.shape)
        if axes not in ("YX", "YXS"):
            raise ReadError(
                path,
                f"slide series has axes {series.axes} (shape {series.shape}); only 2D brightfield "
                "(YX or YX+RGB samples) slides are supported",
            )
        _check_tiff_complete(path, series, tf.filehandle.size)
        facts = _tiff_facts(tf)
        associated = {
            (s.name or f"series{i}").lower(): list(s.shape)
            for i, s in enumerate(tf.series[1:], start=1)
        }
        n_levels = len(series.levels)
        tile = tf.pages.first.tilewidth or None
        thumb = _thumbnail_level(path, tf, series.levels[-1].shape)
        if thumb is not None:
            thumb_shape, thumb_dtype = tuple(tf.series[thumb].shape), tf.series[thumb].dtype
    finally:
        tf.close()

    try:
        store = tifffile.imread(str(path), aszarr=True, series=0)
        z = zarr.open(store, mode="r")
        arrays = [z[str(i)] for i in range(n_levels)] if isinstance(z, zarr.Group) else [z]
        levels = []
        for arr in arrays:
            d = da.from_zarr(arr)
            # drop singleton non-spatial axes (e.g. a 1-plane OME 'CYX' with C=1)
            if d.ndim > 3 or (d.ndim == 3 and d.shape[-1] not in (3, 4)):
                d = d.reshape(tuple(n for n in d.shape if n != 1) or d.shape)
            levels.append(d)
        if thumb is not None and max(levels[-1].shape[:2]) > min_level_size:
            # the scanner's own overview: a cheap first screen instead of decoding a level
            levels.append(_overview_level(path, thumb, thumb_shape, thumb_dtype))
        else:
            thumb = None
    except ReadError:
        raise
    except Exception as exc:
        raise ReadError(path, f"cannot open slide pyramid: {exc}") from exc

    try:  # prove tiles decode (imagecodecs present, data intact): one tile of the smallest
        last = levels[n_levels - 1]  # file level (same codec as full resolution)
        np.asarray(last[: min(64, last.shape[0]), : min(64, last.shape[1])])
    except Exception as exc:
        raise _decoder_error(path, exc) from exc

    return _make_image(path, levels, facts, associated, tile, min_level_size,
                       extra={"source_path": str(path)}, n_file_levels=n_levels,
                       thumbnail_level=thumb is not None)


def read_associated(path: str | Path, name: str) -> np.ndarray:
    """Load one associated image (``"label"``, ``"macro"``, ``"thumbnail"``) of a TIFF slide.

    Only on explicit request: slide labels can show patient identifiers.
    """
    import tifffile

    p = Path(path)
    try:
        with tifffile.TiffFile(str(p)) as tf:
            for i, s in enumerate(tf.series[1:], start=1):
                if (s.name or f"series{i}").lower() == name.lower():
                    return s.asarray()
    except Exception as exc:
        raise ReadError(p, f"cannot read associated image {name!r}: {exc}") from exc
    raise ReadError(p, f"slide has no associated image named {name!r}")


# ---------------------------------------------------------------------------------- DICOM
class _DicomFrames:
    """Thread-safe lazy access to the frames of one DICOM WSI instance."""

    def __init__(self, path: Path):
        import highdicom as hd

        self.path = path
        self._lock = threading.Lock()
        self._reader = hd.io.ImageFileReader(str(path))
        self._reader.open()
        self.metadata = self._reader.metadata
        self.number_of_frames = self._reader.number_of_frames

    def read(self, index: int) -> np.ndarray:
        with self._lock:
            return self._reader.read_frame(index, correct_color=False)

    def close(self) -> None:
        with self._lock:
            self._reader.close()


def _dicom_tile_map(ds: Any, n_rows: int, n_cols: int, th: int, tw: int, nframes: int
                    ) -> tuple[dict[tuple[int, int], int], list[str]]:
    """(tile row, tile col) -> frame index, for TILED_FULL or per-frame positioned frames."""
    warnings: list[str] = []
    mapping: dict[tuple[int, int], int] = {}
    organization = str(ds.get("DimensionOrganizationType", "") or "")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if organization != "TILED_FULL" and per_frame is not None and len(per_frame) == nframes:
        for k, item in enumerate(per_frame):
            try:
                pos = item.PlanePositionSlideSequence[0]
                r = (int(pos.RowPositionInTotalImagePixelMatrix) - 1) // th
                c = (int(pos.ColumnPositionInTotalImagePixelMatrix) - 1) // tw
            except (AttributeError, IndexError):
                continue
            mapping.setdefault((r, c), k)  # first focal plane / optical path wins
        if len(mapping) < nframes:
            warnings.append("only the first focal plane / optical path is shown")
        return mapping, warnings
    per_plane = n_rows * n_cols
    if nframes < per_plane:
        raise ValueError(f"{nframes} frames cannot tile {n_rows}x{n_cols} tiles")
    if nframes > per_plane:
        warnings.append(
            f"{nframes // per_plane} focal planes / optical paths; only the first is shown"
        )
    for r in range(n_rows):
        for c in range(n_cols):
            mapping[(r, c)] = r * n_cols + c
    return mapping, warnings


def _open_dicom_level(path: Path) -> tuple[Any, Any, list[str], str]:
    """One DICOM WSI instance as a lazy dask array: (array, header, warnings, transfer syntax)."""
    import dask.array as da

    try:
        frames = _DicomFrames(path)
    except Exception as exc:
        raise ReadError(path, f"cannot open DICOM whole-slide image: {exc}") from exc
    ds = frames.metadata
    try:
        total_rows = int(ds.TotalPixelMatrixRows)
        total_cols = int(ds.TotalPixelMatrixColumns)
        th, tw = int(ds.Rows), int(ds.Columns)
        spp = int(ds.SamplesPerPixel)
    except (AttributeError, TypeError, ValueError) as exc:
        frames.close()
        raise ReadError(path, f"DICOM WSI header lacks the total pixel matrix / tile size: {exc}"
                        ) from exc
    n_rows, n_cols = math.ceil(total_rows / th), math.ceil(total_cols / tw)
    try:
        mapping, warnings = _dicom_tile_map(ds, n_rows, n_cols, th, tw, frames.number_of_frames)
    except ValueError as exc:
        frames.close()
        raise ReadError(path, f"DICOM WSI frames do not tile the slide: {exc}") from exc
    try:  # decoder present and file complete: the last frame lies at the end of the file
        probe = frames.read(frames.number_of_frames - 1)
    except Exception as exc:
        frames.close()
        raise _decoder_error(path, exc) from exc
    dtype = probe.dtype
    blank = 255 if spp == 3 else 0  # absent tiles (sparse tiling): white glass / black

    row_chunks = tuple(min(th, total_rows - r * th) for r in range(n_rows))
    col_chunks = tuple(min(tw, total_cols - c * tw) for c in range(n_cols))
    chunks: tuple[tuple[int, ...], ...] = (row_chunks, col_chunks)
    if spp > 1:
        chunks = chunks + ((spp,),)

    def load(block_id: tuple[int, ...] | None = None) -> np.ndarray:
        r, c = block_id[0], block_id[1]
        h, w = row_chunks[r], col_chunks[c]
        k = mapping.get((r, c))
        if k is None:
            shape = (h, w, spp) if spp > 1 else (h, w)
            return np.full(shape, blank, dtype=dtype)
        tile = frames.read(k)
        if spp == 1 and tile.ndim == 3:
            tile = tile[..., 0]
        return np.ascontiguousarray(tile[:h, :w])

    level = da.map_blocks(load, dtype=dtype, chunks=chunks,
                          meta=np.empty((0,) * len(chunks), dtype=dtype))
    return level, ds, warnings, str(frames._reader.transfer_syntax_uid)


_DICOM_SCAN_LIMIT = 500  # sibling files inspected when looking for the other pyramid levels


def _image_flavor(ds: Any) -> str:
    """DICOM WSI ImageType value 3: VOLUME (a pyramid level), LABEL, OVERVIEW, THUMBNAIL."""
    it = ds.get("ImageType")
    try:
        return str(it[2]).upper() if it is not None and len(it) > 2 else "VOLUME"
    except (TypeError, IndexError):
        return "VOLUME"


def _dicom_pyramid(path: Path) -> tuple[list[Path], dict[str, list[int]], list[str]]:
    """Level files (largest first) of the slide ``path`` belongs to, plus associated images.

    A DICOM slide stores each pyramid level (and label / overview images) as its own instance
    in one series; instances beside ``path`` with the same SeriesInstanceUID are gathered.
    """
    import pydicom

    tags = ["SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows",
            "SamplesPerPixel", "SOPClassUID", "Rows", "Columns"]
    mine = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
    series = str(mine.get("SeriesInstanceUID", ""))
    notes: list[str] = []
    entries: list[tuple[Path, Any]] = [(path, mine)]
    if series:
        scanned = 0
        for f in sorted(path.parent.iterdir()):
            if f == path or not f.is_file():
                continue
            suffix = f.suffix.lower()
            if not (suffix in _DICOM_SUFFIXES or suffix.lstrip(".").isdigit()):
                continue
            scanned += 1
            if scanned > _DICOM_SCAN_LIMIT:
                notes.append(f"more than {_DICOM_SCAN_LIMIT} files beside the slide; "
                             "not all were checked for other pyramid levels")
                break
            if not _is_dicom_wsi(f):
                continue
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=tags)
            except Exception:
                continue
            if str(ds.get("SeriesInstanceUID", "")) == series:
                entries.append((f, ds))
    levels: dict[tuple[int, int], Path] = {}
    associated: dict[str, list[int]] = {}
    for f, ds in entries:
        flavor = _image_flavor(ds)
        try:
            shape = [int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns),
                     int(ds.get("SamplesPerPixel", 1))]
        except (AttributeError, TypeError, ValueError):
            shape = [int(ds.get("Rows", 0)), int(ds.get("Columns", 0)),
                     int(ds.get("SamplesPerPixel", 1))]
        is_level = flavor == "VOLUME" or (
            f == path and flavor not in ("LABEL", "OVERVIEW", "THUMBNAIL"))
        if is_level:
            # one file per level size: other focal planes / optical paths of a level are
            # skipped (the opened file, listed first, keeps its level)
            levels.setdefault((shape[0], shape[1]), f)
        else:
            name = flavor.lower()
            if name in associated:
                name = f"{name}_{len(associated)}"
            associated[name] = shape
    if not levels:  # the opened file itself is a label / overview: show it alone
        levels[(0, 0)] = path
        associated = {}
    ordered = [levels[k] for k in sorted(levels, key=lambda k: (-k[0] * k[1]))]
    return ordered, associated, notes


def _read_dicom_wsi(path: Path, min_level_size: int) -> MedicalImage:
    try:
        files, associated, notes = _dicom_pyramid(path)
    except Exception:  # sibling scan is best effort; the opened file alone always works
        files, associated, notes = [path], {}, []
    opened = [_open_dicom_level(f) for f in files]
    level_arrays = [o[0] for o in opened]
    # drop levels that do not shrink monotonically (e.g. mismatched instances)
    keep = [0]
    for i in range(1, len(level_arrays)):
        prev = level_arrays[keep[-1]].shape
        cur = level_arrays[i].shape
        if cur[0] < prev[0] and cur[1] < prev[1] and cur[2:] == prev[2:]:
            keep.append(i)
    files = [files[i] for i in keep]
    level_arrays = [level_arrays[i] for i in keep]
    _, ds, warnings, transfer_syntax = opened[0]
    warnings = list(warnings) + notes
    total_rows, total_cols = level_arrays[0].shape[:2]
    tw = int(ds.Columns)

    facts: dict[str, Any] = {"mpp": None, "mpp_source": None, "objective_power": None,
                             "vendor": "dicom"}
    try:
        ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        facts["mpp"] = (float(ps[1]) * 1000.0, float(ps[0]) * 1000.0)
        facts["mpp_source"] = "DICOM PixelMeasuresSequence PixelSpacing"
    except (AttributeError, IndexError, TypeError, ValueError):
        w_mm = _float_or_none(ds.get("ImagedVolumeWidth"))
        h_mm = _float_or_none(ds.get("ImagedVolumeHeight"))
        if w_mm is not None and h_mm is not None:
            facts["mpp"] = (w_mm * 1000.0 / total_cols, h_mm * 1000.0 / total_rows)
            facts["mpp_source"] = "DICOM ImagedVolumeWidth/Height over total pixel matrix"
            warnings.append("no PixelSpacing in the DICOM WSI; pixel size derived from the "
                            "imaged volume width/height")
    with contextlib.suppress(AttributeError, IndexError):
        facts["objective_power"] = _float_or_none(ds.OpticalPathSequence[0].ObjectiveLensPower)
    extra: dict[str, Any] = {
        "source_path": str(path),
        "source_files": [str(f) for f in files],
        "sop_class_uid": str(ds.get("SOPClassUID", WSI_DICOM_SOP_CLASS)),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
        "transfer_syntax": transfer_syntax,
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "dicom_warnings": warnings,
    }
    if ds.get("ImageOrientationSlide") is not None:
        extra["image_orientation_slide"] = [float(v) for v in ds.ImageOrientationSlide]
    return _make_image(path, level_arrays, facts, associated, tw, min_level_size, extra=extra)


# ---------------------------------------------------------------------------------- common
def _make_image(path: Path, levels: list[Any], facts: dict[str, Any], associated: dict[str, Any],
                tile: int | None, min_level_size: int, extra: dict[str, Any],
                n_file_levels: int | None = None, thumbnail_level: bool = False) -> MedicalImage:
    if n_file_levels is None:
        n_file_levels = len(levels)
    derived = _derive_levels(levels, min_level_size)
    rgb = levels[0].ndim == 3 and levels[0].shape[-1] in (3, 4)
    warnings = list(extra.pop("dicom_warnings", []))
    mpp = facts.get("mpp")
    if mpp is not None:
        geometry = Geometry((mpp[0] / 1000.0, mpp[1] / 1000.0), (0.0, 0.0), np.eye(2))
    else:
        geometry = Geometry.identity(2)
        warnings.append("no pixel size (MPP) in the slide; coordinates are in pixels")
    if thumbnail_level:
        warnings.append(
            f"level {n_file_levels} (overview) is the scanner's thumbnail image, scaled to the "
            "slide; use the other levels for analysis"
        )
    if derived:
        warnings.append(
            f"file holds {n_file_levels} resolution level(s); {derived} overview level(s) "
            "are computed on demand (2x2 mean)"
        )
    h0, w0 = levels[0].shape[:2]
    metadata: dict[str, Any] = {
        **extra,
        "mpp": None if mpp is None else [float(mpp[0]), float(mpp[1])],
        "mpp_source": facts.get("mpp_source"),
        "objective_power": facts.get("objective_power"),
        "vendor": facts.get("vendor"),
        "level_shapes": [list(map(int, lv.shape)) for lv in levels],
        "level_downsamples": [float(h0) / float(lv.shape[0]) for lv in levels],
        "file_levels": n_file_levels,
        "derived_levels": derived,
        "thumbnail_level": n_file_levels if thumbnail_level else None,
        "tile_size": tile,
        "associated_images": associated,
        "warnings": warnings,
    }
    if not rgb:
        metadata["photometric"] = metadata.get("photometric") or "MONOCHROME2"
    return MedicalImage(
        data=levels,
        geometry=geometry,
        modality="SM",
        kind="wsi",
        name=_stem(path),
        rgb=rgb,
        multiscale=True,
        window=None,
        metadata=metadata,
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read(path: Path, min_level_size: int = DEFAULT_MIN_LEVEL_SIZE, **kw: Any) -> list[MedicalImage]:
    """Open a whole-slide image lazily as one multiscale :class:`MedicalImage`.

    Parameters
    ----------
    path
        SVS / pyramidal TIFF / OME-TIFF / NDPI file, or a DICOM VL Whole Slide file.
    min_level_size
        Derived (lazy 2x2 mean) levels are appended until the smallest level is at most this
        many pixels on its longest side; pass a very large value to keep only the file's
        own levels.

    Other keyword arguments (meant for other readers) are ignored.
    """
    p = Path(path)
    if not p.is_file():
        raise ReadError(p, "no such file")
    if _head(p, 4).startswith(_TIFF_MAGIC):
        return [_read_tiff(p, min_level_size)]
    if _is_dicom_wsi(p):
        return [_read_dicom_wsi(p, min_level_size)]
    raise ReadError(p, "not a whole-slide image (expected a pyramidal TIFF/SVS/OME-TIFF or a "
                       "DICOM VL Whole Slide Microscopy file)")
