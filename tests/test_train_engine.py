"""The trainer engine on a toy recipe (tests/train_toy_recipe.py): exact resume after SIGKILL
(also during a save), SIGTERM, 2 processes == 1 process, 2 -> 1 resharded resume, FSDP2,
non-finite losses, torn checkpoints, configs, manifests, no overwriting."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "train_toy_recipe.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _toy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_toy_recipe", TOY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inproc(args: list[str], capsys=None, check: bool = True) -> tuple[int, str]:
    """A world-of-one run inside the test process (no interpreter start-up)."""
    from trainers.engine import main

    rc = main(_toy().RECIPE, args)
    err = capsys.readouterr().err if capsys is not None else ""
    if check:
        assert rc == 0, err
    return rc, err


def _run(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(TOY), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(TOY), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy")
    m = d / "m.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "split"])
        for i in range(10):
            w.writerow([i / 10, "train"])
        w.writerow([5, "val"])
    return m


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    _inproc(["--data", str(manifest), "--out", str(out), "--set", "model.dropout=0"])
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "export" / "toy.pt", map_location="cpu", weights_only=True)


def _losses(out: Path) -> list[str]:
    with open(out / "metrics.csv") as fh:
        return [r["loss"] for r in csv.DictReader(fh)]


def _max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_outputs_and_no_overwrite(reference, manifest, capsys):
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000006"]
    assert (reference / "config.yaml").is_file()
    assert (reference / "export" / "model_card.json").is_file()
    before = (reference / "metrics.csv").read_bytes()
    rc, err = _inproc(["--data", str(manifest), "--out", str(reference)], capsys, check=False)
    assert rc == 2 and "already holds a run" in err
    assert (reference / "metrics.csv").read_bytes() == before


def test_sigkill_then_resume_is_bit_exact(reference, manifest, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(manifest), "--out", str(out), "--set", "model.dropout=0"]
    res = _run([*base, "--set", "train.debug_kill_at_step=3"], check=False)
    assert res.returncode == -9
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    _inproc([*base, "--resume"])
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _losses(out) == _losses(reference)


def test_sigkill_during_save_never_loads_torn_checkpoint(reference, manifest, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(manifest), "--out", str(out), "--set", "model.dropout=0"]
    res = _run([*base, "--set", "train.debug_kill_in_save_at_step=4"], check=False)
    assert res.returncode == -9
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-step-00000004", "step-00000002"]
    # a step folder without COMPLETE (e.g. copied by hand) is not a checkpoint either
    (out / "checkpoints" / "step-00000005").mkdir()
    _inproc([*base, "--resume"])
    assert not (out / "checkpoints" / ".tmp-step-00000004").exists()
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_sigterm_saves_and_exits_cleanly(reference, manifest, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(manifest), "--out", str(out), "--set", "model.dropout=0",
            "--set", "model.sigterm_at_step=3"]
    _, err = _inproc(base, capsys)
    assert "stopped (SIGTERM) at step 3" in err
    assert (out / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
    _inproc([*base, "--resume"])
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_two_processes_equal_one_and_resume_at_one(reference, manifest, tmp_path):
    out = tmp_path / "run2"
    base = ["--data", str(manifest), "--out", str(out), "--set", "model.dropout=0"]
    res = _run([*base, "--set", "train.debug_kill_at_step=3"], nproc=2, check=False)
    assert res.returncode != 0
    step2 = out / "checkpoints" / "step-00000002"
    assert (step2 / "rng-rank1.pt").is_file() and (step2 / "__1_0.distcp").is_file()
    with open(out / "metrics.csv") as fh:  # the 2-process steps before the kill
        two = [r["loss"] for r in csv.DictReader(fh)][:2]
    assert [float(x) for x in two] == pytest.approx([float(x) for x in _losses(reference)[:2]],
                                                     rel=1e-5)
    _inproc([*base, "--resume"])  # resharded: saved by 2 ranks, loaded by 1
    assert _max_diff(_weights(reference), _weights(out)) < 1e-5


def test_fsdp2_equals_one_process(reference, manifest, tmp_path):
    out = tmp_path / "fsdp"
    _run(["--data", str(manifest), "--out", str(out), "--set", "model.dropout=0",
          "--set", "train.parallel=fsdp"], nproc=2)
    assert _max_diff(_weights(reference), _weights(out)) < 1e-5


def test_nonfinite_stop_and_skip(manifest, tmp_path, capsys):
    rc, err = _inproc(["--data", str(manifest), "--out", str(tmp_path / "a"),
                       "--set", "model.nan_at_step=3"], capsys, check=False)
    assert rc == 2 and "non-finite loss at step 3" in err
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-00000002"]
    _inproc(["--data", str(manifest), "--out", str(tmp_path / "b"), "--set", "model.nan_at_step=3",
          "--set", "train.nonfinite=skip"])
    with open(tmp_path / "b" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[2]["nonfinite"] == "1" and rows[3]["loss"] != "nan"


def test_bad_manifest_names_rows(tmp_path, capsys):
    m = tmp_path / "bad.csv"
    m.write_text("x,split\n0.1,train\nabc,train\n0.3,train\n")
    rc, err = _inproc(["--data", str(m), "--out", str(tmp_path / "o")], capsys, check=False)
    assert rc == 2 and "row 3: x is not a number" in err
    assert not (tmp_path / "o").exists()
    m.write_text("y\n1\n")
    rc, err = _inproc(["--data", str(m), "--out", str(tmp_path / "o")], capsys, check=False)
    assert rc == 2 and "missing column(s) x" in err


def test_config_layers(tmp_path):
    from trainers.engine import config as C

    presets = {"tiny": {"train": {"lr": 1.0}, "model": {"depth": 2, "sub": {"a": 1}}}}
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\ndepth = 3\n[model.sub]\na = 5\n")
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  lr: 0.5\n")
    cfg = C.resolve(presets, "tiny", [toml, yml], ["model.depth=4"], {"train.seed": 7,
                                                                      "train.max_steps": None})
    assert cfg["model"] == {"depth": 4, "sub": {"a": 5}}
    assert cfg["train"]["lr"] == 0.5 and cfg["train"]["seed"] == 7
    assert cfg["train"]["max_steps"] == C.TRAIN_DEFAULTS["max_steps"]
    with pytest.raises(C.ConfigError, match="unknown config key model.dept"):
        C.resolve(presets, "tiny", overrides=["model.dept=1"])
    with pytest.raises(C.ConfigError, match="changed: model.depth"):
        C.check_resume_compatible(cfg, C.deep_merge(cfg, {"model": {"depth": 9}}))
    C.check_resume_compatible(cfg, C.deep_merge(cfg, {"train": {"max_steps": 99}}))


def test_lr_schedule_closed_form():
    import math

    from trainers.engine import lr_factor

    cfg = {"train": {"warmup_steps": 2, "max_steps": 10, "min_lr": 0.1, "lr": 1.0,
                     "schedule": "cosine"}}
    assert lr_factor(0, cfg) == 0.5 and lr_factor(1, cfg) == 1.0
    assert lr_factor(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, cfg) == pytest.approx(0.1)
