"""I3D inflation of a torchvision ResNet state dict into Merlin's image tower (centre rule).

Each k x k 2D kernel is written into the middle depth slice (``t // 2``) of a t x k x k kernel,
all other depth slices zero (not repeat-and-divide): ``conv1`` 7x7 -> 3x7x7, bottleneck ``conv2``
3x3 -> 3x3x3, the 1x1 convolutions and ``downsample.0`` -> 1x1x1. Batch-norm parameters and
running statistics are carried over unchanged. The torchvision ``fc`` is dropped; Merlin's
``classifier`` and ``contrastive_head`` keep their fresh initialisation.

Consequence (the check in the tests): fed a volume whose depth slices are all the same image,
every depth of the inflated network's feature maps equals the 2D network's feature map of that
image - each output depth only sees its own input slice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["inflate_state_dict", "load_torchvision_state_dict", "HEADS"]

HEADS = ("classifier.", "contrastive_head.")


def _inflate(w2d: torch.Tensor, depth: int) -> torch.Tensor:
    out = torch.zeros((w2d.shape[0], w2d.shape[1], depth, *w2d.shape[2:]), dtype=w2d.dtype)
    out[:, :, depth // 2] = w2d
    return out


def inflate_state_dict(sd2d: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """3D weights for every key of ``target`` (an :class:`I3DResNet` state dict) but the heads.

    ``sd2d``: a torchvision ResNet state dict (same block counts and widths as the target).
    Raises ``ValueError`` naming the keys that are missing or do not fit.
    """
    out: dict[str, torch.Tensor] = {}
    problems = []
    for k, t in target.items():
        if k.startswith(HEADS):
            continue
        src = sd2d.get(k)
        if src is None:
            problems.append(f"missing {k}")
            continue
        if t.ndim == 5:  # a Conv3d weight (out, in, t, kh, kw)
            if src.ndim != 4 or tuple(src.shape[:2]) != tuple(t.shape[:2]) \
                    or tuple(src.shape[2:]) != tuple(t.shape[3:]):
                problems.append(f"{k}: 2D {tuple(src.shape)} does not inflate to {tuple(t.shape)}")
                continue
            out[k] = _inflate(src.detach().float(), int(t.shape[2])).to(t.dtype)
        else:
            if tuple(src.shape) != tuple(t.shape):
                problems.append(f"{k}: {tuple(src.shape)} != {tuple(t.shape)}")
                continue
            out[k] = src.detach().clone().to(t.dtype)
    if problems:
        raise ValueError("cannot inflate the 2D ResNet into this image tower: "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return out


def load_torchvision_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-152 state dict: a ``.pth`` file (loaded with weights_only=True), or
    ``"torchvision"`` for ``ResNet152_Weights.IMAGENET1K_V1`` from the torch hub cache
    (downloaded by torchvision if absent and the network allows)."""
    if str(source) == "torchvision":
        from torchvision.models import ResNet152_Weights

        return dict(ResNet152_Weights.IMAGENET1K_V1.get_state_dict(progress=False))
    from napari_medfm.runtime.safe_load import load_state_dict

    return dict(load_state_dict(Path(source), mmap=False))
