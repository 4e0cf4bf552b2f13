"""Export helpers: atomic file writes and ``model_card.json``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_state_dict", "write_json", "code_version", "write_model_card"]


def _atomic(path: Path, write: Any) -> Path:
    from napari_medfm.io.writers import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """``torch.save`` a flat dict of CPU tensors atomically (loadable with weights_only=True)."""
    clean = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    for k, v in clean.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"export key {k} is not a tensor")
    return _atomic(Path(path), lambda tmp: torch.save(clean, tmp))


def write_json(doc: Any, path: str | Path) -> Path:
    text = json.dumps(doc, indent=1, default=str) + "\n"
    return _atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, the commit (and whether dirty)."""
    from napari_medfm import __version__

    out: dict[str, Any] = {"napari_medfm": __version__, "torch": torch.__version__}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10)
            out["git_dirty"] = bool(dirty.stdout.strip())
    except Exception:
        pass
    return out


def write_model_card(path: str | Path, *, recipe: str, config: Mapping[str, Any],
                     manifest_sha256: str | None, steps: int, final_losses: Mapping[str, Any],
                     files: Mapping[str, str], extra: Mapping[str, Any] | None = None) -> Path:
    """``model_card.json``: what was trained, on what, with which code."""
    from napari_medfm.runtime.weights import sha256_file

    base = Path(path).parent
    card = {
        "recipe": recipe,
        "steps": steps,
        "final_losses": dict(final_losses),
        "manifest_sha256": manifest_sha256,
        "code_version": code_version(),
        "files": {k: {"name": v, "sha256": sha256_file(base / v)} for k, v in files.items()},
        "config": dict(config),
    }
    if extra:
        card.update(extra)
    return write_json(card, path)
