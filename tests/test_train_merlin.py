"""Merlin pretraining recipe (trainers/merlin.py) on real CTs with real report texts (IU X-ray
reports as stand-ins), tiny preset on CPU: loss falls, SIGKILL + --resume is bit-exact,
2 processes == 1 process, a world-size-2 checkpoint resumes at 1, the export opens in
`medfm embed` and gives the trainer's own embeddings; the losses, the inflation and the phecode
expansion against straightforward re-computations; bad manifests are rejected naming the row."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
CTS = ("ct/totalseg_nifti/example_ct.nii.gz", "ct/totalseg_nifti/example_ct_sm.nii.gz",
       "ct/totalseg_dicom_series", "ct/dcmqi_ct3slice")
CODES = ("250.21;427.21", "", "585.3", "272.11;31.1")
#: 6 steps of global batch 2 over 4 CTs, checkpoints every 2; dropout off so that
#: 2 processes can equal 1 (dropout masks come from each rank's own generator)
BASE = ["--max-steps", "6", "--save-every", "2", "--seed", "3", "--set", "model.text.dropout=0",
        "--set", "loss.stage1_fraction=1.0", "--set", "train.progress=false"]


def _report(path: Path) -> str:
    root = ET.parse(path).getroot()
    parts = [f"{a.get('Label')}: {a.text.strip()}" for a in root.iter("AbstractText")
             if a.get("Label") in ("FINDINGS", "IMPRESSION") and a.text]
    return " ".join(parts)


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1: same arithmetic
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from conftest import REAL

    missing = [c for c in CTS if not (REAL / c).exists()]
    reports = sorted((REAL / "cxr" / "reports_iu_xray").glob("*.xml"))
    if missing or len(reports) < len(CTS):
        pytest.skip(f"real CTs / reports missing under {REAL} (set $MEDFM_TEST_DATA)")
    m = tmp_path_factory.mktemp("merlin") / "manifest.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "report", "phecodes", "split"])
        for ct, rep, codes in zip(CTS, reports, CODES, strict=False):
            w.writerow([REAL / ct, _report(rep), codes, "train"])
        w.writerow([REAL / CTS[1], _report(reports[-1]), "", "val"])  # not trained on
    return m


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _sub(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    script = str(ROOT / "trainers" / "merlin.py")
    cmd = ([sys.executable, script] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", script]) + args
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def _inproc(args: list[str]) -> int:
    from trainers.engine import main
    from trainers.merlin import RECIPE

    return main(RECIPE, args)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _export(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "export" / CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _inproc(["--data", str(manifest), "--out", str(out), *BASE]) == 0
    return out


# ------------------------------------------------------------------------------- end to end
def test_tiny_run_outputs_and_loss_falls(reference):
    ck = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ck == ["step-00000004", "step-00000006"]  # keep_last 2 of the tiny preset
    assert (reference / "checkpoints" / "step-00000006" / "COMPLETE").is_file()
    rows = _rows(reference)
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 7)]
    loss = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) for v in loss)
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.05, loss
    assert float(rows[-1]["phenotype"]) < float(rows[0]["phenotype"])
    card = __import__("json").loads((reference / "export" / "model_card.json").read_text())
    assert card["steps"] == 6 and card["recipe"] == "merlin"
    assert set(card["final_losses"]) >= {"loss", "contrastive", "phenotype"}
    assert len(card["manifest_sha256"]) == 64 and card["config"]["preset"] == "tiny"
    assert card["files"]["weights"]["name"] == CKPT


def test_sigkill_then_resume_is_bit_exact(reference, manifest, tmp_path, one_thread):
    out = tmp_path / "run"
    args = ["--data", str(manifest), "--out", str(out), *BASE]
    res = _sub([*args, "--set", "train.debug_kill_at_step=3"])
    assert res.returncode == -9, res.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert _inproc([*args, "--resume"]) == 0
    ref, got = _export(reference), _export(out)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(reference)]


def test_two_processes_equal_one_and_resume_at_one(reference, manifest, tmp_path, one_thread):
    out = tmp_path / "run2"
    args = ["--data", str(manifest), "--out", str(out), *BASE]
    res = _sub([*args, "--set", "train.debug_kill_at_step=3"], nproc=2)
    assert res.returncode != 0  # one worker SIGKILLed: torchrun stops the job
    step2 = out / "checkpoints" / "step-00000002"
    assert (step2 / "rng-rank1.pt").is_file() and (step2 / "__1_0.distcp").is_file()
    two = _rows(out)  # steps 1..3 of the 2-process run (logged before the kill)
    assert [r["step"] for r in two] == ["1", "2", "3"]
    one = _rows(reference)[:3]
    for key in ("loss", "contrastive", "phenotype"):
        assert [float(r[key]) for r in two] == pytest.approx([float(r[key]) for r in one],
                                                             rel=2e-6), key
    # resharded resume: saved by 2 ranks, continued by 1; its step 3 is the 2-process step 3
    assert _inproc([*args, "--resume"]) == 0
    resumed = _rows(out)
    assert len(resumed) == 6
    for key in ("loss", "contrastive", "phenotype"):
        assert float(resumed[2][key]) == pytest.approx(float(two[2][key]), rel=2e-6), key
    # later steps drift apart slowly (float summation order differs between 1 and 2 ranks and
    # this tiny BN net amplifies it); same trajectory all the same
    assert [float(r["loss"]) for r in resumed] == pytest.approx(
        [float(r["loss"]) for r in _rows(reference)], rel=1e-2)
    assert (out / "export" / CKPT).is_file()


def test_export_opens_in_medfm_embed_with_the_trainers_embeddings(reference, tmp_path, one_thread):
    from conftest import REAL

    from napari_medfm import io
    from napari_medfm.cli import main as medfm
    from napari_medfm.models.merlin.preprocess import preprocess
    from trainers.engine.config import load_file
    from trainers.merlin import MerlinTrainNet, preprocess_config

    weights = reference / "export" / CKPT
    ct = REAL / CTS[1]
    assert medfm(["embed", "--model", "merlin", "--weights", str(weights), "--device", "cpu",
                  str(ct), "-o", str(tmp_path / "e.npz")]) == 0
    got = np.load(tmp_path / "e.npz")
    cfg = load_file(reference / "config.yaml")
    net = MerlinTrainNet(cfg).eval()
    net.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    x = preprocess(io.read(ct)[0], preprocess_config(cfg)).tensor[None]
    with torch.no_grad():
        own = net.image(x)
    for k in ("image_embedding", "contrastive_embedding", "phenotype_logits"):
        np.testing.assert_allclose(got[k].reshape(-1), own[k][0].numpy(), rtol=1e-4, atol=1e-5)
    # and the text tower (zero-shot): the tokenizer and config travel with the export
    from napari_medfm.runtime.registry import load_model

    m = load_model("merlin", weights=weights, device="cpu")
    assert m.image_config.layers == (1, 1, 1, 1)
    phrase = "no pleural effusion ."
    feats = m.text_features([phrase])  # builds the text tower + tokenizer from the export
    enc = m.tokenizer([phrase], return_tensors="pt")
    with torch.no_grad():
        t = torch.nn.functional.normalize(net.encode_text(enc["input_ids"],
                                                          enc["attention_mask"]), dim=-1)
    np.testing.assert_allclose(feats, t.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------- pieces
def test_info_nce_and_expanded_bce_against_plain_recomputations():
    from trainers.merlin_lib import phecodes as P
    from trainers.merlin_lib.losses import info_nce, phenotype_bce

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(1.0)
    loss, _ = info_nce(img, txt, scale)
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    a = [unit(v) for v in img.double().tolist()]
    b = [unit(v) for v in txt.double().tolist()]
    s = math.e
    sim = [[s * sum(x * y for x, y in zip(u, v, strict=True)) for v in b] for u in a]
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(z) for z in sim[i])) for i in range(5)) / 5
    t2i = -sum(sim[i][i] - math.log(sum(math.exp(sim[j][i]) for j in range(5)))
               for i in range(5)) / 5
    assert float(loss) == pytest.approx((i2t + t2i) / 2, rel=1e-6)

    codes = [["250.21"], [], ["245.21", "70.4"]]
    y = torch.from_numpy(np.stack([P.targets(c) for c in codes]))
    logits = torch.randn(3, P.N_OUTPUTS, generator=g)
    col = {c: i for i, c in enumerate(P.output_codes())}
    expected_pos = [{"250.21", "250.2", "250"}, set(), {"245.21", "245", "70.4"}]
    total = 0.0
    for r in range(3):
        for c, i in col.items():
            p = 1 / (1 + math.exp(-float(logits[r, i])))
            t = 1.0 if c in expected_pos[r] else 0.0
            total -= t * math.log(p) + (1 - t) * math.log(1 - p)
    assert float(phenotype_bce(logits, y)) == pytest.approx(total / (3 * P.N_OUTPUTS), rel=1e-5)


def test_phecode_expansion_hand_picked():
    from trainers.merlin_lib import phecodes as P

    assert P.normalize("008.51") == "8.51" and P.parse_codes(" 8.5; 427.21 ;") == ["8.5",
                                                                                     "427.21"]
    assert P.expand(["250.21"]) == {"250.21", "250.2", "250"}
    assert P.expand(["427.21"]) == {"427.21", "427.2", "427"}  # 427 / 427.2 are not outputs
    assert P.expand(["70.4"]) == {"70.4"}                      # Rollup 0 in the map
    assert P.expand(["31.1"]) == {"31.1", "31"}                # a non-output child
    assert P.expand(["1010.1"]) == {"1010.1", "1010"}          # not in the ICD-9 map

    def on(codes):
        y = P.targets(codes)
        return {P.output_codes()[i] for i in np.flatnonzero(y)}

    assert on(["427.21"]) == {"427.21"}
    assert P.expand(["245.21"]) == {"245.21", "245.2", "245"}
    assert on(["245.21"]) == {"245.21", "245"}  # through the absent 245.2 to the output 245
    assert on(["31.1"]) == {"31"}
    assert on(["70.4"]) == {"70.4"} and on([]) == set()
    assert len(P.output_codes()) == 1692
    assert len(P.hierarchy()) == 1876
    assert P.unknown_codes(["250.21", "999.99"]) == ["999.99"]


def test_inflation_against_torchvision_on_identical_slices():
    from torchvision.models.resnet import Bottleneck, ResNet

    from napari_medfm.models.merlin.network import I3DResNet, MerlinImageConfig
    from napari_medfm.models.merlin.testing import randomize_batchnorm
    from trainers.merlin_lib.inflate import inflate_state_dict

    torch.manual_seed(0)
    net2d = randomize_batchnorm(ResNet(Bottleneck, [1, 2, 1, 1]), seed=1).eval()
    cfg = MerlinImageConfig(layers=(1, 2, 1, 1), widths=(64, 128, 256, 512))
    net3d = I3DResNet(cfg).eval()
    sd = inflate_state_dict(net2d.state_dict(), net3d.state_dict())
    missing, unexpected = net3d.load_state_dict(sd, strict=False)
    assert not unexpected and sorted(missing) == ["classifier.bias", "classifier.weight",
                                                 "contrastive_head.bias",
                                                 "contrastive_head.weight"]
    w = sd["conv1.weight"]
    assert w.shape == (64, 3, 3, 7, 7)
    assert torch.equal(w[:, :, 1], net2d.conv1.weight) and not w[:, :, 0].any() \
        and not w[:, :, 2].any()
    assert sd["layer2.0.conv2.weight"].shape[2:] == (3, 3, 3)
    img = torch.rand(1, 1, 64, 64)
    depth = 16
    vol = img[..., None].expand(1, 1, 64, 64, depth).contiguous()  # (B, 1, H, W, D)
    with torch.no_grad():
        f3 = net3d.trunk(vol)  # (1, 2048, D', H', W')
        x = img.repeat(1, 3, 1, 1)
        x = net2d.maxpool(net2d.relu(net2d.bn1(net2d.conv1(x))))
        f2 = net2d.layer4(net2d.layer3(net2d.layer2(net2d.layer1(x))))
    assert f3.shape[3:] == f2.shape[2:]
    for d in range(1, f3.shape[2] - 1):  # away from the depth borders
        torch.testing.assert_close(f3[:, :, d], f2, rtol=1e-4, atol=1e-5)


def test_report_sections():
    from trainers.merlin_lib.sections import choose_text, split_sections

    rep = "LIVER: normal. No lesion. GALLBLADDER: absent. Kidneys and ureters: no stones."
    assert split_sections(rep) == ["LIVER: normal. No lesion.", "GALLBLADDER: absent.",
                                   "Kidneys and ureters: no stones."]
    assert split_sections("The heart is normal.") == ["The heart is normal."]
    rng = np.random.default_rng(0)
    picks = {choose_text(rep, rng, True) for _ in range(40)}
    assert rep in picks and "GALLBLADDER: absent." in picks
    assert choose_text(rep, rng, False) == rep


def test_bad_manifests_are_rejected_naming_the_row(manifest, tmp_path, capsys):
    with open(manifest, newline="") as fh:
        good = list(csv.reader(fh))
    bad_img = tmp_path / "broken.nii.gz"
    bad_img.write_bytes(b"this is not a NIfTI file at all" * 10)
    rows = [good[0], good[1], [str(tmp_path / "nope.nii.gz"), "text", "", "train"],
            [str(bad_img), "text", "", "train"], [good[2][0], "text", "999.99", "train"],
            [good[2][0], "", "", "train"]]
    m = tmp_path / "bad.csv"
    with open(m, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    out = tmp_path / "out"
    assert _inproc(["--data", str(m), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err
    assert "row 3: file not found" in err and "nope.nii.gz" in err
    assert "row 4: unreadable image broken.nii.gz" in err
    assert "row 5: unknown phecode(s) 999.99" in err
    assert "row 6: empty report" in err
    assert not out.exists()  # nothing written
    m.write_text("image,text\nx.nii.gz,hello\n")
    assert _inproc(["--data", str(m), "--out", str(out)]) == 2
    assert "missing column(s) report, phecodes" in capsys.readouterr().err


def test_medfm_train_cli_lists_merlin(capsys):
    from napari_medfm.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "merlin", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--out", "--preset", "--config", "--max-steps", "--save-every",
                 "--seed", "--resume"):
        assert flag in text
    args = parser.parse_args(["train", "merlin", "--data", "m.csv", "--out", "o",
                              "--preset", "paper"])
    assert args.preset == "paper" and callable(args.func)


def test_batchnorm_global_by_default_local_on_request():
    """Global batch norm (all-reduced statistics) unless model.image.batchnorm=local; a typo is
    an error, not a silent choice."""
    from types import SimpleNamespace

    from torch import nn

    from trainers.engine import GlobalBatchNorm
    from trainers.engine import config as C
    from trainers.merlin import PRESETS, RECIPE

    def bns(value):
        cfg = C.resolve(PRESETS, "tiny", overrides=[f"model.image.batchnorm={value}"])
        net = RECIPE.build_model(SimpleNamespace(cfg=cfg))
        return [type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    glob, local = bns("global"), bns("local")
    assert glob and set(glob) == {GlobalBatchNorm}
    assert len(local) == len(glob) and GlobalBatchNorm not in set(local)
    with pytest.raises(ValueError, match="global or local"):
        bns("sync")
