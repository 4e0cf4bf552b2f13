"""npe2 sample-data contributions (File > Open Sample > MedFM).

``phantom_ct`` is computed offline; the others download a public file on demand (pinned
sha256, cached in ``data_dir()``) and read it with our readers, so geometry and windowing are
the same as when the user opens such a file.
"""

from __future__ import annotations

from typing import Any

from ..sample_data import load_sample
from .reader import layer_tuple

LayerDataTuple = tuple[Any, dict[str, Any], str]


def _layers(key: str) -> list[LayerDataTuple]:
    return [layer_tuple(img) for img in load_sample(key)]


def phantom_ct() -> list[LayerDataTuple]:
    """Synthetic abdominal CT (HU) with an organ Labels layer; no download."""
    return _layers("phantom")


def sample_ct() -> list[LayerDataTuple]:
    """Abdominal CT (TotalSegmentator example NIfTI), downloaded once on demand."""
    return _layers("ct")


def sample_cxr() -> list[LayerDataTuple]:
    """Chest X-ray (NIH ChestX-ray14), downloaded once on demand."""
    return _layers("cxr")


def sample_fundus() -> list[LayerDataTuple]:
    """Colour fundus photograph (CC0), downloaded once on demand."""
    return _layers("fundus")


def sample_pathology() -> list[LayerDataTuple]:
    """OpenSlide CMU-1-Small-Region whole slide (CC0), downloaded once on demand."""
    return _layers("pathology")
