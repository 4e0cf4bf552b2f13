"""``medfm weights`` sub-commands through ``napari_medfm.cli.main`` (real files, local server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from napari_medfm.cli import main
from napari_medfm.runtime import registry
from napari_medfm.runtime.registry import ModelSpec, WeightFile
from napari_medfm.runtime.weights import WeightsManager

REPO = "testorg/cli-model"


@pytest.fixture
def payload() -> bytes:
    return os.urandom(50_000)


@pytest.fixture
def spec(payload):
    s = ModelSpec(id="cli-test", family="test", tasks=("embed",), modalities=("CT",), dims=(3,),
                  builder="nowhere:build", repo_id=REPO, licence="MIT",
                  files=(WeightFile("weights.pt", sha256=hashlib.sha256(payload).hexdigest(),
                                    size=len(payload)),))
    registry.register(s, replace=True)
    yield s
    registry._REGISTRY.pop(s.id, None)


def _src(tmp_path: Path, payload: bytes) -> Path:
    p = tmp_path / "weights.pt"
    p.write_bytes(payload)
    return p


def test_list_path_import_verify(spec, payload, tmp_path, capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "cli-test" in out and "not installed" in out and f"hf.co/{REPO}" in out
    assert "weights.pt: missing" in out

    assert main(["weights", "path", "cli-test"]) == 0
    captured = capsys.readouterr()
    expected = WeightsManager().model_dir(spec) / "weights.pt"
    assert captured.out.strip() == str(expected)
    assert "medfm weights fetch cli-test" in captured.err

    assert main(["weights", "verify", "cli-test"]) == 1  # missing required file
    assert "weights.pt: missing" in capsys.readouterr().out

    assert main(["weights", "import", "cli-test", str(_src(tmp_path, payload))]) == 0
    assert capsys.readouterr().out.strip() == str(expected)
    assert expected.read_bytes() == payload

    assert main(["weights", "verify", "cli-test"]) == 0
    assert "weights.pt: ok" in capsys.readouterr().out
    assert main(["weights", "list", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["cli-test"]["complete"] is True
    assert rows["cli-test"]["files"][0]["verified"] is True

    expected.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    assert main(["weights", "verify", "cli-test"]) == 1
    assert "hash mismatch" in capsys.readouterr().out
    assert main(["weights", "verify", "cli-test", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["status"] == "hash mismatch"


def test_import_bad_file_is_a_clean_error(spec, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not the release")
    assert main(["weights", "import", "cli-test", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfm weights: error:") and "partial or corrupt" in err
    assert not (WeightsManager().model_dir(spec) / "weights.pt").exists()


def test_fetch_offline_and_unknown_model(spec, capsys):
    assert main(["weights", "fetch", "cli-test"]) == 2  # conftest sets HF_HUB_OFFLINE=1
    assert "offline mode is on" in capsys.readouterr().err
    assert main(["weights", "fetch", "cli-tset"]) == 2
    assert "Did you mean: cli-test" in capsys.readouterr().err


def test_fetch_from_local_hub(spec, payload, tmp_path, monkeypatch, capsys):
    served = tmp_path / "hub"
    f = served / REPO / "resolve" / "main" / "weights.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Quiet, directory=str(served)))
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        assert main(["weights", "fetch", "cli-test", "--quiet"]) == 0
        captured = capsys.readouterr()
        dest = WeightsManager().model_dir(spec) / "weights.pt"
        assert captured.out.strip() == str(dest) and dest.read_bytes() == payload
        assert "licence: MIT" in captured.err and "50.0 kB" in captured.err
        assert main(["weights", "fetch", "cli-test", "--file", "other.bin"]) == 2
        assert "no file 'other.bin'" in capsys.readouterr().err
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


def test_convert_training_checkpoint(tmp_path, capsys):
    import argparse

    import torch

    from napari_medfm.runtime.safe_load import load_state_dict

    src = tmp_path / "ckpt.pth"
    w = torch.randn(3, 3)
    torch.save({"args": argparse.Namespace(lr=0.1), "teacher": {"module.backbone.w": w}}, src)
    dst = tmp_path / "model.safetensors"
    assert main(["weights", "convert", str(src), str(dst)]) == 2
    assert "--allow argparse.Namespace" in capsys.readouterr().err
    assert not dst.exists()
    assert main(["weights", "convert", str(src), str(dst), "--allow", "argparse.Namespace",
                 "--prefix", "teacher.module.backbone."]) == 0
    assert capsys.readouterr().out.strip() == str(dst)
    assert torch.equal(load_state_dict(dst)["w"], w)


def test_bare_weights_prints_help(capsys):
    assert main(["weights"]) == 1
    assert "fetch" in capsys.readouterr().out
