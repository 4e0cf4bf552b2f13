"""Step checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, resharding, exact.

Layout of one checkpoint (``OUT/checkpoints/step-00000120/``)::

    .metadata, __0_0.distcp, ...   DCP: {"model", "optim", "recipe"} (resharded on load: a
                                   checkpoint written by 2 ranks loads into 1, and back)
    rng-rank0.pt, rng-rank1.pt     per-rank RNG states (torch, CUDA, numpy, random) as tensors
                                   only, loadable with weights_only=True
    trainer_state.json             step, data position, world size, scheduler, last metrics
    COMPLETE                       written last, before the rename

Atomicity: every rank writes into ``.tmp-step-N/``; once all are done rank 0 writes
``trainer_state.json`` and ``COMPLETE``, fsyncs, and renames the folder to ``step-N`` (one
``os.rename``). Only folders named ``step-N`` that contain ``COMPLETE`` count; leftovers of a
killed save (``.tmp-*``) are ignored and removed at the next start. The latest ``keep_last`` complete
checkpoints are kept.

RNG states on a resume at another world size: rank r restores the state saved by rank r when
there is one; ranks the checkpoint did not have (growing the world) start from a fresh state
derived from (seed, rank, step). Data order never depends on these states (see
:mod:`trainers.engine.data`), so a resharded resume sees exactly the samples the old run would have.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import Dist, rank_seed

__all__ = ["CheckpointManager", "capture_rng", "restore_rng", "complete_checkpoints"]

_STEP = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


# ------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG states as plain tensors (weights_only-loadable)."""
    out: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937"
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy_meta"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    version, internal, gauss = random.getstate()
    out["random_internal"] = torch.tensor(internal, dtype=torch.int64)
    out["random_meta"] = torch.tensor([version], dtype=torch.int64)
    out["random_gauss"] = torch.tensor([float("nan") if gauss is None else gauss],
                                       dtype=torch.float64)
    return out


def restore_rng(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    pos, has_gauss = (int(v) for v in s["numpy_meta"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(s["numpy_gauss"][0])))
    g = float(s["random_gauss"][0])
    random.setstate((int(s["random_meta"][0]), tuple(int(v) for v in s["random_internal"]),
                     None if np.isnan(g) else g))


def _fresh_rng(seed: int, rank: int, step: int) -> None:
    x = rank_seed(seed, rank, step)
    random.seed(x)
    np.random.seed(x % 2**32)
    torch.manual_seed(x)


# ------------------------------------------------------------------------------------ files
def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``[(step, folder), ...]`` of the complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file() and (p / STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


@dataclass
class Loaded:
    step: int
    path: Path
    state: dict[str, Any]


class CheckpointManager:
    """Saves/loads step folders under ``root`` (shared by all ranks)."""

    def __init__(self, root: str | Path, d: Dist, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.d = d
        self.keep_last = max(1, int(keep_last))
        self.debug_kill_in_save_at = 0  # tests: SIGKILL just before committing this step

    def clean_partial(self) -> None:
        """Remove leftovers of interrupted saves (rank 0; call before training)."""
        if self.d.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-step-") or (
                        _STEP.match(p.name) and not (p / COMPLETE).is_file()):
                    shutil.rmtree(p, ignore_errors=True)
        self.d.barrier()

    def latest(self) -> tuple[int, Path] | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    # ---------------------------------------------------------------- save
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], recipe_state: dict[str, Any] | None = None) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.d.barrier()
        msd, osd = get_state_dict(model, optimizer)
        payload: dict[str, Any] = {"model": msd, "optim": osd}
        if recipe_state:
            payload["recipe"] = recipe_state
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.save(payload, checkpoint_id=str(tmp), no_dist=not self.d.active)
        rng_path = tmp / f"rng-rank{self.d.rank}.pt"
        torch.save(capture_rng(), rng_path)
        with open(rng_path, "rb+") as fh:
            os.fsync(fh.fileno())
        self.d.barrier()
        if self.debug_kill_in_save_at and step == self.debug_kill_in_save_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if self.d.is_main:
            state = dict(trainer_state, step=step, world_size=self.d.world_size)
            _write_synced(tmp / STATE, (json.dumps(state, indent=1) + "\n").encode())
            _write_synced(tmp / COMPLETE, b"complete\n")
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. SIGTERM right after a save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.d.barrier()
        return final

    def _prune(self) -> None:
        found = complete_checkpoints(self.root)
        for _, p in found[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             recipe_state: dict[str, Any] | None = None, seed: int = 0) -> Loaded:
        """Load a complete checkpoint into ``model``/``optimizer`` (resharding as needed) and
        restore this rank's RNG states. Returns the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (path / COMPLETE).is_file():
            raise RuntimeError(f"checkpoint {path} is incomplete (no {COMPLETE}); not loaded")
        state = json.loads((path / STATE).read_text())
        msd, osd = get_state_dict(model, optimizer)
        payload: dict[str, Any] = {"model": msd, "optim": osd}
        if recipe_state:
            payload["recipe"] = recipe_state
        # every model tensor must be in the checkpoint; optimizer entries may be missing for
        # parameters that never received a gradient (their state stays as initialised)
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        lost = [k for k in payload["model"] if f"model.{k}" not in saved]
        if lost:
            raise RuntimeError(f"checkpoint {path} lacks model tensors {lost[:5]}; it was "
                               "written by a different model")
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
            dcp.load(payload, checkpoint_id=str(path), no_dist=not self.d.active,
                     planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optimizer, model_state_dict=payload["model"],
                       optim_state_dict=payload["optim"])
        rng = path / f"rng-rank{self.d.rank}.pt"
        if rng.is_file():
            restore_rng(torch.load(rng, map_location="cpu", weights_only=True))
        else:
            _fresh_rng(seed, self.d.rank, int(state["step"]))
        return Loaded(step=int(state["step"]), path=path, state=state)
