"""Network of Merlin's report generator, laid out exactly like the released checkpoint.

Key layout (a flat state dict, loaded strictly; nothing ignored, no prefix stripped):

* ``encode_image.vision_model.features.{0,1,4,5,6,7}.*`` - Merlin's I3D ResNet-152 trunk kept
  as one sequence (conv1, bn1, ReLU, max-pool, layer1..4). The trunk is
  :class:`napari_medfm.models.merlin.network.I3DResNet` itself (its modules are registered
  here under the sequence indices), so the CLIP tower's input layout, its plain forward and
  its fused CPU inference path are reused, not copied. No pooling, no heads.
* ``adapter.linear2`` - Linear(2048 -> LLM hidden) with bias; no activation, no norm.
* ``decode_text.text_decoder.*`` - a peft LoRA wrapper (unmerged) around transformers'
  ``LlamaForCausalLM``: ``base_model.model.{model.*, lm_head.weight}`` with
  ``q_proj``/``v_proj`` split into ``base_layer`` / ``lora_A.default`` / ``lora_B.default``.

Image tokens: the layer4 map ``(B, 2048, D', H', W')`` flattened to ``(B, D'H'W', 2048)``,
token index ``d*(H'W') + h*W' + w`` (490 tokens, 10x7x7, for 224x224x160).

:class:`MerlinReportConfig` is the optional ``merlin_report_config.json`` of a model folder;
every key it lacks takes the released value.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import WeightsError
from ..merlin.network import I3DResNet, MerlinImageConfig, fuse_for_inference

__all__ = [
    "RADLLAMA_7B",
    "RELEASE_LORA",
    "MerlinReportConfig",
    "ImageEncoder",
    "Adapter",
    "MerlinReportNet",
    "image_tokens",
]

#: ``StanfordAIMI/RadLLaMA-7b`` as a transformers ``LlamaConfig`` dict.
RADLLAMA_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
#: The release's LoRA (peft's LLaMA default targets), stored unmerged.
RELEASE_LORA: dict[str, Any] = {
    "r": 512,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["q_proj", "v_proj"],
}

_KEYS = ("resnet_blocks", "resnet_widths", "image_size", "llm", "lora")


def _merged(default: dict[str, Any], given: Any, what: str) -> dict[str, Any]:
    if given is None:
        return copy.deepcopy(default)
    if not isinstance(given, dict):
        raise WeightsError(f"merlin_report_config.json: {what!r} must be an object, got "
                           f"{type(given).__name__}")
    out = copy.deepcopy(default)
    out.update(copy.deepcopy(given))
    return out


@dataclass(frozen=True)
class MerlinReportConfig:
    """Shape of the report generator (defaults = the release).

    ``resnet_blocks`` / ``llm`` / ``lora`` are the keys of the model-folder contract;
    ``resnet_widths`` (per-stage bottleneck widths, 2048 = 4 x the last) and ``image_size``
    (Merlin's pad/crop size) are extensions for small test models.
    """

    resnet_blocks: tuple[int, int, int, int] = (3, 8, 36, 3)
    resnet_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    image_size: tuple[int, int, int] = (224, 224, 160)
    llm: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(RADLLAMA_7B))
    lora: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(RELEASE_LORA))

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MerlinReportConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise WeightsError(f"merlin_report_config.json: unknown key(s) {', '.join(unknown)}; "
                               f"known: {', '.join(_KEYS)}")

        def _ints(key: str, n: int, default: tuple[int, ...]) -> tuple[int, ...]:
            v = d.get(key)
            if v is None:
                return default
            if not isinstance(v, (list, tuple)) or len(v) != n \
                    or not all(isinstance(x, int) and x > 0 for x in v):
                raise WeightsError(f"merlin_report_config.json: {key!r} must be {n} positive "
                                   f"integers, got {v!r}")
            return tuple(int(x) for x in v)

        base = cls()
        return cls(
            resnet_blocks=_ints("resnet_blocks", 4, base.resnet_blocks),  # type: ignore[arg-type]
            resnet_widths=_ints("resnet_widths", 4, base.resnet_widths),  # type: ignore[arg-type]
            image_size=_ints("image_size", 3, base.image_size),  # type: ignore[arg-type]
            llm=_merged(RADLLAMA_7B, d.get("llm"), "llm"),
            lora=_merged(RELEASE_LORA, d.get("lora"), "lora"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> MerlinReportConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot read {path.name}: {exc}") from None
        if not isinstance(data, dict):
            raise WeightsError(f"{path.name} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resnet_blocks": list(self.resnet_blocks),
            "resnet_widths": list(self.resnet_widths),
            "image_size": list(self.image_size),
            "llm": copy.deepcopy(self.llm),
            "lora": copy.deepcopy(self.lora),
        }

    # ------------------------------------------------------------------ pieces
    @property
    def image_config(self) -> MerlinImageConfig:
        # the heads of the CLIP tower are not part of this network (n_phenotypes is unused)
        return MerlinImageConfig(layers=self.resnet_blocks, widths=self.resnet_widths,
                                 n_phenotypes=1, contrastive_dim=None)

    @property
    def feature_dim(self) -> int:
        return self.image_config.feature_dim

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        try:
            return LlamaConfig(**self.llm)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"merlin_report_config.json: bad 'llm' config: {exc}") from None

    def lora_config(self) -> Any:
        from peft import LoraConfig

        lora = dict(self.lora)
        lora.setdefault("bias", "none")
        try:
            return LoraConfig(**lora)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"merlin_report_config.json: bad 'lora' config: {exc}") from None

    @property
    def n_image_tokens(self) -> int:
        h, w, d = self.image_size
        # stem: stride 2 in-plane then max-pool 2 everywhere; layers 2..4: stride 2 each
        def down(n: int, first: bool) -> int:
            if not first:  # conv1 keeps the depth
                n = (n + 1) // 2
            n = (n + 1) // 2  # max-pool
            for _ in range(3):
                n = (n + 1) // 2
            return n
        return down(d, True) * down(h, False) * down(w, False)


# ---------------------------------------------------------------------------------- modules
class _VisionModel(nn.Module):
    """``vision_model.features``: the trunk's modules as one sequence (checkpoint indices)."""

    def __init__(self, trunk: I3DResNet) -> None:
        super().__init__()
        self.features = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool,
                                      trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)


def image_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """``(B, C, D', H', W')`` -> ``(B, D'H'W', C)``, index ``d*(H'W') + h*W' + w``."""
    return fmap.flatten(2).transpose(1, 2)


class ImageEncoder(nn.Module):
    """``encode_image``: Merlin's I3D trunk, layer4 map as image tokens.

    Input ``(B, 1, H, W, D)`` float32 in [0, 1] (Merlin's preprocessing, MONAI layout).
    """

    def __init__(self, config: MerlinImageConfig) -> None:
        super().__init__()
        trunk = I3DResNet(config)
        trunk.classifier = None  # the report network has no heads
        trunk.contrastive_head = None
        # the trunk's own modules are registered under the checkpoint's sequence indices; the
        # I3DResNet object is kept (unregistered) for its forward and its fused twin
        self.vision_model = _VisionModel(trunk)
        object.__setattr__(self, "_trunk", trunk)
        object.__setattr__(self, "_fused", None)

    @property
    def trunk(self) -> I3DResNet:
        return self._trunk  # type: ignore[attr-defined]

    def fuse(self) -> None:
        """Build the BN-folded inference twin (same outputs up to float rounding)."""
        dev = next(self.parameters()).device
        fused = fuse_for_inference(self.trunk.eval(), cpu=dev.type == "cpu").to(dev)
        object.__setattr__(self, "_fused", fused)

    def unfuse(self) -> None:
        object.__setattr__(self, "_fused", None)

    @property
    def fused(self) -> bool:
        return self._fused is not None  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._fused if self._fused is not None else self.trunk  # type: ignore[attr-defined]
        return image_tokens(net.trunk(x))


class Adapter(nn.Module):
    """``adapter.linear2``: image features (2048) -> LLM hidden size."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear2 = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(x)


class _TextDecoder(nn.Module):
    """``decode_text.text_decoder``: the peft-wrapped LlamaForCausalLM."""

    def __init__(self, config: MerlinReportConfig) -> None:
        super().__init__()
        from peft import get_peft_model
        from transformers import LlamaForCausalLM

        llm = LlamaForCausalLM(config.llama_config())
        self.text_decoder = get_peft_model(llm, config.lora_config())


class MerlinReportNet(nn.Module):
    """``encode_image`` + ``adapter`` + ``decode_text`` (see the module docstring)."""

    def __init__(self, config: MerlinReportConfig) -> None:
        super().__init__()
        self.config = config
        self.encode_image = ImageEncoder(config.image_config)
        hidden = int(config.llm["hidden_size"])
        self.adapter = Adapter(config.feature_dim, hidden)
        self.decode_text = _TextDecoder(config)

    @property
    def merged(self) -> bool:
        """Whether the LoRA has been merged into the base weights (:meth:`merge_lora`)."""
        from peft import PeftModel

        return not isinstance(self.decode_text.text_decoder, PeftModel)

    @property
    def llm(self) -> nn.Module:
        """The ``LlamaForCausalLM`` (with LoRA layers injected, or merged)."""
        dec = self.decode_text.text_decoder
        return dec if self.merged else dec.base_model.model

    def merge_lora(self) -> None:
        """Fold ``scaling * B @ A`` into ``q_proj``/``v_proj`` once (same outputs, faster).

        The state dict no longer has the release's LoRA keys afterwards.
        """
        if self.merged:
            return
        self.decode_text.text_decoder = self.decode_text.text_decoder.merge_and_unload()

    def fix_non_persistent_buffers(self, device: Any = "cpu") -> None:
        """Recreate the buffers that are not in the checkpoint (the rotary tables, float32)
        after a meta build or a dtype change."""
        llm = self.llm
        rot = llm.model.rotary_emb
        with torch.device("cpu"):
            fresh = type(rot)(config=llm.config)
        llm.model.rotary_emb = fresh.to(device)
        left = [n for n, t in self.named_buffers() if t.is_meta] + \
               [n for n, t in self.named_parameters() if t.is_meta]
        if left:
            raise WeightsError(f"uninitialised tensors after loading: {', '.join(left[:5])}")

    def embed_prompt(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``prompt_ids`` (already without BOS)."""
        return self.llm.get_input_embeddings()(prompt_ids)
