"""Merlin's two losses: InfoNCE over the global batch and BCE over expanded phecodes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainers.engine.distributed import all_gather_with_grad

__all__ = ["info_nce", "phenotype_bce", "MAX_LOGIT_SCALE"]

#: CLIP's clamp of the learnable log-scale (exp = 100).
MAX_LOGIT_SCALE = math.log(100.0)


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between this rank's image and report features and those of every
    rank (gathered with gradients, in rank order). The positive of image i is report i.

    Every rank computes the same global loss; with DDP's gradient averaging this gives exactly
    the gradient of the single-process loss over the global batch. Returns (loss, accuracy).
    """
    img = F.normalize(all_gather_with_grad(image.float()), dim=-1)
    txt = F.normalize(all_gather_with_grad(text.float()), dim=-1)
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * img @ txt.T
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    acc = (logits.argmax(dim=1) == target).float().mean()
    return loss, acc.detach()


def phenotype_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over this rank's samples x 1692 phenotypes (the targets are
    already expanded up the hierarchy)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
