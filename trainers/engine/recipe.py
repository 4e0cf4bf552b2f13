"""What a recipe provides. Subclass :class:`Recipe`, override what you need, and hand an
instance to :func:`trainers.engine.loop.run` (or use :func:`trainers.engine.cli_entry`)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import Dist
from .manifest import Row

__all__ = ["Recipe", "RunContext"]


@dataclass
class RunContext:
    """Everything a recipe hook may need about the run (read-only for recipes)."""

    cfg: dict[str, Any]
    dist: Dist
    out: Path
    step: int = 0                  # optimizer steps done so far (0 during the first step)
    max_steps: int = 0
    micro_batch: int = 1           # samples per rank per micro-step
    micro_global: int = 1          # samples per micro-step over all ranks (= contrastive batch)
    grad_accum: int = 1
    rows: Sequence[Row] = field(default_factory=list)
    manifest: Path | None = None
    manifest_sha256: str | None = None
    autocast: Any = None           # callable -> context manager (bf16 autocast or nullcontext)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def export_dir(self) -> Path:
        return self.out / "export"


class Recipe:
    """Base recipe. Required: :attr:`name`, :attr:`presets`, :meth:`build_model`,
    :meth:`build_dataset`, :meth:`training_step`. Everything else has a sensible default."""

    name: str = "recipe"
    #: preset name -> nested config (merged over the engine's ``train`` defaults)
    presets: Mapping[str, Mapping[str, Any]] = {}
    default_preset: str = "tiny"
    #: manifest columns
    required_columns: Sequence[str] = ("image",)
    optional_columns: Sequence[str] = ("split",)
    description: str = ""

    # ---------------------------------------------------------------- command line
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Extra recipe flags (the engine adds --data/--out/--preset/... itself)."""

    def flags_to_config(self, args: argparse.Namespace) -> dict[str, Any]:
        """Map the recipe's own flags to dotted config keys (None values are ignored)."""
        return {}

    # ---------------------------------------------------------------- data
    def check_row(self, row: Row, cfg: Mapping[str, Any]) -> list[str]:
        """Problems of one manifest row (empty = fine). Called on rank 0 before training."""
        return []

    def prepare(self, ctx: RunContext) -> None:
        """Once per process after validation, before the model is built (e.g. build a tokenizer
        on rank 0 then barrier)."""

    def build_dataset(self, ctx: RunContext) -> Any:
        """A dataset with ``__len__`` and ``get(index, rng)`` over ``ctx.rows``."""
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        return torch.utils.data.default_collate(samples)

    # ---------------------------------------------------------------- model
    def build_model(self, ctx: RunContext) -> nn.Module:
        """The trainable module (CPU, fp32). Seeded identically on every rank by the engine."""
        raise NotImplementedError

    def fsdp_blocks(self, model: nn.Module) -> Iterable[nn.Module]:
        """Modules to ``fully_shard`` one by one before the root (FSDP2)."""
        return ()

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        """Turn on activation checkpointing (``train.grad_checkpointing``)."""
        raise NotImplementedError(f"recipe {self.name} has no gradient checkpointing")

    def param_groups(self, model: nn.Module, ctx: RunContext) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups (None: weight decay on >=2-D tensors, none on the rest).
        A group may carry ``lr_scale``: its lr is ``lr_scale`` x the schedule."""
        return None

    # ---------------------------------------------------------------- step
    def training_step(self, model: nn.Module, batch: Any, ctx: RunContext
                      ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Loss of this rank's micro-batch (a mean over its samples, so that the mean over
        ranks is the global loss) and metrics to log. Use
        :func:`~trainers.engine.distributed.all_gather_with_grad` for global-batch losses."""
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module, ctx: RunContext) -> None:
        """Hook after each optimizer step (EMA teacher, queues...)."""

    # ---------------------------------------------------------------- state / export
    def state_dict(self) -> dict[str, Any]:
        """Extra recipe state saved in every checkpoint (tensors, via DCP)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def export(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        """Write the release files into ``ctx.export_dir`` (rank 0 only; ``model`` is the
        unwrapped module with full tensors). Returns ``{"files": {role: name}, ...extra card
        fields}``."""
        return {"files": {}}
