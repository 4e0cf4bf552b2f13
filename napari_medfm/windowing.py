"""CT window / level (Hounsfield units) presets and helpers. No Qt, no napari import.

A *window* is ``(center, width)`` in the image's display units (HU for CT). A napari layer
shows it as ``contrast_limits = (center - width / 2, center + width / 2)``.

Preset values are the standard ones listed by Radiopaedia, "Windowing (CT)"
(https://radiopaedia.org/articles/windowing-ct): brain W80/L40, lungs W1500/L-600,
mediastinum W350/L50, soft tissues W400/L40 (range W350-400 / L20-60), bone W1800/L400.
Liver uses W160/L60, a common PACS setting for the portal-venous abdomen (Radiopaedia gives
W150/L30 for unenhanced liver; both separate liver from the surrounding fat and muscle).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "HEADER_DEFAULT",
    "AUTO",
    "PRESETS",
    "WindowPreset",
    "apply_window",
    "auto_window",
    "header_window",
    "limits_to_window",
    "preset_names",
    "resolve_window",
    "window_to_limits",
]

#: Pseudo-preset names understood by :func:`resolve_window`.
HEADER_DEFAULT = "header"
AUTO = "auto"


@dataclass(frozen=True)
class WindowPreset:
    """A named CT window: ``center`` (level) and ``width`` in HU."""

    key: str
    label: str
    center: float
    width: float

    @property
    def limits(self) -> tuple[float, float]:
        return window_to_limits(self.center, self.width)


PRESETS: dict[str, WindowPreset] = {
    p.key: p
    for p in (
        WindowPreset("soft_tissue", "Soft tissue (W400 L40)", 40.0, 400.0),
        WindowPreset("lung", "Lung (W1500 L-600)", -600.0, 1500.0),
        WindowPreset("bone", "Bone (W1800 L400)", 400.0, 1800.0),
        WindowPreset("brain", "Brain (W80 L40)", 40.0, 80.0),
        WindowPreset("liver", "Liver (W160 L60)", 60.0, 160.0),
        WindowPreset("mediastinum", "Mediastinum (W350 L50)", 50.0, 350.0),
    )
}


def preset_names() -> list[str]:
    """Keys accepted by :func:`resolve_window` (presets, then ``header`` and ``auto``)."""
    return [*PRESETS, HEADER_DEFAULT, AUTO]


def window_to_limits(center: float, width: float) -> tuple[float, float]:
    """``(low, high)`` display limits of a window; ``width`` must be positive."""
    c, w = float(center), float(width)
    if not np.isfinite(c) or not np.isfinite(w):
        raise ValueError(f"window center/width must be finite, got {center!r}/{width!r}")
    if w <= 0:
        raise ValueError(f"window width must be positive, got {width!r}")
    return (c - w / 2.0, c + w / 2.0)


def limits_to_window(low: float, high: float) -> tuple[float, float]:
    """Inverse of :func:`window_to_limits`: ``(center, width)``."""
    lo, hi = float(low), float(high)
    if not hi > lo:
        raise ValueError(f"upper limit must exceed the lower one, got ({low}, {high})")
    return ((lo + hi) / 2.0, hi - lo)


def header_window(source: Any) -> tuple[float, float] | None:
    """The default window stored with an image, if any.

    ``source`` is a :class:`~napari_medfm.io.types.MedicalImage` (its ``window``), a napari
    layer (its ``metadata['window']``, as written by ``MedicalImage.full_metadata``) or a
    metadata mapping. DICOM files may hold several windows; readers store the first.
    """
    win = getattr(source, "window", None)
    if win is None:
        md = source if isinstance(source, Mapping) else getattr(source, "metadata", None)
        if isinstance(md, Mapping):
            win = md.get("window")
    if win is None:
        return None
    arr = np.asarray(win, dtype=float).reshape(-1)
    if arr.size < 2 or not np.all(np.isfinite(arr[:2])) or arr[1] <= 0:
        return None
    return (float(arr[0]), float(arr[1]))


def auto_window(data: Any, percentiles: tuple[float, float] = (1.0, 99.0),
                max_samples: int = 2_000_000) -> tuple[float, float]:
    """Window spanning the given percentiles of ``data`` (subsampled for big arrays)."""
    arr = np.asarray(data[0] if isinstance(data, list) else data)
    flat = arr.reshape(-1)
    if flat.size > max_samples:
        step = int(np.ceil(flat.size / max_samples))
        flat = flat[::step]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if flat.size == 0:
        raise ValueError("cannot compute a window of an empty image")
    lo, hi = (float(v) for v in np.percentile(flat, percentiles))
    if hi <= lo:
        hi = lo + 1.0
    return limits_to_window(lo, hi)


def resolve_window(name: str, source: Any = None) -> tuple[float, float]:
    """``(center, width)`` for a preset key, ``"header"`` or ``"auto"``.

    ``source`` (an image or layer) is needed for ``header`` and ``auto``. ``header`` falls
    back to ``auto`` when the image carries no window, so it always gives something sensible.
    """
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in PRESETS:
        p = PRESETS[key]
        return (p.center, p.width)
    if key in (HEADER_DEFAULT, "header_default", "default"):
        if source is None:
            raise ValueError("the header default needs an image")
        win = header_window(source)
        if win is not None:
            return win
        key = AUTO
    if key == AUTO:
        if source is None:
            raise ValueError("the automatic window needs an image")
        return auto_window(getattr(source, "data", source))
    raise ValueError(f"unknown window preset {name!r}; choose one of {', '.join(preset_names())}")


def apply_window(layer: Any, center: float, width: float) -> tuple[float, float]:
    """Set a napari Image layer's contrast limits to a window and return the limits.

    The layer's ``contrast_limits_range`` is widened when needed so that e.g. the lung
    window can be shown on an image whose values do not reach -1350 HU.
    """
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer {getattr(layer, 'name', '')!r} is RGB: windowing applies to grey images")
    lo, hi = window_to_limits(center, width)
    rng = getattr(layer, "contrast_limits_range", None)
    if rng is not None:
        rlo, rhi = float(rng[0]), float(rng[1])
        if lo < rlo or hi > rhi:
            layer.contrast_limits_range = (min(lo, rlo), max(hi, rhi))
    layer.contrast_limits = (lo, hi)
    return (lo, hi)
