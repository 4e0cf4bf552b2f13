"""``medfm index build|add|query|info|delete|rebuild|merge`` and ``medfm embed --model mermed``
on real corpus files with a tiny random-weight MerMED-layout checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_mermed import tiny_mermed_checkpoint

from napari_medfm import io as mio
from napari_medfm.cli import main
from napari_medfm.runtime.registry import load_model

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_mermed_checkpoint(tmp_path_factory.mktemp("w") / "MerMED.pth", seed=0)


def _json(capsys):
    out = capsys.readouterr().out
    return json.loads(out)


def test_build_query_info_add_delete_rebuild(weights, real_data, tmp_path, capsys):
    patches = real_data / "pathology" / "patches" / "tcga_CHOL_TCGA-3X-AAVA"
    cxr = real_data / "cxr" / "tbx11k"
    ix = tmp_path / "ix"
    rc = main(["index", "build", "--model", "mermed", "--weights", str(weights), "--index",
               str(ix), str(patches), "--modality", "pathology", "--no-progress",
               "--chunk-size", "4", "--batch-size", "2"])
    assert rc == 0
    assert "+6 cases" in capsys.readouterr().out
    # running the same build again resumes: nothing to do
    assert main(["index", "build", "--model", "mermed", "--weights", str(weights), "--index",
                 str(ix), str(patches), "--no-progress"]) == 0
    assert "+0 cases, 6 already indexed" in capsys.readouterr().out

    q = patches / "0_0_3_506.jpg"
    assert main(["index", "query", "--index", str(ix), str(q), "-k", "3", "--json",
                 "--modality", "pathology"]) == 0
    res = _json(capsys)
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3]
    assert res["hits"][0]["case_id"] == "0_0_3_506.jpg"
    assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert res["hits"][0]["path"] == str(q)
    # plain text output: rank, score, case id, path
    assert main(["index", "query", "--index", str(ix), str(q), "-k", "2",
                 "--modality", "pathology"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[2] == "0_0_3_506.jpg"
    # a region of the image
    assert main(["index", "query", "--index", str(ix), str(q), "-k", "1", "--json",
                 "--crop", "0,0,200,200", "--modality", "pathology"]) == 0
    assert len(_json(capsys)["hits"]) == 1

    assert main(["index", "add", "--index", str(ix), str(cxr), "--modality", "CXR",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "info", "--index", str(ix), "--json"]) == 0
    info = _json(capsys)
    assert info["cases"] == 8 and info["state"] == "ok" and info["model_id"] == "mermed"
    assert info["modalities"] == {"pathology": 6, "CXR": 2} and info["index_type"] == "flat"

    assert main(["index", "query", "--index", str(ix), str(q), "-k", "10", "--json",
                 "--filter-modality", "CXR", "--modality", "pathology"]) == 0
    assert {h["case_id"] for h in _json(capsys)["hits"]} == {"h0001.png", "tb0005.png"}
    assert main(["index", "query", "--index", str(ix), str(q), "-k", "10", "--json",
                 "--label", "healthy", "--modality", "pathology"]) == 0
    assert [h["case_id"] for h in _json(capsys)["hits"]] == ["h0001.png"]

    assert main(["index", "delete", "--index", str(ix), "0_0_3_506.jpg"]) == 0
    capsys.readouterr()
    assert main(["index", "query", "--index", str(ix), str(q), "-k", "8", "--json",
                 "--modality", "pathology"]) == 0
    ids = [h["case_id"] for h in _json(capsys)["hits"]]
    assert "0_0_3_506.jpg" not in ids and len(ids) == 7
    assert main(["index", "rebuild", "--index", str(ix)]) == 0
    assert "7 cases" in capsys.readouterr().out
    assert main(["index", "delete", "--index", str(ix), "no-such-case"]) == 1


def test_mixed_weights_refused_and_errors_are_clean(weights, real_data, tmp_path, capsys):
    patches = real_data / "pathology" / "patches" / "tcga_COAD_TCGA-AD-6964"
    ix = tmp_path / "ix"
    assert main(["index", "build", "--model", "mermed", "--weights", str(weights), "--index",
                 str(ix), str(patches), "--no-progress"]) == 0
    other = tiny_mermed_checkpoint(tmp_path / "other.pth", seed=4)
    capsys.readouterr()
    rc = main(["index", "build", "--model", "mermed", "--weights", str(other), "--index",
               str(ix), str(patches), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to mix" in err
    rc = main(["index", "query", "--index", str(ix), "--weights", str(other),
               str(next(patches.iterdir()))])
    assert rc == 2 and "differ from the index" in capsys.readouterr().err
    rc = main(["index", "query", "--index", str(tmp_path / "none"), str(next(patches.iterdir()))])
    assert rc == 2 and "not a similar-case index" in capsys.readouterr().err
    rc = main(["index", "build", "--model", "mermed", "--weights", str(weights), "--index",
               str(ix), str(patches), "--shard", "3/2"])
    assert rc == 2 and "--shard" in capsys.readouterr().err


def test_sharded_build_and_merge(weights, real_data, tmp_path, capsys, monkeypatch):
    patches = real_data / "pathology" / "patches" / "histolab"
    ix = tmp_path / "ix"
    for i in range(3):
        assert main(["index", "build", "--model", "mermed", "--weights", str(weights),
                     "--index", str(ix), str(patches), "--shard", f"{i}/3",
                     "--modality", "pathology", "--no-progress"]) == 0
    # torchrun-style environment selects the shard too
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["index", "build", "--model", "mermed", "--weights", str(weights),
                 "--index", str(ix), str(patches), "--modality", "pathology",
                 "--no-progress"]) == 0
    assert "+0 cases" in capsys.readouterr().out  # shard 1/3 was already complete
    assert main(["index", "merge", "--index", str(ix), "--no-progress"]) == 0
    assert "6 cases" in capsys.readouterr().out
    assert main(["index", "info", "--index", str(ix), "--json"]) == 0
    assert _json(capsys)["cases"] == 6


def test_medfm_embed_with_mermed(weights, real_data, tmp_path, capsys):
    src = real_data / "cxr" / "tbx11k" / "h0001.png"
    if not src.exists():
        pytest.skip(f"missing {src}")
    out = tmp_path / "e.npz"
    assert main(["embed", "--model", "mermed", "--weights", str(weights), "--output", str(out),
                 str(src), "--modality", "CXR", "--no-progress"]) == 0
    with np.load(out) as z:
        emb = z["image_embedding"]
    assert emb.shape == (128,) and emb.dtype == np.float32
    # the modality used is recorded beside the embedding (issue 9 item 1)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["provenance"]["modality"] == "CXR"
    model = load_model("mermed", weights=weights)
    np.testing.assert_allclose(emb, model.embed(mio.read(src)[0], modality="CXR")["image_embedding"],
                               rtol=1e-5, atol=1e-6)


def test_build_from_csv_with_labels_and_reports(weights, real_data, tmp_path, capsys):
    tiles = sorted((real_data / "pathology/patches/tcga_CHOL_TCGA-3X-AAVA").glob("*.jpg"))[:3]
    if len(tiles) < 3:
        pytest.skip("corpus tiles missing")
    csv_path = tmp_path / "cases.csv"
    rows = ["path,labels,report,modality,case_id"]
    for i, t in enumerate(tiles):
        rows.append(f"{t},CHOL,tumour region tile {i} with glands,pathology,case-{i}")
    csv_path.write_text("\n".join(rows) + "\n")
    ix = tmp_path / "ix"
    assert main(["index", "build", "--model", "mermed", "--weights", str(weights), "--index",
                 str(ix), str(csv_path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "query", "--index", str(ix), str(tiles[1]), "--json", "-k", "3",
                 "--modality", "pathology", "--label", "tile 1"]) == 0
    hits = _json(capsys)["hits"]
    assert [h["case_id"] for h in hits] == ["case-1"]
    assert hits[0]["labels"] == "CHOL" and hits[0]["modality"] == "pathology"
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nx.png,a\n")
    rc = main(["index", "build", "--model", "mermed", "--weights", str(weights), "--index",
               str(tmp_path / "ix2"), str(bad), "--no-progress"])
    assert rc == 2 and "'path' column" in capsys.readouterr().err
