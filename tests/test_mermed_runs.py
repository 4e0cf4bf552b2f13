"""MerMED-FM trainer runs (tiny preset, CPU, subprocesses): SIGKILL + resume equals the
uninterrupted run bit for bit, torn checkpoints are never loaded, schedules follow their formulas
after a resume, 2 gloo processes equal 1 at the same global batch, the export loads strictly
through ``medfm embed`` and gives the trainer's teacher outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import mermed_core as core

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--preset", "tiny", "--memory-size", "16", "--threads", "1", "--save-every", "2",
        "--total-steps", "12", "--device", "cpu"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("mermed_data")
    rng = np.random.default_rng(0)
    rows = ["image,modality"]
    for i in range(6):
        y, x = np.mgrid[0:70, 0:84]
        grey = (127 + 100 * np.sin(x / (3 + i)) * np.cos(y / 5) + rng.normal(0, 10, x.shape))
        Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).save(d / f"cxr{i}.png")
        rows.append(f"cxr{i}.png,CXR")
        rgb = np.stack([grey, np.roll(grey, i, 0), 255 - grey], -1)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(d / f"fundus{i}.png")
        rows.append(f"fundus{i}.png,fundus")
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    return d / "manifest.csv"


def _cmd(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "napari_medfm.cli", "train", "mermed", "--data", str(manifest),
            "--out", str(out), *BASE, *extra]


def _run(manifest, out, *extra, timeout=240):
    r = subprocess.run(_cmd(manifest, out, *extra), env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(manifest, out, world, *extra, timeout=240):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(_cmd(manifest, out, *extra), env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        errs.append(err)
        assert p.returncode == 0, err[-3000:]
    return errs


def _state(out: Path, step: int) -> dict:
    from trainers.mermed import read_checkpoint

    return read_checkpoint(out / "checkpoints" / f"step-{step:08d}")


def _metrics(out: Path) -> list[dict]:
    from trainers.engine.metrics import read_metrics

    return [{k: (float(v) if k != "step" else int(v)) for k, v in r.items()}
            for r in read_metrics(out / "metrics.csv")]


def _assert_tree_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs (max {float((a.float() - b.float()).abs().max())})"
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> Path:
    """Uninterrupted 8-step run with drop path (exercises the RNG state in checkpoints)."""
    out = tmp_path_factory.mktemp("ref")
    _run(manifest, out, "--max-steps", "8", "--drop-path", "0.1")
    return out


def _start_until_checkpoint(manifest: Path, out: Path, step: int) -> subprocess.Popen:
    """Start the 8-step reference run in the background; return once step ``step``'s
    checkpoint is complete (or the run ended)."""
    proc = subprocess.Popen(_cmd(manifest, out, "--max-steps", "8", "--drop-path", "0.1"),
                            env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / f"step-{step:08d}" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_sigkill_then_resume_equals_uninterrupted(manifest, reference, tmp_path):
    out = tmp_path / "killed"
    proc = _start_until_checkpoint(manifest, out, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")
            if (p / "COMPLETE").exists()]
    latest = max(done)
    assert latest < 8
    # a torn checkpoint (no COMPLETE marker) and a half-written temporary folder are ignored
    torn = out / "checkpoints" / f"step-{latest + 2:08d}"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"not a checkpoint")
    (out / "checkpoints" / f".tmp-step-{latest + 4:08d}").mkdir()
    _run(manifest, out, "--max-steps", "8", "--drop-path", "0.1", "--resume")
    _assert_tree_equal(_state(reference, 8), _state(out, 8))
    a, b = _metrics(reference), _metrics(out)
    assert [r["step"] for r in b] == list(range(1, 9))  # steps done
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]
    t_ref = torch.load(reference / "export" / "MerMED.pth", weights_only=True)["teacher"]
    t_out = torch.load(out / "export" / "MerMED.pth", weights_only=True)["teacher"]
    _assert_tree_equal(t_ref, t_out)


def test_sigterm_saves_exits_cleanly_and_resume_equals_uninterrupted(manifest, reference,
                                                                    tmp_path):
    """Pre-emption: SIGTERM saves the step it is on and exits 0 without exporting; --resume
    ends where the uninterrupted run ends."""
    out = tmp_path / "preempted"
    proc = _start_until_checkpoint(manifest, out, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and (out / "export").exists():
        pytest.skip("the run finished before SIGTERM arrived (machine too fast)")
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in err and not (out / "export").exists()
    done = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")
                  if (p / "COMPLETE").exists())
    assert done and 2 <= done[-1] < 8
    _run(manifest, out, "--max-steps", "8", "--drop-path", "0.1", "--resume")
    _assert_tree_equal(_state(reference, 8)["teacher"], _state(out, 8)["teacher"])


def test_schedules_in_the_run_follow_the_formulas(reference):
    rows = _metrics(reference)
    # tiny preset: 12 images, global batch 4 -> 3 steps/epoch; warm-up 1 epoch; total 12 steps
    spe, total = 3, 12
    base = 5e-4 * 4 / 256
    for r in rows:
        s = r["step"] - 1  # the schedules of the step that was just done
        assert r["lr"] == pytest.approx(core.lr_at(s, base=base, final=1e-6, warmup=spe,
                                                   total=total))
        assert r["wd"] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + np.cos(np.pi * s / total)))
        assert r["momentum"] == pytest.approx(1 - 0.0005 * 0.5 * (1 + np.cos(np.pi * s / total)))
        assert r["tau_t"] == pytest.approx(0.04 + 0.03 * min(s, spe) / spe)
        assert np.isfinite(r["loss"])
    # memory: 16 slots, 4 pushed per step -> full after 4 steps: masking on from step 4
    assert [r["masking"] for r in rows] == [0] * 4 + [1] * 4
    st = _state(reference, 8)
    assert int(st["memory"]["ptr"]) == 0 and (st["memory"]["labels"] >= 0).all()
    assert st["sampler"]["step"] == 8


def test_two_processes_equal_one(manifest, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(manifest, one, "--max-steps", "5", "--batch-size", "4")
    _run_world(manifest, two, 2, "--max-steps", "5", "--batch-size", "2")
    a, b = _metrics(one), _metrics(two)
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
    sa, sb = _state(one, 5), _state(two, 5)
    # Parameters whose true gradient is 0 (biases right before a batch norm, the final norm's
    # bias, the key bias of attention) get Adam steps driven by float noise: they may differ by
    # at most the sum of the learning rates; everything else agrees to float precision.
    lr_sum = sum(r["lr"] for r in a)
    gradient_free = ("head.mlp.0.bias", "head.mlp.3.bias", "backbone.norm.bias", "attn.qkv.bias")
    for part in ("teacher", "student"):
        for k, v in sa[part].items():
            free = part == "student" and k.endswith(gradient_free)
            atol = 2 * lr_sum if free else (1e-5 if "running" in k else 1e-6)
            torch.testing.assert_close(sb[part][k].float(), v.float(), rtol=1e-4, atol=atol,
                                       msg=f"{part}.{k}")
    torch.testing.assert_close(sb["memory"]["queue"], sa["memory"]["queue"], rtol=1e-4, atol=1e-5)
    assert torch.equal(sb["memory"]["labels"], sa["memory"]["labels"])


def test_export_loads_strictly_through_medfm_embed(reference, manifest, tmp_path):
    from napari_medfm import io
    from napari_medfm.cli import main
    from napari_medfm.models.mermed.model import build_vit
    from napari_medfm.runtime.registry import load_model
    from trainers.mermed import PRESETS

    pth = reference / "export" / "MerMED.pth"
    ck = torch.load(pth, weights_only=True)  # plain tensors only
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in ck["teacher"])
    card = json.loads((reference / "export" / "model_card.json").read_text())
    assert card["steps"] == 8 and card["vit_config"]["embed_dim"] == 128
    from conftest import real_path

    # a DICOM CXR: the modality comes from the header, on both paths
    image_path = real_path("cxr/dicom/siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    npz = tmp_path / "e.npz"
    argv = ["embed", "--model", "mermed", "--weights", str(pth), "--output", str(npz),
            str(image_path)]
    assert main(argv) == 0
    got = np.load(npz)["image_embedding"]
    # the trainer's own teacher backbone on the plugin's preprocessing gives the same vector
    enc = load_model("mermed", weights=str(pth), device="cpu")
    image = io.read(image_path)[0]
    x = torch.from_numpy(enc.preprocess(image))[None]
    vit = build_vit(PRESETS["tiny"]["vit"])
    teacher = _state(reference, 8)["teacher"]
    vit.load_state_dict({k[len("backbone."):]: v for k, v in teacher.items()
                         if k.startswith("backbone.")}, strict=True)
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the safetensors copy is the same model
    enc2 = load_model("mermed", weights=str(reference / "export" / "MerMED.safetensors"),
                      device="cpu")
    np.testing.assert_allclose(enc2.embed(image)["image_embedding"], got,
                               rtol=1e-5, atol=1e-6)


def test_torchrun_script_entry_from_another_folder(manifest, tmp_path):
    """The contract's own command, ``torchrun trainers/mermed.py ...``, run from outside the
    checkout (the script makes the package importable itself)."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "trainers" / "mermed.py"), "--data", str(manifest), "--out", str(out),
           *BASE, "--max-steps", "1"]
    env = _env()
    env.pop("PYTHONPATH", None)
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "export" / "MerMED.pth").is_file()


def test_existing_run_is_not_overwritten_without_resume(manifest, reference):
    """A second run into a folder that holds one fails before writing, naming --resume; the
    first run's checkpoints, metrics and export are untouched."""
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    r = subprocess.run(_cmd(manifest, reference, "--max-steps", "2"), env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert "already holds a run" in r.stderr and "--resume" in r.stderr
    after = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    assert after == before
