"""Typed contracts checked by load_model, unknown options refused, and the one model cache."""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from napari_medfm.errors import MedfmError
from napari_medfm.runtime import registry
from napari_medfm.runtime.cache import ModelCache
from napari_medfm.runtime.contracts import Embedder, check_contracts, protocol_members

BUILDS: list[str] = []


class _Emb:
    weights_sha256 = None
    embedding_dim = 4

    def __init__(self, model_id: str) -> None:
        self._id = model_id

    @property
    def model_id(self) -> str:
        return self._id

    def describe(self):
        return {"model": self._id}

    def embed(self, image, **options):
        return {"image_embedding": np.zeros(4, np.float32)}


def build_ok(spec, weights=None, device=None, *, size: int = 4):
    time.sleep(0.05)  # widen the race window for the concurrency test
    BUILDS.append(spec.id)
    return _Emb(spec.id)


def build_broken(spec, weights=None, device=None):
    return object()


@pytest.fixture()
def fake_specs(monkeypatch):
    mod = types.ModuleType("medfm_test_builders")
    mod.build_ok = build_ok
    mod.build_broken = build_broken
    monkeypatch.setitem(sys.modules, "medfm_test_builders", mod)
    registry._ensure_loaded()
    specs = [
        registry.ModelSpec(id="t-ok", family="t", tasks=("embed",), modalities=("CXR",), dims=(2,),
                           builder="medfm_test_builders:build_ok", needs_weights=False),
        registry.ModelSpec(id="t-big", family="t", tasks=("embed",), modalities=("CXR",), dims=(2,),
                           builder="medfm_test_builders:build_ok", needs_weights=False,
                           extras={"exclusive": True}),
        registry.ModelSpec(id="t-broken", family="t", tasks=("embed",), modalities=("CXR",),
                           dims=(2,), builder="medfm_test_builders:build_broken"),
    ]
    for s in specs:
        registry.register(s, replace=True)
    BUILDS.clear()
    yield
    for s in specs:
        registry._REGISTRY.pop(s.id, None)


def test_embedder_members_include_attributes():
    assert {"embed", "embedding_dim", "describe", "model_id", "weights_sha256"} <= set(
        protocol_members(Embedder))


def test_load_model_checks_contract_and_options(fake_specs):
    m = registry.load_model("t-ok", size=8)
    assert isinstance(m, Embedder)
    with pytest.raises(MedfmError, match="options of this model: size"):
        registry.load_model("t-ok", sise=8)
    with pytest.raises(TypeError, match=r"embed \(Embedder\): missing .*embed"):
        registry.load_model("t-broken")
    with pytest.raises(TypeError, match="missing"):
        check_contracts(object(), ["segment"], "x")


def test_cache_builds_once_across_threads(fake_specs):
    cache = ModelCache(capacity=2)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("t-ok"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert BUILDS == ["t-ok"] and len({id(m) for m in got}) == 1


def test_cache_lru_and_exclusive(fake_specs):
    cache = ModelCache(capacity=2)
    a = cache.get("t-ok", size=1)
    cache.get("t-ok", size=2)
    assert cache.get("t-ok", size=1) is a and len(cache) == 2
    cache.get("t-ok", size=3)  # evicts the least recently used (size=2)
    assert len(cache) == 2 and cache.get("t-ok", size=1) is a
    cache.get("t-big")  # a large model frees every other one
    assert [k[0] for k in cache.keys()] == ["t-big"]  # noqa: SIM118
    cache.get("t-ok")  # and is freed itself when another model is asked for
    assert [k[0] for k in cache.keys()] == ["t-ok"]  # noqa: SIM118
    assert cache.evict() == 1 and len(cache) == 0
