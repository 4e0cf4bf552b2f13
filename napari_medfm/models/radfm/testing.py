"""Offline stand-ins for RadFM's released files, for tests, benchmarks and trainers.

* :data:`TINY` - a tiny ``radfm_config.json`` (same key layout, a few thousand parameters);
* :func:`released_state_dict` - random weights with the released key layout, including the
  unused keys (``bert_model``, ``transformer_decoder``...) and the legacy
  ``rotary_emb.inv_freq`` buffers the release carries;
* :func:`write_model_folder` - a model folder per the folder contract;
* :func:`train_tokenizer` - a LLaMA-style SentencePiece model (unk 0, bos 1, eos 2, byte
  fallback) trained offline on given texts.

Nothing here touches the network.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .network import RadFMConfig, RadFMNetwork

__all__ = ["TINY", "tiny_config", "released_state_dict", "write_model_folder", "train_tokenizer"]

#: A tiny config: 64x64 images, 4-frame patches, 2+1 layers, hidden 32; vocab set by the caller.
TINY: dict[str, Any] = {
    "vision": {"dim": 24, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 32,
               "image_size": 64, "frames": 64, "patch_size": 32, "frame_patch_size": 4},
    "perceiver": {"depth": 1, "heads": 2, "dim_head": 8, "num_latents": 4, "ff_mult": 2},
    "llm": {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 512},
}


def tiny_config(vocab_size: int = 256, **llm: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(TINY))
    d["llm"]["vocab_size"] = vocab_size
    d["llm"].update(llm)
    return d


def released_state_dict(config: dict[str, Any] | RadFMConfig, seed: int = 0,
                        legacy: bool = True) -> dict[str, torch.Tensor]:
    """Random weights laid out like the released ``pytorch_model.bin`` (fp32).

    ``legacy`` adds the unused keys and per-layer ``rotary_emb.inv_freq`` buffers.
    """
    cfg = config if isinstance(config, RadFMConfig) else RadFMConfig.from_dict(config)
    torch.manual_seed(seed)
    net = RadFMNetwork(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["embedding_layer.weight"] = sd["lang_model.model.embed_tokens.weight"]  # tied, shared
    if legacy:
        h = cfg.hidden_size
        head = h // int(cfg.llm["num_attention_heads"])
        for i in range(int(cfg.llm["num_hidden_layers"])):
            sd[f"lang_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = \
                1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
        sd["embedding_layer.bert_model.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
        sd["embedding_layer.bert_model.encoder.layer.0.attention.self.query.weight"] = \
            torch.randn(8, 8)
        sd["embedding_layer.bert_projection_fc.weight"] = torch.randn(cfg.vision.dim, 8)
        sd["embedding_layer.bert_projection_fc.bias"] = torch.randn(cfg.vision.dim)
        sd["embedding_layer.transformer_decoder.layers.0.self_attn.in_proj_weight"] = \
            torch.randn(3 * 8, 8)
        sd["embedding_layer.transformer_decoder_mlp.0.weight"] = torch.randn(8, 8)
        sd["embedding_layer.output_upscaling.0.weight"] = torch.randn(8, 4, 2, 2, 2)
        sd["embedding_layer.cls_head.0.weight"] = torch.randn(2, 8)
    return sd


def write_model_folder(folder: str | Path, config: dict[str, Any] | None = None, *,
                       seed: int = 0, legacy: bool = True, tokenizer: str | Path | None = None,
                       extra: dict[str, torch.Tensor] | None = None,
                       drop: Iterable[str] = ()) -> Path:
    """``pytorch_model.bin`` (+ ``radfm_config.json``, + ``tokenizer.model``) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config or TINY
    sd = released_state_dict(cfg, seed=seed, legacy=legacy)
    sd.update(extra or {})
    for k in drop:
        sd.pop(k)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "radfm_config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return folder


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = 200) -> Path:
    """A LLaMA-layout SentencePiece BPE model (unk 0, bos 1, eos 2, no pad, byte fallback)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=True, num_threads=1,
        minloglevel=2, hard_vocab_limit=False)
    out = Path(out)
    out.write_bytes(buf.getvalue())
    return out
