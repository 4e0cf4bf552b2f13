"""The loaded report generator (``load_model("merlin-report", weights=DIR)``) and its builder.

Model-folder contract (``DIR`` = ``--weights``, default ``$MEDFM_HOME/weights/merlin-report``):

* the checkpoint: either released file name (``..._average_mtl.pt``, the default, or
  ``..._average.pt``), or any ``.pt``/``.safetensors`` given as the weights file itself;
* ``tokenizer/tokenizer.model`` (or ``tokenizer.model`` beside the checkpoint, or
  ``tokenizer=PATH``): RadLLaMA-7b's SentencePiece model, loaded with transformers' standard
  ``LlamaTokenizer`` (BOS added, no EOS, no remote code);
* optional ``merlin_report_config.json`` (:class:`~.network.MerlinReportConfig`): every key it
  lacks takes the released value.

Conformance with the release (see ``docs/reports.md``):

* the prompt as the tokenizer gives it (leading BOS included) loses its first token, and
  ``[adapter(image tokens)] + [prompt embeddings]`` enter the LLM as ``inputs_embeds`` (image
  first, no BOS, no separator, no attention mask);
* greedy decoding with a KV cache; the repetition penalty (1.2) sees the generated tokens
  only; stop at EOS; at most 128 new tokens;
* the report is the 13 organ prompts, each answer cut at its first ``###`` and joined with
  spaces in organ order. The image is encoded once, and the LLM's keys/values of the image
  prefix are computed once too (every organ prompt starts with the same image tokens), then
  each organ continues from that cache. Generation for an organ stops as soon as ``###``
  appears (``early_stop``), which gives the same text as generating 128 tokens and cutting.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import (
    MedfmError,
    MissingTokenizerError,
    VolumeTooLargeError,
    WeightsError,
)
from ...io.types import MedicalImage
from ...runtime.registry import ModelSpec
from ..merlin.preprocess import DEFAULT_PREPROCESS, PreprocessConfig, check_ct, preprocess
from .network import MerlinReportConfig, MerlinReportNet
from .spec import (
    CHECKPOINTS,
    CONFIG_FILE,
    ORGAN_PROMPT,
    ORGANS,
    SECTION_END,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    TOKENIZER_REPO,
)

log = logging.getLogger(__name__)

__all__ = ["MerlinReportModel", "build", "load_tokenizer", "find_checkpoint", "TextStream",
           "apply_repetition_penalty"]

MAX_NEW_TOKENS = 128
REPETITION_PENALTY = 1.2


# ---------------------------------------------------------------------------------- helpers
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None,
                             penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: a seen token's logit is divided by ``penalty`` when
    positive, multiplied when negative. ``logits`` ``[B, V]``, ``seen`` ``[B, T]`` ids."""
    if seen is None or seen.numel() == 0 or penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


class TextStream:
    """Incremental detokenisation: ``push(id)`` returns the text the new id adds.

    The pieces always add up to ``tokenizer.decode(ids, skip_special_tokens=True)``: text is
    emitted only up to the last token that is not a byte-fallback piece (``<0xNN>``), because
    the decoder merges a run of byte pieces into characters only once the run is complete (an
    incomplete UTF-8 tail, or invalid bytes, would otherwise be emitted and then revised);
    everything else decodes prefix-stably. :meth:`flush` emits the rest at the end.
    """

    _BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self._stable = 0  # ids[:_stable] are decoded into ``text``
        self._is_byte: dict[int, bool] = {}

    def _byte(self, tid: int) -> bool:
        b = self._is_byte.get(tid)
        if b is None:
            tok = self.tokenizer.convert_ids_to_tokens(tid)
            # ids the tokenizer does not know decode to nothing: they cannot end a byte run
            b = self._is_byte[tid] = tok is None or bool(self._BYTE.match(str(tok)))
        return b

    def _emit_upto(self, k: int) -> str:
        full = self.tokenizer.decode(self.ids[:k], skip_special_tokens=True)
        if not full.startswith(self.text):  # cannot happen with a LLaMA decoder; never drop text
            raise RuntimeError("tokenizer decoding is not prefix-stable")
        piece, self.text, self._stable = full[len(self.text):], full, k
        return piece

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._byte(int(token_id)):
            return ""  # inside a byte run: wait for it to end
        return self._emit_upto(len(self.ids))

    def flush(self) -> str:
        return self._emit_upto(len(self.ids)) if len(self.ids) > self._stable else ""


class _SectionCut:
    """Passes text through up to the first ``marker`` (held back while it may be starting)."""

    def __init__(self, marker: str = SECTION_END) -> None:
        self.marker = marker
        self.buf = ""
        self.sent = 0
        self.done = False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.buf += piece
        cut = self.buf.find(self.marker)
        if cut >= 0:
            self.done = True
            out, self.sent = self.buf[self.sent:cut], cut
            return out
        safe = len(self.buf)
        for k in range(len(self.marker) - 1, 0, -1):  # a partial marker at the end waits
            if self.buf.endswith(self.marker[:k]):
                safe -= k
                break
        out, self.sent = self.buf[self.sent:safe], max(self.sent, safe)
        return out

    def finish(self) -> str:
        if self.done:
            return ""
        self.done = True
        out, self.sent = self.buf[self.sent:], len(self.buf)
        return out


def _tokenizer_candidates(weights_dir: Path, explicit: Any) -> list[Path]:
    if explicit is not None:
        p = Path(explicit).expanduser()
        return [p / TOKENIZER_FILE if p.is_dir() or not p.suffix else p]
    return [weights_dir / TOKENIZER_DIR / TOKENIZER_FILE, weights_dir / TOKENIZER_FILE]


def load_tokenizer(weights_dir: str | Path, explicit: Any = None) -> Any:
    """RadLLaMA-7b's ``tokenizer.model`` through transformers' ``LlamaTokenizer`` (no remote
    code): only the SentencePiece file is read, BOS added, EOS not."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    cands = _tokenizer_candidates(Path(weights_dir), explicit)
    found = next((c for c in cands if c.is_file()), None)
    if found is None:
        raise MissingTokenizerError(
            f"merlin-report: tokenizer not found (looked for {', '.join(map(str, cands))}). "
            f"Download {TOKENIZER_FILE} from {TOKENIZER_REPO} (only that file; its custom "
            f"tokenizer class is not needed) into {Path(weights_dir) / TOKENIZER_DIR}/, or pass "
            "tokenizer=PATH / --tokenizer PATH.")
    # a folder with only the SentencePiece model: any tokenizer_config.json / auto_map of the
    # original repository (custom class, remote code) is ignored
    with tempfile.TemporaryDirectory(prefix="medfm-tok-") as tmp:
        shutil.copyfile(found, Path(tmp) / TOKENIZER_FILE)
        try:
            tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False,
                                                 unk_token="<unk>", bos_token="<s>",
                                                 eos_token="</s>")
        except Exception as exc:  # a corrupt file: name it
            raise MissingTokenizerError(f"cannot read {found} as a SentencePiece model: {exc}"
                                        ) from None
    tok.source_path = str(found)
    return tok


def find_checkpoint(spec: ModelSpec, weights: Any) -> Path:
    """The checkpoint file: ``weights`` itself, or a released file name inside the folder
    (the default ``..._mtl.pt`` first). Released names are hash-verified where pinned."""
    from ...runtime.weights import WeightsManager

    wm = WeightsManager()
    if weights is None:
        folder = wm.model_dir(spec)
    else:
        folder = Path(weights).expanduser()
        if folder.is_file():
            return Path(wm.resolve(spec, explicit=folder))
        if not folder.exists():
            raise WeightsError(f"weights for merlin-report: {folder} does not exist")
    for name in CHECKPOINTS:
        if (folder / name).is_file():
            return Path(wm.resolve(spec, explicit=folder / name))
    others = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    if len(others) == 1:
        return folder / others[0]
    raise WeightsError(
        f"weights for merlin-report not found in {folder}: expected {CHECKPOINTS[0]} (or "
        f"{CHECKPOINTS[1]}) from stanfordmimi/Merlin, plus {TOKENIZER_DIR}/{TOKENIZER_FILE} "
        f"from {TOKENIZER_REPO}. `medfm weights fetch merlin-report` downloads the checkpoint.")


def _crop(cache: Any, length: int) -> None:
    """Cut a transformers cache back to its first ``length`` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative count of positions to remove
    if cache.get_seq_length() != length:
        raise RuntimeError(f"cache crop failed: {cache.get_seq_length()} != {length}")


def _as_image_tensor(image: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"image must be a preprocessed (B, 1, H, W, D) tensor, got "
                         f"{tuple(x.shape)}")
    return x.float()


def _as_ids(ids: Any) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"prompt_ids must be [B, L], got {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------- model
class MerlinReportModel:
    """Merlin's report generator ready for inference (see the module docstring)."""

    model_id = "merlin-report"
    dims: tuple[int, ...] = (3,)

    def __init__(self, spec: ModelSpec, net: MerlinReportNet, tokenizer: Any,
                 weights_path: Path, device: torch.device, dtype: torch.dtype,
                 config: MerlinReportConfig, *, precision: str = "auto") -> None:
        self.spec = spec
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.weights_path = Path(weights_path)
        self.device = device
        self.dtype = dtype
        self.precision = precision
        self.config = config
        self.preprocess_config: PreprocessConfig = replace(DEFAULT_PREPROCESS,
                                                           spatial_size=config.image_size)
        self.bos_id = int(config.llm.get("bos_token_id", 1))
        self.eos_id = int(config.llm.get("eos_token_id", 2))
        self._sha256: str | None = None

    # ------------------------------------------------------------------ info
    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            from ...runtime.weights import WeightsManager

            self._sha256 = WeightsManager().file_hash(self.weights_path)
        return self._sha256

    @property
    def merged(self) -> bool:
        return self.net.merged

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "weights": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "tokenizer": getattr(self.tokenizer, "source_path", None),
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", ""),
            "lora": "merged" if self.merged else "unmerged",
            "image_fused": self.net.encode_image.fused,
            "config": self.config.to_dict(),
            "preprocessing": self.preprocess_config.to_dict(),
            "generation": {"decoding": "greedy", "repetition_penalty": REPETITION_PENALTY,
                           "max_new_tokens": MAX_NEW_TOKENS, "organs": list(ORGANS),
                           "organ_prompt": ORGAN_PROMPT},
        }

    def merge_lora(self) -> None:
        """Merge the LoRA into the base weights once (same outputs up to rounding, faster)."""
        self.net.merge_lora()

    # ------------------------------------------------------------------ inputs
    def check_input(self, image: MedicalImage) -> None:
        """A 3D CT, small enough to preprocess in the free memory."""
        check_ct(image, what="Merlin's report generator")
        self._check_volume_memory(image)

    def _check_volume_memory(self, image: MedicalImage) -> None:
        from ...runtime.device import available_memory

        n_in = int(np.prod(image.shape))
        sp = np.asarray(image.geometry.spacing, float)  # x, y, z
        extent = np.asarray(image.shape[::-1], float) * sp
        n_out = int(np.prod(np.ceil(extent / np.asarray(self.preprocess_config.pixdim))))
        # float32 copy + reoriented copy of the input, resampled output + its scaled copy
        need = 4 * (2 * n_in + 2 * n_out)
        free = available_memory("cpu")
        if free is not None and need > 0.9 * free:
            raise VolumeTooLargeError(
                f"{image.name}: volume {image.shape} needs about {need / 2**30:.1f} GiB to "
                f"preprocess but only {free / 2**30:.1f} GiB of RAM is free; crop it to the "
                "abdomen or downsample it first.")

    def prepare(self, image: Any) -> torch.Tensor:
        """MedicalImage / napari layer -> ``(1, 1, H, W, D)`` (Merlin's preprocessing);
        an already preprocessed tensor passes through."""
        if isinstance(image, (torch.Tensor, np.ndarray)):
            return _as_image_tensor(image)
        if not isinstance(image, MedicalImage):
            if hasattr(image, "data") and hasattr(image, "metadata"):  # a napari layer
                image = MedicalImage.from_layer(image)
            else:
                raise TypeError(f"expected a MedicalImage, a napari layer or a tensor, got "
                                f"{type(image).__name__}")
        self.check_input(image)
        if not isinstance(image.data, np.ndarray):
            image = replace(image, data=np.asarray(image.data))
        return preprocess(image, self.preprocess_config, check=False).tensor[None]

    def tokenize(self, prompt: str) -> torch.Tensor:
        """``[1, L]`` ids as the tokenizer gives them (leading BOS included)."""
        return torch.as_tensor([self.tokenizer(prompt)["input_ids"]], dtype=torch.long)

    # ------------------------------------------------------------------ forward pieces
    def _run(self, fn: Any, what: str) -> Any:
        from ...runtime.device import run_inference

        return run_inference(fn, self.device, what)

    def encode(self, image: Any) -> torch.Tensor:
        """Image tokens after the adapter: ``[B, N, hidden]`` in the LLM's dtype."""
        x = _as_image_tensor(image).to(self.device)

        def _fn() -> torch.Tensor:
            tokens = self.net.encode_image(x)
            return self.net.adapter(tokens).to(self.dtype)

        return self._run(_fn, "Merlin's image trunk")

    def _prompt_embeds(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        ids = _as_ids(prompt_ids)
        if ids.shape[1] < 2:
            raise MedfmError("the prompt is empty: prompt_ids hold no token after BOS")
        if bool((ids[:, 0] != self.bos_id).any()):
            raise MedfmError(f"prompt_ids must start with BOS ({self.bos_id}) as the tokenizer "
                             "gives them; the model drops it as the release does")
        ids = ids[:, 1:].to(self.device)
        return self._run(lambda: self.net.embed_prompt(ids), "the LLM embedding")

    def logits(self, image: Any, prompt_ids: Any) -> torch.Tensor:
        """Logits ``[B, N + L - 1, V]`` (float32) over [image tokens, prompt tokens minus BOS]."""
        img = self.encode(image)
        txt = self._prompt_embeds(prompt_ids)
        if txt.shape[0] != img.shape[0]:
            txt = txt.expand(img.shape[0], -1, -1) if txt.shape[0] == 1 else txt
        embeds = torch.cat([img, txt], dim=1)
        out = self._run(lambda: self.net.llm(inputs_embeds=embeds, use_cache=False),
                        "the LLM")
        return out.logits.float()

    # ------------------------------------------------------------------ generation
    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.net.llm.config)

    def _greedy(self, embeds: torch.Tensor, cache: Any, max_new_tokens: int,
                repetition_penalty: float) -> Iterator[torch.Tensor]:
        """Yield the next ids ``[B]`` one step at a time (KV cache; rows finished at EOS
        keep yielding EOS). Nothing is computed after the last yield, and closing the
        iterator stops before the next forward pass."""
        if max_new_tokens < 1:
            return
        llm = self.net.llm
        out = self._run(lambda: llm(inputs_embeds=embeds, cache=cache,
                                    use_cache=True), "the LLM")
        b = embeds.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        seen: torch.Tensor | None = None
        for step in range(max_new_tokens):
            scores = out.logits[:, -1, :].float()
            scores = apply_repetition_penalty(scores, seen, repetition_penalty)
            nxt = scores.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            seen = nxt[:, None] if seen is None else torch.cat([seen, nxt[:, None]], dim=1)
            done = done | (nxt == self.eos_id)
            yield nxt
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            out = self._run(lambda n=nxt: llm(input_ids=n[:, None], cache=cache,
                                              use_cache=True), "the LLM")

    def generate_ids(self, image: Any, prompt_ids: Any, max_new_tokens: int = MAX_NEW_TOKENS,
                     repetition_penalty: float = REPETITION_PENALTY) -> torch.Tensor:
        """Greedy ids ``[B, T]``: the new tokens only (EOS included when reached)."""
        img = self.encode(image)
        txt = self._prompt_embeds(prompt_ids)
        if txt.shape[0] == 1 and img.shape[0] > 1:
            txt = txt.expand(img.shape[0], -1, -1)
        embeds = torch.cat([img, txt], dim=1)
        steps = list(self._greedy(embeds, self._new_cache(), max_new_tokens,
                                  repetition_penalty))
        if not steps:
            return torch.zeros((embeds.shape[0], 0), dtype=torch.long)
        return torch.stack(steps, dim=1).cpu()

    def _prefix(self, image: Any) -> tuple[torch.Tensor, Any, int]:
        """Image embeddings and the LLM cache of the image prefix (computed once)."""
        img = self.encode(image)
        if img.shape[0] != 1:
            raise ValueError("report() works on one study at a time")
        cache = self._new_cache()
        self._run(lambda: self.net.llm(inputs_embeds=img, cache=cache,
                                       use_cache=True), "the LLM")
        return img, cache, img.shape[1]

    def _stream_prompt(self, prefix: tuple[torch.Tensor, Any, int] | torch.Tensor, prompt: str,
                       *, max_new_tokens: int, repetition_penalty: float,
                       cut: bool) -> Iterator[str]:
        """Text pieces of one prompt: continued from an image-prefix cache (organ prompts),
        or after the image embeddings ``[1, N, hidden]`` in one prefill (a single prompt)."""
        txt = self._prompt_embeds(self.tokenize(prompt))
        if isinstance(prefix, torch.Tensor):
            cache, embeds = self._new_cache(), torch.cat([prefix, txt], dim=1)
        else:
            _img, cache, n_img = prefix
            _crop(cache, n_img)  # back to the image prefix (drops the previous prompt's part)
            embeds = txt
        text = TextStream(self.tokenizer)
        cutter = _SectionCut() if cut else None
        gen = self._greedy(embeds, cache, max_new_tokens, repetition_penalty)
        try:
            for nxt in gen:
                tid = int(nxt[0])
                if tid == self.eos_id:
                    break
                piece = text.push(tid)
                if cutter is not None:
                    piece = cutter.feed(piece)
                if piece:
                    yield piece
                if cutter is not None and cutter.done:
                    return  # the rest would be cut: same text, fewer tokens
            tail = text.flush()
            if cutter is not None:
                tail = cutter.feed(tail) + cutter.finish()
            if tail:
                yield tail
        finally:
            gen.close()

    def organ_stream(self, image: Any, *, max_new_tokens: int = MAX_NEW_TOKENS,
                     repetition_penalty: float = REPETITION_PENALTY,
                     organs: Sequence[str] = ORGANS, prompt: str = ORGAN_PROMPT,
                     early_stop: bool = True) -> Iterator[str]:
        """Text pieces of the organ-by-organ report (they add up to :meth:`report`'s text).

        With ``early_stop=False`` every organ generates to EOS / ``max_new_tokens`` and is then
        cut at ``###`` (the release's way; same text).
        """
        if "{organ}" not in prompt:
            raise MedfmError("the organ prompt must contain '{organ}'")
        prefix = self._prefix(self.prepare(image))
        for i, organ in enumerate(organs):
            if i:
                yield " "
            pieces = self._stream_prompt(prefix, prompt.format(organ=organ),
                                         max_new_tokens=max_new_tokens,
                                         repetition_penalty=repetition_penalty,
                                         cut=early_stop)
            if early_stop:
                yield from pieces
            else:
                text = "".join(pieces)
                section = text.split(SECTION_END, 1)[0]
                if section:
                    yield section

    def report(self, image_or_layer: Any, stream: Callable[[str], Any] | None = None, *,
               max_new_tokens: int = MAX_NEW_TOKENS,
               repetition_penalty: float = REPETITION_PENALTY,
               early_stop: bool = True) -> str:
        """The organ-by-organ report of one CT (``stream(piece)`` called as text arrives)."""
        t0 = time.perf_counter()
        parts = []
        for piece in self.organ_stream(image_or_layer, max_new_tokens=max_new_tokens,
                                       repetition_penalty=repetition_penalty,
                                       early_stop=early_stop):
            parts.append(piece)
            if stream is not None:
                stream(piece)
        log.info("merlin-report: report in %.1f s", time.perf_counter() - t0)
        return "".join(parts)

    def stream(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = MAX_NEW_TOKENS,
               repetition_penalty: float = REPETITION_PENALTY) -> Iterator[str]:
        """ReportGenerator contract. A prompt containing ``{organ}`` (e.g. :data:`ORGAN_PROMPT`)
        is the organ-by-organ report; any other prompt is generated once after the image."""
        if isinstance(images, (MedicalImage, torch.Tensor, np.ndarray)) or \
                (hasattr(images, "data") and hasattr(images, "metadata")):
            images = [images]
        images = list(images)
        if len(images) != 1:
            raise MedfmError(f"merlin-report reads one CT volume per report, got {len(images)} "
                             "images")
        if not prompt or not prompt.strip():
            from ...errors import EmptyPromptError

            raise EmptyPromptError("merlin-report: the prompt is empty")
        if "{organ}" in prompt:
            yield from self.organ_stream(images[0], max_new_tokens=max_new_tokens,
                                         repetition_penalty=repetition_penalty, prompt=prompt)
            return
        img = self.encode(self.prepare(images[0]))
        yield from self._stream_prompt(img, prompt, max_new_tokens=max_new_tokens,
                                       repetition_penalty=repetition_penalty, cut=False)


# ---------------------------------------------------------------------------------- builder
def _read_config(folder: Path) -> MerlinReportConfig:
    path = folder / CONFIG_FILE
    return MerlinReportConfig.from_file(path) if path.is_file() else MerlinReportConfig()


def _n_params(cfg: MerlinReportConfig) -> int:
    with torch.device("meta"):
        net = MerlinReportNet(cfg)
    return sum(p.numel() for p in net.parameters())


def build(spec: ModelSpec, weights: Any = None, device: Any = None, *, precision: str = "auto",
          tokenizer: str | Path | None = None, merge_lora: bool = False,
          fuse_image: bool = True) -> MerlinReportModel:
    """Build the report generator and load the checkpoint strictly (see the module docstring).

    ``precision``: "auto" (bf16 on CUDA where supported, else fp32 - the release runs fp32),
    "fp32", "bf16" or "fp16" (the LLM; the image trunk and adapter stay fp32).
    ``merge_lora``: merge the LoRA once after loading (faster, same outputs). ``fuse_image``:
    the BN-folded inference twin of the image trunk (Merlin's fused path).
    """
    import warnings

    from ...runtime.device import check_memory, pick_device, precision_dtype
    from ...runtime.safe_load import load_state_dict, load_strict

    t0 = time.perf_counter()
    dev = pick_device(device)
    ckpt = find_checkpoint(spec, weights)
    folder = ckpt.parent
    cfg = _read_config(folder)
    tok = load_tokenizer(folder, tokenizer)  # before the big load: fail fast
    if len(tok) > int(cfg.llm["vocab_size"]):
        raise WeightsError(f"tokenizer {tok.source_path} has {len(tok)} tokens but the LLM "
                           f"vocabulary is {cfg.llm['vocab_size']}: wrong tokenizer")
    dtype = precision_dtype(dev, precision)
    n_params = _n_params(cfg)
    need = n_params * (4 if dev.type == "cpu" else torch.finfo(dtype).bits // 8)
    warn = check_memory(int(need * 1.1), dev, "merlin-report")
    if warn and dev.type != "cpu":
        raise MedfmError(warn + " (options: precision='bf16', device='cpu')")
    if warn:
        log.warning(warn + " (the checkpoint is memory-mapped: it will page, slowly)")
    sd = load_state_dict(ckpt)
    if not any(k.startswith("decode_text.") for k in sd):
        hint = (" It is Merlin's CLIP checkpoint: use model 'merlin' for findings."
                if any(k.startswith("encode_image.i3_resnet.") for k in sd) else "")
        raise WeightsError(f"{ckpt.name} is not a Merlin report-generation checkpoint (no "
                           f"decode_text.* keys).{hint}")
    with torch.device("meta"):
        net = MerlinReportNet(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        load_strict(net, sd, what=ckpt.name, assign=True)
    del sd
    net.fix_non_persistent_buffers("cpu")
    net.eval()
    if merge_lora:
        net.merge_lora()
    if dev.type != "cpu" or dtype != torch.float32:
        net.decode_text.to(device=dev, dtype=dtype)
        net.encode_image.to(device=dev)
        net.adapter.to(device=dev)
        net.fix_non_persistent_buffers(dev)
    if fuse_image:
        net.encode_image.fuse()
    model = MerlinReportModel(spec, net, tok, ckpt, dev, dtype, cfg, precision=precision)
    log.info("merlin-report loaded from %s on %s (%s) in %.1f s", ckpt.name, dev, dtype,
             time.perf_counter() - t0)
    return model
