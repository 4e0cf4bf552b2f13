"""BiomedCLIP adapter: open_clip network from local files, embeddings, zero-shot, "why" maps.

The network is built by ``open_clip`` (``CustomTextCLIP``: timm ViT image tower + Hugging Face
BERT text tower) from the folder's ``open_clip_config.json``, with the text tower's
transformers config and tokenizer read from ``text/`` (never from the hub), and the state
dict loaded strictly (``text.transformer.embeddings.position_ids``, which current
transformers no longer has, is dropped first, as open_clip does).

Implements the contracts of :mod:`napari_medfm.runtime.contracts`:

* ``Embedder``: ``embed(image)`` -> ``{"image_embedding": (512,)}`` L2-normalised, equal to
  open_clip's ``encode_image(x, normalize=True)`` on open_clip's own eval transform;
* ``TextEmbedder``: ``embed_text(texts)`` -> ``(N, 512)`` L2-normalised
  (``encode_text(tokens, normalize=True)``);
* ``FindingsModel``: ``findings(image, prompts=...)`` -> one probability per finding,
  ``sigmoid(scale * (mean cos positive - mean cos negative))`` with ``scale = exp(logit_scale)``
  or ``1 / temperature`` when the prompt file sets one.

``explain`` gives the 2D "why" map of a finding: cosine of each patch token (projected like the
CLS token) with the finding's positive minus negative text embedding, on the image's own grid.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import MedfmError, WeightsError
from ...geometry import Geometry
from ...io.types import MedicalImage
from ...runtime.registry import ModelSpec
from .. import encoder2d
from .spec import CHECKPOINT, CONFIG, PROMPT_FILES, SAFETENSORS, TEXT_DIR

log = logging.getLogger(__name__)

POSITION_IDS = "text.transformer.embeddings.position_ids"
_TEXT_BATCH = 32


# ------------------------------------------------------------------------------- prompts
def load_prompt_set(path: Any = None, modality: str | None = None) -> Any:
    """A prompt set (Merlin's format: positive/negative phrasings per finding).

    ``path`` None: the shipped set for ``modality`` (CXR, pathology, fundus). ``meta``
    records whether the file sets its own ``temperature`` (otherwise the model's logit scale
    is used) and the modality the set was chosen for.
    """
    from importlib import resources

    import yaml

    from ..merlin.phenotypes import PromptSet, load_prompts

    if isinstance(path, PromptSet):
        return path
    if path is None:
        key = encoder2d.canonical_modality(modality) if modality else None
        if key not in PROMPT_FILES:
            have = ", ".join(PROMPT_FILES)
            raise MedfmError(
                f"BiomedCLIP has no shipped prompt set for modality {modality or 'unknown'!r}: "
                f"choose one of {have} (--modality), or pass your own prompt file (--prompts)")
        res = resources.files(__package__).joinpath("prompts", PROMPT_FILES[key])
        with resources.as_file(res) as p:
            ps = load_prompts(p)
            raw = yaml.safe_load(Path(p).read_text("utf-8"))
        ps.source = f"biomedclip/{PROMPT_FILES[key]}"
    else:
        ps = load_prompts(path)
        try:
            raw = yaml.safe_load(Path(path).expanduser().read_text("utf-8"))
        except (OSError, yaml.YAMLError):  # load_prompts already read it
            raw = {}
    ps.meta = {"temperature_set": isinstance(raw, dict) and "temperature" in raw,
               "modality": modality}
    return ps


# ------------------------------------------------------------------------------- config
def read_config(folder: str | Path) -> dict[str, Any]:
    """``open_clip_config.json`` of a hub-layout folder, made loadable offline.

    Old keys ``proj``/``pooler_type`` become ``hf_proj_type``/``hf_pooler_type``; a
    ``hf_model_name``/``hf_tokenizer_name`` that names a hub id resolves to ``<folder>/text``;
    no pretrained weights are fetched for either tower.
    """
    folder = Path(folder)
    path = folder / CONFIG
    try:
        cfg = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise WeightsError(f"BiomedCLIP: cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise WeightsError(f"BiomedCLIP: {path.name} is not valid JSON: {exc}") from None
    model_cfg = dict(cfg.get("model_cfg", cfg))
    text = dict(model_cfg.get("text_cfg", {}))
    for old, new in (("proj", "hf_proj_type"), ("pooler_type", "hf_pooler_type")):
        if old in text:
            text.setdefault(new, text.pop(old))
    text_dir = folder / TEXT_DIR
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text.get(key)
        if name and not Path(str(name)).is_dir():
            text[key] = str(text_dir)
    text["hf_model_pretrained"] = False
    vision = dict(model_cfg.get("vision_cfg", {}))
    vision["timm_model_pretrained"] = False
    model_cfg["text_cfg"], model_cfg["vision_cfg"] = text, vision
    model_cfg.pop("custom_text", None)
    pre = dict(cfg.get("preprocess_cfg", {}))
    return {"model_cfg": model_cfg, "preprocess_cfg": pre}


def build_network(model_cfg: dict[str, Any]) -> Any:
    """The open_clip ``CustomTextCLIP`` described by ``model_cfg`` (random weights)."""
    import open_clip

    text_dir = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if text_dir and not (Path(text_dir) / "config.json").is_file():
        raise WeightsError(f"BiomedCLIP: the text tower's config.json is missing in {text_dir} "
                           "(the BiomedBERT config; `medfm weights fetch biomedclip` assembles "
                           "text/ from the two hub repositories)")
    cfg = {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg",
                                                        "quick_gelu", "init_logit_scale",
                                                        "init_logit_bias", "cast_dtype")}
    return open_clip.CustomTextCLIP(**cfg)


def checkpoint_in(folder: Path) -> Path:
    for name in (SAFETENSORS, CHECKPOINT):
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"BiomedCLIP: neither {CHECKPOINT} nor {SAFETENSORS} in {folder}")


def load_weights(net: Any, path: Path) -> None:
    """Load the hub state dict strictly (after open_clip's own two fix-ups)."""
    from ...runtime.safe_load import load_state_dict, load_strict

    sd = dict(load_state_dict(path))
    if POSITION_IDS in sd and POSITION_IDS not in net.state_dict():
        del sd[POSITION_IDS]
    ls = sd.get("logit_scale")
    if ls is not None and ls.ndim != net.logit_scale.ndim:
        sd["logit_scale"] = ls.reshape(net.logit_scale.shape)
    load_strict(net, sd, what=path.name)


def image_transform(preprocess_cfg: dict[str, Any], image_size: int) -> Any:
    """open_clip's own eval transform for this config (bicubic shortest-side resize, centre crop)."""
    import open_clip

    kw: dict[str, Any] = {}
    for key in ("mean", "std", "interpolation", "resize_mode", "fill_color"):
        if key in preprocess_cfg:
            kw[key] = preprocess_cfg[key]
    return open_clip.image_transform(image_size, is_train=False, **kw)


# ------------------------------------------------------------------------------- adapter
class BiomedCLIPModel:
    """BiomedCLIP on one device (see the module docstring)."""

    model_id = "biomedclip"

    def __init__(self, spec: ModelSpec, net: Any, tokenizer: Any, transform: Any,
                 weights_path: Path, device: torch.device, precision: str = "auto",
                 preprocess_cfg: dict[str, Any] | None = None) -> None:
        from ...runtime.device import precision_dtype

        self.spec = spec
        self.net = net.eval().to(device)
        self.tokenizer = tokenizer
        self.transform = transform
        #: the state-dict file (hashed); ``weights_path`` is its hub-layout folder (what an
        #: index records and a later query loads again from the cache)
        self.checkpoint = Path(weights_path)
        self.weights_path = self.checkpoint.parent
        self.device = device
        self.precision = precision
        self.dtype = precision_dtype(device, precision)
        self.preprocess_cfg = dict(preprocess_cfg or {})
        self._text_cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._sha256: str | None = None

    # ------------------------------------------------------------------ info
    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            from ...runtime.weights import WeightsManager

            self._sha256 = WeightsManager().file_hash(self.checkpoint)
        return self._sha256

    @property
    def embedding_dim(self) -> int:
        return int(self.net.text.output_dim)

    @property
    def image_size(self) -> int:
        s = self.net.visual.image_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    @property
    def logit_scale(self) -> float:
        """The similarity multiplier ``exp(logit_scale)`` (stored as its logarithm)."""
        return float(self.net.logit_scale.detach().float().exp().reshape(-1)[0])

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "weights": self.checkpoint.name,
            "weights_folder": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "embedding_dim": self.embedding_dim,
            "logit_scale": round(self.logit_scale, 6),
            "preprocessing": {"resize": "shortest side bicubic (PIL, antialiased)",
                              "size": self.image_size, "crop": "centre",
                              "mean": list(self.preprocess_cfg.get("mean", ())),
                              "std": list(self.preprocess_cfg.get("std", ()))},
        }

    def _run(self, fn: Any, what: str) -> Any:
        from ...runtime.device import run_inference

        return run_inference(fn, self.device, what, precision=self.precision)

    # ------------------------------------------------------------------ images
    def rgb_plane(self, image: MedicalImage, *, modality: str | None = None,
                  slice_index: int | str | None = None) -> np.ndarray:
        """The 2D plane the model sees, as ``uint8 (y, x, 3)``: 8-bit grey/RGB pixels pass
        unchanged (so open_clip's own transform sees exactly the file's pixels); CT slices are
        windowed and other data scaled to [0, 255] first (see :mod:`..encoder2d`)."""
        mod = modality or image.modality
        plane = encoder2d.select_plane(image, size=self.image_size, slice_index=slice_index)
        ct = encoder2d.canonical_modality(mod) == "CT" or \
            (image.metadata or {}).get("units") == "HU"
        a = np.asarray(plane)
        if a.dtype == np.uint8 and not ct and (a.ndim == 2 or a.shape[-1] in (1, 3, 4)):
            if a.ndim == 3 and a.shape[-1] >= 3:
                return np.ascontiguousarray(a[..., :3])
            grey = a if a.ndim == 2 else a[..., 0]
            return np.repeat(grey[..., None], 3, axis=-1)
        unit = encoder2d.to_unit(a, ct=ct)
        return np.round(np.moveaxis(encoder2d.to_rgb_chw(unit), 0, -1) * 255.0).astype(np.uint8)

    def preprocess(self, image: MedicalImage, *, modality: str | None = None,
                   slice_index: int | str | None = None) -> torch.Tensor:
        """A :class:`MedicalImage` -> ``(3, S, S)`` float tensor through open_clip's transform."""
        from PIL import Image

        rgb = self.rgb_plane(image, modality=modality, slice_index=slice_index)
        return self.transform(Image.fromarray(rgb, mode="RGB"))

    def embed_tensors(self, x: torch.Tensor) -> np.ndarray:
        """Preprocessed ``(N, 3, S, S)`` -> L2-normalised ``(N, D)`` float32."""
        x = x.to(self.device)
        feats = self._run(lambda: self.net.encode_image(x, normalize=True), "BiomedCLIP")
        return feats.float().cpu().numpy().astype(np.float32)

    def embed_batch(self, images: Sequence[MedicalImage], *,
                    modality: str | Sequence[str | None] | None = None,
                    slice_index: int | str | None = None) -> np.ndarray:
        mods = list(modality) if isinstance(modality, (list, tuple)) else [modality] * len(images)
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        x = torch.stack([self.preprocess(im, modality=m, slice_index=slice_index)
                         for im, m in zip(images, mods, strict=True)])
        return self.embed_tensors(x)

    def embed(self, image: MedicalImage, *, modality: str | None = None,
              slice_index: int | str | None = None) -> dict[str, np.ndarray]:
        """``{"image_embedding": float32 (512,)}``, L2-normalised."""
        return {"image_embedding": self.embed_batch([image], modality=modality,
                                                    slice_index=slice_index)[0]}

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised ``(N, 512)`` text embeddings (cached per phrasing)."""
        texts = [str(t) for t in texts]
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for i in range(0, len(todo), _TEXT_BATCH):
            batch = todo[i:i + _TEXT_BATCH]
            tok = self.tokenize(batch).to(self.device)
            feats = self._run(lambda tok=tok: self.net.encode_text(tok, normalize=True),
                              "BiomedCLIP's text tower")
            with self._lock:
                for t, f in zip(batch, feats.float().cpu().numpy(), strict=True):
                    self._text_cache[t] = f.astype(np.float32)
        if not texts:
            return np.zeros((0, self.embedding_dim), np.float32)
        with self._lock:
            return np.stack([self._text_cache[t] for t in texts])

    # ------------------------------------------------------------------ zero-shot
    def prompt_set(self, prompts: Any = None, modality: str | None = None) -> Any:
        return load_prompt_set(prompts, modality)

    def scale_for(self, prompts: Any) -> float:
        """``1 / temperature`` when the prompt file sets one, else ``exp(logit_scale)``."""
        if (prompts.meta or {}).get("temperature_set", True):
            return 1.0 / float(prompts.temperature)
        return self.logit_scale

    def zero_shot_from(self, image_embedding: np.ndarray, prompts: Any) -> list[dict[str, Any]]:
        img = np.asarray(image_embedding, np.float64).reshape(-1)
        img = img / max(np.linalg.norm(img), 1e-12)
        scale = self.scale_for(prompts)
        self.embed_text(prompts.phrases())  # one batched pass for every phrasing
        out = []
        for name, (pos, neg) in prompts.findings.items():
            s_pos = float(np.mean(self.embed_text(pos).astype(np.float64) @ img))
            s_neg = float(np.mean(self.embed_text(neg).astype(np.float64) @ img))
            z = scale * (s_pos - s_neg)
            prob = float(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))
            out.append({"finding": name, "probability": prob, "similarity_positive": s_pos,
                        "similarity_negative": s_neg, "scale": scale})
        return out

    def findings(self, image: MedicalImage, *, prompts: Any = None,
                 modality: str | None = None, slice_index: int | str | None = None
                 ) -> list[dict[str, Any]]:
        """Zero-shot probability of each finding of ``prompts`` (default: the shipped set of
        ``modality`` or the image's own modality)."""
        mod = modality or image.modality
        ps = self.prompt_set(prompts, mod)
        emb = self.embed(image, modality=modality, slice_index=slice_index)["image_embedding"]
        return self.zero_shot_from(emb, ps)

    # ------------------------------------------------------------------ why map
    def patch_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` -> L2-normalised patch tokens ``(gh, gw, D)`` in the joint space."""
        visual = self.net.visual
        trunk = visual.trunk

        def fwd() -> torch.Tensor:
            tokens = trunk.forward_features(x.to(self.device))
            n_prefix = int(getattr(trunk, "num_prefix_tokens", 1))
            patches = visual.head(tokens[:, n_prefix:])
            return F.normalize(patches.float(), dim=-1)[0]

        p = self._run(fwd, "BiomedCLIP")
        gh, gw = trunk.patch_embed.grid_size
        return p.reshape(gh, gw, -1).cpu()

    def explain(self, image: MedicalImage, finding: str, prompts: Any = None, *,
                modality: str | None = None, slice_index: int | str | None = None
                ) -> MedicalImage:
        """The "why" map of ``finding``: per-patch cosine with the mean positive minus the mean
        negative text embedding, rescaled to [0, 1], on ``image``'s own 2D grid (zero outside
        the centre crop the model saw)."""
        from PIL import Image

        ps = self.prompt_set(prompts, modality or image.modality)
        if finding not in ps.findings:
            raise MedfmError(f"cannot explain {finding!r}: not in {ps.source} "
                             f"({', '.join(ps.names[:8])}, ...)")
        pos, neg = ps.findings[finding]
        t_pos = torch.as_tensor(self.embed_text(pos).mean(axis=0))
        t_neg = torch.as_tensor(self.embed_text(neg).mean(axis=0))
        t_pos, t_neg = F.normalize(t_pos, dim=0), F.normalize(t_neg, dim=0)
        rgb = self.rgb_plane(image, modality=modality, slice_index=slice_index)
        x = self.transform(Image.fromarray(rgb, mode="RGB"))[None]
        patches = self.patch_embeddings(x)
        raw = (patches @ t_pos - patches @ t_neg).numpy().astype(np.float32)
        lo, hi = float(raw.min()), float(raw.max())
        unit = (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)
        plane = _paste_on_plane(unit, rgb.shape[:2], self.image_size)
        return _on_image_grid(plane, image, slice_index,
                              name=f"why: {finding}",
                              metadata={"finding": finding, "method": "patch-token similarity",
                                        "model": self.model_id, "prompts": ps.source,
                                        "raw_min": lo, "raw_max": hi})


def _paste_on_plane(unit: np.ndarray, plane_shape: tuple[int, int], size: int) -> np.ndarray:
    """Patch grid over the centre crop -> a map of ``plane_shape`` (open_clip's geometry:
    short side resized to ``size`` with ``int()`` of the long side, centre crop rounded)."""
    h, w = plane_shape
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    sy, sx = h / nh, w / nw
    y0, y1 = top * sy, (top + size) * sy
    x0, x1 = left * sx, (left + size) * sx
    iy0, iy1 = max(0, int(round(y0))), min(h, int(round(y1)))
    ix0, ix1 = max(0, int(round(x0))), min(w, int(round(x1)))
    out = np.zeros((h, w), np.float32)
    if iy1 > iy0 and ix1 > ix0:
        t = torch.as_tensor(unit, dtype=torch.float32)[None, None]
        up = F.interpolate(t, size=(iy1 - iy0, ix1 - ix0), mode="bilinear", align_corners=False)
        out[iy0:iy1, ix0:ix1] = up[0, 0].clamp_(0, 1).numpy()
    return out


def _on_image_grid(plane_map: np.ndarray, image: MedicalImage, slice_index: Any, *,
                   name: str, metadata: dict[str, Any]) -> MedicalImage:
    """A map computed on the plane the encoder saw -> a float image on ``image``'s 2D grid
    (the pyramid level it came from for slides, with the geometry scaled to match)."""
    g = image.geometry
    if image.multiscale:
        level0 = image.data[0].shape[:2]
        fy, fx = level0[0] / plane_map.shape[0], level0[1] / plane_map.shape[1]
        spacing = (g.spacing[0] * fx, g.spacing[1] * fy)
        # pixel (0, 0) of the coarse level covers fx x fy level-0 pixels: move its centre
        shift = np.asarray(g.direction, float) @ (np.asarray([(fx - 1) / 2, (fy - 1) / 2])
                                                 * np.asarray(g.spacing[:2], float))
        geom = Geometry(spacing, tuple(np.asarray(g.origin, float) + shift), g.direction)
        data = plane_map
    else:
        spatial = image.spatial_shape
        target = spatial[-2:]
        data = plane_map
        if tuple(data.shape) != tuple(target):  # the plane was block-averaged first
            t = torch.as_tensor(data)[None, None]
            data = F.interpolate(t, size=tuple(target), mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
        geom = g
        if len(spatial) == 3:  # one slice of a volume: the 2D grid of that slice
            n = spatial[0]
            k = n // 2 if slice_index in (None, "middle") else int(slice_index) % n
            origin3 = g.index_to_physical([0.0, 0.0, float(k)])
            d = np.asarray(g.direction, float)[:2, :2]
            u, _, vt = np.linalg.svd(d)
            geom = Geometry(g.spacing[:2], tuple(origin3[:2]), u @ vt)
            metadata = {**metadata, "slice_index": k}
    return MedicalImage(np.ascontiguousarray(data, np.float32), geom, modality="OT",
                        kind="image2d", name=name, metadata={**metadata, "medfm_why": True})


# ------------------------------------------------------------------------------- builder
def _load_tokenizer(text_cfg: dict[str, Any]) -> Any:
    from open_clip.tokenizer import HFTokenizer

    name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    ctx = int(text_cfg.get("context_length", 256))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}) or {})
    return HFTokenizer(str(name), context_length=ctx, **kwargs)


def load_folder(folder: str | Path) -> tuple[Any, Any, Any, Path, dict[str, Any]]:
    """(network, tokenizer, transform, checkpoint path, preprocess cfg) from a hub-layout
    folder, strictly loaded, no network access."""
    folder = Path(folder)
    cfg = read_config(folder)
    net = build_network(cfg["model_cfg"])
    ckpt = checkpoint_in(folder)
    load_weights(net, ckpt)
    tok = _load_tokenizer(cfg["model_cfg"]["text_cfg"])
    size = net.visual.image_size
    transform = image_transform(cfg["preprocess_cfg"],
                                int(size[0] if isinstance(size, (tuple, list)) else size))
    return net, tok, transform, ckpt, cfg["preprocess_cfg"]


def build(spec: ModelSpec, weights: Any = None, device: Any = None, *,
          precision: str = "auto") -> BiomedCLIPModel:
    """Registry builder: BiomedCLIP from a hub-layout folder (``weights`` or
    ``$MEDFM_HOME/weights/biomedclip``), strictly, offline."""
    from ...runtime.device import pick_device
    from ...runtime.weights import WeightsManager

    t0 = time.perf_counter()
    if weights is not None and Path(weights).expanduser().is_file():
        weights = Path(weights).expanduser().parent  # the checkpoint given: its folder
    try:
        folder = Path(WeightsManager().resolve(spec, explicit=weights))
    except WeightsError as exc:
        raise WeightsError(f"{exc} (BiomedCLIP needs the hub layout: {CONFIG}, {CHECKPOINT} "
                           f"and the text tower in {TEXT_DIR}/)") from None
    if folder.is_file():
        folder = folder.parent
    net, tok, transform, ckpt, pre = load_folder(folder)
    dev = pick_device(device)
    model = BiomedCLIPModel(spec, net, tok, transform, ckpt, dev, precision, pre)
    log.info("BiomedCLIP loaded from %s on %s in %.1f s", folder, dev, time.perf_counter() - t0)
    return model
