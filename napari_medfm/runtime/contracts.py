"""Typed model contracts: what each task may call on a loaded model.

A registry entry lists the tasks its model serves (``ModelSpec.tasks``); :func:`load_model`
checks the built object against the Protocol of every task it claims (see
:data:`TASK_CONTRACTS`) and refuses a builder whose object lacks a method, so the tasks,
the CLI and the widgets never duck-type. Adding a model family means one folder under
``models/`` with a spec, a network, its preprocessing and an adapter that implements these
Protocols; nothing above ``models/`` changes.

Rules every adapter follows:

* inputs are :class:`~napari_medfm.io.types.MedicalImage` objects (numpy order, true
  geometry), never napari layers or Qt objects;
* long work is a generator that yields :class:`~napari_medfm.progress.Progress` (or text
  pieces for report generators) and stops at the next yield when closed;
* builders take ``(spec, weights=None, device=None, *, <named options>)`` and no ``**kwargs``:
  a misspelt option is a ``TypeError`` that :func:`load_model` turns into a clear error.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import Any, Generic, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Model",
    "Embedder",
    "TextEmbedder",
    "FindingsModel",
    "Segmenter",
    "ReportGenerator",
    "TASK_CONTRACTS",
    "contract_for",
    "check_contracts",
]


@runtime_checkable
class Model(Protocol):
    """What every loaded model offers: an id, the hash of its weights and a description."""

    @property
    def model_id(self) -> str: ...

    #: sha256 of the weights file actually loaded (None for weight-free models).
    weights_sha256: str | None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly provenance: model id, weights path/hash, device, precision, config."""
        ...


@runtime_checkable
class Embedder(Model, Protocol):
    """Image -> embedding vectors (retrieval, ``medfm embed``)."""

    embedding_dim: int

    def embed(self, image: Any, **options: Any) -> dict[str, np.ndarray]:
        """Named float32 arrays; ``"image_embedding"`` is always present (1-D, ``embedding_dim``)."""
        ...


@runtime_checkable
class TextEmbedder(Model, Protocol):
    """Text -> vectors in the same space as the model's image embedding (text search)."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """``float32 [N, D]``, L2-normalised, comparable by dot product with image embeddings."""
        ...


@runtime_checkable
class FindingsModel(Model, Protocol):
    """Image -> finding probabilities (zero-shot prompts, probe heads, yes/no questions)."""

    def findings(self, image: Any, *, prompts: Any = None) -> list[dict[str, Any]]:
        """One dict per finding: ``{"finding": str, "probability": float in [0, 1], ...}``.

        ``prompts`` is the model's own prompt/question set (a path, a parsed object or None
        for the shipped default); extra keys (similarities, logits) may follow.
        """
        ...


@runtime_checkable
class Segmenter(Model, Protocol):
    """Volume -> integer labels on the image's own grid."""

    label_names: dict[int, str]

    def check_input(self, image: Any) -> None:
        """Raise :class:`~napari_medfm.errors.WrongModalityError` for images it is not made for."""
        ...

    def run(self, image: Any, settings: Any) -> Generator[Any, None, np.ndarray]:
        """Yield progress; return labels with ``image``'s shape (numpy order)."""
        ...


@runtime_checkable
class ReportGenerator(Model, Protocol):
    """Image(s) + prompt -> generated text, streamed piece by piece."""

    #: spatial dims accepted: (3,) for Merlin's report generator, (2, 3) for RadFM.
    dims: tuple[int, ...]

    def stream(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 200,
               **settings: Any) -> Iterator[str]:
        """Yield decoded text pieces as they are generated; closing the iterator stops
        generation at the next token. ``settings`` are generation options the model
        documents (e.g. ``repetition_penalty``); unknown ones raise ``TypeError``."""
        ...


#: Task name (as in ``ModelSpec.tasks``) -> the Protocol its model must implement.
TASK_CONTRACTS: dict[str, type] = {
    "embed": Embedder,
    "text-embed": TextEmbedder,
    "zero-shot": FindingsModel,
    "findings": FindingsModel,
    "probe": FindingsModel,
    "segment": Segmenter,
    "report": ReportGenerator,
}


def contract_for(task: str) -> type | None:
    """The Protocol a model serving ``task`` implements (None: no typed contract)."""
    return TASK_CONTRACTS.get(task)


def protocol_members(proto: type) -> list[str]:
    """Public methods, properties and annotated attributes a Protocol requires."""
    names: set[str] = set()
    for cls in proto.__mro__:
        if cls in (object, Protocol, Generic) or not getattr(cls, "_is_protocol", False):
            continue
        names.update(n for n in vars(cls) if not n.startswith("_"))
        names.update(n for n in getattr(cls, "__annotations__", {}) if not n.startswith("_"))
    return sorted(names)


def _missing(obj: Any, proto: type) -> list[str]:
    return [n for n in protocol_members(proto) if not hasattr(obj, n)]


def check_contracts(obj: Any, tasks: Sequence[str], model_id: str) -> None:
    """Raise ``TypeError`` naming what ``obj`` lacks for any of ``tasks``."""
    problems = []
    for task in tasks:
        proto = contract_for(task)
        if proto is None:
            continue
        missing = _missing(obj, proto)
        if missing:
            problems.append(f"{task} ({proto.__name__}): missing {', '.join(missing)}")
    if problems:
        raise TypeError(f"model {model_id!r} ({type(obj).__name__}) does not implement its "
                        f"declared contracts: {'; '.join(problems)}")
