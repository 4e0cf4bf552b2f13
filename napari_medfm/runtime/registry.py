"""The one model registry read by the CLI, the widgets and the trainers.

Specs are plain data (no torch import). Each family declares its specs in a torch-free
``napari_medfm.models.<family>.spec`` module listed in :data:`SPEC_MODULES`; the builder named
by ``ModelSpec.builder`` ("module:function") is imported only when a model is loaded.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MedfmError

#: Torch-free modules that each define ``SPECS: list[ModelSpec]``.
SPEC_MODULES = (
    "napari_medfm.models.merlin.spec",
    "napari_medfm.models.mermed.spec",
    "napari_medfm.models.dinov2.spec",
    "napari_medfm.models.segmenters.spec",
    "napari_medfm.models.biomedclip.spec",
    "napari_medfm.models.radfm.spec",
    "napari_medfm.models.merlin_report.spec",
    "napari_medfm.models.probe.spec",
)


@dataclass(frozen=True)
class WeightFile:
    """One file of a model's released weights, as laid out in its hub repository."""

    filename: str
    sha256: str | None = None  # hex digest of the released file; None when not pinned
    size: int | None = None  # bytes, for progress bars and free-space checks
    required: bool = True
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the CLI/GUI need to know about a model before building it."""

    id: str
    family: str
    tasks: tuple[str, ...]  # e.g. ("embed", "zero-shot", "phenotype", "segment")
    modalities: tuple[str, ...]  # e.g. ("CT",) or ("CXR", "fundus", "pathology", "CT")
    dims: tuple[int, ...]  # spatial dims accepted: (3,), (2,) or (2, 3)
    builder: str  # "package.module:function(spec, weights_dir_or_file, device, **kw)"
    description: str = ""
    input_spec: str = ""
    repo_id: str | None = None  # Hugging Face repository (downloads only on explicit request)
    revision: str | None = None
    files: tuple[WeightFile, ...] = ()
    licence: str = ""
    citation: str = ""
    embedding_dim: int | None = None
    needs_weights: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def required_files(self) -> tuple[WeightFile, ...]:
        return tuple(f for f in self.files if f.required)


_REGISTRY: dict[str, ModelSpec] = {}
_LOADED = False


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a spec (plugins and tests may register their own)."""
    if spec.id in _REGISTRY and not replace:
        raise ValueError(f"model id {spec.id!r} is already registered")
    _REGISTRY[spec.id] = spec
    return spec


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    for modname in SPEC_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue  # family not present in this build
            raise MedfmError(f"model registry: cannot import {modname}: {exc}") from exc
        except Exception as exc:  # a broken spec module must not leave a silently empty registry
            raise MedfmError(f"model registry: cannot import {modname}: {exc}") from exc
        for spec in getattr(mod, "SPECS", ()):
            _REGISTRY.setdefault(spec.id, spec)
    _LOADED = True


def list_specs(task: str | None = None, modality: str | None = None,
               dims: int | None = None) -> list[ModelSpec]:
    """Registered models, optionally filtered by task, modality and spatial dims."""
    _ensure_loaded()
    out: Iterable[ModelSpec] = _REGISTRY.values()
    if task:
        out = [s for s in out if task in s.tasks]
    if modality:
        out = [s for s in out if modality in s.modalities]
    if dims:
        out = [s for s in out if dims in s.dims]
    return sorted(out, key=lambda s: s.id)


def get_spec(model_id: str) -> ModelSpec:
    """Spec by id, with a did-you-mean message for typos."""
    _ensure_loaded()
    try:
        return _REGISTRY[model_id]
    except KeyError:
        close = difflib.get_close_matches(model_id, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise MedfmError(
            f"Unknown model {model_id!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def load_model(model_id: str, weights: Any = None, device: Any = None, **kwargs: Any) -> Any:
    """Build model ``model_id`` and load its weights.

    ``weights`` is an explicit file/folder; otherwise the weights manager looks in
    ``$MEDFM_HOME`` (never downloads: use ``medfm weights fetch``). An option the builder does
    not take is a :class:`MedfmError` listing the options it does take; the built object is
    checked against the contract of every task in ``spec.tasks``
    (:mod:`napari_medfm.runtime.contracts`). Widgets and the CLI use the shared cache
    (:func:`napari_medfm.runtime.cache.get_model`) instead of calling this directly.
    """
    from .contracts import check_contracts

    spec = get_spec(model_id)
    modname, _, fn = spec.builder.partition(":")
    builder = getattr(importlib.import_module(modname), fn)
    try:
        bound = inspect.signature(builder).bind(spec, weights=weights, device=device, **kwargs)
    except TypeError as exc:
        params = [p.name for p in inspect.signature(builder).parameters.values()
                  if p.kind == p.KEYWORD_ONLY]
        raise MedfmError(f"{model_id}: {exc}; options of this model: "
                         f"{', '.join(params) or 'none'}") from None
    model = builder(*bound.args, **bound.kwargs)
    check_contracts(model, spec.tasks, model_id)
    return model
