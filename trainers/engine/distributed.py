"""torchrun plumbing: process group (env://; gloo on CPU, nccl on GPU), DDP / FSDP2 wrapping,
gathers that keep gradients, and a batch norm whose statistics span all ranks.

Works without torchrun too (a plain ``python trainers/x.py`` is a world of one, no process group).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# the differentiable collectives are what we want (gradients through the gather); their
# deprecation notice points at private APIs
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)

__all__ = ["Dist", "init_distributed", "all_gather_with_grad", "all_reduce_mean",
           "activation_checkpoint",
           "GlobalBatchNorm", "convert_batchnorm", "wrap_model", "seed_everything",
           "rank_seed"]


@dataclass
class Dist:
    """Where this process stands: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun world (``env://``) when ``WORLD_SIZE`` is set; else a world of one.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available). The backend is nccl on CUDA,
    gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw: dict[str, Any] = {"backend": backend, "init_method": "env://"}
            if dev.type == "cuda":
                kw["device_id"] = dev
            dist.init_process_group(**kw)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, *salt: int) -> int:
    """A 63-bit seed derived from (seed, rank, salt...) - distinct per rank, stable across runs."""
    ss = np.random.SeedSequence([int(seed), int(rank), *map(int, salt)])
    return int(ss.generate_state(1, np.uint64)[0]) & (2**63 - 1)


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch, numpy and ``random`` of this process from (seed, rank)."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, in rank order, gradients flowing back.

    (``torch.distributed.nn.functional.all_gather``; identity in a world of one.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (no gradient; for logging)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


_RECOMPUTING = __import__("threading").local()


def _recomputing() -> bool:
    return bool(getattr(_RECOMPUTING, "on", False))


class _Recompute:
    def __enter__(self) -> None:
        _RECOMPUTING.on = True

    def __exit__(self, *exc: Any) -> None:
        _RECOMPUTING.on = False


def activation_checkpoint(module: nn.Module) -> nn.Module:
    """Recompute ``module``'s activations in the backward pass (``torch.utils.checkpoint``,
    non-reentrant) instead of storing them. Batch norms of this package
    (:class:`GlobalBatchNorm`) do not update their running statistics twice."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    plain = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return plain(*args, **kwargs)
        return checkpoint(plain, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _Recompute()), **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    return module


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the GLOBAL batch (statistics all-reduced with gradients), on any backend.

    ``nn.SyncBatchNorm`` needs CUDA/NCCL; this one works with gloo on the CPU too, and in a world
    of one it is a plain batch norm. The state-dict keys are those of ``nn.BatchNorm{1,2,3}d``,
    so checkpoints and exports are unchanged. Running variance uses the unbiased global variance,
    like PyTorch. Statistics are computed in float32.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input, got {x.ndim}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats):
            return super().forward(x)
        dims = [0] + list(range(2, x.ndim))
        xf = x.float()
        c = x.shape[1]
        shape = [1, c] + [1] * (x.ndim - 2)
        # two passes (mean, then squared deviations), each summed over all ranks: the same
        # numerics as a plain batch norm up to summation order, for any split of the batch
        n_local = torch.tensor([float(x.numel() // c)], device=x.device)
        first = all_reduce_sum_with_grad(torch.cat([xf.sum(dim=dims), n_local]))
        n = first[c].detach()
        mean = first[:c] / n
        dev = xf - mean.view(shape)
        var = all_reduce_sum_with_grad((dev * dev).sum(dim=dims)) / n
        if self.training and self.track_running_stats and not _recomputing():
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / max(float(n) - 1.0, 1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = dev * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every ``BatchNorm{1,2,3}d`` of ``module`` for :class:`GlobalBatchNorm` in place
    (same parameters, buffers and key names)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and \
                not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                  affine=child.affine,
                                  track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.to(next(iter(child.state_dict().values())).device)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def wrap_model(model: nn.Module, d: Dist, parallel: str, precision: str,
               blocks: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` on each of ``blocks(model)``, then on the root).

    In a world of one the model is returned unwrapped (identical numerics, no all-reduce).
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', not {parallel!r}")
    if parallel == "fsdp" and d.active:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
        for blk in (blocks(model) if blocks else ()):
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        return model
    if d.active and d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids, broadcast_buffers=False,
                   find_unused_parameters=False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own unwrapped self)."""
    return model.module if hasattr(model, "module") and \
        isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
