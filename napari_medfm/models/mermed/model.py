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

    ``embed(image)`` -> ``{"image_embedding": float32 (D,)}``; ``embed_batch(images)`` ->
    ``float32 (N, D)``. Embeddings are the raw CLS token (not L2-normalised; the retrieval
    index normalises).
    """

    def __init__(self, spec: Any, vit: Any, *, weights_sha256: str | None, device: Any = "cpu",
                 input_size: int = 224, default_modality: str | None = None,
                 ct_window: tuple[float, float] = encoder2d.DEFAULT_CT_WINDOW,
                 weights_path: str | None = None, precision: str = "auto"):
        self.spec = spec
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

    def preprocess(self, image: Any, *, modality: str | None = None,
                   slice_index: int | str | None = None) -> np.ndarray:
        """MedicalImage -> normalised ``(3, S, S)`` float32."""
        return encoder2d.preprocess(
            image, size=self.input_size, modality=modality or self.default_modality,
            slice_index=slice_index, ct_window=self.ct_window,
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

    def embed_batch(self, images: Sequence[Any], *, modality: str | Sequence[str | None] | None = None,
                    slice_index: int | str | None = None) -> np.ndarray:
        """Embed several images (one forward pass); ``modality`` may be one per image."""
        mods = list(modality) if isinstance(modality, (list, tuple)) else [modality] * len(images)
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        x = np.stack([self.preprocess(im, modality=m, slice_index=slice_index)
                      for im, m in zip(images, mods, strict=False)])
        return self.embed_arrays(x)

    def embed(self, image: Any, *, modality: str | None = None,
              slice_index: int | str | None = None, **_: Any) -> dict[str, np.ndarray]:
        """``{"image_embedding": float32 (D,)}`` for one 2D image (or a chosen CT slice)."""
        emb = self.embed_batch([image], modality=modality, slice_index=slice_index)[0]
        return {"image_embedding": emb}


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
          num_heads: int | None = None, precision: str = "auto") -> ViTEncoder2D:
    """Registry builder: load MerMED-FM (``.pth`` training checkpoint or converted safetensors).

    ``precision``: ``auto`` (fp32 on CPU, bf16/fp16 autocast on GPUs), ``fp32``, ``bf16``,
    ``fp16``. ``vit_config``/``num_heads`` override the architecture read from the tensors.
    """
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
                        precision=precision)
