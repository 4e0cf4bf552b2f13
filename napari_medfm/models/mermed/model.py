"""MerMED-FM encoder: safe checkpoint extraction, strict loading into timm ViT, embedding.

Checkpoint layout assumed (the public ``MerMED.pth`` training checkpoint)::

    {"student": {...}, "teacher": {"module.backbone.cls_token": ..., "module.backbone.blocks.0...",
     "module.head.mlp...": ...}, "optimizer": {...}, "memory"/"queue": tensor, "epoch": int,
     "args": argparse.Namespace(...), "fp16_scaler": {"scale": ..., ...}}

The teacher's backbone tensors are found under ``ckpt["teacher"]`` (or ``"model"``,
``"state_dict"``, or the top level for an already-extracted state dict), with any of the
prefixes ``module.backbone.``, ``backbone.``, ``module.``; projection-head keys (``head.*``)
are dropped. The result must match a timm ``VisionTransformer`` exactly (strict load).

The file is read with ``torch.load(weights_only=True)`` and an explicit allow-list
(``argparse.Namespace`` and :mod:`pathlib` paths for the ``args`` entry): no arbitrary object is
ever unpickled. :func:`convert_to_safetensors` writes the extracted backbone once as
``.safetensors`` (with the ViT configuration in the file's metadata) for fast later loads.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import WeightsError
from .. import encoder2d

log = logging.getLogger(__name__)

_PREFIXES = ("module.backbone.", "backbone.", "module.encoder.", "encoder.", "module.")
_CONTAINERS = ("teacher", "model", "state_dict", "teacher_backbone")
#: Plain-data globals a MerMED training checkpoint may pickle (its ``args`` entry).
ALLOW = ("argparse.Namespace", "pathlib.PosixPath", "pathlib.WindowsPath",
         "pathlib.PurePosixPath", "pathlib.PureWindowsPath")

def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file (cached on disk by the weights manager)."""
    from ...runtime.weights import WeightsManager

    return WeightsManager().file_hash(Path(path))


# ---------------------------------------------------------------------------- checkpoint reading
def load_checkpoint_safely(path: str | Path) -> Any:
    """Tensors of a torch (training) checkpoint, read with ``weights_only=True`` + allow-list.

    Only :data:`ALLOW` globals (``argparse.Namespace``, pathlib paths) may be unpickled; anything
    else (a malicious ``__reduce__``, custom classes) is refused with :class:`WeightsError`
    naming the file. Non-tensor leaves (args, epoch, scaler floats) are dropped.
    """
    from ...runtime.safe_load import load_checkpoint_tensors

    return load_checkpoint_tensors(Path(path), allow=ALLOW)


def extract_backbone(ckpt: Any, key: str = "teacher", source: str = "checkpoint") -> dict[str, Any]:
    """The ViT backbone tensors of a (training) checkpoint, with timm key names."""
    import torch

    if not isinstance(ckpt, dict):
        raise WeightsError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    sd = None
    order = (key,) + tuple(c for c in _CONTAINERS if c != key)
    for name in order:
        if isinstance(ckpt.get(name), dict):
            sd = ckpt[name]
            break
    if sd is None:
        sd = ckpt  # already a state dict
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for pre in _PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        if k.startswith("head.") or k.startswith("head_") or k == "head":
            continue  # DINO projection head / classifier, not part of the backbone
        out[k] = v
    if "cls_token" not in out or "patch_embed.proj.weight" not in out:
        raise WeightsError(
            f"{source}: no ViT backbone found (looked for '{key}' -> module.backbone.cls_token "
            f"and patch_embed.proj.weight); top-level keys: {sorted(ckpt)[:10]}"
        )
    return out


def infer_vit_config(sd: dict[str, Any], num_heads: int | None = None) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments read from the tensor shapes.

    The number of heads is not visible in the shapes: the ViT convention of 64 channels per
    head is used (ViT-S/B/L: 6/12/16 heads) unless ``num_heads`` is given.
    """
    embed = int(sd["cls_token"].shape[-1])
    proj = sd["patch_embed.proj.weight"]
    patch = int(proj.shape[-1])
    n_tok = int(sd["pos_embed"].shape[1]) - 1
    side = int(round(n_tok ** 0.5))
    if side * side != n_tok:
        raise WeightsError(f"pos_embed has {n_tok} patch positions: not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return {
        "img_size": side * patch,
        "patch_size": patch,
        "in_chans": int(proj.shape[1]),
        "embed_dim": embed,
        "depth": depth,
        "num_heads": int(num_heads or max(1, embed // 64)),
        "mlp_ratio": float(sd["blocks.0.mlp.fc1.weight"].shape[0]) / embed,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }


def build_vit(config: dict[str, Any], state_dict: dict[str, Any] | None = None) -> Any:
    """timm ViT (LayerNorm eps 1e-6, CLS pooling, no head); strict load when tensors are given."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(config)
    kw.update(num_classes=0, global_pool="token")
    if state_dict is None:
        return VisionTransformer(**kw).eval()
    with torch.device("meta"):
        model = VisionTransformer(**kw)
    _load_strict(model, state_dict)
    return model.eval()


def _load_strict(model: Any, sd: dict[str, Any]) -> None:
    """Strict key/shape check, then ``assign`` the tensors into a meta-device model (no init):
    :func:`napari_medfm.runtime.safe_load.load_strict`."""
    from ...runtime.safe_load import load_strict

    load_strict(model, {k: v.float() for k, v in sd.items()}, what="MerMED-FM ViT weights",
                assign=True)


def read_backbone(path: str | Path, key: str = "teacher") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict with timm names, ViT config from safetensors metadata or None)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            sd = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{p.name}: not a readable safetensors file ({exc})") from exc
        cfg = json.loads(meta["vit_config"]) if "vit_config" in meta else None
        return extract_backbone(sd, key=key, source=p.name), cfg
    ckpt = load_checkpoint_safely(p)
    return extract_backbone(ckpt, key=key, source=p.name), None


def convert_to_safetensors(src: str | Path, dst: str | Path | None = None, *,
                           key: str = "teacher", num_heads: int | None = None) -> Path:
    """One-time conversion of a MerMED training checkpoint to a backbone-only ``.safetensors``.

    The file is written to a temporary name and renamed into place (never half-written). Its
    metadata records the ViT config and the sha256 of the source checkpoint.
    """
    from ...runtime.safe_load import save_safetensors

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(src.stem + "_backbone.safetensors")
    sd, cfg = read_backbone(src, key=key)
    cfg = cfg or infer_vit_config(sd, num_heads=num_heads)
    build_vit(cfg, sd)  # verify it loads strictly before writing anything
    meta = {"format": "pt", "medfm_model": "mermed", "vit_config": json.dumps(cfg),
            "source_file": src.name, "source_sha256": file_sha256(src), "checkpoint_key": key}
    return save_safetensors({k: v.float() for k, v in sd.items()}, dst, metadata=meta)


# ---------------------------------------------------------------------------- the encoder
class ViTEncoder2D:
    """A 2D ViT image encoder with per-modality preprocessing (MerMED-FM style).

    ``embed(image)`` -> ``{"image_embedding": float32 (D,), "modality": str}``;
    ``embed_batch(images)`` -> ``float32 (N, D)``. Embeddings are the raw CLS token (not
    L2-normalised; the retrieval index normalises).

    Preprocessing is the release's: the whole plane resized to 224 x 224 (squashed, bilinear,
    antialiased), then the per-modality mean/std. The modality comes from the call's
    ``modality``, else the builder's ``modality``, else ``image.modality``; an unknown or missing
    one raises :class:`~napari_medfm.models.encoder2d.UnknownModalityError` (listing the
    modalities) unless the fallback is forced (``modality="imagenet"``, or
    ``allow_fallback=True`` per call or at build time), which warns loudly. The modality used
    is returned by :meth:`modality_for` and in ``embed()``'s ``"modality"`` entry.
    """

    #: the release's ``Resize((224, 224))`` (see :func:`encoder2d.preprocess`)
    resize_mode = "squash"

    def __init__(self, spec: Any, vit: Any, *, weights_sha256: str | None, device: Any = "cpu",
                 input_size: int = 224, default_modality: str | None = None,
                 ct_window: tuple[float, float] = encoder2d.DEFAULT_CT_WINDOW,
                 weights_path: str | None = None, precision: str = "auto",
                 allow_fallback: bool = False):
        self.spec = spec
        self.allow_fallback = bool(allow_fallback)
        self.precision = precision
        self.model = vit
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.device = device
        self.input_size = int(input_size)
        self.default_modality = default_modality
        self.ct_window = ct_window
        self.embedding_dim = int(vit.embed_dim)
        self.channels_last = False

    @property
    def model_id(self) -> str:
        return self.spec.id

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "weights": self.weights_path,
                "weights_sha256": self.weights_sha256, "device": str(self.device),
                "precision": self.precision, "embedding_dim": self.embedding_dim}

    def modality_for(self, image: Any, modality: str | None = None, *,
                     allow_fallback: bool | None = None) -> str:
        """The :data:`~napari_medfm.models.encoder2d.MODALITY_NORMS` key (or ``"imagenet"``)
        this encoder normalises ``image`` with; raises ``UnknownModalityError`` when unknown
        and the fallback is not forced."""
        fb = self.allow_fallback if allow_fallback is None else bool(allow_fallback)
        return encoder2d.resolve_modality(modality or self.default_modality, image,
                                          allow_fallback=fb, model="MerMED-FM")

    def preprocess(self, image: Any, *, modality: str | None = None,
                   slice_index: int | str | None = None,
                   allow_fallback: bool | None = None) -> np.ndarray:
        """MedicalImage -> normalised ``(3, S, S)`` float32 (release transform)."""
        return self._preprocess(image, self.modality_for(image, modality,
                                                         allow_fallback=allow_fallback),
                                slice_index)

    def _preprocess(self, image: Any, key: str, slice_index: Any) -> np.ndarray:
        mean, std = encoder2d.norm_for(key)
        return encoder2d.preprocess(
            image, size=self.input_size,
            modality=key if key != encoder2d.FALLBACK_MODALITY else None,
            slice_index=slice_index, ct_window=self.ct_window, mean=mean, std=std,
            resize=self.resize_mode,
        )

    def embed_arrays(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed ``(N, 3, S, S)`` -> CLS embeddings ``(N, D)`` float32."""
        import torch

        from ...runtime.device import autocast_context

        t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            feats = self.model.forward_features(t)
            cls = self.model.forward_head(feats, pre_logits=True)
        return cls.float().cpu().numpy().astype(np.float32)

    def modalities_for(self, images: Sequence[Any],
                       modality: str | Sequence[str | None] | None = None, *,
                       allow_fallback: bool | None = None) -> list[str]:
        """:meth:`modality_for` of each image (``modality`` may be one per image)."""
        mods = list(modality) if isinstance(modality, (list, tuple)) else [modality] * len(images)
        return [self.modality_for(im, m, allow_fallback=allow_fallback)
                for im, m in zip(images, mods, strict=False)]

    def embed_batch(self, images: Sequence[Any], *, modality: str | Sequence[str | None] | None = None,
                    slice_index: int | str | None = None,
                    allow_fallback: bool | None = None) -> np.ndarray:
        """Embed several images (one forward pass); ``modality`` may be one per image.

        Every modality is resolved before any pixel work (an unknown one fails the batch)."""
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        keys = self.modalities_for(images, modality, allow_fallback=allow_fallback)
        x = np.stack([self._preprocess(im, k, slice_index)
                      for im, k in zip(images, keys, strict=True)])
        return self.embed_arrays(x)

    def embed(self, image: Any, *, modality: str | None = None,
              slice_index: int | str | None = None, allow_fallback: bool | None = None,
              **_: Any) -> dict[str, Any]:
        """``{"image_embedding": float32 (D,), "modality": str}`` for one 2D image (or a chosen
        CT slice); ``"modality"`` is the normalisation actually used (a MODALITY_NORMS key or
        ``"imagenet"`` for a forced fallback)."""
        key = self.modality_for(image, modality, allow_fallback=allow_fallback)
        x = self._preprocess(image, key, slice_index)[None]
        return {"image_embedding": self.embed_arrays(x)[0], "modality": key}


def _resolve_weights(spec: Any, weights: Any) -> Path:
    """Explicit file, a folder (converted ``model.safetensors`` first), or ``$MEDFM_HOME``."""
    from ...runtime.weights import WeightsManager

    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_dir() and (p / "model.safetensors").is_file():
            return p / "model.safetensors"
    else:
        p = None
    res = Path(WeightsManager().resolve(spec, explicit=p))
    if res.is_dir():
        raise WeightsError(f"{res}: no {spec.files[0].filename} or model.safetensors in folder")
    return res


def _pick_device(device: Any) -> Any:
    from ...runtime.device import pick_device

    return pick_device(device)


def build(spec: Any, weights: Any = None, device: Any = None, *, vit_config: dict | None = None,
          checkpoint_key: str | None = None, modality: str | None = None,
          num_heads: int | None = None, precision: str = "auto",
          allow_fallback: bool = False) -> ViTEncoder2D:
    """Registry builder: load MerMED-FM (``.pth`` training checkpoint or converted safetensors).

    ``precision``: ``auto`` (fp32 on CPU, bf16/fp16 autocast on GPUs), ``fp32``, ``bf16``,
    ``fp16``. ``vit_config``/``num_heads`` override the architecture read from the tensors.
    ``modality``: default modality for images that carry none (checked now: an unknown name is
    an error listing the modalities; ``"imagenet"`` forces the fallback). ``allow_fallback``:
    use ImageNet statistics (with a warning) for images of unknown modality instead of failing.
    """
    if modality is not None and str(modality).strip().lower() != encoder2d.FALLBACK_MODALITY:
        modality = encoder2d.resolve_modality(modality, model="MerMED-FM")
    path = _resolve_weights(spec, weights)
    key = checkpoint_key or spec.extras.get("checkpoint_key", "teacher")
    sd, meta_cfg = read_backbone(path, key=key)
    cfg = vit_config or meta_cfg or infer_vit_config(sd, num_heads=num_heads)
    vit = build_vit(cfg, sd)
    dev = _pick_device(device)
    vit = vit.to(dev)
    log.info("loaded %s from %s (%s)", spec.id, path.name, cfg)
    return ViTEncoder2D(spec, vit, weights_sha256=file_sha256(path), device=dev,
                        input_size=int(cfg.get("img_size", spec.extras.get("input_size", 224))),
                        default_modality=modality, weights_path=str(path.resolve()),
                        precision=precision, allow_fallback=allow_fallback)
