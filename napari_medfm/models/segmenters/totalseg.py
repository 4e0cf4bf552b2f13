"""``totalsegmentator``: the TotalSegmentator ``total`` task (117 structures), optional extra.

Available only when the ``totalsegmentator`` package is importable
(``pip install napari-medfm[totalsegmentator]``) **and** its weights are already on disk
(``totalseg_download_weights -t total``, stored by TotalSegmentator in ``$TOTALSEG_HOME_DIR``
or ``~/.totalsegmentator``). napari-medfm never lets it download anything implicitly.

The CT goes to TotalSegmentator's Python API as an in-memory NIfTI image (array in (i, j, k)
order, index -> RAS affine from the geometry); its own resampling returns the labels on the
input grid, which is checked (and, if ever needed, resampled nearest-neighbour with SimpleITK).
TotalSegmentator runs nnU-Net internally in one call, so progress is reported at start and end
only and cancel takes effect when that call returns.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import WeightsError
from ...io.types import MedicalImage
from ...progress import Progress
from ...runtime.checks import check_ct
from ...runtime.inference import resample_labels_to
from .base import Segmenter, SegmentSettings

#: nnU-Net result folders of the ``total`` task (normal = 5 parts, fast = one 3 mm model).
_TOTAL_DATASETS = ("Dataset291", "Dataset292", "Dataset293", "Dataset294", "Dataset295")
_FAST_DATASETS = ("Dataset297",)


class TotalSegmentatorUnavailable(WeightsError):
    """The optional TotalSegmentator extra or its weights are missing."""


def weights_dir() -> Path:
    """Where TotalSegmentator keeps its nnU-Net results (without importing it)."""
    home = os.environ.get("TOTALSEG_HOME_DIR")
    base = Path(home).expanduser() if home else Path.home() / ".totalsegmentator"
    env = os.environ.get("TOTALSEG_WEIGHTS_PATH")
    return Path(env).expanduser() if env else base / "nnunet" / "results"


def availability(fast: bool = False) -> tuple[bool, str]:
    """``(available, message)`` - the message says exactly what to install or download."""
    if importlib.util.find_spec("totalsegmentator") is None:
        return False, ("TotalSegmentator is an optional extra and is not installed: "
                       "`pip install napari-medfm[totalsegmentator]` (or `pip install "
                       "TotalSegmentator`), then download its weights with "
                       "`totalseg_download_weights -t total`.")
    root = weights_dir()
    need = _FAST_DATASETS if fast else _TOTAL_DATASETS
    present = {p.name[:10] for p in root.glob("Dataset*")} if root.is_dir() else set()
    missing = [d for d in need if d not in present]
    if missing:
        return False, (f"TotalSegmentator weights are missing in {root} ({', '.join(missing)}); "
                       f"download them explicitly with `totalseg_download_weights -t "
                       f"{'total_fast' if fast else 'total'}` (napari-medfm never downloads them "
                       "for you).")
    return True, f"TotalSegmentator weights found in {root}"


def class_names() -> dict[int, str]:
    from totalsegmentator.map_to_binary import class_map

    return {int(k): str(v) for k, v in class_map["total"].items()}


class TotalSegmentatorSegmenter(Segmenter):
    model_id = "totalsegmentator"
    weights_sha256 = None

    def __init__(self, device: str | None = None, fast: bool = False):
        ok, msg = availability(fast)
        if not ok:
            raise TotalSegmentatorUnavailable(msg)
        self.fast = fast
        self._device = device
        self.label_names = class_names()
        self.label_colors: dict[int, list[int]] = {}

    def check_input(self, image: MedicalImage) -> None:
        super().check_input(image)
        check_ct(image, self.model_id)

    def run(self, image: MedicalImage,
            settings: SegmentSettings) -> Generator[Progress, None, np.ndarray]:
        import nibabel as nib
        from totalsegmentator.python_api import totalsegmentator

        from ...geometry import Geometry
        from ...runtime.device import pick_device

        dev = pick_device(settings.device or self._device)
        self.device_name = str(dev)
        ts_device = "gpu" if dev.type == "cuda" else ("mps" if dev.type == "mps" else "cpu")
        yield Progress(0, 2, "TotalSegmentator (nnU-Net) running")
        xyz = np.ascontiguousarray(np.transpose(np.asarray(image.data), (2, 1, 0)))
        nii = nib.Nifti1Image(xyz.astype(np.float32), image.geometry.affine_ras())
        out = totalsegmentator(nii, None, task="total", fast=self.fast, ml=True,
                               device=ts_device, quiet=True)
        yield Progress(1, 2, "back to the source grid")
        lab_xyz = np.asarray(out.dataobj).astype(np.uint16)
        got = Geometry.from_affine_ras(out.affine)
        if lab_xyz.shape == xyz.shape and got.same_grid(image.geometry):
            labels = np.transpose(lab_xyz, (2, 1, 0))
        else:
            labels = resample_labels_to(lab_xyz, got, image.geometry, image.shape)
        yield Progress(2, 2, "done")
        return labels


def build(spec: Any, weights: Any = None, device: Any = None, *,
          fast: bool = False) -> TotalSegmentatorSegmenter:
    """Registry builder (``weights`` is unused: TotalSegmentator manages its own folder)."""
    return TotalSegmentatorSegmenter(device=device, fast=fast)
