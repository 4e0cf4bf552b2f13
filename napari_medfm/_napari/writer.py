"""npe2 single-layer writers: Labels -> NIfTI / NRRD / MetaImage / DICOM-SEG on the source geometry.

The physical geometry comes from the layer's own transform (``affine`` composed with
``scale``/``translate``/``rotate``/``shear``, i.e. exactly what napari displays); when
``metadata['geometry']`` describes the same grid its exact values are used. The actual
writing (temporary file + atomic rename) is done by :mod:`napari_medfm.io.writers` and
:mod:`napari_medfm.io.dicom_seg`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, MedfmError
from ..geometry import Geometry
from ..io.types import MedicalImage, undo_display_transpose

log = logging.getLogger(__name__)

__all__ = [
    "geometry_from_attributes",
    "label_tables",
    "write_labels_dicom_seg",
    "write_labels_mha",
    "write_labels_nifti",
    "write_labels_nrrd",
]

_EXTENSIONS = {
    "nifti": (".nii.gz", ".nii"),
    "nrrd": (".seg.nrrd", ".nrrd"),
    "mha": (".mha", ".mhd"),
    "dicom_seg": (".dcm",),
}


def _with_extension(path: str | Path, kind: str) -> Path:
    p = Path(path)
    name = p.name.lower()
    if any(name.endswith(ext) for ext in _EXTENSIONS[kind]):
        return p
    return p.with_name(p.name + _EXTENSIONS[kind][0])


def _world_matrix(attributes: dict[str, Any], ndim: int) -> np.ndarray:
    """napari's data-to-world matrix: ``affine @ (translate, rotate, shear, scale)``."""
    from napari.utils.transforms import Affine

    n = ndim
    comp = Affine(
        scale=attributes.get("scale", (1.0,) * n),
        translate=attributes.get("translate", (0.0,) * n),
        rotate=attributes.get("rotate"),
        shear=attributes.get("shear"),
        ndim=n,
    )
    aff = attributes.get("affine")
    outer = np.eye(n + 1) if aff is None else np.asarray(
        getattr(aff, "affine_matrix", aff), dtype=float)[-(n + 1):, -(n + 1):]
    return outer @ comp.affine_matrix


def geometry_from_attributes(data: Any, attributes: dict[str, Any]) -> Geometry:
    """Physical geometry of a Labels layer from its napari attributes.

    ``metadata['geometry']`` (written by our readers and tasks) is preferred when it
    describes the same grid as the layer transform; if the user moved the layer since, the
    transform wins (that is what was drawn on) and a warning is logged. For layers shown
    transposed (``metadata['display_transpose']``) the geometry is returned in source order;
    use :func:`labels_in_source_order` to get the matching array.
    """
    ndim = np.ndim(data)
    if ndim not in (2, 3):
        raise GeometryError(f"labels must be 2D or 3D to be written with geometry, got {ndim}D")
    try:
        from_transform = Geometry.from_napari_affine(_world_matrix(attributes, ndim))
    except ValueError as exc:  # sheared / degenerate transforms
        raise GeometryError(
            f"the layer transform is not a voxel grid (rotation + spacing): {exc}") from exc
    md = attributes.get("metadata") or {}
    stored = md.get("geometry")
    if md.get("display_transpose"):
        # stored geometry is in source order; compare like with like
        _, from_transform = undo_display_transpose(np.empty((0,) * ndim), from_transform, md)
    if stored:
        try:
            g = Geometry.from_dict(stored)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable metadata['geometry']: %s", exc)
        else:
            if g.same_grid(from_transform, atol=1e-3):
                return g
            log.warning("labels layer was moved since it was made: writing it where it is shown "
                        "(%r), not at its stored geometry (%r)", from_transform, g)
    return from_transform


def labels_in_source_order(data: Any, attributes: dict[str, Any]) -> tuple[np.ndarray, Geometry]:
    """Labels array and geometry in the *source* axis order (display transpose undone)."""
    labels = _labels_array(data)
    geom = geometry_from_attributes(labels, attributes)
    labels, _ = undo_display_transpose(labels, geom, attributes.get("metadata") or {})
    return np.ascontiguousarray(labels), geom


def _int_keys(d: Any) -> dict[int, Any]:
    if not isinstance(d, dict):
        return {}
    out: dict[int, Any] = {}
    for k, v in d.items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            continue
    return out


def label_tables(attributes: dict[str, Any]) -> tuple[dict[int, str] | None, dict[int, Any] | None]:
    """``label_names`` / ``label_colors`` of a layer's metadata (keys as ints, JSON-safe)."""
    md = attributes.get("metadata") or {}
    names = {k: str(v) for k, v in _int_keys(md.get("label_names")).items()}
    colors = {k: [int(c) for c in v][:3] for k, v in _int_keys(md.get("label_colors")).items()}
    return (names or None), (colors or None)


def _labels_array(data: Any) -> np.ndarray:
    if isinstance(data, list):  # multiscale labels: write the full resolution
        data = data[0]
    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise MedfmError("labels hold non-integer values; cannot save them as a label map")
        arr = arr.astype(np.int32)
    if arr.size and arr.min() < 0:
        raise MedfmError("labels hold negative values; label maps need values >= 0")
    return arr


def _write_volume_labels(path: str | Path, data: Any, attributes: dict[str, Any], kind: str) -> list[str]:
    from ..io.writers import write_labels

    labels, geom = labels_in_source_order(data, attributes)
    names, colors = label_tables(attributes)
    out = write_labels(_with_extension(path, kind), labels, geom,
                       label_names=names, label_colors=colors)
    return [str(out)]


def write_labels_nifti(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Labels layer as NIfTI (``.nii.gz``/``.nii``) on its physical geometry."""
    return _write_volume_labels(path, data, attributes, "nifti")


def write_labels_nrrd(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Labels layer as NRRD (``.nrrd``/``.seg.nrrd``) on its physical geometry."""
    return _write_volume_labels(path, data, attributes, "nrrd")


def write_labels_mha(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Labels layer as MetaImage (``.mha``/``.mhd``) on its physical geometry."""
    return _write_volume_labels(path, data, attributes, "mha")


# ------------------------------------------------------------------------------ DICOM-SEG

def _find_source_files(labels: np.ndarray, geom: Geometry, viewer: Any = None) -> Sequence[str] | None:
    """``source_files`` of an Image layer of the viewer on the same grid as the labels."""
    if viewer is None:
        try:
            import napari

            viewer = napari.current_viewer()
        except Exception:
            viewer = None
    if viewer is None:
        return None
    candidates = []
    for layer in viewer.layers:
        if type(layer).__name__ != "Image" or getattr(layer, "rgb", False):
            continue
        files = (layer.metadata or {}).get("source_files")
        if not files:
            continue
        try:
            img = MedicalImage.from_layer(layer)  # source order, like the labels
        except ValueError:
            continue
        if img.geometry.same_grid(geom, tuple(img.data.shape), labels.shape, atol=1e-3):
            candidates.append(layer)
    if not candidates:
        return None
    active = viewer.layers.selection.active
    chosen = active if active in candidates else candidates[0]
    if len(candidates) > 1:
        log.warning("several DICOM images share the labels' grid; referencing %r", chosen.name)
    return list(chosen.metadata["source_files"])


def write_labels_dicom_seg(path: str, data: Any, attributes: dict, *, viewer: Any = None) -> list[str]:
    """Save a Labels layer as DICOM-SEG referencing its source DICOM series.

    The source series is ``metadata['source_files']`` of the labels (our segmentation tasks
    copy it from the image); for labels painted by hand it is taken from the Image layer of
    the current viewer that has the same voxel grid.
    """
    from ..io.dicom_seg import write_dicom_seg

    if np.ndim(data[0] if isinstance(data, list) else data) != 3:
        raise MedfmError(f"DICOM-SEG export needs 3D labels, got {np.ndim(data)}D")
    labels, geom = labels_in_source_order(data, attributes)
    md = attributes.get("metadata") or {}
    files = md.get("source_files") or _find_source_files(labels, geom, viewer)
    if not files:
        raise MedfmError(
            "DICOM-SEG needs the labels to come from a DICOM series: these labels carry no "
            "source_files and no DICOM image layer in the viewer has the same voxel grid. "
            "Open the DICOM series (folder) and segment it, or paint labels on it, "
            "or save as NIfTI/NRRD instead."
        )
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise MedfmError(
            f"DICOM-SEG needs the source DICOM files, but {len(missing)} of {len(files)} are "
            f"gone (e.g. {Path(missing[0]).name}); reopen the series from its folder")
    names, colors = label_tables(attributes)
    desc = md.get("series_description") or attributes.get("name") or "Segmentation"
    out = write_dicom_seg(_with_extension(path, "dicom_seg"), labels, geom, [str(f) for f in files],
                          label_names=names, label_colors=colors,
                          algorithm=md.get("algorithm"), series_description=str(desc)[:64])
    return [str(out)]
