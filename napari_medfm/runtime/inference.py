"""Inference plumbing shared by every model adapter: MONAI tensors, resampling, the windowed
inferer step and progress relaying.

* :func:`to_metatensor` - a :class:`~napari_medfm.io.types.MedicalImage` as the MONAI
  ``MetaTensor`` ``LoadImage`` would give for the same data read from a NIfTI file;
* :func:`geometry_of_metatensor` / :func:`resample_labels_to` - the inverse step: labels on a
  model's grid back onto the source grid (nearest neighbour);
* :class:`WindowPlan` + :func:`windowed_inference` - the sliding-window inferer
  (:func:`~napari_medfm.runtime.sliding_window.sliding_window_gen`) with the progress of the
  whole pre -> inferer -> post -> invert run (:func:`batches`, :func:`relay`).

torch, MONAI and SimpleITK are imported on call.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import Geometry
from ..progress import Progress

__all__ = ["WindowPlan", "batches", "geometry_of_metatensor", "relay", "resample_labels_to",
           "to_metatensor", "windowed_inference"]


def to_metatensor(image: Any, dtype: Any = np.float32, *, channel: bool = False) -> Any:
    """The image as a MONAI ``MetaTensor`` ``(X, Y, Z)`` (``(1, X, Y, Z)`` with ``channel``).

    This is what ``LoadImage`` gives for the same data read from a NIfTI file (array in
    (i, j, k) index order, ``affine`` index -> RAS mm), so MONAI transforms behave identically
    on a napari layer and on a file.
    """
    import torch
    from monai.data import MetaTensor

    arr = np.asarray(image.data)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {arr.shape}")
    xyz = np.ascontiguousarray(np.transpose(arr, (2, 1, 0))).astype(dtype, copy=False)
    if channel:
        xyz = xyz[None]
    aff_np = image.geometry.affine_ras()
    meta = {"original_affine": aff_np, "spatial_shape": np.asarray(xyz.shape[-3:]),
            "original_channel_dim": 0 if channel else float("nan"), "space": "RAS",
            "filename_or_obj": image.name}
    return MetaTensor(torch.from_numpy(xyz), affine=torch.as_tensor(aff_np, dtype=torch.float64),
                      meta=meta)


def geometry_of_metatensor(t: Any) -> Geometry:
    """Geometry of a channel-first MetaTensor (its RAS affine)."""
    return Geometry.from_affine_ras(np.asarray(t.affine, dtype=float))


def resample_labels_to(labels_xyz: np.ndarray, src: Geometry, dst: Geometry,
                       dst_shape_zyx: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resample of a (x, y, z)-order label array on ``src`` onto ``dst``.

    Uses SimpleITK; voxels of ``dst`` outside ``src``'s field of view become 0.
    """
    import SimpleITK as sitk

    lab_zyx = np.ascontiguousarray(np.transpose(labels_xyz, (2, 1, 0)))
    img = src.to_sitk(lab_zyx.astype(np.uint16))
    ref = dst.to_sitk(np.zeros(tuple(dst_shape_zyx), dtype=np.uint8))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt16)
    return sitk.GetArrayFromImage(out)


def batches(spatial: Sequence[int], roi: Sequence[int], overlap: float, sw_batch_size: int) -> int:
    """Number of window batches the sliding-window generator will yield for one image."""
    from .sliding_window import window_count

    n = window_count(tuple(int(s) for s in spatial), tuple(int(r) for r in roi), overlap)
    return (n + sw_batch_size - 1) // sw_batch_size


def relay(gen: Generator[Progress, None, Any], total: int,
          offset: int = 1) -> Generator[Progress, None, Any]:
    """Re-yield a sub-generator's progress ``offset`` steps in, out of ``total`` overall."""
    first = True
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if first and p.step == 0:  # the sub-task's own "started" event
            first = False
            continue
        yield Progress(p.step + offset, total, p.message)


@dataclass(frozen=True)
class WindowPlan:
    """How the sliding-window inferer runs (MONAI ``SlidingWindowInferer`` parameters)."""

    roi_size: tuple[int, ...]
    overlap: float = 0.25
    sw_batch_size: int = 1
    mode: str = "gaussian"
    sigma_scale: float | Sequence[float] = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0

    def effective(self) -> dict[str, Any]:
        """What the run used, for the JSON run report."""
        return {"roi_size": list(self.roi_size), "overlap": self.overlap,
                "sw_batch_size": self.sw_batch_size, "mode": str(self.mode)}


def windowed_inference(x: Any, predictor: Callable[[Any], Any], plan: WindowPlan, *,
                       device: Any, precision: str = "fp32",
                       ) -> Generator[Progress, None, tuple[Any, int]]:
    """The inferer step of a pre -> inferer -> post -> invert run.

    ``x`` is one channel-first preprocessed tensor ``(C, *spatial)``. Returns ``(out, total)``:
    the stitched output ``(1, C_out, *spatial)`` (on the CPU) and the number of progress steps
    of the whole run - one for preprocessing, one per window batch, one for postprocessing; the
    caller yields the first (step 0) and the last (``total``, "done").
    """
    from .sliding_window import sliding_window_gen

    inp = x[None]
    total = batches(inp.shape[2:], plan.roi_size, plan.overlap, plan.sw_batch_size) + 2
    gen = sliding_window_gen(inp, predictor, plan.roi_size, plan.sw_batch_size, plan.overlap,
                             mode=plan.mode, sigma_scale=plan.sigma_scale,
                             padding_mode=plan.padding_mode, cval=plan.cval,
                             sw_device=device, device="cpu", precision=precision)
    out = yield from relay(gen, total)
    yield Progress(total - 1, total, "postprocessing")
    return out, total
