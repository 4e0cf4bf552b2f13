"""npe2 reader contribution: DICOM, NIfTI, NRRD, MHA, CXR/fundus images and whole slides.

``napari_get_reader`` only sniffs (cheap): it returns ``None`` for anything
:func:`napari_medfm.io.can_read` refuses, so that other readers get their turn. The returned
function reads **everything first** and then hands napari one LayerDataTuple per series /
image (label maps become Labels layers), so a failure adds no half layer; failures surface
as :class:`~napari_medfm.errors.ReadError` naming the file and the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import MedfmError, ReadError

log = logging.getLogger(__name__)

PathOrPaths = str | Path | Sequence[str | Path]
LayerDataTuple = tuple[Any, dict[str, Any], str]


def label_display_kwargs(metadata: dict[str, Any]) -> dict[str, Any]:
    """Labels-layer kwargs showing the file's label colours and names (status bar).

    ``metadata['label_colors']`` ({value: [r, g, b] 0-255}) becomes a direct colormap (values
    without a colour are drawn yellow so that nothing painted is invisible) and
    ``metadata['label_names']`` becomes the layer's ``features`` (napari shows the name of
    the label under the cursor).
    """
    out: dict[str, Any] = {}
    colors = metadata.get("label_colors") or {}
    names = metadata.get("label_names") or {}
    if colors:
        from napari.utils.colormaps import DirectLabelColormap

        table: dict[Any, Any] = {None: (1.0, 1.0, 0.0, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for k, rgb in colors.items():
            try:
                key = int(k)
                vals = [float(c) for c in list(rgb)[:3]]
            except (TypeError, ValueError):
                continue
            scale = 255.0 if max(vals, default=0.0) > 1.0 else 1.0
            table[key] = (*(v / scale for v in vals), 1.0)
        out["colormap"] = DirectLabelColormap(color_dict=table)
    if names:
        items = sorted((int(k), str(v)) for k, v in names.items() if str(k).lstrip("-").isdigit())
        if not any(k == 0 for k, _ in items):
            items.insert(0, (0, "background"))
        out["features"] = {"index": [k for k, _ in items], "name": [v for _, v in items]}
    return out


def layer_tuple(img: Any) -> LayerDataTuple:
    """``img.layer_data()`` plus label colours/names for label maps."""
    data, kwargs, kind = img.layer_data()
    if kind == "labels":
        kwargs.update(label_display_kwargs(kwargs.get("metadata") or {}))
    return (data, kwargs, kind)


def _as_paths(path: PathOrPaths) -> list[Path]:
    if isinstance(path, (str, Path)):
        return [Path(path)]
    return [Path(p) for p in path]


def _can_read(p: Path) -> bool:
    from ..io import can_read

    try:
        return bool(can_read(p))
    except ImportError as exc:  # a broken install: say so, but let other readers try
        log.warning("napari-medfm reader unavailable (%s); not opening %s", exc, p.name)
        return False
    except Exception as exc:  # a sniffer must never break napari's reader loop
        log.debug("napari-medfm can_read(%s) failed: %s", p, exc)
        return False


def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerDataTuple]] | None:
    """Return :func:`read_layers` when every path is something we read, else ``None``."""
    paths = _as_paths(path)
    if not paths or not all(_can_read(p) for p in paths):
        return None
    return read_layers


def read_layers(path: PathOrPaths) -> list[LayerDataTuple]:
    """Read file(s)/folder(s) into napari LayerDataTuples (all or nothing)."""
    from ..io import read

    out: list[LayerDataTuple] = []
    for p in _as_paths(path):
        try:
            images = read(p)
        except MedfmError:
            raise
        except MemoryError as exc:
            raise ReadError(p, f"not enough memory to load it ({exc})") from exc
        except Exception as exc:  # keep napari's message short: file + cause
            raise ReadError(p, f"{type(exc).__name__}: {exc}") from exc
        if not images:
            raise ReadError(p, "no images found")
        out.extend(layer_tuple(img) for img in images)
    return out
