"""Volume files: NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr/.seg.nrrd), MetaImage (.mha/.mhd).

Read with SimpleITK; geometry is taken verbatim from the reader (:meth:`Geometry.from_sitk`), so
a NIfTI in RAS and a NRRD in LPS land in the same LPS world.

Decisions (see ``docs/formats.md``):

* dtype: integer data stored wider than needed (e.g. int32 CT) is narrowed to the smallest of
  int16/uint8/uint16 that holds its range exactly (lossless; ``metadata['original_dtype']``
  keeps the file's type). Floats are kept.
* Label maps: ``as_labels=None`` (auto) = integer data (or integral floats), at most 512
  distinct values and a file name hinting seg/label/mask (``*.seg.nrrd`` always). Names come
  from Slicer segment fields of a ``.seg.nrrd`` or a JSON sidecar (``<stem>.json``,
  ``<stem>_labels.json`` or ``labels*.json`` in the same folder; ``{int: name}``,
  ``{"labels": {...}}`` or nnU-Net's ``{name: int}``).
* Modality: ``CT`` (units HU, soft-tissue window 40/400) when the minimum looks like air/padding
  in HU (-3100..-900) and the maximum is positive; else ``OT`` with a 0.5-99.5 percentile window.
  ``modality=`` overrides.
* 4D images (time/channels) and vector pixels: ``channel=k`` opens one; 1-long 4th axes are
  dropped; 3/4-component uint8 pixels become RGB; anything else is a clear :class:`ReadError`.
* NIfTI truncation is detected (SimpleITK silently zero-fills a truncated ``.nii``/``.nii.gz``).
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReadError
from ..geometry import Geometry
from .types import MedicalImage

__all__ = ["can_read", "read", "SUFFIXES", "load_label_names", "volume_stem"]

#: Compound suffixes first so ``volume_stem`` strips them whole.
SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

CT_SOFT_TISSUE_WINDOW = (40.0, 400.0)
MAX_LABELS = 512

_LABEL_HINT = re.compile(r"^(seg|label|mask|annot|aseg|aparc|parc|roi|truth|gt$|gtv$)")


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in SUFFIXES:
        if name.endswith(s) and len(name) > len(s):
            return s
    return None


def volume_stem(path: str | Path) -> str:
    """File name without its volume suffix (``ct.nii.gz`` -> ``ct``, ``a.seg.nrrd`` -> ``a``)."""
    p = Path(path)
    s = _suffix(p)
    return p.name[: -len(s)] if s else p.stem


def can_read(path: Path) -> bool:
    """NIfTI / NRRD / MetaImage by file name (False for unreadable paths)."""
    try:
        p = Path(path)
        return p.is_file() and _suffix(p) is not None
    except OSError:
        return False


# ---------------------------------------------------------------------------------- errors
def _sitk_cause(exc: Exception) -> str:
    """The informative part of a SimpleITK/ITK exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception thrown", "/"))
              and "sitk::ERROR" not in ln]
    useful = [re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\):\s*", "", ln) for ln in useful]
    msg = " ".join(useful[-3:]) if useful else (lines[-1] if lines else type(exc).__name__)
    return msg[:400]


def _check_nifti_complete(path: Path) -> dict[str, float] | None:
    """Raise ReadError when a NIfTI's voxel data is shorter than its header says.

    Returns ``{"slope", "intercept"}`` when the file stores integers scaled by integral
    ``scl_slope``/``scl_inter`` (ITK then hands back floats that are exactly integers).
    """
    try:
        import nibabel as nib

        img = nib.load(str(path))
        hdr = img.header
        offset = int(getattr(img.dataobj, "offset", 0) or hdr.get_data_offset())
        expected = offset + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * \
            hdr.get_data_dtype().itemsize
        # nibabel moves scl_slope/scl_inter from the header to the array proxy on load
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
    except Exception as exc:
        raise ReadError(path, f"not a valid NIfTI header: {exc}") from exc
    scaling = None
    if (hdr.get_data_dtype().kind in "iu" and np.isfinite(slope) and slope != 0
            and (slope, inter) != (1.0, 0.0)):
        inter = 0.0 if not np.isfinite(inter) else inter
        if float(slope).is_integer() and float(inter).is_integer():
            scaling = {"slope": slope, "intercept": inter}
    if path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        if size < 18:
            raise ReadError(path, "file is truncated (gzip stream too short)")
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            isize = struct.unpack("<I", fh.read(4))[0]
        if isize == expected % 2**32:
            return scaling
        # Trailer disagrees: either truncated or an unusual multi-member gzip -> decompress.
        total = 0
        try:
            with gzip.open(path, "rb") as gz:
                while chunk := gz.read(1 << 22):
                    total += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise ReadError(path, f"file is truncated or corrupt (gzip: {exc})") from exc
        if total < expected:
            raise ReadError(path, f"file is truncated: {total} of {expected} bytes of voxel data")
    else:
        size = path.stat().st_size
        if size < expected:
            raise ReadError(path, f"file is truncated: {size} of {expected} bytes")
    return scaling


def _check_detached_data(path: Path) -> None:
    """A .mhd/.nhdr header names its pixel file: say so plainly when that file is missing."""
    try:
        head = path.read_bytes()[:65536].decode("latin-1")
    except OSError as exc:
        raise ReadError(path, f"cannot read header: {exc}") from exc
    key = "ElementDataFile" if path.suffix.lower() == ".mhd" else "data file"
    m = re.search(rf"^\s*{key}\s*[:=]+\s*(.+?)\s*$", head, flags=re.MULTILINE | re.IGNORECASE)
    if not m:
        return
    target = m.group(1).strip()
    if target.upper() in ("LOCAL", "LIST") or target.upper().startswith("LIST") or "%" in target:
        return
    if not (path.parent / target).is_file() and not Path(target).is_file():
        raise ReadError(path, f"its pixel data file {target!r} (named in the header) is missing")


# ---------------------------------------------------------------------------------- labels
def _parse_label_json(obj: Any) -> dict[int, str] | None:
    if isinstance(obj, dict) and isinstance(obj.get("labels"), (dict, list)):
        obj = obj["labels"]
    out: dict[int, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and str(k).lstrip("-").isdigit():
                out[int(k)] = v
            elif isinstance(v, int) and not isinstance(v, bool):  # nnU-Net: {name: value}
                out[int(v)] = str(k)
            elif isinstance(v, list) and v and all(isinstance(x, int) for x in v):
                # nnU-Net region labels {name: [values]} -> first value
                out.setdefault(int(v[0]), str(k))
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                val = item.get("value", item.get("id", item.get("label")))
                name = item.get("name")
                if isinstance(val, int) and isinstance(name, str):
                    out[val] = name
    return out or None


def load_label_names(source: str | Path | dict[Any, Any]) -> dict[int, str]:
    """Label names from a JSON file or dict (``{int: name}``, ``{"labels": ...}``, ``{name: int}``)."""
    if isinstance(source, dict):
        parsed = _parse_label_json(source)
        where = None
    else:
        where = Path(source)
        try:
            parsed = _parse_label_json(json.loads(where.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ReadError(where, f"cannot read label names: {exc}") from exc
    if not parsed:
        raise ReadError(where, "no {value: name} label table found")
    return parsed


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def _sidecar_label_names(path: Path) -> tuple[dict[int, str] | None, str | None]:
    stem = volume_stem(path)
    folder = path.parent
    for cand in (f"{stem}.json", f"{stem}_labels.json", f"{stem}.labels.json"):
        f = folder / cand
        if f.is_file():
            try:
                return load_label_names(f), f.name
            except ReadError:
                pass
    generic = sorted(p for p in folder.glob("*.json")
                     if p.name.lower().startswith("label") or "_labels" in p.name.lower())
    if not generic:
        return None, None
    if len(generic) > 1:  # prefer the table whose name shares a word with the file
        mine = set(_tokens(stem))
        scored = [(len(mine & (set(_tokens(g.stem)) - {"labels", "label"})), g) for g in generic]
        scored.sort(key=lambda t: -t[0])
        if scored[0][0] == 0 or (len(scored) > 1 and scored[1][0] == scored[0][0]):
            return None, None
        generic = [scored[0][1]]
    try:
        return load_label_names(generic[0]), generic[0].name
    except ReadError:
        return None, None


def _slicer_segments(image: Any) -> list[dict[str, Any]]:
    keys = set(image.GetMetaDataKeys())
    segs = []
    i = 0
    while f"Segment{i}_Name" in keys or f"Segment{i}_LabelValue" in keys:
        def get(field: str, i: int = i) -> str | None:
            k = f"Segment{i}_{field}"
            return image.GetMetaData(k) if k in keys else None

        seg: dict[str, Any] = {"name": get("Name") or f"segment_{i}"}
        try:
            seg["value"] = int(float(get("LabelValue") or (i + 1)))
            seg["layer"] = int(float(get("Layer") or 0))
        except ValueError:
            seg["value"], seg["layer"] = i + 1, 0
        color = get("Color")
        if color:
            try:
                rgb = [float(c) for c in color.split()[:3]]
                seg["color"] = [int(round(255 * min(max(c, 0.0), 1.0))) for c in rgb]
            except ValueError:
                pass
        segs.append(seg)
        i += 1
    return segs


def _looks_like_labels(path: Path, arr: np.ndarray) -> bool:
    name_hint = path.name.lower().endswith(".seg.nrrd") or any(
        _LABEL_HINT.match(t) for t in _tokens(volume_stem(path))
    )
    if not name_hint:
        return False
    if arr.dtype.kind == "f":
        sample = arr.reshape(-1)[:: max(1, arr.size // 200_000)]
        if not np.all(np.isfinite(sample)) or not np.all(np.round(sample) == sample):
            return False
    elif arr.dtype.kind not in "iub":
        return False
    return _n_unique(arr) <= MAX_LABELS


def _n_unique(arr: np.ndarray) -> int:
    """Number of distinct values, in bounded memory (chunked histogram for integers)."""
    flat = arr.reshape(-1)
    if flat.size == 0:
        return 0
    if arr.dtype.kind in "iub":
        lo, hi = int(flat.min()), int(flat.max())
        if hi - lo < 1 << 20:
            counts = np.zeros(hi - lo + 1, dtype=np.int64)
            step = 1 << 22
            for i in range(0, flat.size, step):
                part = flat[i : i + step].astype(np.int64) - lo
                counts += np.bincount(part, minlength=counts.size)
            return int(np.count_nonzero(counts))
    sample = flat[:: max(1, flat.size // 200_000)]
    n = int(np.unique(sample).size)
    return n if n > MAX_LABELS else int(np.unique(flat).size)


# ---------------------------------------------------------------------------------- dtype
def _narrow(arr: np.ndarray, labels: bool, integral_float: bool = False) -> np.ndarray:
    """Smallest integer dtype holding the data exactly (labels: integral floats -> ints).

    ``integral_float``: float intensities known to be integers (scaled integer NIfTI) may
    become int16/uint16 when every value is an exact integer in range.
    """
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.size == 0:
        return arr
    if integral_float and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(np.round(arr), arr):
            return arr
    elif arr.size == 0 or arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not labels):
        return arr
    if not labels and arr.dtype.itemsize <= 2:
        return arr
    lo, hi = float(arr.min()), float(arr.max())
    candidates = (np.uint8, np.uint16, np.int16, np.int32) if labels else (np.int16, np.uint16)
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            if arr.dtype.kind == "f" or np.dtype(dt).itemsize < arr.dtype.itemsize:
                return (np.round(arr) if arr.dtype.kind == "f" else arr).astype(dt)
            return arr
    return arr


# ---------------------------------------------------------------------------------- read
def _to_scalar_image(path: Path, image: Any, channel: int | None) -> tuple[Any, bool, list[str]]:
    """Reduce 4D / vector images to one 2D/3D scalar (or RGB) image."""
    import SimpleITK as sitk

    notes: list[str] = []
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        n = size[3]
        if n == 1 or channel is not None:
            k = 0 if n == 1 else int(channel)
            if not 0 <= k < n:
                raise ReadError(path, f"channel={channel} out of range: the 4th axis has {n} entries")
            size[3] = 0
            image = sitk.Extract(image, size, [0, 0, 0, k])
            if n > 1:
                notes.append(f"volume {k} of {n} along the 4th axis")
        else:
            raise ReadError(
                path,
                f"4D image with {n} volumes (time points or channels, size {tuple(image.GetSize())}); "
                "open one with channel=k",
            )
    elif image.GetDimension() not in (2, 3):
        raise ReadError(path, f"{image.GetDimension()}D images are not supported")
    rgb = False
    comps = image.GetNumberOfComponentsPerPixel()
    if comps > 1:
        if channel is not None:
            if not 0 <= int(channel) < comps:
                raise ReadError(path, f"channel={channel} out of range: pixels have {comps} components")
            image = sitk.VectorIndexSelectionCast(image, int(channel))
            notes.append(f"component {channel} of {comps}")
        elif comps in (3, 4) and image.GetPixelID() == sitk.sitkVectorUInt8:
            rgb = True
        else:
            raise ReadError(
                path,
                f"vector image with {comps} components per voxel "
                f"({image.GetPixelIDTypeAsString()}); open one component with channel=k",
            )
    return image, rgb, notes


def _merge_slicer_layers(image: Any, segments: list[dict[str, Any]], notes: list[str]
                         ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Slicer multi-layer (overlapping) segmentation -> one label map, segments renumbered."""
    import SimpleITK as sitk

    layers = sitk.GetArrayFromImage(image)  # (..., n_layers)
    out = np.zeros(layers.shape[:-1], dtype=np.uint16 if len(segments) > 255 else np.uint8)
    merged = []
    overlap = False
    for new, seg in enumerate(segments, start=1):
        if not 0 <= seg["layer"] < layers.shape[-1]:
            continue
        m = layers[..., seg["layer"]] == seg["value"]
        overlap |= bool(np.any(out[m]))
        out[m] = new
        merged.append({**seg, "value": new})
    if overlap:
        notes.append("overlapping Slicer segments flattened (later segments drawn on top)")
    notes.append("multi-layer Slicer segmentation merged; segments renumbered 1..n")
    return out, merged


def read(
    path: Path,
    as_labels: bool | None = None,
    label_names: str | Path | dict[Any, Any] | None = None,
    modality: str | None = None,
    channel: int | None = None,
    **kw: Any,
) -> list[MedicalImage]:
    """Read a NIfTI / NRRD / MetaImage file as one :class:`MedicalImage`.

    Parameters
    ----------
    as_labels
        ``True``/``False`` forces a label map / an intensity image; ``None`` decides from the
        data and file name (see module docstring).
    label_names
        ``{value: name}`` dict or a JSON file; default: Slicer segment fields or a sidecar.
    modality
        Override the CT/OT guess (e.g. ``"MR"``).
    channel
        Index along a 4th axis or of a vector component to open.

    Other keyword arguments (meant for other readers) are ignored.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise ReadError(p, "no such file")
    suffix = _suffix(p)
    scaling = None
    if suffix in (".nii", ".nii.gz"):
        scaling = _check_nifti_complete(p)
    if suffix in (".mhd", ".nhdr"):
        _check_detached_data(p)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        cause = _sitk_cause(exc)
        if "File cannot be read" in cause:  # ITK reports errno of an unrelated call here
            cause = "header or pixel data could not be read (file corrupt or truncated)"
        raise ReadError(p, f"cannot read {suffix or 'volume'} file: {cause}") from exc

    segments = _slicer_segments(image)
    notes: list[str] = []
    multi_layer = segments and image.GetNumberOfComponentsPerPixel() > 1 and channel is None
    if multi_layer and as_labels is not False:
        geometry = Geometry.from_sitk(image)
        arr, segments = _merge_slicer_layers(image, segments, notes)
        view = None
        rgb = False
        original_dtype = image.GetPixelIDTypeAsString()
    else:
        image, rgb, notes = _to_scalar_image(p, image, channel)
        geometry = Geometry.from_sitk(image)
        # a view of ITK's buffer: narrowing copies once into the smaller type (lower peak memory)
        arr = view = sitk.GetArrayViewFromImage(image)
        original_dtype = str(arr.dtype)

    if rgb:
        is_label = False
    elif as_labels is None:
        is_label = bool(segments) or _looks_like_labels(p, arr)
    else:
        is_label = bool(as_labels)
    if is_label and arr.dtype.kind == "f" and not np.all(np.round(arr) == arr):
        raise ReadError(p, "as_labels=True but the voxel values are not integers")
    if scaling is not None and not is_label and arr.dtype.kind == "f":
        # integers x integral slope + integral intercept: exact integers, keep them as such
        arr = _narrow(arr, labels=False, integral_float=True)
    elif not rgb:
        arr = _narrow(arr, labels=is_label)
    if view is not None and np.shares_memory(arr, view):
        arr = np.array(arr)  # never hand out a view of the ITK image buffer

    metadata: dict[str, Any] = {
        "source_path": str(p),
        "original_dtype": original_dtype,
        **({"rescale": scaling} if scaling else {}),
        "orientation": geometry.orientation,
        "warnings": notes,
    }
    window: tuple[float, float] | None = None
    mod = modality.upper() if modality else None
    if is_label:
        names: dict[int, str] | None = None
        colors: dict[int, list[int]] = {}
        if label_names is not None:
            names = load_label_names(label_names)
            metadata["label_names_source"] = "argument"
        elif segments:
            names = {s["value"]: s["name"] for s in segments}
            colors = {s["value"]: s["color"] for s in segments if "color" in s}
            metadata["label_names_source"] = "Slicer segment metadata"
        else:
            names, src = _sidecar_label_names(p)
            if names:
                metadata["label_names_source"] = src
        if names:
            metadata["label_names"] = names
        if colors:
            metadata["label_colors"] = colors
        mod = mod or "OT"
    elif not rgb and arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if mod is None and -3100.0 <= lo <= -900.0 and hi > 0:
            mod = "CT"
        if mod == "CT":
            metadata["units"] = "HU"
            window = CT_SOFT_TISSUE_WINDOW
        else:
            sample = arr.reshape(-1)[:: max(1, arr.size // 1_000_000)]
            a, b = np.percentile(sample, [0.5, 99.5])
            if b > a:
                window = ((a + b) / 2.0, b - a)
    kind = "volume" if geometry.ndim == 3 else "image2d"
    return [
        MedicalImage(
            data=arr,
            geometry=geometry,
            modality=mod or "OT",
            kind=kind,
            name=volume_stem(p),
            rgb=rgb,
            multiscale=False,
            window=None if window is None else (float(window[0]), float(window[1])),
            metadata=metadata,
            is_label=is_label,
        )
    ]
