"""Querying a similar-case index with an image, a region of it, or a vector.

The model used for a query must be the one the index was built with: it is loaded from the
weights path recorded in the index (or the one given) and its sha256 must match. Loaded models
are cached per (model id, weights path) so repeated widget queries do not reload weights.

Regions: :func:`crop_image` cuts a box given in pixel indices (numpy order) and shifts the
geometry's origin accordingly; :func:`crop_world_box` takes corner points in napari world
coordinates (LPS mm, z/y/x order) and converts them with the image's
:class:`~napari_medfm.geometry.Geometry`, so a napari Shapes rectangle drawn over any layer
crops the right pixels of the image whatever its spacing/origin/orientation.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MedfmError, WeightsError
from ...geometry import Geometry
from ...progress import Progress
from .index import CaseIndex, Hit, IndexMismatchError

_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


def model_for_index(index: CaseIndex, weights: str | Path | None = None, device: Any = None) -> Any:
    """Load (or reuse) the model an index was built with; refuse other weights."""
    from ...runtime.registry import load_model

    wpath = str(weights) if weights is not None else index.weights_path
    if not wpath:
        raise WeightsError(f"{index.root}: the index does not record its weights; pass --weights")
    key = (index.model_id, str(Path(wpath).expanduser().resolve()))
    with _CACHE_LOCK:
        model = _MODEL_CACHE.get(key)
    if model is None:
        model = load_model(index.model_id, weights=wpath, device=device)
        with _CACHE_LOCK:
            _MODEL_CACHE[key] = model
    if model.spec.id != index.model_id or model.weights_sha256 != index.weights_sha256:
        raise IndexMismatchError(
            f"{Path(wpath).name}: weights sha256 {model.weights_sha256[:12]}... differ from the "
            f"index's {index.weights_sha256[:12]}... - query with the weights the index was built "
            "with")
    return model


def clear_model_cache() -> None:
    with _CACHE_LOCK:
        _MODEL_CACHE.clear()


def crop_image(image: Any, box: Sequence[int]) -> Any:
    """Crop the spatial axes of a 2D image (or 3D volume) to ``box`` in pixel indices.

    ``box`` is ``(y0, x0, y1, x1)`` for 2D or ``(z0, y0, x0, z1, y1, x1)`` for 3D (numpy
    order, end exclusive, clipped to the image). The geometry origin moves to the new first
    pixel; spacing and direction are unchanged.
    """
    shape = image.spatial_shape
    nd = len(shape)
    if len(box) != 2 * nd:
        raise MedfmError(f"crop box needs {2 * nd} numbers for a {nd}D image, got {len(box)}")
    lo = [max(0, int(np.floor(v))) for v in box[:nd]]
    hi = [min(s, int(np.ceil(v))) for v, s in zip(box[nd:], shape, strict=False)]
    if any(h - low < 1 for low, h in zip(lo, hi, strict=False)):
        raise MedfmError(f"crop box {list(box)} does not overlap the image {shape}")
    if image.multiscale:
        raise MedfmError("region queries on whole-slide pyramids: crop a level first")
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=False))
    data = np.asarray(image.data[sl])
    g = image.geometry
    origin = g.index_to_physical(np.asarray(lo[::-1], dtype=float))
    geom = Geometry(g.spacing, tuple(origin), g.direction)
    md = dict(image.metadata or {})
    md["crop_box"] = [*lo, *hi]
    return replace(image, data=data, geometry=geom, metadata=md, name=f"{image.name} [crop]")


def world_box_to_index(geometry: Geometry, world_points_zyx: np.ndarray,
                       ) -> tuple[list[float], list[float]]:
    """Bounding box (numpy-order lo, hi indices) of world points (napari z/y/x order, LPS)."""
    pts = np.asarray(world_points_zyx, dtype=float)
    n = geometry.ndim
    pts = pts[:, -n:]
    idx_xyz = geometry.physical_to_index(pts[:, ::-1])
    idx = idx_xyz[:, ::-1]
    # pixel centres are at integer indices: a box edge at c covers pixels round(c) inclusive
    lo = np.floor(idx.min(axis=0) + 0.5)
    hi = np.floor(idx.max(axis=0) + 0.5) + 1
    return lo.tolist(), hi.tolist()


def crop_world_box(image: Any, world_points_zyx: np.ndarray) -> Any:
    """Crop ``image`` to the box spanned by world points (e.g. a Shapes rectangle)."""
    lo, hi = world_box_to_index(image.geometry, world_points_zyx)
    return crop_image(image, [*lo, *hi])


def query_vector(index: CaseIndex, vector: np.ndarray, k: int = 10, **filters: Any) -> list[Hit]:
    return index.search(np.asarray(vector, np.float32)[None], k, **filters)[0]


def query_image(index: CaseIndex, model: Any, image: Any, k: int = 10, *,
                slice_index: Any = None, modality: str | None = None,
                filter_modality: str | None = None, label: str | None = None) -> list[Hit]:
    """Embed ``image`` with ``model`` and return its top-``k`` similar cases."""
    from .build import embed_images, model_dim

    index.check_compatible(model.spec.id, model.weights_sha256, model_dim(model))
    emb = embed_images(model, [image], [modality], slice_index)[0]
    return query_vector(index, emb, k, modality=filter_modality, label=label)


def query_task(index_dir: str | Path, image: Any, k: int = 10, *, weights: Any = None,
               device: Any = None, slice_index: Any = None, modality: str | None = None,
               filter_modality: str | None = None, label: str | None = None,
               ) -> Generator[Progress, None, list[Hit]]:
    """Task generator (for widgets/CLI): open index -> load model -> embed -> search."""
    yield Progress(0, 3, "opening index")
    index = CaseIndex.open(index_dir)
    try:
        index.load_faiss()
        yield Progress(1, 3, f"loading {index.model_id}")
        model = model_for_index(index, weights=weights, device=device)
        yield Progress(2, 3, "embedding and searching")
        hits = query_image(index, model, image, k, slice_index=slice_index, modality=modality,
                           filter_modality=filter_modality, label=label)
        yield Progress(3, 3, f"{len(hits)} similar cases")
        return hits
    finally:
        index.close()
