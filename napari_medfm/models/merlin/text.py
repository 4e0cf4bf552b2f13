"""Merlin text tower: Clinical-Longformer + ``linear_layer`` (768 -> 512), tokenizer, sanitising.

The Longformer is ``transformers.LongformerModel`` built from the configuration of
``allenai/longformer-base-4096`` (which ``yikuan8/Clinical-Longformer`` uses); its weights come
from the Merlin CLIP checkpoint (``encode_text.text_encoder.*``), never from the network.
The tokenizer is the RoBERTa byte-level BPE of Clinical-Longformer, read from a local folder
(``vocab.json`` + ``merges.txt``, or ``tokenizer.json``).

Text feature = last hidden state at position 0 (CLS, no global attention mask) ->
``linear_layer``; callers L2-normalise it for cosine similarity.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import WeightsError

__all__ = [
    "MerlinTextConfig",
    "FULL_TEXT_CONFIG",
    "TINY_TEXT_CONFIG",
    "MerlinTextEncoder",
    "sanitize_report",
    "load_tokenizer",
    "find_tokenizer_dir",
    "TOKENIZER_REPO",
]

#: Hugging Face repository the tokenizer files come from.
TOKENIZER_REPO = "yikuan8/Clinical-Longformer"
#: Registry id under which the weights manager fetches/imports the tokenizer files.
TOKENIZER_SPEC_ID = "clinical-longformer"
MAX_LENGTH = 1024


@dataclass(frozen=True)
class MerlinTextConfig:
    """Shape of the text tower (defaults: allenai/longformer-base-4096 = Clinical-Longformer)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 4098
    attention_window: int = 512
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    proj_dim: int = 512
    max_length: int = MAX_LENGTH
    dropout: float = 0.1  # hidden and attention dropout (training only)

    def longformer_config(self) -> Any:
        from transformers import LongformerConfig

        return LongformerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            attention_window=[self.attention_window] * self.num_hidden_layers,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            sep_token_id=self.eos_token_id,
            hidden_act="gelu",
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL_TEXT_CONFIG = MerlinTextConfig()
#: Same key layout, tiny sizes (tests; pair with a tokenizer of at most ``vocab_size`` tokens).
TINY_TEXT_CONFIG = MerlinTextConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=1026, attention_window=32)


class MerlinTextEncoder(nn.Module):
    """``text_encoder`` (LongformerModel) + ``linear_layer`` - the ``encode_text.*`` keys."""

    def __init__(self, config: MerlinTextConfig = FULL_TEXT_CONFIG, with_pooler: bool = True):
        super().__init__()
        from transformers import LongformerModel

        self.config = config
        self.text_encoder = LongformerModel(config.longformer_config(),
                                            add_pooling_layer=with_pooler)
        self.linear_layer = nn.Linear(config.hidden_size, config.proj_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.linear_layer(out.last_hidden_state[:, 0, :])


_WORDS = re.compile(r"\w+|[^\w\s]")


def sanitize_report(text: str) -> str:
    """Merlin's report normalisation: lower-case, split into words and punctuation, re-join.

    ``"Liver: NORMAL.  No ascites,"`` -> ``"liver : normal . no ascites ,"``.
    """
    return " ".join(_WORDS.findall(str(text).lower()))


_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any(all((folder / f).is_file() for f in group)
                                   for group in _TOKENIZER_FILES)


def find_tokenizer_dir(explicit: str | Path | None = None,
                       weights_path: str | Path | None = None) -> Path:
    """The local folder holding the Clinical-Longformer tokenizer.

    Order: ``explicit`` > next to the weights (the checkpoint's folder, or its
    ``Clinical-Longformer`` / ``tokenizer`` sub-folder) > ``<weights dir>/merlin/...`` >
    ``$MEDFM_HOME/weights/yikuan8/Clinical-Longformer`` > the Hugging Face cache (offline
    lookup only). Raises :class:`WeightsError` explaining how to provide it.
    """
    from ...runtime.paths import weights_dir

    if explicit is not None:
        p = Path(explicit).expanduser()
        if not _has_tokenizer(p):
            raise WeightsError(
                f"tokenizer folder {p} must contain vocab.json + merges.txt (or tokenizer.json) "
                f"of {TOKENIZER_REPO}")
        return p
    candidates: list[Path] = []
    if weights_path is not None:
        w = Path(weights_path).expanduser()
        base = w if w.is_dir() else w.parent
        candidates += [base, base / "Clinical-Longformer", base / "tokenizer"]
    root = weights_dir()
    candidates += [root / TOKENIZER_SPEC_ID, root / "merlin" / "Clinical-Longformer",
                   root / "merlin" / "tokenizer", root / "yikuan8" / "Clinical-Longformer"]
    for c in candidates:
        if _has_tokenizer(c):
            return c
    try:  # a copy already in the Hugging Face cache (never downloads here)
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(TOKENIZER_REPO, local_files_only=True))
        if _has_tokenizer(cached):
            return cached
    except Exception:
        pass
    looked = ", ".join(str(c) for c in candidates[:4])
    raise WeightsError(
        f"Merlin's text tower needs the {TOKENIZER_REPO} tokenizer (vocab.json + merges.txt) and "
        f"none was found (looked in {looked}, and the Hugging Face cache). Get it with "
        f"`medfm weights fetch {TOKENIZER_SPEC_ID}` (two small files from hf.co/{TOKENIZER_REPO}), "
        f"or `medfm weights import {TOKENIZER_SPEC_ID} DIR`, or pass --tokenizer DIR.")


def build_tokenizer(spec: Any, weights: str | Path | None = None, device: Any = None) -> Any:
    """Registry builder of ``clinical-longformer``: the tokenizer from the weights manager."""
    return load_tokenizer(find_tokenizer_dir(weights))


def load_tokenizer(folder: str | Path, max_length: int = MAX_LENGTH) -> Any:
    """RoBERTa (byte-level BPE) tokenizer from a local folder; never touches the network."""
    from transformers import RobertaTokenizerFast

    folder = Path(folder)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tok = RobertaTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # corrupt/mismatched files
        raise WeightsError(f"cannot load the tokenizer from {folder}: {exc}") from None
    tok.model_max_length = max_length
    return tok


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = MAX_LENGTH,
             sanitize: bool = True, pad_to_multiple_of: int | None = None
             ) -> dict[str, torch.Tensor]:
    """Sanitise and tokenise ``texts`` (padding to the longest, truncation at ``max_length``).

    ``pad_to_multiple_of`` = the attention window pads like Longformer would internally (pad
    token, attention mask 0), which changes nothing in the features.
    """
    batch = [sanitize_report(t) if sanitize else t for t in texts]
    enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                    pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
