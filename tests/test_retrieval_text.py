"""Text queries on a Merlin CT index: Merlin's own text tower, the contrastive space the index
stores, checked against a direct cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medfm import io as mio
from napari_medfm.progress import drain
from napari_medfm.runtime.cache import cache_key, model_cache
from tests.conftest import real_path

torch.set_num_threads(2)


def test_merlin_index_answers_text_queries(tmp_path):
    from napari_medfm.models.merlin.testing import save_random_checkpoint, train_tokenizer
    from napari_medfm.runtime.registry import load_model
    from napari_medfm.tasks.retrieval.build import build_index, collect_inputs
    from napari_medfm.tasks.retrieval.query import query_text_task

    ct = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    ck = save_random_checkpoint(tmp_path / "m.pt", config="tiny", seed=1)
    train_tokenizer(tmp_path)
    merlin = load_model("merlin", weights=ck, device="cpu", config="tiny")
    drain(build_index(tmp_path / "ix", merlin, collect_inputs([ct])))
    # the tiny config cannot be re-created from the index record: hand the model to the cache
    model_cache.put(cache_key("merlin", ck, None), merlin)
    try:
        hits = drain(query_text_task(tmp_path / "ix", "moderate ascites", 5))
    finally:
        model_cache.evict("merlin")
    assert [h.case_id for h in hits] == ["example_ct_sm.nii.gz"]
    img = merlin.embed(mio.read(ct)[0])["contrastive_embedding"]
    img = img / np.linalg.norm(img)
    want = float(img @ merlin.text_features(["moderate ascites"])[0])
    assert hits[0].score == pytest.approx(want, abs=1e-4)
