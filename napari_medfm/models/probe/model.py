"""Probe heads: network, file format and the :class:`FindingsModel` adapter.

A probe folder holds

* ``probe.safetensors``: the head's tensors (``head.*``) and the feature standardisation
  (``feature_mean``, ``feature_std``, both ``(D,)``);
* ``probe.json``: ``format`` ("medfm-probe/1"), ``labels`` (names, in output order), ``head``
  ("linear" | "mlp") and ``hidden``, ``encoder`` (``id``, ``weights_sha256``, ``weights`` path at
  training time, ``embedding_dim``), ``normalisation`` (the image modality / mean / std the encoder
  was fed, and the feature standardisation), ``modality`` (the training modality, or None when the
  manifest mixed several), ``metrics`` (held-out AUROC per label, counts), ``training`` settings.

:class:`ProbeModel` embeds an image with its encoder (loaded through
:func:`napari_medfm.runtime.cache.get_model`), standardises the feature and applies the head:
``findings(image)`` -> ``[{"finding", "probability", "auroc", "modality"}]`` sorted by probability.
An encoder whose weights sha256 differs from the recorded one is refused
(:class:`~napari_medfm.errors.WeightsError`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import WeightsError

log = logging.getLogger(__name__)

FORMAT = "medfm-probe/1"
JSON_NAME = "probe.json"
TENSORS_NAME = "probe.safetensors"
#: Encoders a probe may sit on (registry ids; each implements the Embedder contract).
ENCODERS = ("mermed", "rad-dino", "dinov2-base")


def is_probe_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / JSON_NAME).is_file() and (p / TENSORS_NAME).is_file()


def make_head(dim: int, n_labels: int, kind: str = "linear", hidden: int = 256,
              dropout: float = 0.1) -> Any:
    """``linear``: one Linear; ``mlp``: Linear-GELU-Dropout-Linear. Outputs one logit per label."""
    import torch.nn as nn

    if kind == "linear":
        return nn.Sequential(nn.Linear(dim, n_labels))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, n_labels))
    raise ValueError(f"unknown probe head {kind!r} (linear or mlp)")


def save_probe(folder: str | Path, head: Any, meta: dict[str, Any], feature_mean: np.ndarray,
               feature_std: np.ndarray) -> dict[str, Path]:
    """Write ``probe.safetensors`` then ``probe.json`` (atomically; JSON gets the tensors' hash)."""
    import torch
    from safetensors.torch import save_file

    from ...io.writers import atomic_write
    from ...runtime.weights import sha256_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().float().cpu().contiguous()
               for k, v in head.state_dict().items()}
    tensors["feature_mean"] = torch.as_tensor(np.asarray(feature_mean, np.float32))
    tensors["feature_std"] = torch.as_tensor(np.asarray(feature_std, np.float32))
    st = folder / TENSORS_NAME
    atomic_write(st, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    doc = dict(meta)
    doc["format"] = FORMAT
    doc["probe_sha256"] = sha256_file(st)
    js = folder / JSON_NAME
    atomic_write(js, lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n",
                                                encoding="utf-8"))
    return {"safetensors": st, "json": js}


def read_probe(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors) of a probe folder, checked for format and tensor hash."""
    from safetensors.torch import load_file

    from ...runtime.weights import sha256_file

    p = Path(folder).expanduser()
    if p.is_file() and p.name in (JSON_NAME, TENSORS_NAME):
        p = p.parent
    if not is_probe_dir(p):
        raise WeightsError(f"{p}: not a probe folder (expected {JSON_NAME} and {TENSORS_NAME}, "
                           "written by `medfm train probe`)")
    try:
        meta = json.loads((p / JSON_NAME).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WeightsError(f"{p / JSON_NAME}: not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{p / JSON_NAME}: format {meta.get('format')!r}, expected {FORMAT}")
    digest = sha256_file(p / TENSORS_NAME)
    if meta.get("probe_sha256") and meta["probe_sha256"] != digest:
        raise WeightsError(f"{p / TENSORS_NAME}: sha256 {digest[:12]} differs from the one in "
                           f"{JSON_NAME} ({meta['probe_sha256'][:12]}): the files do not belong "
                           "together")
    try:
        tensors = load_file(str(p / TENSORS_NAME))
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{p / TENSORS_NAME}: unreadable ({exc})") from exc
    meta["_folder"] = str(p.resolve())
    meta["_sha256"] = digest
    return meta, tensors


def load_head(meta: dict[str, Any], tensors: dict[str, Any]) -> Any:
    dim = int(meta["encoder"]["embedding_dim"])
    head = make_head(dim, len(meta["labels"]), meta.get("head", "linear"),
                     int(meta.get("hidden", 256)))
    sd = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"probe head tensors do not match probe.json: {exc}") from exc
    return head.eval()


def check_encoder(meta: dict[str, Any], encoder: Any) -> None:
    """Refuse an encoder other than the one (id and weights hash) the probe was trained on."""
    want = meta["encoder"]
    got_id = getattr(encoder, "model_id", None)
    if got_id != want["id"]:
        raise WeightsError(f"probe was trained on encoder {want['id']!r}, got {got_id!r}")
    got = getattr(encoder, "weights_sha256", None)
    if want.get("weights_sha256") and got != want["weights_sha256"]:
        raise WeightsError(
            f"encoder {want['id']!r} weights sha256 {str(got)[:16]}... differ from the ones the "
            f"probe was trained on ({want['weights_sha256'][:16]}...): its outputs would be "
            "meaningless. Pass the original weights (encoder_weights=...) or retrain the probe.")


class ProbeModel:
    """FindingsModel adapter: frozen encoder -> standardised feature -> head -> sigmoid."""

    def __init__(self, spec: Any, meta: dict[str, Any], head: Any, feature_mean: np.ndarray,
                 feature_std: np.ndarray, encoder: Any):
        self.spec = spec
        self.meta = meta
        self.head = head
        self.mean = np.asarray(feature_mean, np.float32)
        self.std = np.asarray(feature_std, np.float32)
        self.encoder = encoder
        self.label_names: list[str] = list(meta["labels"])
        self.modality: str | None = meta.get("modality")
        self.weights_sha256: str | None = meta.get("_sha256")
        aurocs = (meta.get("metrics") or {}).get("auroc") or {}
        self._auroc = {k: aurocs.get(k) for k in self.label_names}

    @property
    def model_id(self) -> str:
        return getattr(self.spec, "id", "probe")

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "weights": self.meta.get("_folder"),
                "weights_sha256": self.weights_sha256, "labels": self.label_names,
                "encoder": {k: v for k, v in self.meta["encoder"].items()},
                "normalisation": self.meta.get("normalisation"),
                "metrics": self.meta.get("metrics"), "head": self.meta.get("head")}

    def _modality_for(self, image: Any, modality: str | None = None) -> str | None:
        """Explicit ``modality`` > the image's own (DICOM header / reader) > the probe's."""
        from .. import encoder2d

        if modality:
            return encoder2d.canonical_modality(modality) or modality
        own = encoder2d.canonical_modality(getattr(image, "modality", None))
        return own or self.modality

    def features(self, images: list[Any], modality: str | None = None) -> np.ndarray:
        """Encoder features ``(N, D)`` (not standardised)."""
        mods = [self._modality_for(im, modality) for im in images]
        if hasattr(self.encoder, "embed_batch"):
            return np.asarray(self.encoder.embed_batch(images, modality=mods), np.float32)
        return np.stack([self.encoder.embed(im, modality=m)["image_embedding"]
                         for im, m in zip(images, mods, strict=True)]).astype(np.float32)

    def probabilities(self, feats: np.ndarray) -> np.ndarray:
        import torch

        x = (np.asarray(feats, np.float32) - self.mean) / self.std
        with torch.inference_mode():
            logits = self.head(torch.from_numpy(x))
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def findings(self, image: Any, *, prompts: Any = None,
                 modality: str | None = None) -> list[dict[str, Any]]:
        """``[{"finding", "probability", "auroc", "modality"}]``, most probable first.

        ``prompts``: None (every label), label names to keep, or one comma-separated string of
        them. ``modality``:
        the image's modality when it does not say (a plain PNG); default: the image's own,
        else the probe's training modality.
        """
        if isinstance(prompts, str):  # "a, b" from a text field
            prompts = [p.strip() for p in prompts.split(",") if p.strip()] or None
        keep = None if prompts is None else {str(p) for p in prompts}
        if keep is not None:
            unknown = keep - set(self.label_names)
            if unknown:
                raise ValueError(f"probe has no label(s) {sorted(unknown)}; labels: "
                                 f"{', '.join(self.label_names)}")
        prob = self.probabilities(self.features([image], modality))[0]
        mod = self._modality_for(image, modality)
        rows = [{"finding": n, "probability": float(p), "auroc": self._auroc.get(n),
                 "modality": mod}
                for n, p in zip(self.label_names, prob, strict=True)
                if keep is None or n in keep]
        return sorted(rows, key=lambda r: -r["probability"])


def build(spec: Any, weights: Any = None, device: Any = None, *,
          encoder_weights: str | None = None, precision: str = "auto") -> ProbeModel:
    """Registry builder: ``weights`` = the probe folder; the encoder comes from the shared cache.

    ``encoder_weights`` overrides the encoder weights path recorded at training time (the
    file may have moved); its sha256 must still match.
    """
    from ...runtime.cache import get_model

    if weights is None:
        raise WeightsError("probe: pass the probe folder written by `medfm train probe` "
                           "(weights=PROBE_DIR, CLI --probe PROBE_DIR)")
    meta, tensors = read_probe(weights)
    enc = meta["encoder"]
    enc_weights = encoder_weights or enc.get("weights")
    if enc_weights and not Path(enc_weights).exists():
        raise WeightsError(f"probe encoder weights {enc_weights} not found (pass "
                           "encoder_weights=PATH / --encoder-weights PATH)")
    opts: dict[str, Any] = {}
    if precision and precision != "auto":
        opts["precision"] = precision
    encoder = get_model(enc["id"], weights=enc_weights, device=device, **opts)
    check_encoder(meta, encoder)
    head = load_head(meta, tensors)
    return ProbeModel(spec, meta, head, tensors["feature_mean"].numpy(),
                      tensors["feature_std"].numpy(), encoder)
