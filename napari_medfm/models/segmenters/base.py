"""Segmenter base classes: what every segmentation adapter shares.

* :class:`SegmentSettings` - the user-tunable inference settings (window, overlap, batch,
  device, precision);
* :class:`Segmenter` - a base class implementing the
  :class:`~napari_medfm.runtime.contracts.Segmenter` contract (``model_id``, ``weights_sha256``,
  ``describe()``, ``label_names``, ``check_input()``, ``run()``);
* :class:`WindowedSegmenter` - the one **pre -> inferer -> post -> invert** template (MONAI
  Label's shape) that :class:`NetworkSegmenter` (a torch network with RAS/spacing/intensity
  preprocessing) and :class:`~napari_medfm.models.segmenters.bundle.BundleSegmenter` (a MONAI
  bundle's own transforms) fill in.

Layer: models (imports runtime/io/geometry only; never tasks, widgets or the CLI).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ...errors import WrongModalityError
from ...io.types import MedicalImage
from ...progress import Progress
from ...runtime.checks import check_ct
from ...runtime.inference import (
    WindowPlan,
    geometry_of_metatensor,
    resample_labels_to,
    to_metatensor,
    windowed_inference,
)

__all__ = ["BUNDLE_PREFIX", "NetworkSegmenter", "SegmentSettings", "Segmenter",
           "WindowedSegmenter", "check_ct"]

#: Model ids of the form ``bundle:PATH`` address a local MONAI bundle folder.
BUNDLE_PREFIX = "bundle:"


@dataclass
class SegmentSettings:
    """User-tunable inference settings (ignored by models they do not apply to)."""

    roi_size: tuple[int, ...] | None = None  # None: the model's own default
    overlap: float | None = None  # None: the model's default (0.25 unless a bundle says)
    sw_batch_size: int | None = None  # None: the model's default (1 unless a bundle says)
    device: str | None = None  # None/"auto": cuda > mps > cpu
    precision: str = "fp32"  # fp32 | fp16 | bf16 | auto

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi_size"] = list(self.roi_size) if self.roi_size else None
        return d


class Segmenter:
    """A segmentation model that labels a :class:`MedicalImage` on its own voxel grid."""

    model_id: str = "segmenter"
    label_names: dict[int, str]
    label_colors: dict[int, list[int]]
    weights_sha256: str | None = None
    default_roi: tuple[int, ...] | None = None
    uses_windows: bool = False

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "weights_sha256": self.weights_sha256,
                "labels": {int(k): v for k, v in self.label_names.items()}}

    def check_input(self, image: MedicalImage) -> None:
        """Refuse images the model is not made for (raise :class:`WrongModalityError`)."""
        if image.kind != "volume" or image.rgb or image.multiscale or len(image.shape) != 3:
            raise WrongModalityError(
                f"{self.model_id} segments 3D volumes; {image.name!r} is a {image.kind} of shape "
                f"{image.shape}")

    def run(self, image: MedicalImage,
            settings: SegmentSettings) -> Generator[Progress, None, np.ndarray]:
        """Yield progress; return integer labels with ``image``'s shape (numpy order)."""
        raise NotImplementedError


class WindowedSegmenter(Segmenter):
    """The one pre -> inferer -> post -> invert template for sliding-window segmenters.

    Subclasses fill in four steps; :meth:`run` is the same for all of them:

    * :meth:`preprocess` ``(image, device) -> (x, state)``: ``x`` a channel-first tensor
      ``(C, *spatial)`` on the model's grid, ``state`` whatever the later steps need;
    * :meth:`window_plan` ``(settings, state) -> WindowPlan`` (the user's settings over the
      model's defaults) and :meth:`predictor` ``(state)`` (the network);
    * :meth:`postprocess` ``(out, x, state) -> (labels_xyz, grid)``: activation/argmax, labels in
      (x, y, z) order with the geometry of their grid (or ``None`` when already on the source);
    * :meth:`invert` - back onto the source grid (default: nearest-neighbour resampling).
    """

    uses_windows = True
    _device_pref: Any = None

    def preprocess(self, image: MedicalImage, device: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def window_plan(self, settings: SegmentSettings, state: Any) -> WindowPlan:
        roi = tuple(settings.roi_size or self.default_roi or ())
        return WindowPlan(roi_size=roi,
                          overlap=0.25 if settings.overlap is None else settings.overlap,
                          sw_batch_size=settings.sw_batch_size or 1)

    def predictor(self, state: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, out: Any, x: Any, state: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def invert(self, labels_xyz: np.ndarray, grid: Any, image: MedicalImage) -> np.ndarray:
        """Labels (x, y, z) on ``grid`` -> numpy order on the image grid."""
        if grid is None:
            return np.transpose(labels_xyz, (2, 1, 0))
        return resample_labels_to(labels_xyz, grid, image.geometry, image.shape)

    def run(self, image: MedicalImage,
            settings: SegmentSettings) -> Generator[Progress, None, np.ndarray]:
        from ...runtime.device import pick_device

        device = pick_device(settings.device or self._device_pref)
        self.device_name = str(device)
        yield Progress(0, 1, "preprocessing")
        x, state = self.preprocess(image, device)
        plan = self.window_plan(settings, state)
        self.effective = plan.effective()
        out, total = yield from windowed_inference(x, self.predictor(state), plan,
                                                   device=device, precision=settings.precision)
        labels_xyz, grid = self.postprocess(out, x, state)
        del out
        labels = self.invert(labels_xyz, grid, image)
        yield Progress(total, total, "done")
        return labels


class NetworkSegmenter(WindowedSegmenter):
    """A torch network run MONAI-Label style: RAS + spacing + intensity window -> sliding
    window -> softmax/argmax -> nearest-neighbour resample back onto the source grid.

    ``network`` maps ``(N, 1, *roi)`` windows to ``(N, C, *roi)`` logits; channel ``c`` is
    label value ``c``.
    """

    def __init__(self, network: Any, label_names: dict[int, str], *, model_id: str,
                 roi_size: Sequence[int], spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
                 intensity: tuple[float, float, float, float] | None = (-1000, 1000, 0, 1),
                 device: Any = None, weights_sha256: str | None = None,
                 label_colors: dict[int, list[int]] | None = None, ct_only: bool = True):
        self.network = network
        self.model_id = model_id
        self.label_names = {int(k): v for k, v in label_names.items()}
        self.label_colors = dict(label_colors or {})
        self.default_roi = tuple(int(r) for r in roi_size)
        self.spacing = tuple(spacing) if spacing else None
        self.intensity = intensity
        self.weights_sha256 = weights_sha256
        self.ct_only = ct_only
        self._device_pref = device

    def check_input(self, image: MedicalImage) -> None:
        super().check_input(image)
        if self.ct_only:
            check_ct(image, self.model_id)

    def transform(self, image: MedicalImage) -> Any:
        """RAS orientation, spacing and intensity window: ``(1, X, Y, Z)`` MetaTensor."""
        from monai.transforms import Orientation, ScaleIntensityRange, Spacing

        x = to_metatensor(image, channel=True)
        x = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
        if self.spacing:
            x = Spacing(pixdim=self.spacing, mode="bilinear")(x)
        if self.intensity:
            a0, a1, b0, b1 = self.intensity
            x = ScaleIntensityRange(a_min=a0, a_max=a1, b_min=b0, b_max=b1, clip=True)(x)
        return x

    def preprocess(self, image: MedicalImage, device: Any) -> tuple[Any, Any]:
        self.network.to(device).eval()
        x = self.transform(image)
        return x.as_tensor().float(), geometry_of_metatensor(x)

    def predictor(self, state: Any) -> Any:
        return self.network

    def postprocess(self, out: Any, x: Any, state: Any) -> tuple[np.ndarray, Any]:
        import torch

        return torch.argmax(out[0], dim=0).numpy().astype(np.uint16), state
