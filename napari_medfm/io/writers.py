"""Write label maps and intensity volumes to NIfTI, NRRD and MetaImage on their true geometry.

Formats are chosen from the file name: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``,
``.mha``, ``.mhd`` (header + ``.zraw`` data file). Pixels go through SimpleITK with the
:class:`~napari_medfm.geometry.Geometry` applied, so spacing, origin and direction (LPS) are
those of the image the labels were drawn or predicted on.

Label names and colours
-----------------------
* Every :func:`write_labels` call writes a JSON **sidecar** next to the file, named
  ``<stem>.labels.json`` where the stem is the file name without its format extension
  (``liver.nii.gz`` -> ``liver.labels.json``, ``a.seg.nrrd`` -> ``a.labels.json``)::

      {"format": "napari-medfm-labels/1", "image": "liver.nii.gz",
       "labels": [{"value": 1, "name": "liver", "color": [220, 40, 40]},
                  {"value": 2, "name": "spine"}]}

  One entry per non-zero label value present in the array or named/coloured by the caller;
  ``name``/``color`` (RGB 0-255) only when known. The sidecar is always rewritten, so a
  stale one from an earlier save never describes new labels (files of one stem in one folder
  share it). :func:`read_labels_sidecar` reads it back (and also the ``labels_total.json``
  style ``{"labels": {"1": "spleen"}}``); :mod:`napari_medfm.io.volume` finds it by name.
* NRRD files (``.nrrd`` and ``.seg.nrrd``) additionally carry 3D Slicer segmentation
  key/values (``SegmentN_Name``, ``SegmentN_Color`` 0-1 floats, ``SegmentN_LabelValue``,
  ``SegmentN_Layer``, ``SegmentN_Extent``), so Slicer opens a ``.seg.nrrd`` with names and
  colours.

Writes are atomic: the file is written in a hidden temporary folder next to the target and
moved into place with :func:`os.replace` (:func:`napari_medfm.io.files.atomic_write`); on any
failure nothing is left behind.

No Qt, napari or torch imports here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import present_values
from ..errors import MedfmError, UnsupportedFormatError
from ..geometry import Geometry
from .files import atomic_write, atomic_write_text
from .types import MedicalImage

__all__ = [
    "LABEL_EXTENSIONS",
    "atomic_write",
    "SIDECAR_SUFFIX",
    "WriteError",
    "label_dtype",
    "read_labels_sidecar",
    "sidecar_path",
    "write_image",
    "write_labels",
]

#: Extensions handled by :func:`write_labels` / :func:`write_image` (longest first).
LABEL_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

#: Suffix that replaces the format extension to name the label-table sidecar.
SIDECAR_SUFFIX = ".labels.json"

_SIDECAR_FORMAT = "napari-medfm-labels/1"


class WriteError(MedfmError):
    """A label map or image could not be written; the message names the file and the cause."""

    def __init__(self, path: str | Path | None, cause: str):
        self.path = None if path is None else Path(path)
        self.cause = cause
        where = f"{Path(path).name}: " if path is not None else ""
        super().__init__(f"{where}{cause}")


# ---------------------------------------------------------------------------- helpers
def file_format(path: str | Path) -> str:
    """The extension (from :data:`LABEL_EXTENSIONS`) that decides how ``path`` is written."""
    name = Path(path).name.lower()
    for ext in LABEL_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    raise UnsupportedFormatError(
        f"{Path(path).name}: cannot write this format; use one of "
        + ", ".join(sorted(LABEL_EXTENSIONS))
    )


#: Output extensions stripped to form a sidecar's stem (label files plus DICOM-SEG ``.dcm``).
_STEM_EXTENSIONS = (*LABEL_EXTENSIONS, ".dcm")


def sidecar_path(path: str | Path, suffix: str = SIDECAR_SUFFIX) -> Path:
    """The one sidecar naming rule: the file name without its format extension + ``suffix``.

    ``liver.nii.gz`` -> ``liver.labels.json`` (the label table written by :func:`write_labels`);
    with ``suffix=".json"``, ``seg.dcm`` -> ``seg.json`` (the run report of ``medfm segment``).
    """
    p = Path(path)
    name = p.name
    for ext in _STEM_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name + suffix)


def label_dtype(labels: np.ndarray) -> np.dtype:
    """Smallest stored dtype for a label map: uint8 (max < 256), uint16 (< 65536) else int32."""
    arr = np.asarray(labels)
    mx = int(arr.max()) if arr.size else 0
    if mx < 256:
        return np.dtype(np.uint8)
    if mx < 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _check_labels(path: Path, labels: Any, geometry: Geometry) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim != geometry.ndim:
        raise WriteError(
            path,
            f"labels have {arr.ndim} dimensions {arr.shape} but the geometry is {geometry.ndim}D",
        )
    if arr.size == 0:
        raise WriteError(path, f"labels are empty (shape {arr.shape})")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise WriteError(path, "labels must be whole numbers (got non-integer floats)")
    elif arr.dtype.kind not in "iu":
        raise WriteError(path, f"labels must be an integer array, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise WriteError(path, f"labels must be >= 0, got minimum {arr.min()}")
    if arr.max() > np.iinfo(np.int32).max:
        raise WriteError(path, f"label value {arr.max()} does not fit in int32")
    return arr.astype(label_dtype(arr), copy=False)


def _norm_color(value: Any, path: Path | None = None) -> tuple[int, int, int]:
    raw = list(np.asarray(value).reshape(-1))[:3]
    if len(raw) != 3:
        raise WriteError(path, f"a label colour needs 3 values (r, g, b), got {value!r}")
    c = [float(v) for v in raw]
    if all(isinstance(v, (float, np.floating)) for v in raw) and max(c) <= 1.0:
        c = [v * 255.0 for v in c]  # napari-style 0-1 float RGB(A)
    return tuple(int(round(min(255.0, max(0.0, v)))) for v in c)  # type: ignore[return-value]


def _label_table(
    arr: np.ndarray,
    label_names: Mapping[Any, str] | None,
    label_colors: Mapping[Any, Any] | None,
    path: Path | None = None,
) -> dict[int, dict[str, Any]]:
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    colors = {int(k): _norm_color(v, path) for k, v in (label_colors or {}).items()}
    present = present_values(arr)
    table: dict[int, dict[str, Any]] = {}
    for v in sorted(set(present) | set(names) | set(colors)):
        if v == 0:
            continue
        entry: dict[str, Any] = {}
        if v in names:
            entry["name"] = names[v]
        if v in colors:
            entry["color"] = list(colors[v])
        table[v] = entry
    return table


def read_labels_sidecar(path: str | Path) -> tuple[dict[int, str], dict[int, tuple[int, int, int]]]:
    """Label names and colours from the sidecar of ``path`` (or from a sidecar path itself).

    Accepts our ``{"labels": [{"value", "name", "color"}]}`` and the
    ``{"labels": {"1": "spleen"}}`` / ``{"1": {"name": ..., "color": ...}}`` styles. Returns ``({}, {})`` when
    there is no sidecar. Raises :class:`~napari_medfm.errors.ReadError` on malformed JSON.
    """
    from ..errors import ReadError

    p = Path(path)
    side = p if p.name.endswith(".json") else sidecar_path(p)
    if not side.is_file():
        return {}, {}
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReadError(side, f"label table sidecar is not valid JSON ({exc})") from exc
    table = doc.get("labels", doc) if isinstance(doc, dict) else doc
    if isinstance(table, list):
        table = {e.get("value"): e for e in table if isinstance(e, dict)}
    if not isinstance(table, dict):
        raise ReadError(side, "label table sidecar has no 'labels' table")
    names: dict[int, str] = {}
    colors: dict[int, tuple[int, int, int]] = {}
    for key, entry in table.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, str):
            names[value] = entry
        elif isinstance(entry, dict):
            if entry.get("name") is not None:
                names[value] = str(entry["name"])
            if entry.get("color") is not None:
                colors[value] = _norm_color(entry["color"])
    return names, colors


def _slicer_metadata(arr: np.ndarray, table: dict[int, dict[str, Any]]) -> dict[str, str]:
    """3D Slicer segmentation key/values (seg.nrrd conventions) for a single-layer label map."""
    from scipy import ndimage

    boxes = ndimage.find_objects(arr) if arr.max() > 0 else []
    md = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": " ".join(["0"] * arr.ndim),
    }
    for i, (value, entry) in enumerate(table.items()):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            extent = " ".join(["0 -1"] * arr.ndim)
        else:  # Slicer extent is x0 x1 y0 y1 z0 z1 (inclusive), numpy order reversed
            extent = " ".join(f"{s.start} {s.stop - 1}" for s in box[::-1])
        name = entry.get("name", f"Segment_{value}")
        md[f"Segment{i}_ID"] = f"Segment_{value}"
        md[f"Segment{i}_Name"] = name
        md[f"Segment{i}_NameAutoGenerated"] = "0" if "name" in entry else "1"
        if "color" in entry:
            md[f"Segment{i}_Color"] = " ".join(f"{c / 255.0:.6g}" for c in entry["color"])
            md[f"Segment{i}_ColorAutoGenerated"] = "0"
        md[f"Segment{i}_LabelValue"] = str(value)
        md[f"Segment{i}_Layer"] = "0"
        md[f"Segment{i}_Extent"] = extent
        md[f"Segment{i}_Tags"] = "|"
    return md


def _write_sitk(path: Path, image: Any, compress: bool) -> Path:
    import SimpleITK as sitk

    def _write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:  # ITK exceptions are long; keep the last (useful) line
            msg = str(exc).strip().splitlines()
            raise WriteError(path, "SimpleITK could not write the file: "
                             + (msg[-1] if msg else "unknown error")) from exc

    return atomic_write(path, _write)


# ---------------------------------------------------------------------------- public API
def write_labels(
    path: str | Path,
    labels: np.ndarray,
    geometry: Geometry,
    *,
    label_names: dict[int, str] | None = None,
    label_colors: dict[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write a label map on ``geometry`` (format from the extension) plus its label sidecar.

    Parameters
    ----------
    path
        Target file: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ``.mha`` or ``.mhd``.
    labels
        Integer (or bool / whole-valued float) array in numpy order ``(z, y, x)`` (or ``(y, x)``).
        Stored as uint8 when max < 256, uint16 when max < 65536, else int32.
    geometry
        Voxel grid of ``labels`` (SimpleITK x/y/z order, LPS mm), usually the source image's.
    label_names, label_colors
        ``{value: name}`` and ``{value: (r, g, b)}`` (0-255, or 0-1 floats as napari uses);
        stored in the ``<stem>.labels.json`` sidecar and, for NRRD, as Slicer key/values.

    Returns the written path. Raises :class:`WriteError` for bad labels and
    :class:`~napari_medfm.errors.UnsupportedFormatError` for an unknown extension.
    """
    p = Path(path)
    ext = file_format(p)
    arr = _check_labels(p, labels, geometry)
    table = _label_table(arr, label_names, label_colors, p)
    image = geometry.to_sitk(np.ascontiguousarray(arr))
    if ext in (".nrrd", ".seg.nrrd"):
        for key, value in _slicer_metadata(arr, table).items():
            image.SetMetaData(key, value)
    _write_sitk(p, image, compress=ext != ".nii")
    doc = {
        "format": _SIDECAR_FORMAT,
        "image": p.name,
        "labels": [{"value": v, **e} for v, e in table.items()],
    }
    atomic_write_text(sidecar_path(p), json.dumps(doc, indent=1) + "\n", mkdir=False)
    return p


def write_image(path: str | Path, image: MedicalImage) -> Path:
    """Write an intensity volume (or 2D image) with its geometry; format from the extension.

    The dtype is kept (bool -> uint8, float16 -> float32); RGB(A) images are written as
    vector pixels. Label maps (``image.is_label``) are delegated to :func:`write_labels` with
    ``metadata['label_names']`` / ``metadata['label_colors']``. Only pixels and geometry are
    written: no header fields (and so no patient identifiers) are copied. Atomic.
    """
    p = Path(path)
    file_format(p)
    if image.multiscale:
        raise WriteError(p, "multiscale (whole-slide) images cannot be written as a volume file")
    if image.is_label:
        md = image.metadata or {}
        return write_labels(
            p, np.asarray(image.data), image.geometry,
            label_names=md.get("label_names"), label_colors=md.get("label_colors"),
        )
    import SimpleITK as sitk

    arr = np.asarray(image.data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    spatial = arr.ndim - 1 if image.rgb else arr.ndim
    if spatial != image.geometry.ndim:
        raise WriteError(
            p, f"image has {spatial} spatial dimensions {arr.shape} but the geometry is "
               f"{image.geometry.ndim}D"
        )
    try:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=image.rgb)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise WriteError(p, f"pixel type {arr.dtype} cannot be written ({exc})") from exc
    image.geometry.apply_to_sitk(img)
    return _write_sitk(p, img, compress=file_format(p) != ".nii")
