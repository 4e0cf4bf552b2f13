"""Probe heads: manifest parsing, split, few-shot, training, AUROC, the probe file format, the
FindingsModel adapter (encoder hash check), and an end-to-end run on the real corpus's weak labels
through ``medfm train probe`` and ``medfm findings --probe``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medfm.errors import MedfmError, WeightsError
from napari_medfm.models.probe import model as pm
from napari_medfm.runtime.cache import model_cache
from napari_medfm.tasks import probe as tp

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_cache():
    model_cache.clear()
    yield
    model_cache.clear()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------- units


def test_manifest_labels_unknowns_and_errors(tmp_path):
    m = _write_csv(tmp_path / "m.csv", ["image", "modality", "a", "b"],
                   [["x.png", "CXR", "1", ""], ["/abs/y.png", "CXR", "0", "1"]])
    rows, labels, y = tp.read_probe_manifest(m)
    assert labels == ["a", "b"]
    assert rows[0]["image"] == str(tmp_path / "x.png") and rows[1]["image"] == "/abs/y.png"
    assert y[0, 0] == 1 and np.isnan(y[0, 1]) and y[1].tolist() == [0, 1]
    bad = _write_csv(tmp_path / "bad.csv", ["image", "modality", "a"], [["x.png", "CXR", "yes"]])
    with pytest.raises(MedfmError, match="not 0, 1 or empty"):
        tp.read_probe_manifest(bad)
    nolab = _write_csv(tmp_path / "n.csv", ["image", "modality"], [["x.png", "CXR"]])
    with pytest.raises(MedfmError, match="no label columns"):
        tp.read_probe_manifest(nolab)


def test_split_keeps_both_classes_held_out_and_few_shot():
    y = np.array([[1, np.nan], [1, 0], [0, 1], [0, 1], [1, 0], [0, np.nan], [1, 1], [0, 0]],
                 np.float32)
    train, test = tp.split_rows(y, test_fraction=0.25, seed=3)
    assert sorted(train.tolist() + test.tolist()) == list(range(8))
    for j in range(2):
        assert {1.0, 0.0} <= set(y[test, j][~np.isnan(y[test, j])].tolist())
    assert tp.split_rows(y, test_fraction=0.25, seed=3)[1].tolist() == test.tolist()
    given = ["train"] * 6 + ["test", "test"]
    tr, te = tp.split_rows(y, given=given)
    assert te.tolist() == [6, 7] and tr.tolist() == list(range(6))
    shots = tp.few_shot(y, np.arange(8), 1, seed=0)
    for j in range(2):
        assert np.sum(y[shots, j] == 1) >= 1 and np.sum(y[shots, j] == 0) >= 1
    assert len(shots) <= 4


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_fit_probe_learns_and_auroc(head):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 16)).astype(np.float32)
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0)], 1).astype(np.float32)
    y[::7, 1] = np.nan  # unknowns are ignored
    net, mean, std, losses = tp.fit_probe(x[:60], y[:60], head=head, epochs=150, lr=1e-2)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        p = torch.sigmoid(net(torch.from_numpy((x[60:] - mean) / std))).numpy()
    au = tp.auroc_per_label(y[60:], p, ["a", "b"])
    assert au["a"] > 0.9 and au["b"] > 0.8
    assert tp.auroc_per_label(np.ones((3, 1), np.float32), np.ones((3, 1)), ["c"]) == {"c": None}


class _FakeEncoder:
    model_id = "mermed"
    weights_sha256 = "ab" * 32
    weights_path = None
    embedding_dim = 4

    def embed(self, image, *, modality=None, **_):
        v = np.asarray(image.data, np.float32).reshape(-1)[:4]
        return {"image_embedding": v}


def test_probe_file_round_trip_findings_and_encoder_hash_check(tmp_path):
    from napari_medfm.geometry import Geometry
    from napari_medfm.io.types import MedicalImage

    head = pm.make_head(4, 2, "linear")
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]]))
        head[0].bias.zero_()
    meta = {"labels": ["up", "down"], "head": "linear", "hidden": 256,
            "encoder": {"id": "mermed", "weights_sha256": "ab" * 32, "weights": None,
                        "embedding_dim": 4},
            "modality": "CXR", "normalisation": {}, "metrics": {"auroc": {"up": 0.9, "down": None}}}
    pm.save_probe(tmp_path, head, meta, np.zeros(4), np.ones(4))
    assert pm.is_probe_dir(tmp_path)
    meta2, tensors = pm.read_probe(tmp_path)
    assert meta2["labels"] == ["up", "down"] and meta2["_sha256"] == meta2["probe_sha256"]
    probe = pm.ProbeModel(None, meta2, pm.load_head(meta2, tensors), tensors["feature_mean"].numpy(),
                          tensors["feature_std"].numpy(), _FakeEncoder())
    img = MedicalImage(np.full((2, 2), 1.0, np.float32), Geometry.identity(2), modality="DX",
                       kind="image2d")
    rows = probe.findings(img)
    assert [r["finding"] for r in rows] == ["up", "down"]
    assert rows[0]["probability"] == pytest.approx(1 / (1 + np.exp(-5.0)))
    assert rows[0]["auroc"] == 0.9 and rows[0]["modality"] == "CXR"
    assert [r["finding"] for r in probe.findings(img, prompts=["down"])] == ["down"]
    assert [r["finding"] for r in probe.findings(img, prompts=" up, down")] == ["up", "down"]
    with pytest.raises(ValueError, match="no label"):
        probe.findings(img, prompts=["sideways"])
    # the contract the Findings dock relies on
    from napari_medfm.runtime.contracts import check_contracts

    check_contracts(probe, ("probe", "findings"), "probe")
    # another encoder weights hash is refused
    other = _FakeEncoder()
    other.weights_sha256 = "cd" * 32
    with pytest.raises(WeightsError, match="differ from the ones the probe was trained on"):
        pm.check_encoder(meta2, other)
    # tensors swapped under the JSON are refused
    data = bytearray((tmp_path / pm.TENSORS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / pm.TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="do not belong together"):
        pm.read_probe(tmp_path)
    with pytest.raises(WeightsError, match="not a probe folder"):
        pm.read_probe(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- real data, CLI

REAL_LABELS = ("cxr/labels.csv", "fundus/labels.csv", "pathology/labels.csv")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def weak_label_manifest(real: Path, out: Path) -> Path:
    """Manifest from the corpus's weak labels: ``abnormal`` for CXR/fundus, ``tumor`` for
    pathology patches (empty = unknown, e.g. heuristic or stain-only labels)."""
    rows = []
    for r in _csv_rows(real / "cxr/labels.csv"):
        lab = r["label"].lower()
        ab = "" if not lab else ("0" if ("healthy" in lab or lab.startswith("no ")) else "1")
        rows.append([str(real / "cxr" / r["file"]), "CXR", ab, ""])
    for r in _csv_rows(real / "fundus/labels.csv"):
        lab = r["label"].lower()
        rows.append([str(real / "fundus" / r["file"]), "fundus",
                     "0" if ("healthy" in lab or "normal" in lab) else "1", ""])
    for r in _csv_rows(real / "pathology/labels.csv"):
        if r["file"].startswith("wsi/"):
            continue  # whole slides: the dock runs probes on regions; keep the fixture small
        t = "1" if r["label"] in ("CHOL", "COAD") else ("0" if r["label"] in ("NORM", "no tissue")
                                                         else "")
        rows.append([str(real / "pathology" / r["file"]), "pathology", "", t])
    return _write_csv(out, ["image", "modality", "abnormal", "tumor"], rows)


@pytest.fixture(scope="module")
def trained_probe(tmp_path_factory):
    from conftest import REAL
    from test_mermed import TINY, random_vit_state, save_released_layout

    from napari_medfm.cli import main

    for rel in REAL_LABELS:
        if not (REAL / rel).is_file():
            pytest.skip(f"real test corpus file missing: {REAL / rel} (set $MEDFM_TEST_DATA)")
    d = tmp_path_factory.mktemp("probe")
    cfg = dict(TINY, img_size=64)
    enc = save_released_layout(d / "MerMED.pth", random_vit_state(cfg, seed=1))
    manifest = weak_label_manifest(REAL, d / "weak.csv")
    out = d / "probe"
    rc = main(["train", "probe", "--model", "mermed", "--weights", str(enc), "--data",
               str(manifest), "--out", str(out), "--epochs", "100"])
    assert rc == 0
    return {"dir": out, "encoder": enc, "manifest": manifest, "root": d}


def test_probe_trained_on_real_weak_labels_end_to_end(trained_probe, capsys):
    from conftest import REAL

    from napari_medfm.cli import main
    from napari_medfm.runtime.weights import sha256_file

    out = trained_probe["dir"]
    meta = json.loads((out / "probe.json").read_text())
    assert meta["labels"] == ["abnormal", "tumor"]
    assert meta["encoder"]["id"] == "mermed"
    assert meta["encoder"]["weights_sha256"] == sha256_file(trained_probe["encoder"])
    assert set(meta["normalisation"]["modalities"]) == {"CXR", "fundus", "pathology"}
    assert meta["normalisation"]["image"]["CXR"]["mean"] == [0.5076] * 3
    au = meta["metrics"]["auroc"]
    assert set(au) == {"abnormal", "tumor"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in au.values())
    assert meta["metrics"]["n_test"] >= 2 and meta["metrics"]["n_train"] >= 10
    card = json.loads((out / "model_card.json").read_text())
    assert card["metrics"]["auroc"] == au
    assert list((out / "feature_cache").glob("features-mermed-*.npz"))
    capsys.readouterr()
    img = REAL / "cxr/tbx11k/tb0005.png"
    assert main(["findings", "--probe", str(out), str(img), "--modality", "CXR", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["finding"] for r in doc["findings"]] and len(doc["findings"]) == 2
    probs = [r["probability"] for r in doc["findings"]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert doc["encoder"]["weights_sha256"] == meta["encoder"]["weights_sha256"]
    # the same through the library (what the dock calls) gives the same numbers
    from napari_medfm import io
    from napari_medfm.runtime.cache import get_model

    probe = get_model("probe", weights=str(out))
    rows = probe.findings(io.read(img, modality="CXR")[0])
    assert [r["probability"] for r in rows] == pytest.approx(probs, rel=1e-6)
    # plain-text output
    assert main(["findings", "--probe", str(out), str(img), "--modality", "CXR"]) == 0
    assert "abnormal" in capsys.readouterr().out


def test_probe_refuses_other_encoder_weights_and_reuses_feature_cache(trained_probe, capsys):
    from test_mermed import TINY, random_vit_state, save_released_layout

    from napari_medfm.cli import main
    from napari_medfm.progress import drain
    from napari_medfm.runtime.cache import get_model

    root = trained_probe["root"]
    other = save_released_layout(root / "Other.pth", random_vit_state(dict(TINY, img_size=64), 2))
    img = trained_probe["manifest"]  # any path; the error comes before reading
    rc = main(["findings", "--probe", str(trained_probe["dir"]), "--encoder-weights", str(other),
               str(img)])
    assert rc == 2
    assert "differ from the ones the probe was trained on" in capsys.readouterr().err
    # a second probe (MLP head, few-shot) on the same images hits the feature cache only
    enc = get_model("mermed", weights=str(trained_probe["encoder"]))
    events = []
    meta = drain(tp.train_probe_task(enc, trained_probe["manifest"], root / "probe_mlp",
                                     head="mlp", shots=2, epochs=50,
                                     cache=trained_probe["dir"] / "feature_cache"),
                 callback=events.append)
    assert events[0].message == f"{events[0].total} cached" and events[0].step == events[0].total
    assert meta["head"] == "mlp" and meta["training"]["shots"] == 2
    assert pm.is_probe_dir(root / "probe_mlp")


def test_probe_on_rad_dino_hub_folder(tmp_path):
    """Any registered 2D encoder works: a tiny random RAD-DINO hub folder, synthetic images."""
    from PIL import Image
    from test_dinov2 import make_hub_folder

    from napari_medfm import io
    from napari_medfm.progress import drain
    from napari_medfm.runtime.cache import get_model

    hub = make_hub_folder(tmp_path / "rad-dino")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        bright = i % 2
        arr = rng.integers(0, 100, (70, 80)) + 120 * bright
        Image.fromarray(arr.astype(np.uint8)).save(tmp_path / f"x{i}.png")
        rows.append([f"x{i}.png", "CXR", str(bright)])
    m = _write_csv(tmp_path / "m.csv", ["image", "modality", "bright"], rows)
    enc = get_model("rad-dino", weights=str(hub))
    meta = drain(tp.train_probe_task(enc, m, tmp_path / "probe", epochs=200, lr=1e-2))
    assert meta["encoder"]["id"] == "rad-dino" and meta["encoder"]["embedding_dim"] == 32
    assert meta["normalisation"]["image"]["processor_mean"] == [0.53] * 3
    assert meta["metrics"]["auroc"]["bright"] is not None
    probe = get_model("probe", weights=str(tmp_path / "probe"))
    hi = probe.findings(io.read(tmp_path / "x1.png")[0], modality="CXR")[0]["probability"]
    lo = probe.findings(io.read(tmp_path / "x0.png")[0], modality="CXR")[0]["probability"]
    assert hi > lo
