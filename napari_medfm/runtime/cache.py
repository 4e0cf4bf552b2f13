"""The one model cache shared by every widget, CLI call and task in a process.

``get_model(model_id, weights=..., device=..., **options)`` returns the loaded model for that
key, building it at most once even when several worker threads ask at the same time (a 13B
model is never loaded twice). The cache is memory-aware:

* it holds at most ``capacity`` models (``$MEDFM_MODEL_CACHE``, default 2); the least
  recently used one is freed first;
* a model whose spec declares ``extras["exclusive"] = True`` (the large generative models)
  frees every other model before it is built, and is freed itself when another model is asked
  for: switching models frees the old one;
* :meth:`ModelCache.evict` / :meth:`ModelCache.clear` drop references, run the garbage
  collector and return cached GPU memory to the driver.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ModelCache", "get_model", "model_cache"]


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return repr(value)


def cache_key(model_id: str, weights: Any = None, device: Any = None, **options: Any) -> tuple:
    w = None if weights is None else str(Path(str(weights)).expanduser().resolve())
    return (model_id, w, None if device is None else str(device), _freeze(options))


def _free_accelerator_memory() -> None:
    gc.collect()
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        log.debug("could not empty the CUDA cache", exc_info=True)


class ModelCache:
    """Thread-safe LRU of loaded models (see the module docstring)."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is None:
            capacity = int(os.environ.get("MEDFM_MODEL_CACHE", "2") or 2)
        self.capacity = max(1, int(capacity))
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._exclusive: set[tuple] = set()
        self._lock = threading.RLock()
        self._building: dict[tuple, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, key: tuple) -> bool:
        return key in self._models

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._models)

    def get(self, model_id: str, weights: Any = None, device: Any = None,
            **options: Any) -> Any:
        """The cached model for this key, building it (once) through the registry."""
        from .registry import get_spec, load_model

        key = cache_key(model_id, weights, device, **options)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        exclusive = bool(get_spec(model_id).extras.get("exclusive", False))
        return self.get_or_build(
            key, lambda: load_model(model_id, weights=weights, device=device, **options),
            exclusive=exclusive)

    def get_or_build(self, key: tuple, build: Callable[[], Any], *,
                     exclusive: bool = False) -> Any:
        """The model cached under ``key``, else ``build()`` once (models without a registry
        entry, e.g. a MONAI bundle folder keyed by its path and content hash)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:  # one build per key, whatever the number of threads asking
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            self._make_room(exclusive)
            try:
                model = build()
            except BaseException:
                with self._lock:
                    self._building.pop(key, None)
                raise
            with self._lock:
                self._models[key] = model
                if exclusive:
                    self._exclusive.add(key)
                self._building.pop(key, None)
            return model

    def put(self, key: tuple, model: Any) -> None:
        """Insert a model built elsewhere (tests, trainers handing a fresh export)."""
        with self._lock:
            self._make_room(False)
            self._models[key] = model

    def _make_room(self, exclusive: bool) -> None:
        with self._lock:
            victims = []
            if exclusive:
                victims = list(self._models)
            else:
                victims = [k for k in self._models if k in self._exclusive]
                keep = [k for k in self._models if k not in victims]
                while len(keep) >= self.capacity:
                    victims.append(keep.pop(0))
            for k in victims:
                self._drop(k)
        if victims:
            _free_accelerator_memory()

    def _drop(self, key: tuple) -> None:
        self._models.pop(key, None)
        self._exclusive.discard(key)
        log.info("model cache: freed %s", key[0])

    def evict(self, model_id: str | None = None) -> int:
        """Free every cached model (or those of ``model_id``); returns how many were freed."""
        with self._lock:
            keys = [k for k in self._models if model_id is None or k[0] == model_id]
            for k in keys:
                self._drop(k)
        if keys:
            _free_accelerator_memory()
        return len(keys)

    def clear(self) -> None:
        self.evict(None)


#: The process-wide cache.
model_cache = ModelCache()


def get_model(model_id: str, weights: Any = None, device: Any = None, **options: Any) -> Any:
    """Shortcut for ``model_cache.get(...)``: what widgets, the CLI and tasks call."""
    return model_cache.get(model_id, weights=weights, device=device, **options)
