"""MerMED-FM networks for training: timm ViT backbone + 768 -> 2048 -> 2048 -> 256 projection head.

The backbone is the plugin's own ViT (:func:`napari_medfm.models.mermed.model.build_vit`, timm
``VisionTransformer``, CLS pooling), so an export loads into the plugin unchanged. The head is
Linear-BN-GELU-Linear-BN-GELU-Linear, output L2-normalised. In a distributed run its batch norms
use statistics of the *global* batch: :class:`torch.nn.SyncBatchNorm` on CUDA, the engine's
:class:`~trainers.engine.GlobalBatchNorm` (sums all-reduced with autograd) where SyncBatchNorm cannot
run (CPU / gloo). Single process: plain BN. The state-dict keys are those of ``nn.BatchNorm1d``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_medfm.models.mermed.model import build_vit, read_backbone


class ProjectionHead(nn.Module):
    """``in -> hidden -> hidden -> out`` MLP with BN + GELU, L2-normalised output."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, out_dim),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)


class MerMEDNet(nn.Module):
    """Backbone + head over a list of crops; crops of equal size share one backbone pass."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        # consecutive crops of the same resolution go through the backbone together
        feats, start = [], 0
        sizes = [c.shape[-1] for c in crops]
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            x = torch.cat(crops[start:end])
            f = self.backbone.forward_features(x)
            feats.append(self.backbone.forward_head(f, pre_logits=True))
            start = end
        z = self.head(torch.cat(feats))  # one head pass: BN statistics over every crop
        return list(z.chunk(len(crops)))


def vit_config(preset: dict[str, Any], *, drop_path: float) -> dict[str, Any]:
    cfg = dict(preset["vit"])
    cfg.update(dynamic_img_size=True, drop_path_rate=float(drop_path))
    return cfg


def build_nets(preset: dict[str, Any], *, drop_path: float, init: str | None = None,
               global_bn: str | None = None) -> tuple[MerMEDNet, MerMEDNet]:
    """(student, teacher): teacher = copy of the student (no drop path), no gradients."""
    student_vit = build_vit(vit_config(preset, drop_path=drop_path))
    teacher_vit = build_vit(vit_config(preset, drop_path=0.0))
    if init:
        sd = load_pretrained_backbone(init, student_vit)
        student_vit.load_state_dict(sd, strict=True)
    dim = int(student_vit.embed_dim)
    head = ProjectionHead(dim, preset["head_hidden"], preset["head_out"])
    student = MerMEDNet(student_vit.train(), head)
    teacher = MerMEDNet(teacher_vit, ProjectionHead(dim, preset["head_hidden"], preset["head_out"]))
    teacher.load_state_dict(student.state_dict(), strict=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if global_bn == "sync":  # CUDA / NCCL
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    elif global_bn == "allreduce":  # CPU / gloo, where SyncBatchNorm cannot run
        from trainers.engine import convert_batchnorm

        student = convert_batchnorm(student)
        teacher = convert_batchnorm(teacher)
    teacher.train()  # batch statistics in the teacher's head, as in the release
    return student, teacher


def load_pretrained_backbone(path: str | Path, vit: nn.Module) -> dict[str, torch.Tensor]:
    """Backbone tensors of a pretrained ViT from a file (.pth/.bin/.safetensors, plain state dict
    or a MerMED/DINO training checkpoint) or a hub-layout folder (``model.safetensors`` or
    ``pytorch_model.bin``); position embeddings are resampled to this ViT's grid if needed.
    Keys must otherwise match the ViT exactly (strict)."""
    from timm.layers import resample_abs_pos_embed

    from napari_medfm.errors import WeightsError

    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise WeightsError(f"{p}: no model.safetensors or pytorch_model.bin in the folder")
    sd, _ = read_backbone(p, key="teacher")  # safetensors, or torch.load(weights_only=True)
    own = vit.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        side = int(round((own["pos_embed"].shape[1] - 1) ** 0.5))
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[side, side],
                                                 num_prefix_tokens=1)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise WeightsError(f"{p.name}: pretrained ViT does not match the preset: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    return {k: v.float() for k, v in sd.items()}
