"""Safe checkpoint loading: safetensors, or ``torch.load(weights_only=True)``, never full unpickling.

* :func:`load_state_dict` - a plain ``state_dict`` from ``.safetensors`` / ``.pt`` / ``.pth`` /
  ``.bin`` (memory-mapped where possible).
* :func:`load_checkpoint_tensors` - tensors out of a *training* checkpoint that pickles
  ``argparse.Namespace``, optimizer state, epochs... (like ``MerMED.pth``), with an explicit
  allow-list of extra globals for the restricted unpickler; returns nested dicts of tensors.
* :func:`extract_prefix`, :func:`flatten` - pick the sub-dict a module needs.
* :func:`load_strict` - strict loading whose error lists missing/unexpected keys and shape
  mismatches and names the checkpoint file that was expected.
* :func:`convert_to_safetensors` - one-time conversion (atomic write).

torch is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: Globals allowed by default in training checkpoints (plain data containers, no code).
DEFAULT_ALLOW: tuple[str, ...] = ("argparse.Namespace",)

#: Modules whose classes are plain data (suggested for the allow-list in error messages).
_PLAIN_DATA_MODULES = ("argparse.", "pathlib.", "collections.", "numpy.", "datetime.",
                       "fractions.", "decimal.")

#: Keys under which checkpoints commonly nest their state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


# --------------------------------------------------------------------------- helpers


def _import_global(name: str) -> Any:
    modname, _, attr = name.rpartition(".")
    if not modname:
        raise ValueError(f"allow-list entry {name!r} must be 'module.Name'")
    try:
        obj: Any = importlib.import_module(modname)
    except ModuleNotFoundError:
        # nested attributes, e.g. "numpy.core.multiarray.scalar"
        head, _, sub = modname.rpartition(".")
        obj = getattr(importlib.import_module(head), sub)
    return getattr(obj, attr)


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _torch_load(path: Path, *, mmap: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        # legacy (non-zip) checkpoints cannot be memory-mapped
        if mmap and ("mmap" in str(exc) or "zipfile" in str(exc)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        raise


def _refused(path: Path, exc: BaseException, allow: Iterable[str] = ()) -> WeightsError:
    """A clear error for a pickle the restricted unpickler refused."""
    needed: list[str] = []
    with contextlib.suppress(Exception):
        import torch

        needed = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                  if g not in set(allow)]
    what = f" it needs {', '.join(needed[:10])}" if needed else f" {exc}"
    if needed and all(n.startswith(_PLAIN_DATA_MODULES) for n in needed):
        hint = (" These are plain-data classes: if you trust the file, load its tensors with "
                f"load_checkpoint_tensors(path, allow={tuple(needed)!r}) or convert it once with "
                f"`medfm weights convert {path.name} OUT.safetensors "
                + " ".join(f"--allow {n}" for n in needed) + "`.")
    else:
        hint = (" Those are not plain data (they could run code when unpickled): do not load "
                "this file unless you know where it comes from; ask its publisher for a "
                "safetensors or weights-only release.")
    return WeightsError(
        f"refused to load {path.name}: the file pickles Python objects that are not plain "
        f"tensors/containers;{what}. napari-medfm never runs arbitrary pickled code "
        "(torch.load weights_only=True)." + hint)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist" if not path.exists()
                           else f"checkpoint {path} is not a file")


# --------------------------------------------------------------------------- loading


def load_state_dict(path: str | Path, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict on the CPU, loaded safely.

    ``.safetensors`` through safetensors (lazily memory-mapped); ``.pt/.pth/.bin/.ckpt``
    through ``torch.load(map_location="cpu", weights_only=True, mmap=mmap)``. A checkpoint
    that nests the state dict under one well-known key (``state_dict``, ``model``...) is
    unwrapped. Anything else (training checkpoints) -> :func:`load_checkpoint_tensors`.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"cannot read {path.name} as safetensors: {exc}") from None
    try:
        obj = _torch_load(path, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"cannot read checkpoint {path.name}: {exc} (truncated or not a "
                           "PyTorch file? `medfm weights verify` checks the hashes)") from None
    return _as_flat_state_dict(obj, path)


def _as_flat_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    if obj and all(_is_tensor(v) for v in obj.values()):
        return dict(obj)
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(_is_tensor(v) for v in inner.values()):
            log.info("%s: using the state dict under %r", path.name, key)
            return dict(inner)
    keys = ", ".join(map(str, list(obj)[:10]))
    raise WeightsError(f"{path.name} is not a plain state dict (top-level keys: {keys}); "
                       "use load_checkpoint_tensors() and extract_prefix() to pick the weights")


def load_checkpoint(path: str | Path, allow: Iterable[str] = DEFAULT_ALLOW, *,
                    mmap: bool = True) -> Any:
    """Load a training checkpoint with the restricted unpickler plus the ``allow`` globals.

    ``allow`` names plain-data classes ("argparse.Namespace", ...); everything else is refused
    (full unpickling is never used).
    """
    import torch

    path = Path(path)
    _check_exists(path)
    allow = tuple(allow)
    try:
        objs = [_import_global(name) for name in allow]
    except (ImportError, AttributeError, ValueError) as exc:
        raise WeightsError(f"bad allow-list entry for {path.name}: {exc}") from None
    try:
        with torch.serialization.safe_globals(objs):
            return _torch_load(path, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc, allow) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"cannot read checkpoint {path.name}: {exc}") from None


def tensors_only(obj: Any) -> Any:
    """Keep only tensors: dicts (and Namespaces, lists) become nested dicts of tensors.

    Branches without tensors (args, epochs, learning rates...) are dropped; list/tuple items
    are keyed by their index as a string. Returns None when there is no tensor at all.
    """
    if _is_tensor(obj):
        return obj
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    elif hasattr(obj, "__dict__") and type(obj).__module__ == "argparse":
        items = vars(obj).items()
    else:
        return None
    out = {}
    for k, v in items:
        kept = tensors_only(v)
        if kept is not None:
            out[k] = kept
    return out or None


def load_checkpoint_tensors(path: str | Path, allow: Iterable[str] = DEFAULT_ALLOW, *,
                            mmap: bool = True) -> dict[str, Any]:
    """Nested dicts of the tensors of a training checkpoint (student/teacher/optimizer...).

    Uses ``torch.load(weights_only=True)`` with ``torch.serialization.safe_globals(allow)``;
    non-tensor leaves (args, epoch, ...) are dropped. Pick a sub-model with
    ``extract_prefix(ckpt["teacher"], "module.backbone.")``.
    """
    obj = load_checkpoint(path, allow, mmap=mmap)
    kept = tensors_only(obj)
    if not isinstance(kept, dict):
        raise WeightsError(f"{Path(path).name} contains no tensors")
    return kept


def flatten(nested: Mapping[Any, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": t}}`` -> ``{"a.b": t}`` (keys converted to str)."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, key + sep))
        else:
            out[key] = v
    return out


def extract_prefix(sd: Mapping[str, Any], prefix: str, strip: bool = True) -> dict[str, Any]:
    """Entries whose key starts with ``prefix`` (a trailing "." is implied), optionally stripped.

    Raises :class:`WeightsError` listing the available top-level prefixes when none matches.
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    if any(isinstance(v, Mapping) for v in sd.values()):
        sd = flatten(sd)
    out = {(k[len(prefix):] if strip else k): v for k, v in sd.items()
           if str(k).startswith(prefix)}
    if not out:
        heads = sorted({str(k).split(".")[0] for k in sd})
        raise WeightsError(f"no weights under {prefix!r}; top-level names are: "
                           + ", ".join(heads[:20]))
    return out


# --------------------------------------------------------------------------- strict loading


def _listing(title: str, names: list[str], n: int = 10) -> str:
    more = f", ... (+{len(names) - n} more)" if len(names) > n else ""
    return f"{len(names)} {title}: {', '.join(names[:n])}{more}"


def load_strict(module: torch.nn.Module, sd: Mapping[str, Any], what: str | Path | None = None,
                *, assign: bool = False) -> torch.nn.Module:
    """``module.load_state_dict(sd, strict=True)`` with a helpful :class:`WeightsError`.

    ``assign=True`` adopts the checkpoint's tensors instead of copying them (a module built
    on the meta device then holds the memory-mapped weights: no second copy in RAM).

    The error lists missing and unexpected keys (first 10 of each, with counts) and shape
    mismatches, and names ``what`` (the checkpoint file that was expected). ``assign`` puts the
    tensors themselves into the module (for a model built on the ``meta`` device: no
    initialisation, no copy).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
              if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(v.shape)]
    name = type(module).__name__
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if shapes:
            parts.append(_listing("shape mismatches", shapes))
        label = (Path(what).name if isinstance(what, Path) else what) if what else None
        raise WeightsError(
            f"checkpoint{' ' + label if label else ''} does not match {name}: "
            + "; ".join(parts)
            + (f". {name} expects the released {label};" if label else ".")
            + " is this a different model size/version, or the wrong file?")
    try:
        module.load_state_dict(dict(sd), strict=True, assign=assign)
    except RuntimeError as exc:  # e.g. dtype/device issues not caught above
        raise WeightsError(f"cannot load weights{' from ' + str(what) if what else ''} into "
                           f"{name}: {exc}") from None
    return module


# --------------------------------------------------------------------------- conversion


def convert_to_safetensors(src: str | Path, dst: str | Path, *, prefix: str | None = None,
                           allow: Iterable[str] | None = None, dtype: Any = None,
                           metadata: Mapping[str, str] | None = None) -> Path:
    """Write the tensors of ``src`` to ``dst`` as safetensors (temp file + ``os.replace``).

    ``prefix`` keeps (and strips) one sub-tree; ``allow`` switches to
    :func:`load_checkpoint_tensors` for training checkpoints; ``dtype`` casts floating
    tensors (e.g. ``torch.bfloat16``). Shared tensors are cloned (safetensors forbids aliasing).
    """
    import torch

    src, dst = Path(src), Path(dst)
    if allow is not None:
        sd: Mapping[str, Any] = flatten(load_checkpoint_tensors(src, allow, mmap=False))
    else:
        sd = load_state_dict(src, mmap=False)
    if prefix:
        sd = extract_prefix(sd, prefix)
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        out[str(k)] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if not out:
        raise WeightsError(f"{src.name}: no tensors to convert")
    meta = {"format": "pt", "source": src.name, **dict(metadata or {})}
    return save_safetensors(out, dst, metadata=meta)


def save_safetensors(tensors: Mapping[str, Any], dst: str | Path, *,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as safetensors atomically (the one writer of converted weights).

    Views and shared storage are cloned (safetensors stores no aliases); the file appears
    only complete (:func:`napari_medfm.io.files.atomic_write`).
    """
    import torch
    from safetensors.torch import save_file

    from ..io.files import atomic_write

    dst = Path(dst)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        ptr = t.untyped_storage().data_ptr()
        if (ptr and ptr in seen) or not t.is_contiguous() \
                or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone().contiguous()
        seen.add(t.untyped_storage().data_ptr())
        out[str(k)] = t
    if not out:
        raise WeightsError(f"{dst.name}: no tensors to write")
    return atomic_write(dst, lambda tmp: save_file(out, str(tmp), metadata=dict(metadata or {})),
                        mkdir=True, fsync=True)


__all__ = [
    "DEFAULT_ALLOW", "convert_to_safetensors", "extract_prefix", "flatten", "load_checkpoint",
    "load_checkpoint_tensors", "load_state_dict", "load_strict", "save_safetensors",
    "tensors_only",
]
