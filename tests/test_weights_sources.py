"""Weights manager: files a spec takes from another repository (``extras["file_sources"]``),
as BiomedCLIP's ``text/`` folder does, fetched into the model folder's sub-folder."""

from __future__ import annotations

import pytest
from test_runtime_weights import REPO, hub, payload  # noqa: F401  (the local fake hub)

from napari_medfm.runtime import registry
from napari_medfm.runtime.registry import ModelSpec, WeightFile
from napari_medfm.runtime.weights import WeightsManager


@pytest.fixture
def sourced(request):
    spec = ModelSpec(
        id="sourced-test", family="test", tasks=("embed",), modalities=("CXR",), dims=(2,),
        builder="nowhere:build", repo_id="other/repo",
        files=(WeightFile("text/config.json"), WeightFile("text/notes.txt", required=False)),
        extras={"file_sources": {"text/config.json": (REPO, "config.json"),
                                 "text/notes.txt": (REPO, "extra/notes.txt")}})
    registry.register(spec, replace=True)
    request.addfinalizer(lambda: registry._REGISTRY.pop(spec.id, None))
    return spec


def test_fetch_takes_sourced_files_from_their_own_repository(sourced, hub):  # noqa: F811
    wm = WeightsManager()
    wm.fetch(sourced)
    folder = wm.model_dir(sourced)
    assert (folder / "text" / "config.json").read_bytes() == b'{"hidden": 8}'
    assert (folder / "text" / "notes.txt").read_text() == "hello"
    assert wm.resolve(sourced) == folder / "text" / "config.json"
    # nothing was asked of the spec's own repository
    assert not [r for r in hub.requests if r["path"].startswith("/other/repo/")]
    n = len(hub.requests)
    wm.fetch(sourced)  # already there: no new download
    assert len(hub.requests) == n
