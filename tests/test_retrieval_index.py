"""The faiss + SQLite case index on its own: add/search/filter/delete/rebuild, refusal of mixed
models, crash-safety of chunk commits and of the faiss file, HNSW above the flat threshold."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from napari_medfm.tasks.retrieval.index import (
    FAISS_FILE,
    MANIFEST,
    CaseIndex,
    CaseRecord,
    IndexCorruptError,
    IndexMismatchError,
    l2_normalise,
)

MODEL = dict(model_id="m", weights_sha256="a" * 64)


def _records(n, start=0, modality="CXR"):
    return [CaseRecord(case_id=f"case{start + i}", source_path=f"/data/{start + i}.png",
                       modality=modality if i % 2 == 0 else "fundus",
                       labels="effusion" if i % 3 == 0 else "normal", item_key=f"k{start + i}")
            for i in range(n)]


def _exact_topk(x, q, k):
    xs, qs = l2_normalise(x), l2_normalise(q)
    return np.argsort(-(qs @ xs.T), axis=1, kind="stable")[:, :k]


@pytest.fixture
def vecs():
    return np.random.default_rng(0).standard_normal((120, 24)).astype(np.float32)


def _build(root, vecs, chunk=50):
    idx = CaseIndex.create_or_open(root, dim=vecs.shape[1], weights_path="/w.pth", **MODEL)
    for s in range(0, len(vecs), chunk):
        idx.add_chunk(vecs[s:s + chunk], _records(len(vecs[s:s + chunk]), s), **MODEL)
    idx.finalize()
    return idx


def test_add_search_matches_exact_and_manifest(tmp_path, vecs):
    idx = _build(tmp_path / "ix", vecs)
    hits = idx.search(vecs[:5], k=7)
    want = _exact_topk(vecs, vecs[:5], 7)
    for row, w in zip(hits, want, strict=True):
        assert [h.case_id for h in row] == [f"case{j}" for j in w]
        assert row[0].score == pytest.approx(1.0, abs=1e-5)
        assert all(row[i].score >= row[i + 1].score for i in range(len(row) - 1))
    man = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    assert man["count"] == 120 and man["vectors_in_faiss"] == 120 and man["dim"] == 24
    assert man["index_type"] == "flat" and man["model_id"] == "m"
    assert man["faiss"] == faiss.__version__ and "napari_medfm" in man
    idx.close()


def test_filters_by_modality_and_label(tmp_path, vecs):
    idx = _build(tmp_path / "ix", vecs)
    hits = idx.search(vecs[1:2], k=200, modality="fundus")[0]
    assert len(hits) == 60 and {h.modality for h in hits} == {"fundus"}
    hits = idx.search(vecs[1:2], k=5, label="EFFUSION")[0]
    assert hits and all("effusion" in h.labels for h in hits)
    assert idx.search(vecs[:1], k=5, modality="OCT") == [[]]


def test_mixed_models_refused(tmp_path, vecs):
    idx = _build(tmp_path / "ix", vecs)
    with pytest.raises(IndexMismatchError, match="refusing to mix"):
        idx.add_chunk(vecs[:2], _records(2, 500), model_id="m", weights_sha256="b" * 64)
    with pytest.raises(IndexMismatchError):
        idx.add_chunk(vecs[:2], _records(2, 500), model_id="other", weights_sha256="a" * 64)
    with pytest.raises(IndexMismatchError):
        idx.add_chunk(np.zeros((2, 8), np.float32), _records(2, 500), **MODEL)
    with pytest.raises(IndexMismatchError):
        CaseIndex.create_or_open(tmp_path / "ix", model_id="rad-dino", weights_sha256="a" * 64,
                                 dim=24)
    assert idx.count() == 120


def test_incremental_add_delete_rebuild(tmp_path, vecs):
    idx = _build(tmp_path / "ix", vecs[:100])
    idx.add_chunk(vecs[100:], _records(20, 100), **MODEL)
    with pytest.raises(IndexCorruptError, match="not in the faiss index"):
        CaseIndex.open(tmp_path / "ix").load_faiss()  # stale faiss is never used silently
    man = idx.finalize()
    assert man["vectors_in_faiss"] == 120
    assert idx.search(vecs[110:111], 1)[0][0].case_id == "case110"
    assert idx.delete(["case110", "nope"]) == ["nope"]
    top = idx.search(vecs[110:111], 3)[0]
    assert "case110" not in [h.case_id for h in top] and len(top) == 3
    assert idx.count() == 119 and idx.deleted_count() == 1
    man = idx.rebuild()
    assert man["vectors_in_faiss"] == 119 and idx.deleted_count() == 0
    reopened = CaseIndex.open(tmp_path / "ix")
    assert "case110" not in [h.case_id for h in reopened.search(vecs[110:111], 5)[0]]
    assert reopened.search(vecs[111:112], 1)[0][0].case_id == "case111"
    with pytest.raises(Exception, match="already indexed"):
        idx.add_chunk(vecs[:1], _records(1, 0), **MODEL)


def test_half_written_or_missing_faiss_never_loaded(tmp_path, vecs):
    root = tmp_path / "ix"
    _build(root, vecs).close()
    data = (root / FAISS_FILE).read_bytes()
    (root / FAISS_FILE).write_bytes(data[: len(data) // 2])  # torn write
    with pytest.raises(IndexCorruptError, match="checksum"):
        CaseIndex.open(root).search(vecs[:1], 3)
    idx = CaseIndex.open(root)
    idx.rebuild()
    assert idx.search(vecs[:1], 1)[0][0].case_id == "case0"
    (root / MANIFEST).unlink()  # interrupted before the manifest was written
    with pytest.raises(IndexCorruptError, match="interrupted"):
        CaseIndex.open(root).search(vecs[:1], 3)


def test_uncommitted_chunk_file_is_discarded(tmp_path, vecs):
    root = tmp_path / "ix"
    idx = _build(root, vecs[:50])
    # a crash after the vectors file was renamed into place but before the SQLite commit
    orphan = root / "vectors" / "chunk-000001.npz"
    np.savez(orphan, ids=np.arange(50, 60), vectors=vecs[50:60])
    idx.close()
    idx = CaseIndex.open(root)
    assert not orphan.exists()
    assert idx.count() == 50 and idx.chunk_ids() == [0]
    ids = idx.add_chunk(vecs[50:60], _records(10, 50), **MODEL)
    assert ids == list(range(50, 60))
    idx.finalize()
    assert idx.search(vecs[55:56], 1)[0][0].case_id == "case55"


def test_corrupt_chunk_detected(tmp_path, vecs):
    root = tmp_path / "ix"
    _build(root, vecs).close()
    f = root / "vectors" / "chunk-000000.npz"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(IndexCorruptError, match="corrupt"):
        CaseIndex.open(root).rebuild()


def test_hnsw_above_threshold(tmp_path):
    x = np.random.default_rng(1).standard_normal((600, 16)).astype(np.float32)
    idx = CaseIndex.create_or_open(tmp_path / "h", dim=16, **MODEL)
    idx.add_chunk(x, _records(600), **MODEL)
    man = idx.finalize(flat_max=100)
    assert man["index_type"] == "hnsw"
    index = idx.load_faiss()
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexHNSWFlat)
    hits = idx.search(x[:50], 10)
    want = _exact_topk(x, x[:50], 10)
    recall = np.mean([len({h.vector_id for h in row} & set(w.tolist())) / 10
                      for row, w in zip(hits, want, strict=True)])
    assert recall >= 0.9
    assert all(row[0].vector_id == i for i, row in enumerate(hits))
    # filtered HNSW search only returns allowed ids
    assert {h.modality for h in idx.search(x[:1], 10, modality="CXR")[0]} == {"CXR"}
    idx.delete(["case0"])
    assert "case0" not in [h.case_id for h in idx.search(x[:1], 5)[0]]
