"""RadFM's release as published: a split zip (RadFM.z01..z04 + RadFM.zip) fetched from a local
hub laid out like Hugging Face (resume after a cut, LFS sha256, unpacking, disk-space message),
read across the parts; `medfm weights fetch radfm` and `medfm weights convert radfm`."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import zipfile
from collections import namedtuple

import pytest
import torch
from test_runtime_weights import REPO, HubServer

import napari_medfm
from napari_medfm.errors import WeightsError
from napari_medfm.runtime import registry
from napari_medfm.runtime import weights as weights_mod
from napari_medfm.runtime.weights import (
    WeightsManager,
    fetch_archive,
    split_zip_members,
    unpack_split_zip,
)

PARTS = ("RadFM.z01", "RadFM.z02", "RadFM.z03", "RadFM.z04", "RadFM.zip")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _split_zip(folder, payload: bytes, name: str = "pytorch_model.bin", zip64: bool = False):
    """A real split archive made by Info-ZIP (`zip -s`), as the release was."""
    if shutil.which("zip") is None:
        pytest.skip("Info-ZIP `zip` is not installed (needed to make a real split archive)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    import zlib

    size_k = max(64, int(len(zlib.compress(payload)) / 4.5) // 1024)  # 5 parts, like the release
    cmd = ["zip", "-q", *(["-fz"] if zip64 else []), "-s", f"{size_k}k", "RadFM.zip", name]
    subprocess.run(cmd, cwd=folder, check=True)
    (folder / name).unlink()
    parts = sorted(p.name for p in folder.glob("RadFM.z[0-9]*")) + ["RadFM.zip"]
    return [folder / p for p in parts]


def _tiny_checkpoint(tmp_path) -> bytes:
    from napari_medfm.models.radfm.testing import tiny_config, write_model_folder

    src = write_model_folder(tmp_path / "src", tiny_config())
    return (src / "pytorch_model.bin").read_bytes()


def _tiny_config_into(folder):
    import json

    from napari_medfm.models.radfm.testing import tiny_config

    (folder / "radfm_config.json").write_text(json.dumps(tiny_config()))


@pytest.mark.parametrize("zip64", [False, True])
def test_split_zip_is_read_across_the_parts(tmp_path, zip64):
    import random

    payload = random.Random(0).randbytes(300_000) + bytes(60_000)  # deflated, over 5 parts
    parts = _split_zip(tmp_path / "z", payload, zip64=zip64)
    assert [p.name for p in parts] == list(PARTS)
    [m] = split_zip_members(parts)
    assert m["name"] == "pytorch_model.bin" and m["size"] == len(payload) and m["method"] == 8
    [out] = unpack_split_zip(parts, tmp_path / "out")
    assert out.read_bytes() == payload and not list((tmp_path / "out").glob(".*tmp"))
    with pytest.raises(WeightsError, match="central directory is on part 5 but only 4 parts"):
        unpack_split_zip([p for p in parts if p.name != "RadFM.z03"], tmp_path / "o2")
    parts[2].rename(parts[2].with_suffix(".bak"))
    with pytest.raises(WeightsError, match="missing parts RadFM.z03"):
        unpack_split_zip(parts, tmp_path / "o3")


def test_single_zip64_archive_and_corruption_detected(tmp_path):
    payload = b"radfm" * 50_000
    z = tmp_path / "one.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf, \
            zf.open("w/pytorch_model.bin", "w", force_zip64=True) as fh:
        fh.write(payload)
    [out] = unpack_split_zip([z], tmp_path / "out", members=["pytorch_model.bin"])
    assert out.read_bytes() == payload
    raw = bytearray(z.read_bytes())
    raw[200] ^= 0xFF
    z.write_bytes(bytes(raw))
    with pytest.raises((WeightsError, Exception)):
        unpack_split_zip([z], tmp_path / "bad")
    assert not (tmp_path / "bad" / "pytorch_model.bin").exists()


@pytest.fixture
def radfm_hub(request, monkeypatch, tmp_path):
    """The radfm spec pointed at a local hub serving a split zip of a tiny checkpoint."""
    payload = _tiny_checkpoint(tmp_path)
    parts = _split_zip(tmp_path / "release", payload)
    files = {p.name: p.read_bytes() for p in parts}
    srv = HubServer(files)
    srv.linked_etag = {n: _sha(b) for n, b in files.items()}  # the hub's LFS sha256
    orig = registry.get_spec("radfm")
    spec = dataclasses.replace(orig, repo_id=REPO, extras={
        **orig.extras, "archive": {**orig.extras["archive"], "download_size_estimate": None,
                                   "unpacked_size_estimate": len(payload)}})
    registry.register(spec, replace=True)
    request.addfinalizer(lambda: registry.register(orig, replace=True))
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(weights_mod, "_DOWNLOAD_CHUNK", 4096)
    yield srv, spec, payload, files
    srv.close()


def test_fetch_split_zip_resumes_after_a_cut_and_unpacks(radfm_hub):
    srv, spec, payload, files = radfm_hub
    wm = WeightsManager()
    folder = wm.model_dir(spec)
    srv.cut_after, srv.cuts_left = 30_000, 1
    with pytest.raises(WeightsError, match="interrupted.*resume"):
        fetch_archive(spec, wm, retries=0)
    part = folder / "RadFM.z01.part"
    kept = part.stat().st_size
    assert 0 < kept <= 30_000 and not (folder / "pytorch_model.bin").exists()
    seen = []
    [path] = fetch_archive(spec, wm, progress=seen.append)
    assert path == folder / "pytorch_model.bin" and path.read_bytes() == payload
    z01 = [r["range"] for r in srv.file_requests() if r["path"].endswith("RadFM.z01")]
    assert z01 == [None, f"bytes={kept}-"]  # resumed, not restarted
    assert all((folder / p).read_bytes() == files[p] for p in PARTS)
    assert any(p.message.startswith("unpacking") for p in seen)
    assert wm._cached_hash(path) == _sha(payload)  # hashed while unpacking, not again at load
    # the model folder now loads (default weights folder, no explicit path); the tiny sizes
    # come in through the folder contract's radfm_config.json (the release needs none)
    _tiny_config_into(folder)
    m = napari_medfm.load_model("radfm", device="cpu")
    assert m.weights_sha256 == _sha(payload)
    n = len(srv.file_requests())
    fetch_archive(spec, wm)  # already unpacked: nothing downloaded
    assert len(srv.file_requests()) == n


def test_fetch_split_zip_checks_disk_space_first(radfm_hub, monkeypatch):
    srv, spec, payload, _ = radfm_hub
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(weights_mod.shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    with pytest.raises(WeightsError, match=r"not enough disk space.*split zip.*needed.*free.*"
                                           r"MEDFM_HOME"):
        fetch_archive(spec)
    assert srv.requests == []


def test_cli_fetch_delete_parts_and_convert(radfm_hub, capsys):
    from napari_medfm.cli import main

    srv, spec, payload, _ = radfm_hub
    assert main(["weights", "fetch", "radfm", "-q", "--delete-parts"]) == 0
    folder = WeightsManager().model_dir(spec)
    assert (folder / "pytorch_model.bin").read_bytes() == payload
    assert not any((folder / p).exists() for p in PARTS)
    assert str(folder / "pytorch_model.bin") in capsys.readouterr().out
    _tiny_config_into(folder)
    # one-time conversion to bf16 safetensors shards in the model folder; the loader prefers them
    assert main(["weights", "convert", "radfm", "--shard-size", "50kB"]) == 0
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    m = napari_medfm.load_model("radfm", device="cpu")
    assert m.files == shards and m.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in m.net.parameters())
