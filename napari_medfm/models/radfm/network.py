"""RadFM network: 3D ViT + Perceiver resampler + ``fc`` + transformers' ``LlamaForCausalLM``.

Written from the published description of the release (``shared/specs/radfm.md``); module
names reproduce the checkpoint's key layout so the released ``pytorch_model.bin`` loads
strictly:

* ``embedding_layer.vision_encoder.*`` - 3D ViT on ``[N, 3, H, W, D]`` (depth last), patches
  ``p x p x pf`` flattened as ``(p1 p2 pf c)``, LayerNorm -> Linear -> LayerNorm, learned 3D
  position table ``[row, col, dep]`` with index rescaling, pre-norm blocks, no final norm;
* ``embedding_layer.perceiver.*`` - Flamingo-style resampler (latents attend to
  ``cat(media, latents)``), no time embeddings, final LayerNorm;
* ``embedding_layer.fc`` - latent dim -> LLM hidden size; ``embedding_layer.weight`` (tied to
  ``lang_model.model.embed_tokens.weight``) and ``embedding_layer.figure_token_weight`` (2 rows:
  ``<image>``, ``</image>``);
* ``lang_model`` - ``LlamaForCausalLM``.

Token stream: for vocabulary V, id ``t < V`` is a text token, ``V`` = ``<image>``, ``V+1`` =
``</image>``, ``V+2+k`` = the k-th image latent of the sample (32 per image, images in order).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import WeightsError

__all__ = [
    "VisionConfig", "PerceiverConfig", "RadFMConfig", "RELEASED_LLM", "RadFMNetwork",
    "VisionTransformer3D", "PerceiverResampler", "count_parameters",
]

#: LLaMA-13B ("MedLLaMA-13B") as released, with the corrected special ids (the shipped config
#: says bos 0, eos 1, pad -1, which is wrong for the LLaMA tokenizer).
RELEASED_LLM: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class VisionConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 2048
    image_size: int = 512
    frames: int = 512
    patch_size: int = 32
    frame_patch_size: int = 4

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size * self.frame_patch_size

    @property
    def grid(self) -> tuple[int, int, int]:
        """Rows of the (row, col, dep) position tables."""
        return (self.image_size // self.patch_size, self.image_size // self.patch_size,
                self.frames // self.frame_patch_size)


@dataclass(frozen=True)
class PerceiverConfig:
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 32
    ff_mult: int = 4


@dataclass(frozen=True)
class RadFMConfig:
    """Network sizes; the defaults are the released model (``radfm_config.json`` overrides)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    llm: dict[str, Any] = field(default_factory=lambda: dict(RELEASED_LLM))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RadFMConfig:
        """Every missing key takes the released value; unknown keys are an error (typos)."""
        d = dict(d or {})
        unknown = set(d) - {"vision", "perceiver", "llm"}
        if unknown:
            raise WeightsError(f"radfm_config.json: unknown sections {sorted(unknown)}; "
                               "expected vision, perceiver, llm")
        parts = {}
        for name, klass in (("vision", VisionConfig), ("perceiver", PerceiverConfig)):
            sub = dict(d.get(name) or {})
            names = {f.name for f in dataclasses.fields(klass)}
            bad = set(sub) - names
            if bad:
                raise WeightsError(f"radfm_config.json: unknown {name} keys {sorted(bad)}; "
                                   f"expected some of {sorted(names)}")
            parts[name] = klass(**sub)
        llm = dict(RELEASED_LLM)
        llm.update(d.get("llm") or {})
        cfg = cls(vision=parts["vision"], perceiver=parts["perceiver"], llm=llm)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> RadFMConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"vision": dataclasses.asdict(self.vision),
                "perceiver": dataclasses.asdict(self.perceiver), "llm": dict(self.llm)}

    def validate(self) -> None:
        v = self.vision
        if v.dim % 3:
            raise WeightsError(f"radfm_config: vision.dim {v.dim} must be divisible by 3 "
                               "(row/col/depth position tables)")
        if v.image_size % v.patch_size or v.frames % v.frame_patch_size:
            raise WeightsError("radfm_config: image_size/frames must be multiples of the patch sizes")

    @property
    def vocab_size(self) -> int:
        return int(self.llm["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def bos_id(self) -> int:
        return int(self.llm.get("bos_token_id", 1))

    @property
    def eos_id(self) -> int:
        return int(self.llm.get("eos_token_id", 2))

    @property
    def pad_id(self) -> int:
        pad = self.llm.get("pad_token_id", 0)
        return 0 if pad is None or int(pad) < 0 else int(pad)

    @property
    def image_token(self) -> int:
        return self.vocab_size

    @property
    def end_image_token(self) -> int:
        return self.vocab_size + 1

    def patch_token(self, k: int) -> int:
        """Id of ``<image{k}>`` (k counts latents over all images of a sample)."""
        return self.vocab_size + 2 + k

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(**self.llm)


# --------------------------------------------------------------------------- vision encoder


class Patchify(nn.Module):
    """``b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)`` (no parameters)."""

    def __init__(self, p: int, pf: int) -> None:
        super().__init__()
        self.p, self.pf = p, pf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww, ff = x.shape
        p, pf = self.p, self.pf
        h, w, f = hh // p, ww // p, ff // pf
        x = x.reshape(b, c, h, p, w, p, f, pf)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b h w f p1 p2 pf c
        return x.reshape(b, h * w * f, p * p * pf * c)


class PositionEmbedding3D(nn.Module):
    """Learned row/col/depth tables, concatenated ``[row, col, dep]`` with index rescaling."""

    def __init__(self, d: int, rows: int, cols: int, deps: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(rows, d)
        self.col_embed = nn.Embedding(cols, d)
        self.dep_embed = nn.Embedding(deps, d)

    def forward(self, h: int, w: int, f: int) -> torch.Tensor:
        dev = self.row_embed.weight.device
        rows, cols, deps = (self.row_embed.num_embeddings, self.col_embed.num_embeddings,
                            self.dep_embed.num_embeddings)
        if h > rows or w > cols or f > deps:
            raise ValueError(f"image grid {h}x{w}x{f} patches exceeds the position tables "
                             f"{rows}x{cols}x{deps}")
        i = (torch.arange(h, device=dev) + 1) * (rows // h) - 1
        j = (torch.arange(w, device=dev) + 1) * (cols // w) - 1
        k = (torch.arange(f, device=dev) + 1) * (deps // f) - 1
        r = self.row_embed(i)[:, None, None, :].expand(h, w, f, -1)
        c = self.col_embed(j)[None, :, None, :].expand(h, w, f, -1)
        d = self.dep_embed(k)[None, None, :, :].expand(h, w, f, -1)
        return torch.cat([r, c, d], dim=-1).reshape(h * w * f, -1)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class ViTFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # indices as released: .0 Linear, .1 GELU, (.2 dropout), .3 Linear
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNorm(dim, ViTAttention(dim, heads, dim_head)),
                           PreNorm(dim, ViTFeedForward(dim, mlp_dim))])
            for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x  # no final norm


class VisionTransformer3D(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.to_patch_embedding = nn.Sequential(
            Patchify(cfg.patch_size, cfg.frame_patch_size), nn.LayerNorm(cfg.patch_dim),
            nn.Linear(cfg.patch_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        self.pos_embedding = PositionEmbedding3D(cfg.dim // 3, *cfg.grid)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W, D]`` -> ``[N, (H/p)(W/p)(D/pf), dim]``."""
        c = self.cfg
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"vision input must be [N, 3, H, W, D], got {tuple(x.shape)}")
        _, _, hh, ww, ff = x.shape
        if hh % c.patch_size or ww % c.patch_size or ff % c.frame_patch_size:
            raise ValueError(f"image {hh}x{ww}x{ff} is not divisible by the patch size "
                             f"{c.patch_size}x{c.patch_size}x{c.frame_patch_size}")
        tokens = self.to_patch_embedding(x)
        pos = self.pos_embedding(hh // c.patch_size, ww // c.patch_size, ff // c.frame_patch_size)
        return self.transformer(tokens + pos.to(tokens.dtype))


# --------------------------------------------------------------------------- perceiver


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PerceiverAttention(dim, cfg.heads, cfg.dim_head),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * cfg.ff_mult, bias=False),
                              nn.GELU(), nn.Linear(dim * cfg.ff_mult, dim, bias=False)),
            ]) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, n, dim]`` (one image each) -> ``[N, num_latents, dim]``."""
        lat = self.latents.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            lat = attn(x, lat) + lat
            lat = ff(lat) + lat
        return self.norm(lat)


# --------------------------------------------------------------------------- embedding + LLM


class RadFMEmbedding(nn.Module):
    """``embedding_layer``: vision encoder, perceiver, fc and the token lookup table."""

    def __init__(self, cfg: RadFMConfig, weight: nn.Parameter) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = weight  # tied with lang_model.model.embed_tokens.weight
        self.figure_token_weight = nn.Parameter(torch.zeros(2, cfg.hidden_size))
        self.vision_encoder = VisionTransformer3D(cfg.vision)
        self.perceiver = PerceiverResampler(cfg.vision.dim, cfg.perceiver)
        self.fc = nn.Linear(cfg.vision.dim, cfg.hidden_size)

    def encode_images(self, vision_x: torch.Tensor) -> torch.Tensor:
        """``[B, S, 3, H, W, D]`` -> ``[B, S * num_latents, hidden]`` (images encoded one by one
        through the ViT, so it matches per-image encoding exactly)."""
        if vision_x.ndim != 6:
            raise ValueError(f"vision_x must be [B, S, 3, H, W, D], got {tuple(vision_x.shape)}")
        b, s = vision_x.shape[:2]
        dtype = self.fc.weight.dtype
        feats = self.vision_encoder(vision_x.reshape(b * s, *vision_x.shape[2:]).to(dtype))
        lat = self.fc(self.perceiver(feats))  # [B*S, n_lat, hidden]
        return lat.reshape(b, s * lat.shape[1], lat.shape[2])

    def lookup(self, ids: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        """Rows of ``cat(weight, figure_token_weight, vision[b])`` selected by ``ids``.

        Same result as the release's ``one_hot(ids) @ table`` without building the table.
        """
        V = self.cfg.vocab_size
        w = self.weight
        out_dev = self.figure_token_weight.device
        text = F.embedding(ids.clamp(0, V - 1).to(w.device), w).to(out_dev)
        if not bool((ids >= V).any()):
            return text
        fig = self.figure_token_weight[(ids - V).clamp(0, 1)]
        n_img = 0 if vision is None else vision.shape[1]
        top = int(ids.max())
        if top >= V + 2 + n_img:
            raise ValueError(f"token id {top} refers to image latent {top - V - 2} but the sample "
                             f"has {n_img} ({n_img // max(1, self.cfg.perceiver.num_latents)} "
                             "image(s)): pass as many images as the prompt has <image> blocks")
        out = torch.where((ids < V + 2).unsqueeze(-1), fig.to(text.dtype), text)
        out = torch.where((ids < V).unsqueeze(-1), text, out)
        if vision is not None and n_img:
            idx = (ids - V - 2).clamp(0, n_img - 1)
            vis = torch.gather(vision.to(text.dtype), 1,
                               idx.unsqueeze(-1).expand(-1, -1, vision.shape[-1]))
            out = torch.where((ids >= V + 2).unsqueeze(-1), vis, out)
        return out


class RadFMNetwork(nn.Module):
    """``lang_model`` + ``embedding_layer``: the checkpoint's key layout."""

    def __init__(self, cfg: RadFMConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.cfg = cfg
        self.lang_model = LlamaForCausalLM(cfg.llama_config())
        self.embedding_layer = RadFMEmbedding(cfg, self.lang_model.model.embed_tokens.weight)

    def tie(self) -> None:
        """Re-tie ``embed_tokens`` to the lookup table (after an ``assign`` load)."""
        self.lang_model.model.embed_tokens.weight = self.embedding_layer.weight

    def forward(self, vision_x: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool = False, logits_to_keep: int = 0) -> Any:
        vis = None if vision_x is None else self.embedding_layer.encode_images(vision_x)
        emb = self.embedding_layer.lookup(input_ids, vis)
        return self.lang_model(inputs_embeds=emb, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, use_cache=use_cache,
                               logits_to_keep=logits_to_keep)


def count_parameters(cfg: RadFMConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no build): vision, perceiver, fc, llm, total.

    The tied embedding is counted once (in ``llm``).
    """
    v, p, llm = cfg.vision, cfg.perceiver, cfg.llm
    H, V = cfg.hidden_size, cfg.vocab_size
    inner = v.heads * v.dim_head
    vision = (2 * v.patch_dim + v.patch_dim * v.dim + v.dim + 2 * v.dim
              + sum(cfg.vision.grid) * (v.dim // 3)
              + v.depth * (2 * v.dim + v.dim * 3 * inner + inner * v.dim + v.dim
                           + 2 * v.dim + v.dim * v.mlp_dim + v.mlp_dim + v.mlp_dim * v.dim + v.dim))
    pin = p.heads * p.dim_head
    d = v.dim
    perceiver = (p.num_latents * d + 2 * d
                 + p.depth * (4 * d + d * pin + d * 2 * pin + pin * d
                              + 2 * d + 2 * d * d * p.ff_mult))
    fc = d * H + H + 2 * H
    nh = int(llm["num_attention_heads"])
    nkv = int(llm.get("num_key_value_heads") or nh)
    hd = int(llm.get("head_dim") or H // nh)
    inter = int(llm["intermediate_size"])
    layers = int(llm["num_hidden_layers"])
    per_layer = H * nh * hd * 2 + 2 * H * nkv * hd + 3 * H * inter + 2 * H
    lm_head = 0 if llm.get("tie_word_embeddings") else V * H
    lang = V * H + layers * per_layer + H + lm_head
    linear = layers * (H * nh * hd * 2 + 2 * H * nkv * hd + 3 * H * inter)
    return {"vision": vision, "perceiver": perceiver, "fc": fc, "llm": lang,
            "llm_linear": linear, "total": vision + perceiver + fc + lang}
