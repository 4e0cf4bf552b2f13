"""MerMED-FM self-supervised pretraining (memory-bank teacher-student, balanced modalities).

    medfm train mermed --data MANIFEST.csv --out DIR [--preset tiny|paper|release] [--max-steps N] [--resume]
    torchrun --nproc-per-node 8 -m trainers.mermed --data MANIFEST.csv --out DIR --preset release

Manifest columns ``image``, ``modality``. On the trainer engine's parts (``trainers/engine``): its
distributed set-up, its DCP step folders ``DIR/checkpoints/step-N/`` (student, teacher, optimizer and
memory bank resharded on load; per-rank RNG states; complete folders only, the newest ``--keep``
kept), SIGTERM = save and exit, no run overwritten without ``--resume``, and its metrics logger
``DIR/metrics.csv`` (``step`` = steps done); the step loop is the recipe's own (two networks, the
memory bank, four schedules, per-parameter clipping).
and, at the end, ``DIR/export/MerMED.pth`` (the teacher under ``teacher`` -> ``module.backbone.*`` /
``module.head.*`` as in the release, plain tensors, ``torch.load(weights_only=True)`` works),
``DIR/export/MerMED.safetensors`` (same tensors + ViT config in the metadata) and
``DIR/export/model_card.json``. ``medfm embed --model mermed --weights DIR/export/MerMED.pth`` loads it.

Differences from the public release (on purpose; see docs/training-mermed.md): the masked softmax
gives loss 0 and gradient 0 on block rows without a same-modality slot (release: NaN); the sampler
uses the global rank (release: the local rank, duplicating data across nodes); the block partition
comes from (seed, step) so resume and world size do not change it; checkpoints are complete step
folders holding RNG and sampler state; the queue push happens
after backward (the logits use the queue before the push either way, so the result is the same).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):  # `torchrun trainers/mermed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("trainers.mermed")

_TINY_VIT = {"img_size": 64, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2,
             "mlp_ratio": 2.0, "qkv_bias": True}
_VIT_B16 = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
            "mlp_ratio": 4.0, "qkv_bias": True}

#: Recipe presets. ``batch_size`` is per process; lr = base_lr * global batch / 256.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vit=_TINY_VIT, head_hidden=64, head_out=32, memory=32, blocks=2,
                 global_size=64, local_size=32, n_local=10, batch_size=4, epochs=4,
                 warmup_epochs=1, teacher_temp_warmup_epochs=1, base_lr=5e-4, min_lr=1e-6,
                 drop_path=0.0, workers=0),
    "paper": dict(vit=_VIT_B16, head_hidden=2048, head_out=256, memory=65536, blocks=4,
                  global_size=224, local_size=96, n_local=10, batch_size=64, epochs=100,
                  warmup_epochs=10, teacher_temp_warmup_epochs=10, base_lr=5e-5, min_lr=1e-6,
                  drop_path=0.1, workers=8),
    "release": dict(vit=_VIT_B16, head_hidden=2048, head_out=256, memory=131072, blocks=8,
                    global_size=224, local_size=96, n_local=10, batch_size=128, epochs=100,
                    warmup_epochs=10, teacher_temp_warmup_epochs=10, base_lr=5e-5, min_lr=1e-6,
                    drop_path=0.1, workers=8),
}
COMMON = dict(wd=0.04, wd_end=0.4, momentum=0.9995, tau_s=0.1, tau_t=0.04, tau_t_end=0.07,
              layer_decay=0.8, clip=1.0)


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="manifest CSV (columns image, modality)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, export)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this global step (the schedules still span the whole run)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--init", default=None,
                   help="pretrained ViT: a file (.pth/.safetensors) or a hub-layout folder")
    p.add_argument("--batch-size", type=int, default=None, help="per process (preset default)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--total-steps", type=int, default=None,
                   help="schedule length in steps (default epochs x steps per epoch)")
    p.add_argument("--memory-size", type=int, default=None, help="K (divisible by global batch)")
    p.add_argument("--blocks", type=int, default=None, help="P, blocks of the memory partition")
    p.add_argument("--lr", type=float, default=None, help="base lr per 256 samples")
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data-loader workers per process")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints kept")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")


def main(args: argparse.Namespace) -> int:
    trainer = Trainer(args)
    try:
        trainer.run()
    finally:
        trainer.close()
    return 0


# ---------------------------------------------------------------------------- trainer


def read_checkpoint(step_dir: str | Path) -> dict[str, Any]:
    """A complete MerMED checkpoint folder as plain tensors: ``step``, ``student``, ``teacher``,
    ``optimizer``, ``memory`` (queue, labels, ptr), ``sampler`` and ``config`` (for tests,
    inspection and conversions; training resumes through the engine's loader)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from trainers.engine.checkpoint import COMPLETE, STATE

    step_dir = Path(step_dir)
    if not (step_dir / COMPLETE).is_file():
        raise FileNotFoundError(f"{step_dir} is not a complete checkpoint (no {COMPLETE})")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(step_dir), str(Path(tmp) / "ckpt.pt"))
        flat = torch.load(Path(tmp) / "ckpt.pt", weights_only=True)
    state = json.loads((step_dir / STATE).read_text())
    model = flat["model"]
    return {"step": int(state["step"]),
            "student": {k[8:]: v for k, v in model.items() if k.startswith("student.")},
            "teacher": {k[8:]: v for k, v in model.items() if k.startswith("teacher.")},
            "optimizer": flat["optim"], "memory": flat["recipe"]["memory"],
            "sampler": state["sampler"], "config": state["config"]}


class Trainer:
    def __init__(self, args: argparse.Namespace):
        import torch

        from napari_medfm.errors import MedfmError
        from trainers import mermed_core as core
        from trainers.engine.distributed import init_distributed
        from trainers.mermed_data import (
            BalancedModalitySampler,
            CropSpec,
            MultiCropDataset,
            mermed_samples,
        )
        from trainers.mermed_model import build_nets

        self.args = args
        self.core = core
        if args.threads:
            torch.set_num_threads(args.threads)
        self.dist = d = init_distributed(args.device)
        self.world, self.rank = d.world_size, d.rank
        self.device = d.device
        want_cuda = self.device.type == "cuda"
        self.distributed = d.active
        preset = dict(PRESETS[args.preset])
        for key, val in (("batch_size", args.batch_size), ("epochs", args.epochs),
                         ("memory", args.memory_size), ("blocks", args.blocks),
                         ("base_lr", args.lr), ("drop_path", args.drop_path),
                         ("workers", args.workers)):
            if val is not None:
                preset[key] = val
        self.preset = preset
        self.hp = dict(COMMON)
        self.out = Path(args.out)
        from trainers.engine.checkpoint import CheckpointManager
        from trainers.engine.loop import check_out

        check_out(self.out, bool(args.resume), d)  # never overwrites a run without --resume
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        d.barrier()
        self.ckpt = CheckpointManager(self.out / "checkpoints", d, int(args.keep))
        self.ckpt.clean_partial()

        samples = mermed_samples(args.data)
        self.modalities = sorted({s.modality for s in samples})
        self.n_samples = len(samples)
        self.counts = {m: sum(s.modality == m for s in samples) for m in self.modalities}
        B = int(preset["batch_size"])
        self.global_batch = B * self.world
        K = int(preset["memory"])
        if K % self.global_batch:
            raise MedfmError(f"memory size {K} is not divisible by the global batch "
                             f"{self.global_batch} ({B} x {self.world} processes)")
        if K % int(preset["blocks"]):
            raise MedfmError(f"memory size {K} is not divisible into {preset['blocks']} blocks")
        spe = max(1, math.ceil(self.n_samples / self.global_batch))
        self.steps_per_epoch = spe
        self.total = int(args.total_steps or preset["epochs"] * spe)
        self.warmup = int(preset["warmup_epochs"] * spe)
        self.tt_warmup = int(preset["teacher_temp_warmup_epochs"] * spe)
        self.lr_base = float(preset["base_lr"]) * self.global_batch / 256.0
        self.max_steps = min(self.total, args.max_steps) if args.max_steps else self.total

        self.spec = CropSpec(global_size=preset["global_size"], local_size=preset["local_size"],
                             n_local=preset["n_local"])
        self.dataset = MultiCropDataset(samples, self.modalities, self.spec)
        self.sampler = BalancedModalitySampler([s.modality for s in samples], batch_size=B,
                                               rank=self.rank, world_size=self.world,
                                               seed=args.seed)
        torch.manual_seed(args.seed)  # same initial weights on every rank
        bn = None if not self.distributed else ("sync" if want_cuda else "allreduce")
        student, teacher = build_nets(preset, drop_path=float(preset["drop_path"]), init=args.init,
                                      global_bn=bn)
        self.depth = int(preset["vit"]["depth"])
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device)
        self.pair = torch.nn.ModuleDict({"student": self.student, "teacher": self.teacher})
        groups = core.param_groups(self.student.named_parameters(), self.depth,
                                   self.hp["layer_decay"])
        for g in groups:
            g.pop("names")
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.student_ddp = DDP(self.student, device_ids=[self.device.index] if want_cuda
                                   else None, broadcast_buffers=False)
        else:
            self.student_ddp = self.student
        self.bank = core.MemoryBank(K, preset["head_out"], seed=args.seed, device=self.device)
        self.step = 0
        self.last: dict[str, Any] = {}
        torch.manual_seed(args.seed * 1000 + self.rank + 1)  # per-rank stream (drop path)
        if args.resume:
            self._load_latest()
        from trainers.engine.metrics import MetricsLogger

        self.metrics = MetricsLogger(self.out, self.rank == 0, False,
                                     self.step if args.resume else None)

    # ------------------------------------------------------------------ schedules
    def schedules(self, step: int) -> dict[str, float]:
        c = self.core
        return {
            "lr": c.lr_at(step, base=self.lr_base, final=float(self.preset["min_lr"]),
                          warmup=self.warmup, total=self.total),
            "wd": c.wd_at(step, start=self.hp["wd"], end=self.hp["wd_end"], total=self.total),
            "momentum": c.momentum_at(step, start=self.hp["momentum"], total=self.total),
            "tau_t": c.teacher_temp_at(step, start=self.hp["tau_t"], end=self.hp["tau_t_end"],
                                       warmup=self.tt_warmup),
        }

    # ------------------------------------------------------------------ loop
    def _loader(self):
        import torch

        from trainers.mermed_data import collate

        workers = int(self.preset["workers"])
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=iter(self.sampler), num_workers=workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if workers else None)

    def _gather(self, x):
        import torch
        import torch.distributed as dist

        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # rank order

    def run(self) -> None:
        import torch

        if self.step >= self.max_steps:
            self._export()
            return
        rng = torch.get_rng_state()
        loader = iter(self._loader())
        torch.set_rng_state(rng)  # creating the loader iterator draws from the RNG
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        from trainers.engine.loop import StopOnSigterm

        stop = StopOnSigterm()
        stop.install()  # SIGTERM (pre-emption): save at the end of this step and exit
        try:
            self._loop(loader, autocast, stop)
        finally:
            stop.restore()
        if not stop.requested:
            self._export()

    def _loop(self, loader: Any, autocast: Any, stop: Any) -> None:
        import torch

        core = self.core
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            step = self.step
            views, labels = next(loader)
            views = [v.to(self.device, non_blocking=True) for v in views]
            labels = labels.to(self.device)
            sch = self.schedules(step)
            core.apply_schedules(self.optimizer, sch["lr"], sch["wd"])
            blocks = core.partition(self.bank.size, int(self.preset["blocks"]), seed=self.args.seed,
                                    step=step).to(self.device)
            valid = self.bank.mask(labels)
            with autocast:
                with torch.no_grad():
                    t_out = self.teacher(views[:2])
                s_out = self.student_ddp(views)
                loss = core.mermed_loss(s_out, t_out, self.bank.queue, blocks, valid,
                                        tau_s=self.hp["tau_s"], tau_t=sch["tau_t"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            core.clip_per_parameter(self.student.parameters(), self.hp["clip"])
            self.optimizer.step()
            core.ema_update(self.teacher, self.student, sch["momentum"])
            # FIFO push of this step's teacher embeddings of global view 2 (all ranks, rank order)
            self.bank.push(self._gather(t_out[1].detach().float()), self._gather(labels))
            self.step = step + 1
            loss_v = self._mean(loss.detach())
            dt = time.perf_counter() - t0
            self.last = {"loss": loss_v}
            self.metrics.log(self.step, {"loss": loss_v, **sch, "masking": int(valid is not None),
                                         "samples_per_s": self.global_batch / max(dt, 1e-9),
                                         "time_s": dt})
            if self.rank == 0 and (step % 10 == 0 or self.step == self.max_steps):
                log.info("step %d/%d loss %.4f lr %.2e", self.step, self.total, loss_v, sch["lr"])
            saved = self.step % self.args.save_every == 0 or self.step == self.max_steps
            if saved:
                self._save()
            if self.dist.any(stop.requested):
                if not saved:
                    self._save()
                if self.rank == 0:
                    log.warning("SIGTERM: saved step %d, exiting", self.step)
                return

    def _mean(self, x) -> float:
        import torch.distributed as dist

        if self.distributed:
            x = x.clone()
            dist.all_reduce(x)
            x = x / self.world
        return float(x)

    # ------------------------------------------------------------------ checkpoints
    # The engine's DCP step folders (trainers/engine/checkpoint.py): student + teacher +
    # optimizer + memory bank through DCP, per-rank RNG states, the sampler position and the
    # run's shape in trainer_state.json; atomic, the latest --keep kept.
    def _trainer_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_at(self.step), "last": self.last,
                "config": {"preset": self.args.preset, "seed": self.args.seed,
                           "world_size": self.world, "global_batch": self.global_batch,
                           "total_steps": self.total}}

    def _save(self) -> None:
        self.ckpt.save(self.step, self.pair, self.optimizer, self._trainer_state(),
                       {"memory": self.bank.state_dict()})

    def _barrier(self) -> None:
        self.dist.barrier()

    def _load_latest(self) -> None:
        from napari_medfm.errors import MedfmError

        found = self.ckpt.latest()
        if found is None:
            log.warning("--resume: no complete checkpoint in %s, starting from step 0",
                        self.ckpt.root)
            return
        _, d = found
        state = json.loads((d / "trainer_state.json").read_text())
        cfg = state["config"]
        if cfg["global_batch"] != self.global_batch:
            raise MedfmError(f"{d}: saved with global batch {cfg['global_batch']}, this run has "
                             f"{self.global_batch}")
        rstate = {"memory": self.bank.state_dict()}
        loaded = self.ckpt.load(d, self.pair, self.optimizer, rstate, seed=int(self.args.seed))
        self.bank.load_state_dict(rstate["memory"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = loaded.step
        self.last = dict(state.get("last") or {})
        log.info("resumed from %s (step %d)", d, self.step)

    # ------------------------------------------------------------------ export
    def _export(self) -> None:
        if self.rank == 0:
            export_release_layout(self.teacher, self.out / "export", preset_name=self.args.preset,
                                  preset=self.preset, step=self.step, total=self.total,
                                  data=self.args.data, counts=self.counts, world=self.world,
                                  global_batch=self.global_batch, last=self.last)
        self._barrier()

    def close(self) -> None:
        from trainers.engine.distributed import shutdown

        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "dist"):
            shutdown(self.dist)


def export_release_layout(teacher: Any, folder: Path, *, preset_name: str, preset: dict[str, Any],
                          step: int, total: int, data: str, counts: dict[str, int], world: int,
                          global_batch: int, last: dict[str, Any] | None = None) -> dict[str, Path]:
    """``MerMED.pth`` (release layout, plain tensors) + ``MerMED.safetensors`` + ``model_card.json``."""
    import torch
    from safetensors.torch import save_file

    from napari_medfm.io.writers import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    sd = teacher.state_dict()
    tensors = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        tensors[f"module.{k}"] = v.detach().float().cpu().contiguous()
    vit_cfg = {k: preset["vit"][k] for k in ("img_size", "patch_size", "embed_dim", "depth",
                                             "num_heads", "mlp_ratio", "qkv_bias")}
    vit_cfg["in_chans"] = 3
    pth = folder / "MerMED.pth"
    epoch = step * int(preset["epochs"]) // max(1, total)
    atomic_write(pth, lambda tmp: torch.save({"teacher": tensors, "step": step, "epoch": epoch},
                                             tmp))
    st = folder / "MerMED.safetensors"
    meta = {"format": "pt", "medfm_model": "mermed", "vit_config": json.dumps(vit_cfg),
            "checkpoint_key": "teacher", "step": str(step)}
    atomic_write(st, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    from trainers.engine.export import write_model_card
    from trainers.engine.manifest import manifest_sha256

    card_path = folder / "model_card.json"
    write_model_card(
        card_path, recipe="mermed", manifest_sha256=manifest_sha256(data), steps=step,
        final_losses=last or {}, files={"teacher": pth.name, "teacher_safetensors": st.name},
        config={"preset": preset_name, **{k: v for k, v in preset.items() if k != "vit"},
                **COMMON, "total_steps": total, "world_size": world,
                "global_batch": global_batch},
        extra={"model": "mermed",
               "format": "MerMED-FM release layout: teacher -> module.backbone.* (timm ViT) "
                         "+ module.head.* (projection head)",
               "load": "medfm embed --model mermed --weights MerMED.pth (or MerMED.safetensors)",
               "vit_config": vit_cfg,
               "data": {"manifest": Path(data).name, "images_per_modality": counts},
               "licence_note": "weights you trained; the MerMED-FM method is from Zhou et al., "
                               "arXiv:2507.00185 (reimplemented from the paper's equations)"})
    return {"pth": pth, "safetensors": st, "card": card_path}


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainers.mermed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_cli())
