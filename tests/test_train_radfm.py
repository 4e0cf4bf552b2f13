"""RadFM trainer: real images and report texts of the corpus, tiny config, CPU.

Loss falls; the weighted loss against a direct re-computation; the dictionary tagger; the
sampler never mixes 2D and 3D and gives each rank distinct batches (seeded, resumable);
2 gloo processes killed with SIGKILL then resumed equal one uninterrupted process; the export
loads through load_model("radfm") and gives the trainer's logits; LoRA merged == adapters.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import real_path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "trainers" / "radfm.py"


def _reports() -> list[str]:
    out = []
    for f in sorted(real_path("cxr/reports_iu_xray").glob("*.xml")):
        root = ET.parse(f).getroot()
        for node in root.iter("AbstractText"):
            if node.get("Label") == "FINDINGS" and node.text and node.text.strip():
                out.append(node.text.strip())
    assert len(out) >= 4
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """2D CXR/fundus/pathology and 3D CT rows with real report texts."""
    images2d = [real_path("cxr/nih_chestxray14/00000001_000.png"),
                real_path("cxr/tbx11k/h0001.png"), real_path("cxr/tbx11k/tb0005.png"),
                real_path("fundus/skimage_retina.jpg")]
    ct = real_path("ct/totalseg_nifti/example_ct_sm.nii.gz")
    rep = _reports()
    d = tmp_path_factory.mktemp("radfm_train")
    rows = []
    for i, p in enumerate(images2d):
        rows.append({"images": str(p), "question": "Please write the findings of this image.",
                     "answer": rep[i % len(rep)], "stage": "2"})
    rows.append({"images": f"{images2d[0]};{images2d[1]}",
                 "question": "Compare <image> with <image>.", "answer": rep[-1], "stage": "2"})
    rows.append({"images": str(ct), "question": "Describe this CT scan.",
                 "answer": rep[1], "stage": "1"})
    rows.append({"images": str(ct), "question": "Is there a pleural effusion?",
                 "answer": "No pleural effusion.", "stage": "1"})
    m = d / "manifest.csv"
    with open(m, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["images", "question", "answer", "stage"])
        w.writeheader()
        w.writerows(rows)
    return m


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _inproc(args: list[str]) -> int:
    from trainers.engine import main
    from trainers.radfm import RadFMRecipe

    return main(RadFMRecipe(), args)


def _losses(out: Path, col: str = "loss") -> list[float]:
    with open(out / "metrics.csv") as fh:
        return [float(r[col]) for r in csv.DictReader(fh) if r.get(col)]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    assert _inproc(["--data", str(manifest), "--out", str(out), "--loss", "weighted"]) == 0
    return out


def test_loss_falls_and_export_loads_with_the_trainers_logits(reference):
    import napari_medfm
    from trainers.radfm import RadFMTrainNet

    w = _losses(reference, "loss_weighted")
    assert len(w) == 8 and all(math.isfinite(x) for x in w)
    assert sum(w[-3:]) / 3 < sum(w[:3]) / 3  # the loss falls
    exp = reference / "export"
    for f in ("model.safetensors", "radfm_config.json", "tokenizer.model", "model_card.json"):
        assert (exp / f).is_file(), f
    m = napari_medfm.load_model("radfm", weights=exp, device="cpu")
    net = RadFMTrainNet(m.cfg)
    net.load_state_dict(_weights(reference))
    net.eval()
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 64, 64, 4, generator=g)
    ids = [m.prompt_ids("Please write the findings of this image.", 1)]
    with torch.no_grad():
        trainer = net(img, torch.tensor([1]), torch.tensor(ids), torch.ones(1, len(ids[0]),
                                                                            dtype=torch.long))
    torch.testing.assert_close(m.logits(img[:, None], ids), trainer, atol=1e-5, rtol=1e-5)
    assert m.generate_ids(img[:, None], ids, max_new_tokens=5).shape[1] >= 1


def test_weighted_loss_against_a_direct_recomputation():
    from trainers.radfm_loss import hf_loss, weighted_loss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 2, -100], [-100, 5, 6, 7, 8, 2]])
    weights = torch.tensor([[0, 0, 3, 1, 1, 0], [0, 1, 3, 3, 1, 1]], dtype=torch.float32)
    num = den = 0.0
    tot = n = 0.0
    for b in range(2):
        for t in range(5):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            lp = logits[b, t] - torch.logsumexp(logits[b, t], 0)
            ce = -float(lp[y])
            num += float(weights[b, t + 1]) * ce
            den += float(weights[b, t + 1])
            tot += ce
            n += 1
    assert float(weighted_loss(logits, labels, weights)) == pytest.approx(num / den, rel=1e-5)
    assert float(hf_loss(logits, labels)) == pytest.approx(tot / n, rel=1e-5)


def test_dictionary_tagger_and_sample_weights(tmp_path):
    import sentencepiece as spm

    from napari_medfm.models.radfm.network import RadFMConfig
    from napari_medfm.models.radfm.testing import tiny_config, train_tokenizer
    from trainers.radfm_data import encode_sample
    from trainers.radfm_loss import DictionaryTagger

    tag = DictionaryTagger()
    text = "Small left Pleural  effusion. No pneumothorax; heart size normal, nodules absent."
    spans = [text[b:e].lower() for b, e in tag(text)]
    assert spans == ["pleural  effusion", "pneumothorax", "heart size"]  # longest first, words
    tok = train_tokenizer(_reports() + [text], tmp_path / "t.model", vocab_size=400)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    cfg = RadFMConfig.from_dict(tiny_config(vocab_size=sp.get_piece_size()))
    ids, labels, weights = encode_sample(cfg, sp, "Findings?", text, 1, tag, 512)
    n_prompt = 1 + (cfg.perceiver.num_latents + 2) + len(sp.encode("Findings?"))
    assert labels[:n_prompt] == [-100] * n_prompt and weights[:n_prompt] == [0.0] * n_prompt
    assert ids[-1] == labels[-1] == cfg.eos_id and weights[-1] == 1.0
    proto = sp.encode(text, return_type="proto")
    for p, w in zip(proto.pieces, weights[n_prompt:-1], strict=True):
        inside = any(p.begin < e and p.end > b for b, e in tag(text)) and p.end > p.begin
        assert w == (3.0 if inside else 1.0), p.piece
    assert 3.0 in weights and 1.0 in weights


def test_sampler_never_mixes_2d_and_3d_and_ranks_get_distinct_batches():
    from trainers.radfm_data import ModalityBatchSampler, make_groups

    dims = [2] * 13 + [3] * 5 + [2] * 4
    for seed in (0, 1):
        groups = make_groups(dims, 4, 1, seed)
        assert sorted(i for g in groups for i in g) == list(range(len(dims)))
        assert all(len({dims[i] for i in g}) == 1 for g in groups)
        assert groups == make_groups(dims, 4, 1, seed)  # seeded
    world = 2
    for epoch in (0, 3):
        per_rank = []
        for r in range(world):
            s = ModalityBatchSampler(dims, 4, 1, seed=7, rank=r, world_size=world, epoch=epoch)
            per_rank.append(list(s))
            assert all(len({dims[i] for i in b}) == 1 for b in per_rank[-1])
        seen = [i for b in per_rank[0] for i in b]
        assert not set(seen) & {i for b in per_rank[1] for i in b}  # distinct data per rank
        assert len(per_rank[0]) == len(per_rank[1])
        # resumable: from batch position 2 the rest is identical
        s = ModalityBatchSampler(dims, 4, 1, seed=7, rank=1, world_size=world, epoch=epoch,
                                 start=2)
        assert list(s) == per_rank[1][2:]
    a = list(ModalityBatchSampler(dims, 4, 1, seed=7, epoch=0))
    b = list(ModalityBatchSampler(dims, 4, 1, seed=7, epoch=1))
    assert a != b and sorted(map(sorted, a)) == sorted(map(sorted, b))  # reshuffled per epoch


def test_two_processes_sigkill_resume_equal_one_uninterrupted(reference, manifest, tmp_path):
    out = tmp_path / "run2"
    base = [str(RECIPE), "--data", str(manifest), "--out", str(out), "--loss", "weighted"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run([*cmd, *base, "--set", "train.debug_kill_at_step=5"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode != 0
    assert (out / "checkpoints").is_dir() and not (out / "export").exists()
    res = subprocess.run([*cmd, *base, "--resume"], capture_output=True, text=True,
                         env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert _losses(out)[-1] == pytest.approx(_losses(reference)[-1], abs=1e-5)


def test_fsdp2_two_processes_equal_one_and_export_loads(reference, manifest, tmp_path):
    """The LLM sharded per decoder layer with fully_shard (gloo, 2 ranks): same weights as the
    1-process run, and the export (gathered full state dict) opens in the plugin's loader."""
    import napari_medfm

    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(RECIPE), "--data", str(manifest), "--out", str(out), "--loss", "weighted",
           "--set", "train.parallel=fsdp"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert napari_medfm.load_model("radfm", weights=out / "export", device="cpu") is not None


def test_lora_export_merged_equals_adapters_applied(manifest, tmp_path):
    pytest.importorskip("peft")
    import sentencepiece as spm

    import napari_medfm
    from napari_medfm.models.radfm.network import RadFMNetwork
    from napari_medfm.models.radfm.testing import tiny_config, train_tokenizer, write_model_folder
    from trainers.radfm_lora import load_adapters

    tok = train_tokenizer(_reports(), tmp_path / "tok.model", vocab_size=400)
    V = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    base = write_model_folder(tmp_path / "base", tiny_config(vocab_size=V), tokenizer=tok)
    out = tmp_path / "lora"
    args = ["--data", str(manifest), "--out", str(out), "--lora", "--init", str(base),
            "--max-steps", "3", "--set", "train.save_every=0", "--set", "train.lr=0.05",
            "--set", "data.stage=1"]
    torch.set_num_threads(1)
    assert _inproc(args) == 0
    exp = out / "export"
    assert (exp / "adapters" / "adapter_config.json").is_file()
    merged = napari_medfm.load_model("radfm", weights=exp, device="cpu")
    plain = napari_medfm.load_model("radfm", weights=base, device="cpu")
    g = torch.Generator().manual_seed(2)
    vx = torch.rand(1, 1, 3, 64, 64, 8, generator=g)
    ids = [merged.prompt_ids("Describe this CT scan.", 1)]
    net = load_adapters(plain.net, exp / "adapters")
    assert isinstance(net, RadFMNetwork)
    with torch.no_grad():
        vis = net.embedding_layer.encode_images(vx)
        emb = net.embedding_layer.lookup(torch.tensor(ids), vis)
        applied = net.lang_model(inputs_embeds=emb).logits
    got = merged.logits(vx, ids)
    torch.testing.assert_close(got, applied, atol=1e-5, rtol=1e-5)
    base_logits = napari_medfm.load_model("radfm", weights=base, device="cpu").logits(vx, ids)
    assert float((got - base_logits).abs().max()) > 1e-4  # the adapters did change the model
