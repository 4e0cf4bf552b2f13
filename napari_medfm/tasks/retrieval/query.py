"""Querying a similar-case index with an image, a region of it, a vector or a sentence.

The model used for a query must be the one the index was built with: it is loaded through the
process-wide model cache (:func:`napari_medfm.runtime.cache.get_model`) from the weights path
recorded in the index (or the one given) and its sha256 must match.

Text queries (:func:`query_text_task`) embed the sentence with the index's own model family
(BiomedCLIP's text tower for a BiomedCLIP index, Merlin's for a Merlin CT index, whose vectors
are Merlin's contrastive embeddings); indexes of image-only models refuse with
:class:`TextSearchUnsupported`.

Regions: :func:`crop_image` cuts a box given in pixel indices (numpy order) and shifts the
geometry's origin accordingly; :func:`crop_world_box` takes corner points in napari world
coordinates (LPS mm, z/y/x order) and converts them with the image's
:class:`~napari_medfm.geometry.Geometry`, so a napari Shapes rectangle drawn over any layer
crops the right pixels of the image whatever its spacing/origin/orientation.
:func:`plane_of` / :func:`region_query_image` hold the slice and direction arithmetic the
Similar cases dock needs (the shown slice of a volume, a rectangle on it).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MedfmError, WeightsError
from ...geometry import Geometry
from ...progress import Progress
from .index import CaseIndex, Hit, IndexMismatchError


class TextSearchUnsupported(MedfmError):
    """Text queries on an index built with an image-only model."""


def supports_text(model_id: str) -> bool:
    """Whether indexes of ``model_id`` take text queries (a vision-language model)."""
    from ...runtime.registry import get_spec

    try:
        tasks = get_spec(model_id).tasks
    except MedfmError:
        return False
    return "text-embed" in tasks or "zero-shot" in tasks


def model_for_index(index: CaseIndex, weights: str | Path | None = None, device: Any = None,
                    ) -> Any:
    """The model an index was built with (shared model cache); other weights are refused."""
    from ...runtime.cache import get_model

    wpath = str(weights) if weights is not None else index.weights_path
    if not wpath:
        raise WeightsError(f"{index.root}: the index does not record its weights; pass --weights")
    model = get_model(index.model_id, weights=wpath, device=device)
    if model.spec.id != index.model_id or model.weights_sha256 != index.weights_sha256:
        raise IndexMismatchError(
            f"{Path(wpath).name}: weights sha256 {model.weights_sha256[:12]}... differ from the "
            f"index's {index.weights_sha256[:12]}... - query with the weights the index was built "
            "with")
    return model


def clear_model_cache() -> None:
    """Free the models loaded for queries (the shared cache)."""
    from ...runtime.cache import model_cache

    model_cache.clear()


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


# ------------------------------------------------------------------ slices and regions
def orthonormal_2d(direction: np.ndarray) -> np.ndarray:
    """In-plane 2x2 part of a 3D direction, re-orthonormalised (exact for axial slices)."""
    d = np.asarray(direction, dtype=float)[:2, :2]
    u, _, vt = np.linalg.svd(d)
    return u @ vt


def plane_of(image: Any, k: int | None = None) -> Any:
    """The 2D image of slice ``k`` (numpy axis 0; default the middle) of a volume, with the
    slice's own in-plane geometry (origin of its first pixel, in-plane spacing/direction)."""
    from ...io.types import MedicalImage

    data = image.data
    n = data.shape[0]
    k = int(k if k is not None else n // 2)
    k = min(max(k, 0), n - 1)
    geom = image.geometry
    origin3 = geom.index_to_physical([0.0, 0.0, float(k)])
    g2 = Geometry(geom.spacing[:2], tuple(origin3[:2]), orthonormal_2d(geom.direction))
    md = dict(image.metadata or {})
    md["slice_index"] = k
    return MedicalImage(np.asarray(data[k]), g2, modality=image.modality, kind="image2d",
                        name=f"{image.name} [slice {k}]", rgb=image.rgb, metadata=md)


def region_query_image(image: Any, corners_world: np.ndarray | None, *,
                       volume: Any = None) -> Any:
    """Crop ``image`` (2D) to a rectangle given by world corners (napari z/y/x order).

    For a slice of a volume pass the ``volume`` too: 3D corners are converted with the
    volume's own geometry (exact for any orientation) and the in-plane box cut from the slice.
    """
    if corners_world is None:
        return image
    corners = np.asarray(corners_world, float)
    if volume is not None and corners.shape[1] >= 3:
        lo, hi = world_box_to_index(volume.geometry, corners[:, -3:])
        return crop_image(image, [lo[1], lo[2], hi[1], hi[2]])
    return crop_world_box(image, corners[:, -2:])


def crop_slide_region(image: Any, corners_world: np.ndarray, max_side: int = 2048) -> Any:
    """A rectangle of a whole-slide pyramid as a plain 2D image: the finest level at which
    the region's long side is at most ``max_side`` pixels, with that level's geometry."""
    from ...io.types import MedicalImage

    levels = list(image.data)
    g = image.geometry
    lo, hi = world_box_to_index(g, np.asarray(corners_world, float)[:, -2:])
    h0, w0 = levels[0].shape[:2]
    lo = [max(0.0, lo[0]), max(0.0, lo[1])]
    hi = [min(float(h0), hi[0]), min(float(w0), hi[1])]
    if hi[0] - lo[0] < 1 or hi[1] - lo[1] < 1:
        raise MedfmError("the rectangle does not overlap the slide")
    chosen = len(levels) - 1
    for i, lvl in enumerate(levels):
        f = h0 / lvl.shape[0]
        if max(hi[0] - lo[0], hi[1] - lo[1]) / f <= max_side:
            chosen = i
            break
    lvl = levels[chosen]
    fy, fx = h0 / lvl.shape[0], w0 / lvl.shape[1]
    y0, x0 = int(lo[0] // fy), int(lo[1] // fx)
    y1, x1 = max(y0 + 1, int(np.ceil(hi[0] / fy))), max(x0 + 1, int(np.ceil(hi[1] / fx)))
    data = np.asarray(lvl[y0:y1, x0:x1])
    first = g.index_to_physical([x0 * fx + (fx - 1) / 2, y0 * fy + (fy - 1) / 2])
    geom = Geometry((g.spacing[0] * fx, g.spacing[1] * fy), tuple(first), g.direction)
    md = dict(image.metadata or {})
    md.update(crop_box=[y0, x0, y1, x1], pyramid_level=chosen)
    return MedicalImage(data, geom, modality=image.modality, kind="image2d",
                        name=f"{image.name} [region]", rgb=image.rgb, metadata=md)


def region_image(image: Any, corners_world: np.ndarray | None, *, volume: Any = None) -> Any:
    """:func:`region_query_image` for plain images, :func:`crop_slide_region` for slides."""
    if corners_world is not None and getattr(image, "multiscale", False):
        return crop_slide_region(image, corners_world)
    return region_query_image(image, corners_world, volume=volume)


def volume_region(volume: Any, corners_world: np.ndarray | None) -> Any:
    """For a 3D encoder: the whole volume, or the sub-volume under a rectangle's in-plane box
    through all slices."""
    if corners_world is None:
        return volume
    corners = np.asarray(corners_world, float)
    if corners.shape[1] < 3:
        raise MedfmError("draw the rectangle on the volume (a 3D Shapes layer)")
    lo, hi = world_box_to_index(volume.geometry, corners[:, -3:])
    return crop_image(volume, [0, lo[1], lo[2], volume.shape[0], hi[1], hi[2]])


def build_query_image(image: Any, *, slice_index: int | None = None,
                      corners_world: np.ndarray | None = None,
                      volume_mode: bool = False) -> Any:
    """The image a query embeds, from a layer's image (in its displayed order) and what the
    user chose: a 3D encoder gets the volume (or the sub-volume under a rectangle), a 2D
    encoder the shown slice ``slice_index`` of a volume (or a rectangle of it), a 2D image or
    a rectangle of it (a slide region from the finest pyramid level that fits). Reads pixels:
    call it in a worker."""
    spatial = len(image.spatial_shape)
    if spatial == 3 and volume_mode:
        vol = replace(image, data=np.asarray(image.data))
        return volume_region(vol, corners_world)
    if spatial == 3:
        plane = plane_of(image, slice_index)
        return region_query_image(plane, corners_world, volume=image)
    if spatial != 2:
        raise MedfmError(f"{image.name}: {spatial}D images are not supported for similar cases")
    if corners_world is None and not image.multiscale:
        return replace(image, data=np.asarray(image.data))
    return region_image(image, corners_world)


# ------------------------------------------------------------------ queries
def query_vector(index: CaseIndex, vector: np.ndarray, k: int = 10, **filters: Any) -> list[Hit]:
    return index.search(np.asarray(vector, np.float32)[None], k, **filters)[0]


def query_image(index: CaseIndex, model: Any, image: Any, k: int = 10, *,
                slice_index: Any = None, modality: str | None = None,
                filter_modality: str | None = None, label: str | None = None) -> list[Hit]:
    """Embed ``image`` with ``model`` and return its top-``k`` similar cases."""
    from .build import embed_images, model_dim

    index.check_compatible(model.spec.id, model.weights_sha256, model_dim(model) or index.dim)
    emb = embed_images(model, [image], [modality], slice_index)[0]
    return query_vector(index, emb, k, modality=filter_modality, label=label)


def text_vector(model: Any, text: str) -> np.ndarray:
    """The sentence embedded in ``model``'s joint image-text space (L2-normalised)."""
    if hasattr(model, "embed_text"):
        return np.asarray(model.embed_text([text]), np.float32)[0]
    if hasattr(model, "text_features"):  # Merlin: the text tower of its contrastive space
        return np.asarray(model.text_features([text]), np.float32)[0]
    raise TextSearchUnsupported(
        f"{getattr(model, 'model_id', 'this model')} has no text tower: text search needs an "
        "index built with a vision-language model (biomedclip for 2D images, merlin for CT)")


def check_text_search(index: CaseIndex) -> None:
    if not supports_text(index.model_id):
        raise TextSearchUnsupported(
            f"{index.root.name}: this index was built with {index.model_id}, an image-only "
            "model; text search needs a vision-language model index "
            "(`medfm index build --model biomedclip ...` for 2D images, `--model merlin` for CT)")


def query_text(index: CaseIndex, model: Any, text: str, k: int = 10, *,
               filter_modality: str | None = None, label: str | None = None) -> list[Hit]:
    """The top-``k`` cases whose image embeddings are closest to the sentence ``text``."""
    if not str(text).strip():
        raise MedfmError("empty text query")
    check_text_search(index)
    vec = text_vector(model, str(text))
    if vec.shape[0] != index.dim:
        raise IndexMismatchError(f"text embedding has dim {vec.shape[0]}, index has {index.dim}"
                                 " (an index built before text search: rebuild it)")
    return query_vector(index, vec, k, modality=filter_modality, label=label)


def query_task(index_dir: str | Path, image: Any = None, k: int = 10, *, text: str | None = None,
               weights: Any = None, device: Any = None, slice_index: Any = None,
               modality: str | None = None, filter_modality: str | None = None,
               label: str | None = None) -> Generator[Progress, None, list[Hit]]:
    """Task generator (for widgets/CLI): open index -> load model -> embed -> search.

    Give an ``image`` (or a region of it) or a ``text`` sentence.
    """
    if (image is None) == (text is None):
        raise MedfmError("query with an image or a text, not both")
    yield Progress(0, 3, "opening index")
    index = CaseIndex.open(index_dir)
    try:
        if text is not None:
            check_text_search(index)  # before loading any weights
        index.load_faiss()
        yield Progress(1, 3, f"loading {index.model_id}")
        model = model_for_index(index, weights=weights, device=device)
        yield Progress(2, 3, "embedding and searching")
        if text is not None:
            hits = query_text(index, model, text, k, filter_modality=filter_modality,
                              label=label)
        else:
            hits = query_image(index, model, image, k, slice_index=slice_index,
                               modality=modality, filter_modality=filter_modality, label=label)
        yield Progress(3, 3, f"{len(hits)} similar cases")
        return hits
    finally:
        index.close()


def query_text_task(index_dir: str | Path, text: str, k: int = 10, **kw: Any,
                    ) -> Generator[Progress, None, list[Hit]]:
    """:func:`query_task` with a sentence."""
    return (yield from query_task(index_dir, None, k, text=text, **kw))


#: the task names the issue uses
query = query_task
