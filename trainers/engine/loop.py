"""The training loop shared by every recipe (see ``docs/training.md``).

``run(recipe, argv)`` = parse flags -> resolve config -> validate the manifest -> build model,
optimizer, scheduler -> resume from the newest complete checkpoint (``--resume``) -> train
(accumulation, bf16, clipping, non-finite guard, metrics, progress bar, SIGTERM) -> checkpoint
every ``save_every`` steps and at the end -> export (rank 0).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_medfm.errors import MedfmError

from . import config as C
from .checkpoint import CheckpointManager
from .data import Stream, make_loader
from .distributed import Dist, init_distributed, seed_everything, shutdown, unwrap, wrap_model
from .manifest import ManifestError, manifest_sha256, validate_manifest
from .metrics import MetricsLogger
from .recipe import Recipe, RunContext

log = logging.getLogger("trainers")

__all__ = ["add_engine_arguments", "run", "main", "NonFiniteLossError", "TrainError",
           "lr_factor"]


class TrainError(MedfmError):
    """A run that cannot start or continue (the message says why)."""


class NonFiniteLossError(TrainError):
    """The loss became NaN/inf (``train.nonfinite = stop``); the step is in the message."""


# ------------------------------------------------------------------------------- arguments
def add_engine_arguments(parser: argparse.ArgumentParser, recipe: Recipe) -> None:
    """The flags every recipe takes (then the recipe's own)."""
    g = parser.add_argument_group("run")
    g.add_argument("--data", required=True, metavar="MANIFEST.csv",
                   help="training manifest (CSV; columns: "
                        + ", ".join([*recipe.required_columns,
                                     *[f"[{c}]" for c in recipe.optional_columns]]) + ")")
    g.add_argument("--out", required=True, metavar="DIR", help="run folder")
    g.add_argument("--preset", default=recipe.default_preset, choices=sorted(recipe.presets),
                   help=f"config preset (default {recipe.default_preset})")
    g.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML/TOML config file(s) merged over the preset")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key, e.g. --set train.lr=3e-4 (repeatable)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in DIR/checkpoints")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    recipe.add_arguments(parser)


def lr_factor(step: int, cfg: dict[str, Any]) -> float:
    """Schedule multiplier at optimizer step ``step`` (0-based): linear warm-up, then cosine /
    linear decay to ``min_lr / lr`` or constant."""
    t = cfg["train"]
    warm, total = int(t["warmup_steps"]), max(1, int(t["max_steps"]))
    if warm and step < warm:
        return (step + 1) / warm
    floor = float(t["min_lr"]) / float(t["lr"]) if float(t["lr"]) else 0.0
    if t["schedule"] == "constant":
        return 1.0
    frac = min(1.0, (step - warm) / max(1, total - warm))
    if t["schedule"] == "linear":
        return floor + (1 - floor) * (1 - frac)
    if t["schedule"] == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    raise TrainError(f"train.schedule must be cosine, linear or constant, not {t['schedule']!r}")


def _default_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    decay, no = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no).append(p)
    return [g for g in ({"params": decay, "weight_decay": wd},
                        {"params": no, "weight_decay": 0.0}) if g["params"]]


def _batch_sizes(cfg: dict[str, Any], world: int) -> tuple[int, int, int]:
    t = cfg["train"]
    bs, acc = int(t["batch_size"]), int(t["grad_accum"])
    if bs % (acc * world):
        raise TrainError(f"train.batch_size {bs} must be a multiple of grad_accum {acc} x world "
                         f"size {world}")
    return bs // (acc * world), bs // acc, acc


# ------------------------------------------------------------------------------- the run
class StopOnSigterm:
    """``requested`` turns true on SIGTERM (install/restore the handler around the loop)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. called from a GUI worker)
            self._old = None

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def check_out(out: Path, resume: bool, d: Dist) -> None:
    """Refuse (before anything is written) a run folder that holds a run, unless resuming."""
    from .checkpoint import complete_checkpoints

    busy = (out / "metrics.csv").exists() or bool(complete_checkpoints(out / "checkpoints")) \
        or (out / "export").exists()
    if busy and not resume:
        raise TrainError(f"{out} already holds a run (metrics/checkpoints/export): pass --resume "
                         "to continue it, or choose a new --out folder (nothing was overwritten)")


def run(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """Train with ``recipe`` as ``args`` says. Returns a summary (rank 0: final metrics)."""
    d = init_distributed(args.device)
    stop = StopOnSigterm()
    stop.install()
    try:
        return _run(recipe, args, d, stop)
    finally:
        stop.restore()
        shutdown(d)


def _validated(recipe: Recipe, args: argparse.Namespace, cfg: dict[str, Any], d: Dist) -> Any:
    rows, err = None, None
    if d.is_main:
        try:
            rows = validate_manifest(args.data, recipe.required_columns, recipe.optional_columns,
                                     check_row=lambda r: recipe.check_row(r, cfg))
        except MedfmError as exc:
            err = str(exc)
    err = d.broadcast_object(err)
    if err:
        raise ManifestError(err)
    return d.broadcast_object(rows)


def _run(recipe: Recipe, args: argparse.Namespace, d: Dist, stop: StopOnSigterm) -> dict[str, Any]:
    flags = {"train.max_steps": args.max_steps, "train.save_every": args.save_every,
             "train.seed": args.seed, **recipe.flags_to_config(args)}
    cfg = C.resolve(recipe.presets, args.preset, args.config, args.overrides, flags)
    cfg["recipe"] = recipe.name
    t = cfg["train"]
    out = Path(args.out)
    check_out(out, args.resume, d)
    if args.resume and (out / "config.yaml").is_file():
        C.check_resume_compatible(C.load_file(out / "config.yaml"), cfg)
    rows = _validated(recipe, args, cfg, d)  # before anything is written
    micro, micro_global, acc = _batch_sizes(cfg, d.world_size)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        C.save(cfg, out / "config.yaml")
    d.barrier()
    use_bf16 = t["precision"] == "bf16"
    if t["precision"] not in ("fp32", "bf16"):
        raise TrainError(f"train.precision must be fp32 or bf16, not {t['precision']!r}")

    def autocast() -> Any:
        if use_bf16:
            return torch.autocast(d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    ctx = RunContext(cfg=cfg, dist=d, out=out, max_steps=int(t["max_steps"]), micro_batch=micro,
                     micro_global=micro_global, grad_accum=acc, rows=rows,
                     manifest=Path(args.data), manifest_sha256=manifest_sha256(args.data),
                     autocast=autocast)
    recipe.prepare(ctx)
    torch.manual_seed(int(t["seed"]))  # identical initial weights on every rank
    model = recipe.build_model(ctx).to(d.device)
    if t["grad_checkpointing"]:
        recipe.enable_grad_checkpointing(model)
    model = wrap_model(model, d, t["parallel"], t["precision"], recipe.fsdp_blocks,
                       bool(t["fsdp_reshard_after_forward"]))
    inner = unwrap(model)
    groups = recipe.param_groups(inner, ctx) or _default_groups(inner, float(t["weight_decay"]))
    for g in groups:
        g["lr"] = float(t["lr"]) * float(g.pop("lr_scale", 1.0))
    if t["optimizer"] == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=float(t["lr"]), betas=tuple(t["betas"]), eps=float(t["eps"]),
            weight_decay=float(t["weight_decay"]))
    elif t["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, lr=float(t["lr"]), momentum=float(t["betas"][0]),
                                    weight_decay=float(t["weight_decay"]))
    else:
        raise TrainError(f"train.optimizer must be adamw or sgd, not {t['optimizer']!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    seed_everything(int(t["seed"]), d.rank)
    ckpt = CheckpointManager(out / "checkpoints", d, int(t["keep_last"]))
    ckpt.debug_kill_in_save_at = int(t.get("debug_kill_in_save_at_step") or 0)
    ckpt.clean_partial()
    step, position, resumed_from = 0, 0, None
    if args.resume:
        found = ckpt.latest()
        if found is not None:
            rstate = recipe.state_dict()
            loaded = ckpt.load(found[1], model, optimizer, rstate or None, seed=int(t["seed"]))
            if rstate:
                recipe.load_state_dict(rstate)
            step, position = loaded.step, int(loaded.state["position"])
            scheduler.load_state_dict(loaded.state["scheduler"])
            resumed_from = step
            if d.is_main:
                log.warning("resumed from %s (step %d, saved by %d rank(s), now %d)", found[1].name,
                            step, loaded.state["world_size"], d.world_size)
    stream = Stream(len(dataset := recipe.build_dataset(ctx)), int(t["seed"]))
    metrics = MetricsLogger(out, d.is_main, bool(t["tensorboard"]),
                            resumed_from if args.resume else None)
    bar = None
    if d.is_main and t["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=ctx.max_steps, initial=step, desc=f"train {recipe.name}",
                   dynamic_ncols=True, file=sys.stderr)
    last: dict[str, Any] = {}

    def trainer_state() -> dict[str, Any]:
        return {"position": position, "scheduler": scheduler.state_dict(), "last": last,
                "recipe": recipe.name}

    def save() -> None:
        ckpt.save(step, model, optimizer, trainer_state(), recipe.state_dict() or None)

    saved_at = step
    kill_at = int(t.get("debug_kill_at_step") or 0)
    model.train()
    # one loader for the rest of the run (workers persist); what it yields depends only on the
    # stream position it starts from
    loader = make_loader(dataset, stream, position, micro_global, micro, d.rank,
                         acc * max(0, ctx.max_steps - step), recipe.collate,
                         int(t["num_workers"]))
    batches = iter(loader)
    try:
        while step < ctx.max_steps:
            ctx.step = step
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=d.device)
            sums: dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            for j in range(acc):
                batch = _to_device(next(batches), d.device)
                sync = j == acc - 1
                with _no_sync(model, sync):
                    with autocast():
                        loss, parts = recipe.training_step(model, batch, ctx)
                    (loss / acc).backward()
                loss_sum += loss.detach().float() / acc
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / acc
            position += micro_global * acc
            bad = d.any(not bool(torch.isfinite(loss_sum)))
            if bad:
                metrics.log(step + 1, {"loss": float("nan"), "nonfinite": 1})
                if t["nonfinite"] != "skip":
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (train.nonfinite=stop); the last "
                        f"complete checkpoint is step {saved_at}. Lower train.lr, use fp32, or "
                        "set train.nonfinite=skip")
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at step %d: optimizer step skipped", step + 1)
            else:
                if float(t["grad_clip"]) > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(t["grad_clip"]))
                optimizer.step()
                recipe.after_optimizer_step(inner, ctx)
            scheduler.step()
            step += 1
            ctx.step = step
            dt = time.perf_counter() - t0
            loss_mean = _mean_over_ranks(loss_sum, d)
            last = {"loss": loss_mean, **{k: _mean_over_ranks(torch.tensor(v), d)
                                          for k, v in sums.items()}}
            if not bad and (step % int(t["log_every"]) == 0 or step == ctx.max_steps):
                metrics.log(step, {**last, "lr": optimizer.param_groups[0]["lr"],
                                   "epoch": stream.epoch(position),
                                   "samples_per_s": micro_global * acc / dt, "time_s": dt})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_mean:.4f}")
            every = int(t["save_every"])
            if (every and step % every == 0) or step == ctx.max_steps:
                save()
                saved_at = step
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if d.any(stop.requested):
                if saved_at != step:
                    save()
                    saved_at = step
                if d.is_main:
                    log.warning("SIGTERM: saved step %d, exiting", step)
                return {"step": step, "stopped": True, "last": last}
    finally:
        del batches, loader
        if bar is not None:
            bar.close()
        metrics.close()
    result: dict[str, Any] = {"step": step, "stopped": False, "last": last}
    if t["export"]:
        result["export"] = _export(recipe, model, ctx, last)
    return result


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _mean_over_ranks(x: torch.Tensor, d: Dist) -> float:
    if d.active:
        import torch.distributed as dist

        y = x.detach().float().clone().to(d.device)
        dist.all_reduce(y)
        return float(y) / d.world_size
    return float(x)


@contextlib.contextmanager
def _no_sync(model: nn.Module, sync: bool) -> Any:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2
    set_requires_gradient_sync)."""
    if sync:
        yield
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def _export(recipe: Recipe, model: nn.Module, ctx: RunContext, last: dict[str, Any]
            ) -> dict[str, Any] | None:
    """Full (unsharded) weights to rank 0, then the recipe's export + model_card.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .export import write_model_card

    d = ctx.dist
    inner = unwrap(model)
    is_fsdp = ctx.cfg["train"]["parallel"] == "fsdp" and d.active
    full = None
    if is_fsdp:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    res = None
    if d.is_main:
        if is_fsdp:
            torch.manual_seed(0)
            inner = recipe.build_model(ctx)
            inner.load_state_dict(full)
        was = inner.training
        inner.eval()
        try:
            res = recipe.export(inner, ctx)
        finally:
            inner.train(was)
        files = dict(res.get("files", {}))
        extra = {k: v for k, v in res.items() if k != "files"}
        write_model_card(ctx.export_dir / "model_card.json", recipe=recipe.name, config=ctx.cfg,
                         manifest_sha256=ctx.manifest_sha256, steps=ctx.step, final_losses=last,
                         files=files, extra=extra)
    d.barrier()
    return res


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """``python trainers/<recipe>.py ...`` / ``torchrun trainers/<recipe>.py ...``."""
    parser = argparse.ArgumentParser(prog=f"trainers/{recipe.name}.py",
                                     description=recipe.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser, recipe)
    args = parser.parse_args(argv)
    return run_cli(recipe, args)


def run_cli(recipe: Recipe, args: argparse.Namespace) -> int:
    """Run and turn known errors into a message + exit code 2 (used by ``medfm train`` too)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = run(recipe, args)
    except (MedfmError, C.ConfigError) as exc:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"train {recipe.name}: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        state = "stopped (SIGTERM) at" if res.get("stopped") else "finished at"
        print(f"train {recipe.name}: {state} step {res['step']}; run folder {args.out}",
              file=sys.stderr)
    return 0
