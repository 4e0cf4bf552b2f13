"""Merlin image tower: an I3D-inflated ResNet-152 with phenotype and contrastive heads.

Built from the public description of the released checkpoint (see ``docs/merlin.md``): the
state-dict key names below are those of the released file after stripping the prefix
``encode_image.i3_resnet.``, so :meth:`I3DResNet.load_state_dict` with ``strict=True`` accepts
the released weights unchanged.

The depth/width of the network is configurable so tests can build a tiny random-weight model
with the same key layout (:data:`TINY_CONFIG`).

Also here: :func:`fuse_for_inference`, an exact (up to float rounding) faster CPU path that
folds batch norms into the convolutions and the single-to-three channel repeat into ``conv1``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = [
    "MerlinImageConfig",
    "FULL_CONFIG",
    "TINY_CONFIG",
    "Bottleneck3d",
    "I3DResNet",
    "FusedI3DResNet",
    "fuse_for_inference",
    "IMAGE_PREFIX",
]

#: Prefix of the image tower in the released CLIP checkpoint.
IMAGE_PREFIX = "encode_image.i3_resnet."


@dataclass(frozen=True)
class MerlinImageConfig:
    """Shape of the image tower. The defaults are the released ResNet-152."""

    layers: tuple[int, int, int, int] = (3, 8, 36, 3)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    expansion: int = 4
    n_phenotypes: int = 1692
    contrastive_dim: int | None = 512
    in_channels: int = 3  # the model repeats the single CT channel to 3 (I3D from RGB ImageNet)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * self.expansion

    def to_dict(self) -> dict:
        return asdict(self)


FULL_CONFIG = MerlinImageConfig()
#: Same key layout, a few thousand times cheaper: for tests.
TINY_CONFIG = MerlinImageConfig(layers=(1, 1, 2, 1), widths=(4, 8, 8, 16))


class Bottleneck3d(nn.Module):
    """1x1x1 -> 3x3x3 (stride on all axes) -> 1x1x1 bottleneck with a residual connection."""

    def __init__(self, in_ch: int, width: int, stride: int, expansion: int,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        out_ch = width * expansion
        self.conv1 = nn.Conv3d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width, eps=1e-5)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width, eps=1e-5)
        self.conv3 = nn.Conv3d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_ch, eps=1e-5)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu(out)


class I3DResNet(nn.Module):
    """The Merlin image tower.

    Input ``(B, 1, H, W, D)`` float32 in [0, 1] with H/W/D = RAS x/y/z (MONAI channel-first
    layout after :mod:`~napari_medfm.models.merlin.preprocess`). Internally permuted to
    ``(B, 1, D, H, W)`` and repeated to 3 channels.
    """

    def __init__(self, config: MerlinImageConfig = FULL_CONFIG) -> None:
        super().__init__()
        self.config = config
        c = config
        stem = c.widths[0]
        self.conv1 = nn.Conv3d(c.in_channels, stem, kernel_size=(3, 7, 7), stride=(1, 2, 2),
                               padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(stem, eps=1e-5)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        in_ch = stem
        for i, (n, w) in enumerate(zip(c.layers, c.widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                down = None
                if b == 0 and (stride != 1 or in_ch != w * c.expansion):
                    down = nn.Sequential(
                        nn.Conv3d(in_ch, w * c.expansion, 1, stride=stride, bias=False),
                        nn.BatchNorm3d(w * c.expansion, eps=1e-5),
                    )
                blocks.append(Bottleneck3d(in_ch, w, stride if b == 0 else 1, c.expansion, down))
                in_ch = w * c.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.classifier = nn.Conv3d(in_ch, c.n_phenotypes, 1, bias=True)
        # the 5-year network has no contrastive head (contrastive_dim=None)
        self.contrastive_head = (nn.Conv3d(in_ch, c.contrastive_dim, 1, bias=True)
                                 if c.contrastive_dim else None)

    # --------------------------------------------------------------- pieces
    @staticmethod
    def to_network_layout(x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W, D) -> (B, 1, D, H, W)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, H, W, D) tensor, got {tuple(x.shape)}")
        return x.permute(0, 1, 4, 2, 3)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_network_layout(x)
        x = x.repeat(1, self.config.in_channels, 1, 1, 1)
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Layer4 feature map ``(B, 2048, D/16, H/32, W/32)`` (10x7x7 for 224x224x160)."""
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def heads(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global average pooling, then the 1x1x1 ``classifier`` / ``contrastive_head``."""
        pooled = fmap.mean(dim=(2, 3, 4), keepdim=True)
        out = {
            "image_embedding": pooled.flatten(1),
            "phenotype_logits": self.classifier(pooled).flatten(1),
        }
        if self.contrastive_head is not None:
            out["contrastive_embedding"] = self.contrastive_head(pooled).flatten(1)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.trunk(x)
        out = self.heads(fmap)
        out["visual_tokens"] = fmap
        return out

    def trunk_parameter_count(self) -> int:
        heads = {"classifier", "contrastive_head"}
        return sum(p.numel() for n, p in self.named_parameters() if n.split(".")[0] not in heads)


# ---------------------------------------------------------------------------------- fast path
def _fold(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    """A conv with bias equal to ``bn(conv(x))`` in eval mode (float64 arithmetic)."""
    w = conv.weight.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    bias = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double() * scale
    out = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    with torch.no_grad():
        out.weight.copy_((w * scale.view(-1, 1, 1, 1, 1)).to(conv.weight.dtype))
        out.bias.copy_(bias.to(conv.weight.dtype))
    return out


class _FusedBlock(nn.Module):
    def __init__(self, block: Bottleneck3d) -> None:
        super().__init__()
        self.conv1 = _fold(block.conv1, block.bn1)
        self.conv2 = _fold(block.conv2, block.bn2)
        self.conv3 = _fold(block.conv3, block.bn3)
        self.down = None if block.downsample is None else _fold(block.downsample[0],
                                                                block.downsample[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu_(self.conv1(x))
        out = torch.relu_(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.down is None else self.down(x)
        del x  # let the block input go as early as possible
        out += identity
        del identity
        return torch.relu_(out)


class FusedI3DResNet(nn.Module):
    """Inference-only twin of :class:`I3DResNet` (same outputs, fewer ops and allocations).

    * batch norms folded into the preceding convolutions;
    * the channel repeat folded into ``conv1`` (sum of its three input-channel kernels), so the
      stem convolves one channel instead of three identical ones;
    * in-place ReLU/residual add, intermediates released early;
    * optional ``channels_last_3d`` memory format (oneDNN's preferred layout on CPU).
    """

    def __init__(self, model: I3DResNet, channels_last: bool = False) -> None:
        super().__init__()
        self.config = model.config
        conv1 = _fold(model.conv1, model.bn1)
        single = nn.Conv3d(1, conv1.out_channels, conv1.kernel_size, stride=conv1.stride,
                           padding=conv1.padding, bias=True)
        with torch.no_grad():
            single.weight.copy_(conv1.weight.sum(dim=1, keepdim=True))
            single.bias.copy_(conv1.bias)
        self.conv1 = single
        self.maxpool = copy.deepcopy(model.maxpool)
        self.blocks = nn.ModuleList(
            _FusedBlock(b) for i in range(1, 5) for b in getattr(model, f"layer{i}")
        )
        self.classifier = copy.deepcopy(model.classifier)
        self.contrastive_head = copy.deepcopy(model.contrastive_head)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)
        self.eval()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = I3DResNet.to_network_layout(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.maxpool(torch.relu_(self.conv1(x)))
        for blk in self.blocks:
            x = blk(x)
        return x

    heads = I3DResNet.heads

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.trunk(x)
        out = self.heads(fmap)
        out["visual_tokens"] = fmap
        return out


def fuse_for_inference(model: I3DResNet, channels_last: bool = False) -> FusedI3DResNet:
    """Build the fused inference twin of ``model`` (``model`` itself is left unchanged)."""
    return FusedI3DResNet(model.eval(), channels_last=channels_last)
