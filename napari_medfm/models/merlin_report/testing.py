"""Offline stand-ins for the report generator's released files (tests and benchmarks).

* :data:`TINY_CONFIG` - a ``merlin_report_config.json`` with the released key layout and a
  few thousand times fewer weights.
* :func:`random_state_dict` - the released flat layout (``encode_image.vision_model.features.*``,
  ``adapter.linear2.*``, ``decode_text.text_decoder.base_model.model.*`` with unmerged LoRA)
  with random weights: batch-norm statistics and LoRA ``B`` randomised too, so folding and
  merging are really exercised.
* :func:`train_sentencepiece` - a LLaMA-style SentencePiece model (unk 0, bos 1, eos 2, byte
  fallback) trained offline on given texts.
* :func:`write_model_folder` - all of it laid out as the model-folder contract says.

Nothing here touches the network.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .network import MerlinReportConfig, MerlinReportNet
from .spec import CHECKPOINTS, CONFIG_FILE, ORGAN_PROMPT, ORGANS, TOKENIZER_DIR, TOKENIZER_FILE

__all__ = ["TINY_CONFIG", "random_state_dict", "train_sentencepiece", "write_model_folder",
           "report_corpus"]

#: Small enough for CI (image 64x64x32 -> 8 image tokens, a 2-layer LLM of width 32).
TINY_CONFIG: dict[str, Any] = {
    "resnet_blocks": [1, 1, 1, 1],
    "resnet_widths": [4, 8, 8, 16],
    "image_size": [64, 64, 32],
    "llm": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 1024},
    "lora": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.1},
}


def random_state_dict(config: dict[str, Any] | MerlinReportConfig | None = None, seed: int = 0,
                      lora_scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Released layout with random weights for ``config`` (default :data:`TINY_CONFIG`)."""
    from ..merlin.testing import randomize_batchnorm

    cfg = config if isinstance(config, MerlinReportConfig) else \
        MerlinReportConfig.from_dict(copy.deepcopy(TINY_CONFIG if config is None else config))
    torch.manual_seed(seed)
    net = MerlinReportNet(cfg)
    randomize_batchnorm(net.encode_image, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: make the LoRA matter
                p.copy_(torch.randn(p.shape, generator=g) * lora_scale)
            elif name.startswith("decode_text") and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # peaked, tie-free logits
    return {k: v.clone() for k, v in net.state_dict().items()}


def report_corpus(folder: str | Path) -> list[str]:
    """FINDINGS / IMPRESSION texts of the IU X-ray report XML files in ``folder``."""
    import xml.etree.ElementTree as ET

    texts = []
    for f in sorted(Path(folder).glob("*.xml")):
        for el in ET.parse(f).getroot().iter("AbstractText"):
            if el.text and el.text.strip():
                texts.append(el.text.strip())
    return texts


def train_sentencepiece(texts: Iterable[str], folder: str | Path, vocab_size: int = 500) -> Path:
    """Train a LLaMA-layout SentencePiece BPE model on ``texts``; returns ``folder/tokenizer.model``.

    The organ prompts are added to the corpus so that they tokenise into real pieces.
    """
    import sentencepiece as spm

    corpus = list(texts) + [ORGAN_PROMPT.format(organ=o) for o in ORGANS]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 3), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / TOKENIZER_FILE
    out.write_bytes(buf.getvalue())
    return out


def write_model_folder(folder: str | Path, texts: Iterable[str], *,
                       config: dict[str, Any] | None = None, seed: int = 0,
                       checkpoint: str = CHECKPOINTS[0], vocab_size: int = 500) -> Path:
    """A complete model folder: checkpoint + ``tokenizer/tokenizer.model`` + config JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(TINY_CONFIG if config is None else config)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    torch.save(random_state_dict(cfg, seed), folder / checkpoint)
    train_sentencepiece(texts, folder / TOKENIZER_DIR, vocab_size=vocab_size)
    return folder
