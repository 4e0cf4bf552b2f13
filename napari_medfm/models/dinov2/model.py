"""RAD-DINO / DINOv2 via transformers, loaded from a local folder in hub layout.

The folder holds ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (as on
the Hugging Face hub). Loading is offline (``local_files_only``) and strict: any missing,
unexpected or mis-shaped tensor raises :class:`~napari_medfm.errors.WeightsError`.

Preprocessing: the image's plane is chosen and its intensities mapped to [0, 1] by
:mod:`napari_medfm.models.encoder2d` (CT windowing, robust scaling of 16-bit radiographs, grey
-> RGB), quantised to 8 bits like the PNGs these models were trained on, then handed to the
model's own ``AutoImageProcessor`` (resize, crop, mean/std). Embedding = CLS token of
``last_hidden_state`` (after the final layernorm).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import WeightsError
from .. import encoder2d

log = logging.getLogger(__name__)


class Dinov2Encoder:
    """``embed(image)`` -> ``{"image_embedding": (D,)}``; ``embed_batch(images)`` -> ``(N, D)``."""

    def __init__(self, spec: Any, model: Any, processor: Any, *, weights_sha256: str,
                 device: Any = "cpu", weights_path: str | None = None,
                 default_modality: str | None = None, precision: str = "auto"):
        self.spec = spec
        self.precision = precision
        self.model = model
        self.processor = processor
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.device = device
        self.default_modality = default_modality
        self.embedding_dim = int(model.config.hidden_size)

    @property
    def model_id(self) -> str:
        return self.spec.id

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "weights": self.weights_path,
                "weights_sha256": self.weights_sha256, "device": str(self.device),
                "precision": self.precision, "embedding_dim": self.embedding_dim}

    def _rgb(self, image: Any, modality: str | None, slice_index: Any) -> np.ndarray:
        return encoder2d.unit_rgb_uint8(image, size=self._short_side(),
                                        modality=modality or self.default_modality,
                                        slice_index=slice_index)

    def _short_side(self) -> int:
        size = getattr(self.processor, "size", None) or {}
        if isinstance(size, dict):
            return int(size.get("shortest_edge") or size.get("height") or 224)
        return int(getattr(size, "shortest_edge", None) or getattr(size, "height", None) or 224)

    def preprocess_batch(self, images: Sequence[Any], *, modality: Any = None,
                         slice_index: Any = None) -> Any:
        """Pixel values tensor ``(N, 3, H, W)`` from the model's image processor."""
        mods = list(modality) if isinstance(modality, (list, tuple)) else [modality] * len(images)
        rgbs = [self._rgb(im, m, slice_index) for im, m in zip(images, mods, strict=False)]
        return self.processor(images=rgbs, return_tensors="pt")["pixel_values"]

    def embed_pixels(self, pixel_values: Any) -> np.ndarray:
        import torch

        from ...runtime.device import autocast_context

        with torch.inference_mode(), autocast_context(self.device, self.precision):
            out = self.model(pixel_values=pixel_values.to(self.device))
        return out.last_hidden_state[:, 0].float().cpu().numpy().astype(np.float32)

    def embed_batch(self, images: Sequence[Any], *, modality: Any = None,
                    slice_index: Any = None) -> np.ndarray:
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self.embed_pixels(self.preprocess_batch(images, modality=modality,
                                                       slice_index=slice_index))

    def embed(self, image: Any, *, modality: str | None = None, slice_index: Any = None,
              **_: Any) -> dict[str, np.ndarray]:
        return {"image_embedding": self.embed_batch([image], modality=modality,
                                                    slice_index=slice_index)[0]}


def load_folder(folder: str | Path, device: Any = "cpu") -> tuple[Any, Any]:
    """(Dinov2Model, image processor) from a local hub-layout folder, strictly."""
    from transformers import AutoImageProcessor, Dinov2Model

    folder = Path(folder)
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise WeightsError(f"{folder}: {name} missing (expected a hub-layout folder with "
                               "config.json, model.safetensors, preprocessor_config.json)")
    if not any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise WeightsError(f"{folder}: model.safetensors missing")
    try:
        model, info = Dinov2Model.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder.name}: cannot load Dinov2Model ({exc})") from exc
    problems = {k: v for k, v in info.items() if k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") and v}
    # the pooler is absent from Dinov2Model; "mask_token" is legitimately unused but saved
    if problems:
        raise WeightsError(f"{folder.name}: weights do not match Dinov2Model: {problems}")
    try:
        try:  # the PIL backend needs no torchvision; older transformers call it use_fast=False
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True,
                                                           backend="pil")
        except TypeError:
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True,
                                                           use_fast=False)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder.name}: cannot load the image processor ({exc})") from exc
    return model.eval().to(device), processor


def build(spec: Any, weights: Any = None, device: Any = None, *, modality: str | None = None,
          precision: str = "auto") -> Dinov2Encoder:
    """Registry builder: ``weights`` is the hub-layout folder (or its model.safetensors)."""
    from ...runtime.weights import WeightsManager

    wm = WeightsManager()
    p = Path(weights).expanduser() if weights is not None else None
    if p is not None and p.is_file():
        p = p.parent
    folder = Path(wm.resolve(spec, explicit=p)) if p is None else p
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder in hub layout")
    from ...runtime.device import pick_device

    dev = pick_device(device)
    model, processor = load_folder(folder, dev)
    sha = wm.file_hash(folder / "model.safetensors")
    return Dinov2Encoder(spec, model, processor, weights_sha256=sha, device=dev,
                         weights_path=str(folder.resolve()), default_modality=modality,
                         precision=precision)
