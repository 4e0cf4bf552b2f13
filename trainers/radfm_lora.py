"""LoRA for RadFM's LLM (peft): train adapters on one GPU, export merged weights or adapters.

* :func:`apply_lora` wraps ``net.lang_model`` in a peft model with LoRA on ``target_modules``
  and freezes everything else (vision encoder, perceiver, fc and the embedding table included).
* :func:`merged_state_dict` gives the released key layout with every LoRA delta added to its
  base weight (``W + B A * alpha / r``), without touching the training model;
* :func:`save_adapters` writes the peft adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) to apply on top of the base weights with
  :func:`load_adapters` (or peft directly).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["apply_lora", "merged_state_dict", "save_adapters", "load_adapters", "is_lora"]


def is_lora(net: nn.Module) -> bool:
    return hasattr(net.lang_model, "peft_config")


def apply_lora(net: nn.Module, *, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: Sequence[str] = ("q_proj", "v_proj")) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=int(r), lora_alpha=int(alpha), lora_dropout=float(dropout),
                     target_modules=list(target_modules), bias="none")
    for p in net.parameters():
        p.requires_grad_(False)
    net.lang_model = get_peft_model(net.lang_model, cfg)
    return net


def merged_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Released-layout state dict (``lang_model.*``, ``embedding_layer.*``) with LoRA merged."""
    from peft.tuners.lora import LoraLayer

    base = net.lang_model.get_base_model()
    deltas = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer):
            for adapter in mod.active_adapters:
                d = mod.get_delta_weight(adapter).detach()
                deltas[name] = deltas[name] + d if name in deltas else d
    out: dict[str, torch.Tensor] = {}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        if k.endswith(".base_layer.weight"):
            mod = k[: -len(".base_layer.weight")]
            v = v.detach() + deltas[mod].to(v.dtype) if mod in deltas else v
            k = mod + ".weight"
        elif ".base_layer." in k:
            k = k.replace(".base_layer.", ".")
        out["lang_model." + k] = v.detach()
    for k, v in net.embedding_layer.state_dict().items():
        out["embedding_layer." + k] = v.detach()
    return out


def save_adapters(net: nn.Module, folder: str | Path) -> Path:
    """peft adapter folder, written to a temporary folder then renamed into place."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.lang_model.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_adapters(net: nn.Module, folder: str | Path) -> nn.Module:
    """Apply saved adapters to a plain RadFM network (its ``lang_model`` becomes a peft model)."""
    from peft import PeftModel

    net.lang_model = PeftModel.from_pretrained(net.lang_model, str(folder))
    net.lang_model.eval()
    return net
