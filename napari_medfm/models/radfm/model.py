"""The loaded RadFM model (``load_model("radfm", weights=DIR, device=...)``) and its builder.

:class:`RadFMModel` implements the ``ReportGenerator`` (``dims``, ``stream``) and
``FindingsModel`` (``findings``) contracts plus the tensor-level API:

* ``logits(vision_x, input_ids, attention_mask=None)`` -> ``[B, L, V]`` float32;
* ``generate_ids(vision_x, input_ids, max_new_tokens=200)`` -> new ids ``[B, T]`` (greedy, KV
  cache, stops at eos; ``input_ids`` may be a list of prompts of different lengths: they are
  left-padded with an attention mask and matching position ids, so a batch gives the same ids
  as one prompt at a time, which the release gets wrong);
* ``generate(images, prompt, max_new_tokens=200, stream=callback)`` -> text.

Loading (:func:`build`): the network is constructed on the meta device, the checkpoint is read
memory-mapped (``torch.load(mmap=True, weights_only=True)`` or safetensors), exactly the
documented unused keys and the legacy ``rotary_emb.inv_freq`` buffers are dropped, and every
remaining key must match the network (missing/unexpected keys and shape mismatches are an
error naming them); tensors are then assigned in the target dtype/device (no second copy).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import MedfmError, WeightsError
from ...runtime.registry import ModelSpec
from .network import RadFMConfig, RadFMNetwork, count_parameters
from .preprocess import image_dims, modality_group, preprocess_image
from .spec import CHECKPOINT, CONFIG_FILE, TOKENIZER

log = logging.getLogger(__name__)

__all__ = ["RadFMModel", "build", "image_block", "interleaved_ids", "drop_unused_keys", "UNUSED_PREFIXES", "estimate_memory_bytes",
           "load_findings_questions", "find_checkpoint"]

#: Present in the released checkpoint but unused at inference (dropped before the strict load).
UNUSED_PREFIXES = (
    "embedding_layer.bert_model.",
    "embedding_layer.bert_projection_fc.",
    "embedding_layer.transformer_decoder",
    "embedding_layer.output_upscaling.",
    "embedding_layer.cls_head.",
)
_LEGACY_INV_FREQ = re.compile(r"^lang_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_QUANTIZE = (None, "8bit", "4bit")
_PUNCT = (".", "?", "!", ":", ";")
FINDINGS_FILE = Path(__file__).with_name("findings.yaml")


# --------------------------------------------------------------------------- keys / loading


def drop_unused_keys(sd: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(kept, dropped)``: exactly the documented unused keys and legacy inv_freq buffers go."""
    kept, dropped = {}, []
    for k, v in sd.items():
        if k.startswith(UNUSED_PREFIXES) or _LEGACY_INV_FREQ.match(k):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


def _listing(title: str, names: list[str], n: int = 10) -> str:
    more = f", ... (+{len(names) - n} more)" if len(names) > n else ""
    return f"{len(names)} {title}: {', '.join(names[:n])}{more}"


def _check_keys(expected: dict[str, torch.Size], sd: dict[str, Any], what: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} (model {tuple(s)})" for k, s in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or shapes:
        parts = [_listing(t, n) for t, n in (("missing keys", missing),
                                              ("unexpected keys", unexpected),
                                              ("shape mismatches", shapes)) if n]
        raise WeightsError(
            f"checkpoint {what} does not match RadFM: " + "; ".join(parts)
            + ". Is this a different model size (radfm_config.json) or the wrong file?")


def find_checkpoint(folder: Path) -> list[Path]:
    """``*.safetensors`` (all shards, sorted) if any, else ``pytorch_model.bin``."""
    shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if shards:
        return shards
    if (folder / CHECKPOINT).is_file():
        return [folder / CHECKPOINT]
    return []


def _read_checkpoint(files: list[Path]) -> dict[str, torch.Tensor]:
    """Memory-mapped state dict (lazy for safetensors), released keys as they are."""
    from ...runtime.safe_load import load_state_dict

    if len(files) == 1 and files[0].suffix != ".safetensors":
        return load_state_dict(files[0], mmap=True)  # torch.load(mmap=True, weights_only=True)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_state_dict(f)
        dup = set(part) & set(sd)
        if dup:
            raise WeightsError(f"{f.name} repeats keys of another shard: {sorted(dup)[:5]}")
        sd.update(part)
    return sd


# --------------------------------------------------------------------------- memory


def estimate_memory_bytes(cfg: RadFMConfig, *, dtype_bytes: int = 2, quantize: str | None = None,
                          batch: int = 1, context: int | None = None,
                          image_tokens: int = 4096) -> dict[str, int]:
    """Rough inference memory: weights, KV cache, vision activations, total (bytes)."""
    counts = count_parameters(cfg)
    llm = cfg.llm
    other = counts["total"] - counts["llm_linear"]
    if quantize == "8bit":
        weights = counts["llm_linear"] * 1 + other * dtype_bytes
    elif quantize == "4bit":
        weights = int(counts["llm_linear"] * 0.56) + other * dtype_bytes
    else:
        weights = counts["total"] * dtype_bytes
    ctx = int(context or llm.get("max_position_embeddings", 2048))
    nh = int(llm["num_attention_heads"])
    nkv = int(llm.get("num_key_value_heads") or nh)
    hd = int(llm.get("head_dim") or cfg.hidden_size // nh)
    kv = 2 * int(llm["num_hidden_layers"]) * batch * ctx * nkv * hd * dtype_bytes
    v = cfg.vision
    vision = batch * (v.heads * image_tokens * image_tokens + 4 * image_tokens * v.mlp_dim) \
        * dtype_bytes
    total = int((weights + kv + vision) * 1.1)
    return {"weights": int(weights), "kv_cache": int(kv), "vision": int(vision), "total": total,
            "parameters": counts["total"]}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _fit_message(cfg: RadFMConfig, need: int, free: int, device: Any) -> str:
    q8 = estimate_memory_bytes(cfg, quantize="8bit")["total"]
    q4 = estimate_memory_bytes(cfg, quantize="4bit")["total"]
    return (f"RadFM needs about {_gib(need)} on {device} but only {_gib(free)} is free. "
            f"Options: quantize='8bit' (~{_gib(q8)}) or quantize='4bit' (~{_gib(q4)}), both "
            "need bitsandbytes (`pip install napari-medfm[quant]`) and a CUDA GPU; "
            "device_map='auto' to offload layers to CPU RAM (accelerate, slower); "
            "device='cpu' (works, very slowly); or memory_check=False to try anyway.")


# --------------------------------------------------------------------------- questions


def load_findings_questions(prompts: Any = None, group: str | None = None
                            ) -> tuple[dict[str, str], dict[str, str]]:
    """``(questions {finding: question}, answers {"yes": text, "no": text})``.

    ``prompts``: None (the shipped file), a path to a YAML file like it, a group name of the
    shipped file ("CXR", "fundus", "pathology", "CT"), a parsed dict (full file layout, or a
    plain ``{finding: question}`` mapping) or a list of questions.
    """
    import yaml

    data: Any = prompts
    if prompts is None or (isinstance(prompts, str) and not Path(prompts).suffix
                           and not Path(prompts).exists()):
        group = prompts if isinstance(prompts, str) else group
        data = yaml.safe_load(FINDINGS_FILE.read_text())
    elif isinstance(prompts, (str, Path)):
        p = Path(prompts).expanduser()
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise MedfmError(f"cannot read findings questions {p}: {exc}") from None
    answers = {"yes": "Yes.", "no": "No."}
    if isinstance(data, (list, tuple)):
        return {str(q): str(q) for q in data}, answers
    if not isinstance(data, dict):
        raise MedfmError("findings questions must be a mapping or a list of questions")
    if "modalities" in data or "answers" in data:
        ans = data.get("answers") or {}
        answers = {"yes": str(ans.get("yes", answers["yes"])), "no": str(ans.get("no", answers["no"]))}
        groups = data.get("modalities") or {}
        if group is None:
            if len(groups) == 1:
                group = next(iter(groups))
            else:
                raise MedfmError("the image's modality is not one the findings questions cover; "
                                 f"pass prompts= one of {', '.join(groups)} or your own questions")
        if group not in groups:
            raise MedfmError(f"no RadFM findings questions for {group!r}; groups: "
                             f"{', '.join(groups)} (pass prompts= a group or your own questions)")
        data = groups[group]
    qs = {str(k): str(v) for k, v in dict(data).items()}
    if not qs:
        raise MedfmError("no findings questions given")
    return qs, answers


# --------------------------------------------------------------------------- token stream


def image_block(cfg: RadFMConfig, index: int) -> list[int]:
    """``<image>`` = V, the ids V+2+k of image ``index``'s latents, ``</image>`` = V+1."""
    n = cfg.perceiver.num_latents
    return ([cfg.image_token] + [cfg.patch_token(index * n + j) for j in range(n)]
            + [cfg.end_image_token])


def interleaved_ids(cfg: RadFMConfig, encode: Callable[[str], list[int]], prompt: str,
                    n_images: int, *, bos: bool = True) -> list[int]:
    """BOS + image blocks + text: each image where the prompt says ``<image>`` (one marker per
    image, in order), else all images first. ``encode`` gives ids without BOS (LLaMA's legacy
    tokenizer after a special token). Used by the model and by the trainer."""
    if not prompt or not prompt.strip():
        raise MedfmError("RadFM: the prompt is empty; ask a question or request a report")
    pieces = prompt.split("<image>")
    ids = [cfg.bos_id] if bos else []
    if len(pieces) == 1:
        for i in range(n_images):
            ids += image_block(cfg, i)
        return ids + list(encode(prompt.strip()))
    if len(pieces) - 1 != n_images:
        raise MedfmError(f"the prompt has {len(pieces) - 1} <image> markers for "
                         f"{n_images} image(s)")
    for i, text in enumerate(pieces):
        if text.strip():
            ids += list(encode(text.strip()))
        if i < n_images:
            ids += image_block(cfg, i)
    return ids


# --------------------------------------------------------------------------- the model


class RadFMModel:
    """RadFM ready for inference (see the module docstring)."""

    model_id = "radfm"
    dims = (2, 3)

    def __init__(self, spec: ModelSpec, net: RadFMNetwork, cfg: RadFMConfig, *,
                 device: torch.device, dtype: torch.dtype, files: Sequence[Path],
                 tokenizer_path: Path | None, options: dict[str, Any],
                 estimate: dict[str, int]) -> None:
        self.spec = spec
        self.net = net
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.files = [Path(f) for f in files]
        self.tokenizer_path = tokenizer_path
        self.options = dict(options)
        self.memory_estimate = dict(estimate)
        self._sp: Any = None
        self._sha256: str | None = None

    # ---- provenance

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the checkpoint (cached by the weights manager); for safetensors shards the
        sha256 of the sorted ``"<sha256>  <name>"`` lines of all shards."""
        if self._sha256 is None and self.files:
            from ...runtime.weights import WeightsManager

            wm = WeightsManager()
            if len(self.files) == 1:
                self._sha256 = wm.file_hash(self.files[0])
            else:
                lines = "\n".join(f"{wm.file_hash(f)}  {f.name}" for f in self.files)
                self._sha256 = hashlib.sha256(lines.encode()).hexdigest()
        return self._sha256

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "weights": [str(f) for f in self.files],
            "weights_sha256": self.weights_sha256,
            "tokenizer": str(self.tokenizer_path) if self.tokenizer_path else None,
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "options": {k: v for k, v in self.options.items() if v is not None},
            "config": self.cfg.to_dict(),
            "parameters": self.memory_estimate.get("parameters"),
            "memory_estimate_gib": round(self.memory_estimate.get("total", 0) / 2**30, 2),
            "note": ("running on the CPU: expect minutes per report at full size"
                     if self.device.type == "cpu" else None),
        }

    # ---- tokenizer

    @property
    def tokenizer(self) -> Any:
        """The SentencePiece processor (``tokenizer.model`` of the model folder)."""
        if self._sp is None:
            if self.tokenizer_path is None:
                raise WeightsError(
                    "RadFM: no tokenizer.model in the model folder: put the LLaMA SentencePiece "
                    f"tokenizer ({TOKENIZER}, from RadFM's Quick_demo/Language_files) next to "
                    "the weights or pass tokenizer=PATH. Token-level use (logits, "
                    "generate_ids) needs no tokenizer.")
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))
            if sp.get_piece_size() > self.cfg.vocab_size:
                raise WeightsError(f"{self.tokenizer_path.name} has {sp.get_piece_size()} pieces "
                                   f"but the model's vocabulary is {self.cfg.vocab_size}")
            self._sp = sp
        return self._sp

    def encode_text(self, text: str) -> list[int]:
        """Text ids without BOS, as LLaMA's legacy tokenizer gives them after a special token."""
        return list(self.tokenizer.encode(text))

    def image_block(self, index: int) -> list[int]:
        """``<image>``, the 32 ids of image ``index`` of the sample, ``</image>``."""
        return image_block(self.cfg, index)

    def prompt_ids(self, prompt: str, n_images: int) -> list[int]:
        """BOS + the image blocks + the question (see :func:`interleaved_ids`)."""
        return interleaved_ids(self.cfg, self.encode_text, prompt, n_images)

    # ---- tensors

    def _pad(self, input_ids: Any, attention_mask: Any = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad a list of prompts (or take a tensor + mask) -> (ids, mask) on the device."""
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.long()
            if ids.ndim == 1:
                ids = ids[None]
            mask = (torch.ones_like(ids) if attention_mask is None
                    else torch.as_tensor(attention_mask).long().reshape(ids.shape))
            return ids.to(self.device), mask.to(self.device)
        seqs = [list(map(int, s)) for s in input_ids]
        if seqs and not isinstance(input_ids[0], (list, tuple, np.ndarray, torch.Tensor)):
            seqs = [list(map(int, input_ids))]
        if not seqs or not all(seqs):
            raise MedfmError("RadFM: empty input_ids")
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.cfg.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def _vision(self, vision_x: Any) -> torch.Tensor | None:
        if vision_x is None:
            return None
        x = torch.as_tensor(vision_x, dtype=torch.float32)
        if x.ndim == 5:
            x = x[:, None]
        with torch.inference_mode():
            return self.net.embedding_layer.encode_images(x.to(self.device))

    def logits(self, vision_x: Any, input_ids: Any, attention_mask: Any = None) -> torch.Tensor:
        """``[B, L, V]`` float32 logits for preprocessed images ``[B, S, 3, H, W, D]``."""
        ids, mask = self._pad(input_ids, attention_mask)
        with torch.inference_mode():
            vis = self._vision(vision_x)
            emb = self.net.embedding_layer.lookup(ids, vis)
            out = self.net.lang_model(inputs_embeds=emb, attention_mask=mask,
                                      position_ids=self._positions(mask), use_cache=False)
        return out.logits.float()

    def iter_ids(self, vision_x: Any, input_ids: Any, max_new_tokens: int = 200,
                 attention_mask: Any = None, *, vision: torch.Tensor | None = None
                 ) -> Iterator[torch.Tensor]:
        """Greedy decoding with the KV cache, one ``[B]`` tensor of ids per step.

        Rows that reached eos yield ``pad`` afterwards; stops when all did or after
        ``max_new_tokens``; closing the iterator stops at the next token.
        """
        ids, mask = self._pad(input_ids, attention_mask)
        limit = int(self.cfg.llm.get("max_position_embeddings", 2048)) - ids.shape[1]
        if max_new_tokens > limit:
            log.warning("RadFM: prompt of %d tokens leaves room for %d new tokens (of %d asked)",
                        ids.shape[1], max(limit, 0), max_new_tokens)
            max_new_tokens = max(limit, 0)
        if max_new_tokens <= 0:
            return
        eos, pad = self.cfg.eos_id, self.cfg.pad_id
        lm = self.net.lang_model
        table = self.net.embedding_layer
        with torch.inference_mode():
            vis = vision if vision is not None else self._vision(vision_x)
            pos = self._positions(mask)
            out = lm(inputs_embeds=table.lookup(ids, vis), attention_mask=mask, position_ids=pos,
                     use_cache=True, logits_to_keep=1)
            cache = out.cache
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
            pos = pos[:, -1:]
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].float().argmax(-1).to(self.device)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                yield nxt
                done |= nxt == eos
                if bool(done.all()) or step == max_new_tokens - 1:
                    return
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos + 1
                out = lm(inputs_embeds=table.lookup(nxt[:, None], None), attention_mask=mask,
                         position_ids=pos, cache=cache, use_cache=True)
                cache = out.cache

    def generate_ids(self, vision_x: Any, input_ids: Any, max_new_tokens: int = 200,
                     attention_mask: Any = None) -> torch.Tensor:
        """New ids only, ``[B, T]`` (eos included; rows that stopped earlier padded with pad)."""
        steps = list(self.iter_ids(vision_x, input_ids, max_new_tokens, attention_mask))
        if not steps:
            return torch.zeros((self._pad(input_ids, attention_mask)[0].shape[0], 0),
                               dtype=torch.long)
        return torch.stack(steps, dim=1).cpu()

    # ---- text

    def preprocess(self, images: Any, *, window: tuple[float, float] | None = None
                   ) -> list[torch.Tensor]:
        """Images (MedicalImage, 2D or 3D, or preprocessed ``[3, H, W, D]`` tensors) ->
        preprocessed tensors."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise MedfmError("RadFM needs at least one image")
        v = self.cfg.vision
        out = []
        for im in images:
            if isinstance(im, torch.Tensor):
                out.append(im.float())
                continue
            if image_dims(im) not in self.dims:
                raise MedfmError(f"RadFM takes 2D or 3D images, got shape {np.shape(im.data)}")
            out.append(preprocess_image(im, image_size=v.image_size,
                                        max_depth=min(64, v.frames), window=window))
        return out

    def _encode_sample(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One sample's images (shapes may differ: each goes through the ViT alone)."""
        with torch.inference_mode():
            parts = [self.net.embedding_layer.encode_images(t[None, None].to(self.device))
                     for t in tensors]
        return torch.cat(parts, dim=1)

    def _fix_prompt(self, prompt: str) -> str:
        p = (prompt or "").strip()
        if p and not p.endswith(_PUNCT):
            p += "."  # RadFM tends to answer nothing to an unpunctuated prompt
        return p

    def stream(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 200,
               window: tuple[float, float] | None = None) -> Iterator[str]:
        """Decoded text pieces as they are generated (the ReportGenerator contract).

        ``window``: an optional (center, width) clip for volumes before min-max (the release
        uses none). Closing the iterator stops generation at the next token.
        """
        sp = self.tokenizer
        prompt = self._fix_prompt(prompt)
        tensors = self.preprocess(images, window=window)
        ids = self.prompt_ids(prompt, len(tensors))
        vis = self._encode_sample(tensors)
        out: list[int] = []
        emitted = ""
        eos = self.cfg.eos_id
        gen = self.iter_ids(None, [ids], max_new_tokens, vision=vis)
        try:
            for nxt in gen:
                tok = int(nxt[0])
                if tok == eos:
                    break
                out.append(tok)
                text = sp.decode(out)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence (byte fallback): wait for the rest
                piece = text[len(emitted):] if text.startswith(emitted) else text[len(emitted):]
                if piece:
                    emitted = text
                    yield piece
            final = sp.decode(out) if out else ""
            if len(final) > len(emitted):
                yield final[len(emitted):]
        finally:
            gen.close()

    def generate(self, images: Any, prompt: str, max_new_tokens: int = 200,
                 stream: Callable[[str], Any] | None = None,
                 window: tuple[float, float] | None = None) -> str:
        """The generated text; ``stream(piece)`` is called with each piece as it arrives
        (without ``stream`` the ids are decoded once at the end, the same text)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if stream is not None:
            pieces = []
            for piece in self.stream(images, prompt, max_new_tokens=max_new_tokens,
                                     window=window):
                pieces.append(piece)
                stream(piece)
            return "".join(pieces).strip()
        sp = self.tokenizer
        prompt = self._fix_prompt(prompt)
        tensors = self.preprocess(images, window=window)
        ids = self.prompt_ids(prompt, len(tensors))
        vis = self._encode_sample(tensors)
        out = []
        for nxt in self.iter_ids(None, [ids], max_new_tokens, vision=vis):
            tok = int(nxt[0])
            if tok == self.cfg.eos_id:
                break
            out.append(tok)
        return sp.decode(out).strip() if out else ""

    # ---- findings

    def findings(self, image: Any, *, prompts: Any = None, batch_size: int = 8,
                 window: tuple[float, float] | None = None) -> list[dict[str, Any]]:
        """Yes/no probability per finding (the FindingsModel contract).

        For each question the likelihoods of the two answers (sum of their tokens' log-probs
        after the image and the question) are turned into ``p(yes) = softmax(ll_yes, ll_no)``.
        """
        group = modality_group(image) if not isinstance(image, torch.Tensor) else None
        questions, answers = load_findings_questions(prompts, group)
        tensors = self.preprocess([image], window=window)
        vis = self._encode_sample(tensors)
        ans_ids = {k: self.encode_text(v) for k, v in answers.items()}
        seqs, meta = [], []
        for finding, q in questions.items():
            base = self.prompt_ids(self._fix_prompt(q), 1)
            for key in ("yes", "no"):
                seqs.append(base + ans_ids[key])
                meta.append((finding, key, len(ans_ids[key])))
        ll: list[float] = []
        keep = max(len(a) for a in ans_ids.values()) + 1
        with torch.inference_mode():
            for s in range(0, len(seqs), batch_size):
                chunk = seqs[s:s + batch_size]
                ids, mask = self._pad(chunk)
                emb = self.net.embedding_layer.lookup(ids, vis.expand(len(chunk), -1, -1))
                out = self.net.lang_model(inputs_embeds=emb, attention_mask=mask,
                                          position_ids=self._positions(mask), use_cache=False,
                                          logits_to_keep=keep)
                logp = torch.log_softmax(out.logits.float(), dim=-1)  # [b, keep, V]
                for r, (_, _, n) in enumerate(meta[s:s + batch_size]):
                    target = ids[r, -n:]
                    pred = logp[r, keep - 1 - n:keep - 1]  # logits at t predict token t + 1
                    ll.append(float(pred.gather(-1, target[:, None]).sum()))
        rows = []
        for i, finding in enumerate(questions):
            ly, ln = ll[2 * i], ll[2 * i + 1]
            p = torch.softmax(torch.tensor([ly, ln], dtype=torch.float64), 0)
            rows.append({"finding": finding, "probability": float(p[0]),
                         "question": questions[finding], "loglik_yes": ly, "loglik_no": ln})
        return rows


# --------------------------------------------------------------------------- builder


def _resolve_folder(spec: ModelSpec, weights: Any) -> tuple[Path, list[Path]]:
    from ...runtime.weights import WeightsManager, how_to_get

    wm = WeightsManager()
    if weights is None:
        folder = wm.model_dir(spec)
    else:
        p = Path(weights).expanduser()
        if not p.exists():
            raise WeightsError(f"weights for radfm: {p} does not exist. " + how_to_get(spec, wm.root))
        if p.is_file():
            return p.parent, [p]
        folder = p
    files = find_checkpoint(folder)
    if not files:
        parts = [n for n in spec.extras.get("archive", {}).get("parts", ())
                 if (folder / n).exists()]
        hint = (f" The split zip is there ({', '.join(parts)}): `medfm weights fetch radfm` "
                "unpacks it." if parts else "")
        raise WeightsError(f"weights for radfm not found: no {CHECKPOINT} or *.safetensors in "
                           f"{folder}.{hint} " + how_to_get(spec, wm.root))
    return folder, files


def _quantize_llm(net: RadFMNetwork, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Replace the LLM's decoder Linear layers by bitsandbytes 8-bit / 4-bit ones (on CUDA)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MedfmError(f"quantize={mode!r} needs bitsandbytes: `pip install napari-medfm[quant]` "
                         "(CUDA GPUs only)") from None
    for layer in net.lang_model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                w = lin.weight.data.to(torch.float16 if mode == "8bit" else dtype)
                if mode == "8bit":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False,
                                                 has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                          compute_dtype=dtype, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))  # quantised when moved to the GPU


def build(spec: ModelSpec, weights: Any = None, device: Any = None, *, precision: str = "auto",
          quantize: str | None = None, device_map: Any = None, max_memory: Any = None,
          tokenizer: str | Path | None = None, memory_check: bool = True) -> RadFMModel:
    """Build RadFM from a model folder and load it strictly.

    ``weights``: a folder (``pytorch_model.bin`` or ``*.safetensors``, optional
    ``tokenizer.model`` and ``radfm_config.json``) or a checkpoint file; default
    ``$MEDFM_HOME/weights/radfm``. ``precision``: auto (bf16 on GPU, fp32 on CPU), bf16, fp16,
    fp32. ``quantize``: None, "8bit" or "4bit" (bitsandbytes, CUDA). ``device_map``: "auto" or
    an accelerate device map to offload LLM layers (with ``max_memory``). ``memory_check``:
    refuse (with the options) when the estimate does not fit the free memory.
    """
    from ...runtime.device import available_memory, pick_device, precision_dtype

    t0 = time.perf_counter()
    if quantize not in _QUANTIZE:
        raise MedfmError(f"quantize must be one of None, '8bit', '4bit', got {quantize!r}")
    dev = pick_device(device)
    dtype = precision_dtype(dev, precision)
    if quantize and dev.type != "cuda":
        raise MedfmError(f"quantize={quantize!r} needs a CUDA GPU (bitsandbytes); on {dev} use "
                         "precision='bf16' or the full model")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise MedfmError("device_map needs accelerate: `pip install accelerate`") from None
    folder, files = _resolve_folder(spec, weights)
    cfg_path = folder / CONFIG_FILE
    cfg = RadFMConfig.from_file(cfg_path) if cfg_path.is_file() else RadFMConfig()
    tok = Path(tokenizer).expanduser() if tokenizer else folder / TOKENIZER
    if tokenizer and not tok.is_file():
        raise WeightsError(f"tokenizer {tok} does not exist")
    est = estimate_memory_bytes(cfg, dtype_bytes=torch.finfo(dtype).bits // 8, quantize=quantize)
    log.info("RadFM: %.1f B parameters, estimated %s on %s (%s%s)", est["parameters"] / 1e9,
             _gib(est["total"]), dev, str(dtype).replace("torch.", ""),
             f", {quantize}" if quantize else "")
    free = available_memory(dev)
    if memory_check and device_map is None and free is not None and est["total"] > free * 0.95:
        msg = _fit_message(cfg, est["total"], free, dev)
        if dev.type == "cpu":
            log.warning("%s (the CPU pages weights in from the memory-mapped file)", msg)
        else:
            raise MedfmError(msg)
    if dev.type == "cpu" and est["parameters"] > 1e9:
        log.warning("RadFM runs on the CPU: it works, but slowly (minutes per report at 13B)")

    with torch.device("meta"):
        net = RadFMNetwork(cfg)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    sd, dropped = drop_unused_keys(_read_checkpoint(files))
    if dropped:
        log.info("RadFM: dropped %d unused/legacy keys", len(dropped))
    _check_keys(expected, sd, files[0].name if len(files) == 1 else f"{folder.name}/*.safetensors")
    load_dev = torch.device("cpu") if (device_map is not None or quantize) else dev
    sd = {k: (v.to(load_dev, dtype) if v.is_floating_point() else v.to(load_dev))
          for k, v in sd.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    del sd
    net.tie()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(load_dev):  # non-persistent buffers were left on the meta device
        net.lang_model.model.rotary_emb = LlamaRotaryEmbedding(config=net.lang_model.config)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"RadFM: not loaded from the checkpoint: {left[:10]}")
    net.eval().requires_grad_(False)
    if quantize:
        _quantize_llm(net, quantize, dev, dtype)
        net.to(dev)
    elif device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        # the lookup table stays whole on the main device (accelerate may offload embed_tokens)
        table = torch.nn.Parameter(net.embedding_layer.weight.data.to(dev), requires_grad=False)
        net.embedding_layer.to(dev)
        net.embedding_layer.weight = table
        dm = device_map
        if dm == "auto":
            dm = infer_auto_device_map(net.lang_model, max_memory=max_memory,
                                       no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
        net.lang_model = dispatch_model(net.lang_model, device_map=dm,
                                        main_device=str(dev) if dev.type != "cpu" else None)
    options = {"precision": precision, "quantize": quantize,
               "device_map": device_map if isinstance(device_map, str) else
               (None if device_map is None else "custom"), "memory_check": memory_check}
    model = RadFMModel(spec, net, cfg, device=dev, dtype=dtype, files=files,
                       tokenizer_path=tok if tok.is_file() else None, options=options,
                       estimate=est)
    log.info("RadFM loaded from %s on %s in %.1f s", folder, dev, time.perf_counter() - t0)
    return model
