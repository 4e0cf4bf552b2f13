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


def _has_mkldnn_pointwise() -> bool:
    return bool(torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _conv_relu(conv: nn.Conv3d, x: torch.Tensor, cpu_fused: bool) -> torch.Tensor:
    """ReLU(conv(x)); on the CPU one oneDNN call with the ReLU fused into the convolution."""
    if cpu_fused and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "relu", [], "")
    return torch.relu_(conv(x))


class _Pointwise(nn.Module):
    """A folded 1x1x1 convolution kept as a (Cout, Cin) matrix: one GEMM per sample."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.stride = conv.stride[0]
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def sub(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return x if s == 1 else x[:, :, ::s, ::s, ::s].contiguous()

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        x = self.sub(x)
        n, c, d, h, w = x.shape
        out = x.new_empty((n, self.weight.shape[0], d, h, w))
        for i in range(n):
            o = out[i].view(self.weight.shape[0], -1)
            torch.addmm(self.bias[:, None], self.weight, x[i].reshape(c, -1), out=o)
            if relu:
                o.relu_()
        return out

    def accumulate(self, into: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``into += conv(x)`` (bias included), in place, then ReLU: the residual tail."""
        n, c = x.shape[:2]
        for i in range(n):
            o = into[i].view(self.weight.shape[0], -1)
            o.addmm_(self.weight, x[i].reshape(c, -1))
            o.add_(self.bias[:, None]).relu_()
        return into


class _FusedBlock(nn.Module):
    def __init__(self, block: Bottleneck3d, cpu: bool) -> None:
        super().__init__()
        self.cpu = cpu
        self.cpu_fused = cpu and _has_mkldnn_pointwise()
        c1, c2, c3 = (_fold(block.conv1, block.bn1), _fold(block.conv2, block.bn2),
                      _fold(block.conv3, block.bn3))
        down = None if block.downsample is None else _fold(block.downsample[0],
                                                           block.downsample[1])
        if cpu:  # 1x1x1 convolutions as GEMMs (oneDNN's 3D path does not take them)
            self.conv1, self.conv3 = _Pointwise(c1), _Pointwise(c3)
            self.down = None if down is None else _Pointwise(down)
        else:
            self.conv1, self.conv3, self.down = c1, c3, down
        self.conv2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cpu:
            out = torch.relu_(self.conv1(x))
            out = torch.relu_(self.conv2(out))
            out = self.conv3(out)
            identity = x if self.down is None else self.down(x)
            del x
            out += identity
            del identity
            return torch.relu_(out)
        out = self.conv1(x, relu=True)
        out = _conv_relu(self.conv2, out, self.cpu_fused)
        # the block input is an intermediate we own: the residual is accumulated into it
        identity = x if self.down is None else self.down(x)
        del x
        return self.conv3.accumulate(identity, out)


class FusedI3DResNet(nn.Module):
    """Inference-only twin of :class:`I3DResNet` (same outputs, fewer ops and allocations).

    * batch norms folded into the preceding convolutions;
    * the channel repeat folded into ``conv1`` (sum of its three input-channel kernels), so the
      stem convolves one channel instead of three identical ones;
    * ``cpu=True`` (float32 on the CPU): 1x1x1 convolutions run as GEMMs, the 3x3x3 ones as
      oneDNN convolutions with the ReLU fused, and each residual is accumulated in place into
      the block input (``addmm_``) - no BN, copy or separate add passes over the big maps;
    * the stem (conv1 + ReLU + max-pool) computed in depth slabs, so the 64-channel
      full-resolution conv1 output (514 MB at 224x224x160) never exists at once;
    * intermediates released as early as possible.
    """

    def __init__(self, model: I3DResNet, cpu: bool = True) -> None:
        super().__init__()
        self.config = model.config
        self.cpu = cpu
        self.cpu_fused = cpu and _has_mkldnn_pointwise()
        conv1 = _fold(model.conv1, model.bn1)
        single = nn.Conv3d(1, conv1.out_channels, conv1.kernel_size, stride=conv1.stride,
                           padding=conv1.padding, bias=True)
        with torch.no_grad():
            single.weight.copy_(conv1.weight.sum(dim=1, keepdim=True))
            single.bias.copy_(conv1.bias)
        self.conv1 = single
        self.maxpool = copy.deepcopy(model.maxpool)
        self.blocks = nn.ModuleList(
            _FusedBlock(b, cpu) for i in range(1, 5) for b in getattr(model, f"layer{i}")
        )
        self.classifier = copy.deepcopy(model.classifier)
        self.contrastive_head = copy.deepcopy(model.contrastive_head)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def stem(self, x: torch.Tensor, slab: int = 8) -> torch.Tensor:
        """conv1 + ReLU + max-pool computed ``slab`` output depths at a time.

        Never materialises the full-resolution conv1 output (64 x D x H/2 x W/2: 514 MB for
        224x224x160), only one slab of it. Exact: after the ReLU every value is >= 0, so the
        pool's -inf depth padding can be replaced by zeros, and slabs overlap by one conv plane.
        """
        n, _, d, h, w = x.shape
        c1, pool = self.conv1, self.maxpool
        assert pool.kernel_size == 3 and pool.stride == 2 and pool.padding == 1
        assert c1.stride[0] == 1
        kd, kh, kw = c1.kernel_size
        pd, ph, pw = c1.padding
        dc = d + 2 * pd - kd + 1  # conv1 output depth (stride 1 in depth)
        d_out = (dc + 2 - 3) // 2 + 1
        h_c = (h + 2 * ph - kh) // c1.stride[1] + 1
        w_c = (w + 2 * pw - kw) // c1.stride[2] + 1
        h_out, w_out = (h_c + 2 - 3) // 2 + 1, (w_c + 2 - 3) // 2 + 1
        xp = torch.nn.functional.pad(x, (0, 0, 0, 0, pd, pd))  # depth padding done once
        conv = nn.Conv3d(1, c1.out_channels, c1.kernel_size, stride=c1.stride,
                         padding=(0, ph, pw), bias=True, device=x.device, dtype=x.dtype)
        conv.weight, conv.bias = c1.weight, c1.bias
        pool_hw = nn.MaxPool3d(kernel_size=3, stride=(2, 2, 2), padding=(0, 1, 1))
        out = x.new_empty((n, c1.out_channels, d_out, h_out, w_out))
        for j0 in range(0, d_out, slab):
            j1 = min(d_out, j0 + slab)
            t_lo, t_hi = 2 * j0 - 1, 2 * (j1 - 1) + 1  # conv planes the pool windows need
            a, b = max(t_lo, 0), min(t_hi, dc - 1)
            y = _conv_relu(conv, xp[:, :, a:b + kd], self.cpu_fused)  # planes a..b
            before, after = a - t_lo, t_hi - b
            if before or after:
                y = torch.nn.functional.pad(y, (0, 0, 0, 0, before, after))
            out[:, :, j0:j1] = pool_hw(y)
            del y
        return out

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = I3DResNet.to_network_layout(x).contiguous()
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    heads = I3DResNet.heads

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.trunk(x)
        out = self.heads(fmap)
        out["visual_tokens"] = fmap
        return out


def fuse_for_inference(model: I3DResNet, cpu: bool | None = None) -> FusedI3DResNet:
    """Build the fused inference twin of ``model`` (``model`` itself is left unchanged).

    ``cpu``: use the CPU-tuned blocks (default: when ``model`` is on the CPU).
    """
    if cpu is None:
        cpu = next(model.parameters()).device.type == "cpu"
    return FusedI3DResNet(model.eval(), cpu=cpu)
