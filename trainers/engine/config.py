"""Run configuration: presets (nested dicts) < config file (YAML/TOML) < command-line overrides.

A config is a plain nested ``dict``. The engine reads the ``train`` section (see
:data:`TRAIN_DEFAULTS`); a recipe owns every other section (``model``, ``data``, ``loss``...).
The fully resolved config is written to ``OUT/config.yaml`` at the start of a run, and a resumed run
refuses a config whose model/data-defining parts changed (see :func:`check_resume_compatible`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomllib
import yaml

__all__ = ["TRAIN_DEFAULTS", "ConfigError", "deep_merge", "load_file", "parse_override",
           "resolve", "save", "get", "check_resume_compatible"]

#: The engine's own settings (section ``train``). Recipes' presets override any of them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "max_steps": 100,          # optimizer steps
    "batch_size": 8,           # GLOBAL samples per optimizer step (all ranks, all micro-steps)
    "grad_accum": 1,           # micro-steps per optimizer step; per-rank micro-batch =
                               # batch_size / (grad_accum * world_size)
    "optimizer": "adamw",      # adamw | sgd (momentum = betas[0], nesterov off)
    "lr": 1e-4,
    "min_lr": 0.0,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "warmup_steps": 0,
    "schedule": "cosine",      # cosine | constant | linear
    "grad_clip": 0.0,          # global-norm clipping (0 = off)
    "precision": "fp32",       # fp32 | bf16 (autocast; FSDP2: MixedPrecisionPolicy)
    "parallel": "ddp",         # ddp | fsdp (FSDP2 fully_shard per block, then the root)
    "fsdp_reshard_after_forward": True,
    "grad_checkpointing": False,
    "nonfinite": "stop",       # stop | skip (a non-finite loss skips the optimizer step)
    "save_every": 50,          # steps between checkpoints (0: only at the end)
    "keep_last": 3,            # complete step folders kept
    "log_every": 1,
    "seed": 0,
    "num_workers": 0,          # DataLoader workers per rank (results do not depend on it)
    "tensorboard": True,       # when the tensorboard package is importable
    "progress": True,          # tqdm bar on rank 0
    "export": True,            # write OUT/export/ at the end
    "debug_kill_at_step": 0,   # tests: SIGKILL this process after this step (0 = never)
    "debug_kill_in_save_at_step": 0,  # tests: SIGKILL while saving this step, before the commit
}


class ConfigError(ValueError):
    """A config file or override that cannot be used (message names the key)."""


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``over`` (new dicts; inputs untouched)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``/``.json``) or TOML (``.toml``) config file as a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(text) if p.suffix.lower() == ".toml" else yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse config file {p}: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return doc


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 3e-4}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _check_known(cfg: Mapping[str, Any], ref: Mapping[str, Any], where: str) -> None:
    for k, v in cfg.items():
        if k not in ref:
            near = ", ".join(sorted(ref))
            raise ConfigError(f"unknown config key {where}{k} (known in {where or 'top level '}"
                              f": {near})")
        if isinstance(v, Mapping) and isinstance(ref[k], Mapping) and ref[k]:
            _check_known(v, ref[k], f"{where}{k}.")


def resolve(presets: Mapping[str, Mapping[str, Any]], preset: str,
            files: Iterable[str | Path] = (), overrides: Iterable[str] = (),
            flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run config: ``TRAIN_DEFAULTS`` < ``presets[preset]`` < files < overrides < flags.

    ``flags`` maps dotted keys to values given by dedicated command-line flags (``--max-steps``
    -> ``{"train.max_steps": 20}``); ``None`` values are ignored. Unknown keys are refused (keys
    must exist in the defaults or in the preset), so a typo never passes silently.
    """
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(presets)}")
    cfg = deep_merge({"train": TRAIN_DEFAULTS}, presets[preset])
    cfg["preset"] = preset
    ref = copy.deepcopy(cfg)
    layers = [load_file(f) for f in files] + [parse_override(o) for o in overrides]
    for k, v in (flags or {}).items():
        if v is not None:
            layers.append(parse_override(f"{k}={json.dumps(v)}"))
    for layer in layers:
        _check_known(layer, ref, "")
        cfg = deep_merge(cfg, layer)
    return cfg


def get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``get(cfg, "model.depth")``."""
    cur: Any = cfg
    for p in dotted.split("."):
        if not isinstance(cur, Mapping) or p not in cur:
            return default
        cur = cur[p]
    return cur


def save(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``cfg`` as YAML, atomically."""
    from napari_medfm.io.writers import atomic_write

    text = yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


#: Keys of ``train`` a resumed run may change (everything else must match the saved config).
RESUME_MUTABLE = {"max_steps", "save_every", "keep_last", "log_every", "num_workers",
                  "tensorboard", "progress", "export", "debug_kill_at_step",
                  "debug_kill_in_save_at_step", "nonfinite"}


def check_resume_compatible(saved: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse a resume whose model/data/optimisation config differs from the saved one."""
    a, b = copy.deepcopy(dict(saved)), copy.deepcopy(dict(new))
    for c in (a, b):
        for k in RESUME_MUTABLE:
            c.get("train", {}).pop(k, None)
    if a != b:
        diff = sorted(_diff(a, b, ""))
        raise ConfigError("--resume with a different config (changed: " + ", ".join(diff[:10])
                          + "); use a new --out folder or the saved config.yaml")


def _diff(a: Any, b: Any, where: str) -> set[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{where}{k}.")
        return out
    return set() if a == b else {where.rstrip(".")}
