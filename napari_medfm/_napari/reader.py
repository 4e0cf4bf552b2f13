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


def layer_tuple(img: Any) -> LayerDataTuple:
    """``img.layer_data()`` (label maps carry their colours and names)."""
    return img.layer_data()


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
    except Exception as exc:  # a sniffer bug must not break napari's reader loop: log it
        log.debug("napari-medfm: sniffing %s raised %s: %s (a bug; not opening it)", p,
                  type(exc).__name__, exc, exc_info=True)
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
