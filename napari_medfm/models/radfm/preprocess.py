"""RadFM preprocessing from :class:`~napari_medfm.io.types.MedicalImage` (deterministic).

* 2D (grey, RGB, slide): RGB, resized to ``image_size`` x ``image_size`` (bilinear with
  antialiasing; the release uses a random resized crop even at inference, we resize), scaled to
  [0, 1] without mean/std (uint8 / 255; other dtypes: display window if any, else min-max),
  replicated to depth 4 -> ``[3, S, S, 4]``.
* 3D (numpy ``(z, y, x)``): optional window ``(center, width)`` clip (the release has none),
  ``image_size`` in-plane with depth > ``max_depth`` zoomed to ``max_depth`` (trilinear),
  global min-max to [0, 1], 3 copied channels, depth then snapped to the nearest multiple of 4 in ``[4, max_depth]``
  (ties round up) -> ``[3, S, S, D]`` with H = y, W = x, D = z.

Output float32 tensors ready for ``vision_x`` (stack as ``[B, S, 3, H, W, D]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import MedfmError, WrongModalityError

__all__ = ["snap_depth", "preprocess_2d", "preprocess_3d", "preprocess_image", "image_dims",
           "modality_group"]

DEPTH_STEP = 4


def snap_depth(depth: int, max_depth: int = 64, step: int = DEPTH_STEP) -> int:
    """Depth after RadFM's rule: min(depth, max_depth) snapped to the nearest multiple of 4."""
    d = min(int(depth), max_depth)
    snapped = int(np.floor(d / step + 0.5)) * step
    return int(min(max(snapped, step), max_depth))


def _pick_level(image: Any, size: int) -> np.ndarray:
    """Full-resolution array, or for a multiscale slide the coarsest level >= ``size``."""
    if not getattr(image, "multiscale", False):
        return np.asarray(image.data)
    levels = list(image.data)
    chosen = levels[0]
    for lvl in levels:
        if min(lvl.shape[0], lvl.shape[1]) >= size:
            chosen = lvl
    return np.asarray(chosen)


def _to_unit(a: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if window is not None:
        c, w = float(window[0]), float(window[1])
        lo, hi = c - w / 2.0, c + w / 2.0
        return np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def preprocess_2d(image: Any, *, image_size: int = 512, depth: int = DEPTH_STEP,
                  window: tuple[float, float] | None = None) -> torch.Tensor:
    """A 2D image (grey ``(y, x)``, RGB(A) ``(y, x, c)``) -> ``[3, S, S, depth]`` in [0, 1]."""
    a = _pick_level(image, image_size) if hasattr(image, "data") else np.asarray(image)
    rgb = bool(getattr(image, "rgb", a.ndim == 3 and a.shape[-1] in (3, 4)))
    if rgb:
        if a.ndim != 3:
            raise WrongModalityError(f"RGB image expected (y, x, c), got shape {a.shape}")
        a = a[..., :3]
        if window is None and a.dtype != np.uint8:
            window = getattr(image, "window", None)
        unit = _to_unit(a, window)
    else:
        if a.ndim != 2:
            raise WrongModalityError(f"2D image expected (y, x), got shape {a.shape}")
        if window is None:
            window = getattr(image, "window", None) if a.dtype != np.uint8 else None
        unit = np.repeat(_to_unit(a, window)[..., None], 3, axis=-1)
    t = torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)[None]  # 1 3 y x
    if t.shape[-2:] != (image_size, image_size):
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    t = t.clamp(0.0, 1.0)[0]
    return t[..., None].expand(3, image_size, image_size, depth).contiguous()


def preprocess_3d(image: Any, *, image_size: int = 512, max_depth: int = 64,
                  window: tuple[float, float] | None = None) -> torch.Tensor:
    """A volume ``(z, y, x)`` -> ``[3, S, S, D]`` (see the module docstring)."""
    a = np.asarray(image.data if hasattr(image, "data") else image)
    if a.ndim != 3:
        raise WrongModalityError(f"3D volume expected (z, y, x), got shape {a.shape}")
    v = a.astype(np.float32)
    if window is not None:
        c, w = float(window[0]), float(window[1])
        v = np.clip(v, c - w / 2.0, c + w / 2.0)
    # the release's order: in-plane resize + depth zoom (<= max_depth), min-max, depth snap
    zoom_d = min(v.shape[0], max_depth)
    t = torch.from_numpy(np.ascontiguousarray(v)).permute(1, 2, 0)[None, None]  # 1 1 y x z
    if tuple(t.shape[-3:]) != (image_size, image_size, zoom_d):
        t = F.interpolate(t, size=(image_size, image_size, zoom_d), mode="trilinear",
                          align_corners=False)
    lo, hi = float(t.min()), float(t.max())
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    d = snap_depth(zoom_d, max_depth)
    if d != zoom_d:
        t = F.interpolate(t, size=(image_size, image_size, d), mode="trilinear",
                          align_corners=False)
    t = t.clamp(0.0, 1.0)[0]
    return t.expand(3, image_size, image_size, d).contiguous()


def image_dims(image: Any) -> int:
    """2 for 2D images/slides, 3 for volumes (a single-slice volume counts as 2D)."""
    kind = getattr(image, "kind", None)
    if kind in ("image2d", "wsi"):
        return 2
    shape = getattr(image, "spatial_shape", None) or np.shape(getattr(image, "data", image))
    if kind == "volume" and len(shape) == 3 and shape[0] > 1:
        return 3
    if len(shape) == 3 and kind == "volume" and shape[0] == 1:
        return 2
    return 3 if len(shape) == 3 and not getattr(image, "rgb", False) else 2


def preprocess_image(image: Any, *, image_size: int = 512, max_depth: int = 64,
                     window: tuple[float, float] | None = None) -> torch.Tensor:
    """2D or 3D preprocessing chosen from the image (see :func:`image_dims`)."""
    if image_dims(image) == 3:
        return preprocess_3d(image, image_size=image_size, max_depth=max_depth, window=window)
    if getattr(image, "kind", None) == "volume" and np.ndim(image.data) == 3:
        a = np.asarray(image.data)[0]  # (1, y, x) volume
        return preprocess_2d(a, image_size=image_size, window=window or image.window)
    return preprocess_2d(image, image_size=image_size, window=window)


#: DICOM modality code -> question group of the shipped findings file.
_GROUPS = {"CR": "CXR", "DX": "CXR", "CXR": "CXR", "OP": "fundus", "XC": "fundus",
           "FUNDUS": "fundus", "SM": "pathology", "PATHOLOGY": "pathology", "CT": "CT"}


def modality_group(image: Any) -> str | None:
    """"CXR", "fundus", "pathology", "CT" or None (unknown) for an image."""
    if getattr(image, "kind", None) == "wsi":
        return "pathology"
    mod = str(getattr(image, "modality", "") or "").upper()
    return _GROUPS.get(mod)


def stack_images(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One sample's preprocessed images -> ``[1, S, 3, H, W, D]`` (same shape required)."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise MedfmError(f"images of one sample must share a shape to stack, got {sorted(shapes)}")
    return torch.stack(list(tensors))[None]
