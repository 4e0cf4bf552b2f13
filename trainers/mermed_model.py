"""MerMED-FM networks for training: timm ViT backbone + 768 -> 2048 -> 2048 -> 256 projection head.

The backbone is the plugin's own ViT (:func:`napari_medfm.models.mermed.model.build_vit`, timm
``VisionTransformer``, CLS pooling), so an export loads into the plugin unchanged. The head is
Linear-BN-GELU-Linear-BN-GELU-Linear, output L2-normalised. Its batch norms use statistics of the
*global* batch: :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`AllReduceBatchNorm1d` (sums
all-reduced with autograd) where SyncBatchNorm cannot run (CPU / gloo). Single process: plain BN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from napari_medfm.models.mermed.model import build_vit, read_backbone


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics are all-reduced over the default process group.

    Forward and backward are exact for the global batch (``torch.distributed.nn`` all-reduce
    carries the gradient), so 2 processes give the same result as 1 with the same global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        n = torch.tensor([float(x.shape[0])], device=x.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), n])
        stats = all_reduce(stats)
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            mom = self.momentum if self.momentum is not None else 0.1
            unbiased = var.detach() * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - mom).add_(mean.detach(), alpha=mom)
            self.running_var.mul_(1 - mom).add_(unbiased, alpha=mom)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class ProjectionHead(nn.Module):
    """``in -> hidden -> hidden -> out`` MLP with BN + GELU, L2-normalised output."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), AllReduceBatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), AllReduceBatchNorm1d(hidden), nn.GELU(),
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
               sync_bn: bool = False) -> tuple[MerMEDNet, MerMEDNet]:
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
    if sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
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
