"""The loaded Merlin model (``load_model("merlin", weights=...)``) and its builder.

:class:`MerlinModel` offers the generic ``embed(image)`` contract (``image_embedding`` (2048,),
``contrastive_embedding`` (512,), ``phenotype_logits`` (1692,), float32 numpy) plus
``phenotypes``, ``zero_shot``, ``five_year_risk`` and ``explain``. The same steps are exposed
one by one (``prepare`` / ``forward_image`` / ``text_features`` / ...) for the progress-yielding
task generators of :mod:`napari_medfm.tasks.findings`.

Loading is strict: the image tower loads exactly the ``encode_image.i3_resnet.*`` keys of the
CLIP checkpoint; the text tower (built only when zero-shot is used, or eagerly with
``text=True``) is loaded by loading the *whole* checkpoint (image + text + ``logit_scale``)
strictly into :class:`MerlinCLIP`. Image-only use (``text=False`` or ``medfm embed``) never
builds the text tower.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import MedfmError, WeightsError
from ...io.types import MedicalImage
from ...runtime.registry import ModelSpec
from .network import (
    FULL_CONFIG,
    IMAGE_PREFIX,
    TINY_CONFIG,
    I3DResNet,
    MerlinImageConfig,
    fuse_for_inference,
)
from .phenotypes import PromptSet, load_prompts, phenotype_table, top_phenotypes
from .preprocess import DEFAULT_PREPROCESS, PreprocessConfig, Preprocessed, check_ct, preprocess
from .spec import CLIP_CHECKPOINT, FIVE_YEAR_CHECKPOINT
from .text import (
    FULL_TEXT_CONFIG,
    TINY_TEXT_CONFIG,
    MerlinTextConfig,
    MerlinTextEncoder,
    find_tokenizer_dir,
    load_tokenizer,
    tokenize,
)

log = logging.getLogger(__name__)

__all__ = ["MerlinModel", "MerlinCLIP", "build", "CONFIGS", "five_year_net", "infer_configs",
           "EXPORT_CONFIG"]

#: Named network sizes: "full" is the released model; "tiny" has the same key layout (tests).
CONFIGS: dict[str, tuple[MerlinImageConfig, MerlinTextConfig]] = {
    "full": (FULL_CONFIG, FULL_TEXT_CONFIG),
    "tiny": (TINY_CONFIG, TINY_TEXT_CONFIG),
}

_POSITION_IDS = "encode_text.text_encoder.embeddings.position_ids"

#: Written by the trainer next to an exported checkpoint: ``{"image": {...}, "text": {...},
#: "preprocess": {...}}`` (the parts the state dict cannot tell: attention heads/window,
#: max length, and the preprocessing the model was trained with).
EXPORT_CONFIG = "merlin_config.json"

_TEXT = "encode_text.text_encoder."


def _count(sd: Any, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)
           and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(idx) + 1 if idx else 0


def infer_configs(sd: Any, sidecar: dict[str, Any] | None = None
                  ) -> tuple[MerlinImageConfig, MerlinTextConfig, PreprocessConfig]:
    """Image/text tower shapes (and preprocessing) of a CLIP-layout checkpoint.

    Block counts, widths, heads' sizes, vocabulary, hidden size, layers, positions and the
    projection come from the tensor shapes; the attention heads/window and the preprocessing
    from ``sidecar`` (:data:`EXPORT_CONFIG`) when present, else the released values. For the
    released file this gives exactly :data:`FULL_CONFIG` / :data:`FULL_TEXT_CONFIG`.
    """
    sidecar = sidecar or {}
    p = IMAGE_PREFIX
    layers = tuple(_count(sd, f"{p}layer{i}.") for i in range(1, 5))
    if not all(layers):
        raise WeightsError("not a Merlin image tower: layer1..layer4 blocks are missing")
    widths = tuple(int(sd[f"{p}layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
    expansion = int(sd[f"{p}layer1.0.conv3.weight"].shape[0]) // widths[0]
    cdim = int(sd[f"{p}contrastive_head.weight"].shape[0]) \
        if f"{p}contrastive_head.weight" in sd else None
    image = MerlinImageConfig(layers=layers, widths=widths, expansion=expansion,  # type: ignore[arg-type]
                              n_phenotypes=int(sd[f"{p}classifier.weight"].shape[0]),
                              contrastive_dim=cdim, in_channels=int(sd[f"{p}conv1.weight"].shape[1]))
    side_text = dict(sidecar.get("text") or {})
    text = FULL_TEXT_CONFIG
    emb = sd.get(f"{_TEXT}embeddings.word_embeddings.weight")
    if emb is not None:
        hidden = int(emb.shape[1])
        shapes = {
            "vocab_size": int(emb.shape[0]),
            "hidden_size": hidden,
            "num_hidden_layers": _count(sd, f"{_TEXT}encoder.layer."),
            "intermediate_size": int(sd[f"{_TEXT}encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "max_position_embeddings": int(sd[f"{_TEXT}embeddings.position_embeddings.weight"].shape[0]),
            "type_vocab_size": int(sd[f"{_TEXT}embeddings.token_type_embeddings.weight"].shape[0]),
            "proj_dim": int(sd["encode_text.linear_layer.weight"].shape[0]),
        }
        if hidden != FULL_TEXT_CONFIG.hidden_size and "num_attention_heads" not in side_text:
            shapes["num_attention_heads"] = max(1, hidden // 64)
        known = {f.name for f in dataclasses.fields(MerlinTextConfig)}
        text = dataclasses.replace(FULL_TEXT_CONFIG, **shapes,
                                   **{k: v for k, v in side_text.items() if k in known
                                      and k not in shapes})
    pre = DEFAULT_PREPROCESS
    if sidecar.get("preprocess"):
        known = {f.name for f in dataclasses.fields(PreprocessConfig)}
        vals = {k: (tuple(v) if isinstance(v, list) else v)
                for k, v in sidecar["preprocess"].items() if k in known}
        pre = dataclasses.replace(DEFAULT_PREPROCESS, **vals)
    return image, text, pre


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    import json

    side = path.parent / EXPORT_CONFIG
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {side}: {exc}") from None
    want = doc.get("weights")
    if want and want != path.name:  # the sidecar describes another file in that folder
        return None
    return doc


class _Namespace(nn.Module):
    """An empty module used to reproduce the checkpoint's key hierarchy."""


class MerlinCLIP(nn.Module):
    """Key layout of the released CLIP checkpoint: ``logit_scale``, ``encode_image.i3_resnet.*``,
    ``encode_text.text_encoder.*``, ``encode_text.linear_layer.*``."""

    def __init__(self, image: I3DResNet, text: MerlinTextEncoder) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.encode_image = _Namespace()
        self.encode_image.i3_resnet = image
        self.encode_text = text


def five_year_net(config: MerlinImageConfig, contrastive_dim: int | None = None) -> I3DResNet:
    """The 5-year network: the trunk plus a 6-output ``classifier`` (keys unprefixed).

    Layout inferred from the release notes (trunk keys with no prefix, 6-output classifier); a
    ``contrastive_head`` is built only when the checkpoint has one (``contrastive_dim``).
    """
    return I3DResNet(dataclasses.replace(config, n_phenotypes=6, contrastive_dim=contrastive_dim))


class _Heads(nn.Module):
    """CPU float32 copies of the heads, for Grad-CAM without moving the network."""

    def __init__(self, net: I3DResNet) -> None:
        super().__init__()
        import copy

        self.classifier = copy.deepcopy(net.classifier).float().cpu()
        self.contrastive_head = (None if net.contrastive_head is None
                                 else copy.deepcopy(net.contrastive_head).float().cpu())

    heads = I3DResNet.heads


def _empty_image_net(config: MerlinImageConfig) -> I3DResNet:
    """An image tower with uninitialised storage (no random init: it is loaded right after).

    Every parameter and buffer of :class:`I3DResNet` is in its state dict, so a strict load
    overwrites all of it.
    """
    with torch.device("meta"):
        net = I3DResNet(config)
    return net.to_empty(device="cpu")


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class MerlinModel:
    """Merlin ready for inference on one device (see the module docstring)."""

    model_id = "merlin"

    def __init__(self, spec: ModelSpec, image_net: I3DResNet, weights_path: Path,
                 device: torch.device, precision: str = "auto", *, config_name: str = "full",
                 text: bool | None = None, tokenizer_dir: str | Path | None = None,
                 five_year_path: Path | None = None, fast: bool = True,
                 preprocess_config: PreprocessConfig = DEFAULT_PREPROCESS,
                 configs: tuple[MerlinImageConfig, MerlinTextConfig] | None = None) -> None:
        from ...runtime.device import precision_dtype

        self.spec = spec
        self.device = device
        self.precision = precision
        self.dtype = precision_dtype(device, precision)
        self.config_name = config_name
        self.image_config, self.text_config = configs or CONFIGS[config_name]
        self.weights_path = Path(weights_path)
        self.preprocess_config = preprocess_config
        image_net = image_net.eval().to(device)
        self._heads: _Heads | None = _Heads(image_net)
        # CPU-tuned fused blocks for fp32 on the CPU; BN-folded standard convolutions elsewhere;
        # the unfused network is then released (half the memory); ``net`` rebuilds it on demand
        cpu_fp32 = device.type == "cpu" and self.dtype == torch.float32
        self.fast = fuse_for_inference(image_net, cpu=cpu_fp32).to(device) if fast else None
        self._net: I3DResNet | None = None if fast else image_net
        del image_net
        self._text_allowed = text is not False
        self._tokenizer_dir = tokenizer_dir
        self.text_net: MerlinTextEncoder | None = None
        self.tokenizer: Any = None
        self._text_cache: dict[str, np.ndarray] = {}
        self.five_year_path = five_year_path
        self._five_year: I3DResNet | None = None
        self._sha256: str | None = None
        if text:
            self.load_text()

    # ------------------------------------------------------------------ info
    @property
    def weights_sha256(self) -> str:
        """sha256 of the checkpoint file (computed once, cached by the weights manager)."""
        if self._sha256 is None:
            from ...runtime.weights import WeightsManager

            self._sha256 = WeightsManager().file_hash(self.weights_path)
        return self._sha256

    @property
    def net(self) -> I3DResNet:
        """The plain (unfused) image tower with the released weights.

        With the fast path on, it is rebuilt from the checkpoint at each access (reference and
        tests only); inference uses the fused twin.
        """
        if self._net is not None:
            return self._net
        from ...runtime.safe_load import extract_prefix, load_state_dict, load_strict

        net = _empty_image_net(self.image_config)
        load_strict(net, extract_prefix(load_state_dict(self.weights_path), IMAGE_PREFIX),
                    what=self.weights_path.name)
        return net.eval().to(self.device)

    def _image_tower(self) -> nn.Module:
        return self.fast if self.fast is not None else self.net

    @property
    def embedding_dim(self) -> int:
        """Length of ``image_embedding`` (2048 for the released ResNet-152)."""
        return int(self.image_config.feature_dim)

    @property
    def has_text(self) -> bool:
        return self._text_allowed

    def describe(self) -> dict[str, Any]:
        """Provenance for exports: model, weights, device, preprocessing."""
        return {
            "model": self.model_id,
            "weights": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "config": self.config_name,
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "preprocessing": self.preprocess_config.to_dict(),
            "five_year_weights": self.five_year_path.name if self.five_year_path else None,
        }

    # ------------------------------------------------------------------ steps
    def prepare(self, image: MedicalImage) -> Preprocessed:
        """Check the image is a 3D CT and run the Merlin preprocessing."""
        check_ct(image)
        return preprocess(image, self.preprocess_config, check=False)

    def _run(self, fn: Any, what: str) -> Any:
        from ...runtime.device import run_inference

        return run_inference(fn, self.device, what, precision=self.precision)

    def memory_warning(self) -> str | None:
        """A warning when the forward pass will probably not fit in the free memory."""
        from ...runtime.device import check_memory, estimate_memory

        h, w, d = self.preprocess_config.spatial_size
        stem = self.image_config.widths[0] * d * (h // 2) * (w // 2)  # conv1 output
        n_params = sum(p.numel() for p in self._image_tower().parameters())
        bytes_ = estimate_memory(n_params * (2 if self.fast is not None else 1), 3 * stem,
                                 dtype_bytes=2 if self.dtype != torch.float32 else 4)
        return check_memory(bytes_, self.device, "Merlin's image tower")

    def forward_image(self, pre: Preprocessed | torch.Tensor,
                      keep_tokens: bool = False) -> dict[str, np.ndarray]:
        """Image tower on one preprocessed volume -> float32 numpy outputs (batch dim removed)."""
        x = pre.tensor if isinstance(pre, Preprocessed) else pre
        if x.ndim == 4:
            x = x[None]
        x = x.to(self.device, non_blocking=True)
        net = self._image_tower()
        out = self._run(lambda: net(x), "Merlin's image tower")
        res = {
            "image_embedding": out["image_embedding"][0].float().cpu().numpy(),
            "contrastive_embedding": out["contrastive_embedding"][0].float().cpu().numpy(),
            "phenotype_logits": out["phenotype_logits"][0].float().cpu().numpy(),
        }
        if keep_tokens:
            res["visual_tokens"] = out["visual_tokens"][0].float().cpu().numpy()
        return res

    # ------------------------------------------------------------------ text tower
    def load_text(self) -> MerlinTextEncoder:
        """Build the text tower and load the whole CLIP checkpoint strictly (once)."""
        if self.text_net is not None:
            return self.text_net
        if not self._text_allowed:
            raise MedfmError("this Merlin model was loaded image-only (text=False); zero-shot "
                             "findings need the text tower: load it without text=False")
        from ...runtime.safe_load import load_state_dict, load_strict

        sd = load_state_dict(self.weights_path)
        if not any(k.startswith("encode_text.") for k in sd):
            raise WeightsError(
                f"{self.weights_path.name} has no text tower (encode_text.*): zero-shot findings "
                f"need Merlin's CLIP checkpoint {CLIP_CHECKPOINT}")
        with_pooler = any(k.startswith("encode_text.text_encoder.pooler.") for k in sd)
        text = MerlinTextEncoder(self.text_config, with_pooler=with_pooler)
        with torch.device("meta"):  # the image half only checks keys/shapes: no memory
            image_check = I3DResNet(self.image_config)
        clip = MerlinCLIP(image_check, text)
        if _POSITION_IDS in sd and _POSITION_IDS not in clip.state_dict():
            # older transformers saved this constant arange buffer; it is not a weight
            sd = {k: v for k, v in sd.items() if k != _POSITION_IDS}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")
            load_strict(clip, sd, what=self.weights_path.name)
        del clip, sd  # the image half was only needed to check the whole checkpoint
        self.text_net = text.eval().to(self.device)
        tok_dir = find_tokenizer_dir(self._tokenizer_dir, self.weights_path)
        self.tokenizer = load_tokenizer(tok_dir, self.text_config.max_length)
        if len(self.tokenizer) > self.text_config.vocab_size:
            raise WeightsError(f"tokenizer in {tok_dir} has {len(self.tokenizer)} tokens but the "
                               f"text tower has {self.text_config.vocab_size}: wrong tokenizer")
        return self.text_net

    def text_features(self, texts: Sequence[str], batch_size: int = 8) -> np.ndarray:
        """L2-normalised 512-d features of ``texts`` (cached per phrase)."""
        self.load_text()
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(todo), batch_size):
            self._encode_batch(todo[i:i + batch_size])
        return np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, 512))

    def _encode_batch(self, batch: Sequence[str]) -> None:
        assert self.text_net is not None
        enc = tokenize(self.tokenizer, batch, self.text_config.max_length,
                       pad_to_multiple_of=self.text_config.attention_window)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        feats = self._run(lambda: _l2n(self.text_net(**enc)), "Merlin's text tower")
        for t, f in zip(batch, feats.cpu().numpy(), strict=True):
            self._text_cache[t] = f.astype(np.float32)

    def pending_phrases(self, prompts: PromptSet) -> list[str]:
        """Phrasings of ``prompts`` whose features are not cached yet."""
        return [p for p in prompts.phrases() if p not in self._text_cache]

    # ------------------------------------------------------------------ heads
    def zero_shot_from(self, contrastive: np.ndarray, prompts: PromptSet) -> list[dict[str, Any]]:
        """Finding probabilities from a contrastive image embedding (see prompts.yaml)."""
        img = np.asarray(contrastive, np.float64).reshape(-1)
        img = img / max(np.linalg.norm(img), 1e-12)
        out = []
        for name, (pos, neg) in prompts.findings.items():
            s_pos = float(np.mean(self.text_features(pos).astype(np.float64) @ img))
            s_neg = float(np.mean(self.text_features(neg).astype(np.float64) @ img))
            z = (s_pos - s_neg) / prompts.temperature
            prob = float(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))
            out.append({"finding": name, "probability": prob, "similarity_positive": s_pos,
                        "similarity_negative": s_neg})
        return out

    def five_year_from(self, pre: Preprocessed) -> list[dict[str, Any]] | None:
        """5-year disease risks (sigmoid of the 6 logits), or None without that checkpoint."""
        net = self._load_five_year()
        if net is None:
            return None
        x = pre.tensor[None].to(self.device)
        logits = self._run(lambda: net(x)["phenotype_logits"][0].float().cpu().numpy(),
                           "Merlin's 5-year head")
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return [{"output": i + 1, "logit": float(lg), "probability": float(p)}
                for i, (lg, p) in enumerate(zip(logits, probs, strict=True))]

    def _load_five_year(self) -> I3DResNet | None:
        if self._five_year is not None or self.five_year_path is None:
            return self._five_year
        from ...runtime.safe_load import load_state_dict, load_strict

        sd = dict(load_state_dict(self.five_year_path))
        if any(k.startswith("encode_image.") for k in sd):
            raise WeightsError(f"{self.five_year_path.name} looks like a CLIP checkpoint, not "
                               f"the 5-year checkpoint {FIVE_YEAR_CHECKPOINT}")
        w = sd.get("classifier.weight")
        if w is not None and w.ndim == 2:  # stored as a Linear: same numbers as a 1x1x1 conv
            sd["classifier.weight"] = w[:, :, None, None, None]
        cdim = sd["contrastive_head.weight"].shape[0] if "contrastive_head.weight" in sd else None
        net = five_year_net(self.image_config, cdim)
        load_strict(net, sd, what=self.five_year_path.name)
        self._five_year = net.eval().to(self.device)
        return self._five_year

    # ------------------------------------------------------------------ public API
    def embed(self, image: MedicalImage) -> dict[str, np.ndarray]:
        """``image_embedding`` (2048,), ``contrastive_embedding`` (512,), ``phenotype_logits``
        (1692,), float32."""
        return self.forward_image(self.prepare(image))

    def phenotypes(self, image: MedicalImage, top_k: int | None = 20) -> list[dict[str, Any]]:
        """Most probable phecode phenotypes (sigmoid of the logits), most probable first."""
        return top_phenotypes(self.embed(image)["phenotype_logits"], top_k)

    def zero_shot(self, image: MedicalImage, prompts: PromptSet | str | Path | None = None
                  ) -> list[dict[str, Any]]:
        """Probability of each finding of ``prompts`` (default: the packaged 31 findings)."""
        ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
        return self.zero_shot_from(self.embed(image)["contrastive_embedding"], ps)

    def findings(self, image: MedicalImage, *, prompts: PromptSet | str | Path | None = None
                 ) -> list[dict[str, Any]]:
        """The :class:`~napari_medfm.runtime.contracts.FindingsModel` contract (zero-shot)."""
        return self.zero_shot(image, prompts)

    def five_year_risk(self, image: MedicalImage) -> list[dict[str, Any]]:
        """5-year risks (needs the five-year checkpoint); see :data:`FIVE_YEAR_NOTE`."""
        if self.five_year_path is None:
            raise WeightsError(f"5-year risks need {FIVE_YEAR_CHECKPOINT} (pass five_year=PATH "
                               "or --five-year PATH)")
        res = self.five_year_from(self.prepare(image))
        assert res is not None
        return res

    def explain(self, image: MedicalImage, finding: str, prompts: PromptSet | None = None,
                pre: Preprocessed | None = None, tokens: np.ndarray | None = None
                ) -> MedicalImage:
        """Grad-CAM "why" map of a zero-shot finding or a phenotype (phecode or name), as a
        float image in [0, 1] on ``image``'s own grid (same shape and geometry)."""
        from .explain import grad_cam, to_source_grid

        pre = pre if pre is not None else self.prepare(image)
        if tokens is None:
            x = pre.tensor[None].to(self.device)
            net = self._image_tower()
            tokens = self._run(lambda: net.trunk(x)[0].float().cpu().numpy(), "Merlin")
        fmap = torch.as_tensor(np.asarray(tokens), dtype=torch.float32)[None]
        score_fn, label = self._score_fn(finding, prompts, self._heads)
        cam = grad_cam(fmap, score_fn, tuple(pre.tensor.shape[1:]))
        return to_source_grid(cam, pre.affine_ras, image, name=f"why: {label}",
                              metadata={"finding": label, "method": "grad-cam layer4",
                                        "model": self.model_id})

    def _score_fn(self, finding: str, prompts: PromptSet | None, net: Any) -> tuple[Any, str]:
        ps = prompts if prompts is not None else None
        if ps is None and self._text_allowed:
            ps = load_prompts()
        if ps is not None and finding in ps.findings:
            pos, neg = ps.findings[finding]
            tp = torch.as_tensor(self.text_features(pos))
            tn = torch.as_tensor(self.text_features(neg))

            def zero_shot_score(a: torch.Tensor) -> torch.Tensor:
                img = _l2n(net.heads(a)["contrastive_embedding"])
                return (img @ tp.T).mean() - (img @ tn.T).mean()

            return zero_shot_score, finding
        table = phenotype_table()
        key = finding.strip()
        key = key.split(":", 1)[1].strip() if key.lower().startswith("phecode:") else key
        idx = next((i for i, (code, name) in enumerate(table)
                    if key == code or key.lower() == name.lower()), None)
        if idx is None:
            known = ", ".join(ps.names[:8]) + ", ..." if ps is not None else ""
            raise MedfmError(f"cannot explain {finding!r}: not a zero-shot finding ({known}) nor "
                             "a phecode / phenotype name")

        def phenotype_score(a: torch.Tensor) -> torch.Tensor:
            return net.heads(a)["phenotype_logits"][:, idx]

        return phenotype_score, f"{table[idx][1]} ({table[idx][0]})"


# ---------------------------------------------------------------------------------- builder
def _resolve(spec: ModelSpec, explicit: Any, filename: str) -> Path:
    from ...runtime.weights import WeightsManager

    return Path(WeightsManager().resolve(spec, explicit=explicit, filename=filename))


def build(spec: ModelSpec, weights: Any = None, device: Any = None, *, precision: str = "auto",
          tokenizer: str | Path | None = None, five_year: Any = None, text: bool | None = None,
          config: str = "auto", fast: bool = True) -> MerlinModel:
    """Build Merlin and load its weights strictly.

    ``weights``: the CLIP checkpoint (file, or a folder laid out like ``stanfordmimi/Merlin``);
    default: ``$MEDFM_HOME/weights/merlin/``. ``text``: None = build the text tower when first
    needed, True = now, False = never (image-only). ``five_year``: the 5-year checkpoint (path,
    or True to take it from the weights folder); when None it is used if it lies next to the
    CLIP checkpoint. ``config``: "auto" (default: the tower shapes read from the checkpoint
    itself, plus ``merlin_config.json`` beside it when a trainer exported it - see
    :func:`infer_configs`), or "full" (released) / "tiny" (tests) to force one.
    """
    from ...runtime.device import pick_device
    from ...runtime.safe_load import extract_prefix, load_state_dict, load_strict

    if config != "auto" and config not in CONFIGS:
        raise MedfmError(f"unknown Merlin config {config!r}: use auto or one of "
                         f"{', '.join(CONFIGS)}")
    t0 = time.perf_counter()
    dev = pick_device(device)
    path = _resolve(spec, weights, CLIP_CHECKPOINT)
    sd = load_state_dict(path)
    if not any(k.startswith(IMAGE_PREFIX) for k in sd):
        hint = ""
        if "conv1.weight" in sd and "classifier.weight" in sd \
                and sd["classifier.weight"].shape[0] == 6:
            hint = (" It looks like the 5-year checkpoint: pass it as five_year= / --five-year "
                    f"and give the CLIP checkpoint {CLIP_CHECKPOINT} as the weights.")
        raise WeightsError(f"{path.name} is not a Merlin CLIP checkpoint (no "
                           f"{IMAGE_PREFIX}* keys).{hint}")
    pre_cfg = DEFAULT_PREPROCESS
    if config == "auto":
        image_cfg, text_cfg, pre_cfg = infer_configs(sd, _read_sidecar(path))
        config_name = "auto"
    else:
        image_cfg, text_cfg = CONFIGS[config]
        config_name = config
    net = _empty_image_net(image_cfg)
    load_strict(net, extract_prefix(sd, IMAGE_PREFIX), what=path.name)
    del sd
    fy: Path | None = None
    if five_year is True:
        fy = _resolve(spec, None, FIVE_YEAR_CHECKPOINT)
    elif five_year:
        fy = Path(five_year).expanduser()
        if not fy.is_file():
            raise WeightsError(f"5-year checkpoint {fy} does not exist")
    elif (path.parent / FIVE_YEAR_CHECKPOINT).is_file():
        fy = path.parent / FIVE_YEAR_CHECKPOINT
    model = MerlinModel(spec, net, path, dev, precision, config_name=config_name, text=text,
                        tokenizer_dir=tokenizer, five_year_path=fy, fast=fast,
                        preprocess_config=pre_cfg, configs=(image_cfg, text_cfg))
    log.info("Merlin loaded from %s on %s in %.1f s", path.name, dev, time.perf_counter() - t0)
    warn = model.memory_warning()
    if warn:
        log.warning(warn)
    return model

