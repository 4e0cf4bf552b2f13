"""Weights manager: resolve, hash verification (+cache), import, verify/list and downloads.

Downloads are exercised against a real HTTP server on 127.0.0.1 (``http.server`` in a thread)
laid out like the hub (``/<repo>/resolve/<rev>/<file>``) that honours ``Range`` and can cut the
connection mid-file, redirect like the hub's CDN, or refuse like a gated repository.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest

from napari_medfm.errors import WeightsError
from napari_medfm.runtime import registry
from napari_medfm.runtime import weights as weights_mod
from napari_medfm.runtime.registry import ModelSpec, WeightFile
from napari_medfm.runtime.weights import (
    MISMATCH,
    MISSING,
    OK,
    PARTIAL,
    UNPINNED,
    WeightsManager,
    resolve_weights,
    sha256_file,
)

REPO = "testorg/tiny-model"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _register(spec: ModelSpec, request: pytest.FixtureRequest) -> ModelSpec:
    registry.register(spec, replace=True)
    request.addfinalizer(lambda: registry._REGISTRY.pop(spec.id, None))
    return spec


@pytest.fixture
def payload() -> bytes:
    return os.urandom(300_000) + b"end-of-weights"


@pytest.fixture
def tiny(request, payload) -> ModelSpec:
    """A single-file model whose file is pinned (sha256 + size)."""
    return _register(ModelSpec(
        id="tiny-test", family="test", tasks=("embed",), modalities=("CT",), dims=(3,),
        builder="nowhere:build", repo_id=REPO, revision="main",
        files=(WeightFile("model.pt", sha256=_sha(payload), size=len(payload)),)), request)


@pytest.fixture
def multi(request, payload) -> ModelSpec:
    """A hub-layout model: two pinned files, one unpinned optional file in a sub-folder."""
    cfg = b'{"hidden": 8}'
    return _register(ModelSpec(
        id="multi-test", family="test", tasks=("embed",), modalities=("CXR",), dims=(2,),
        builder="nowhere:build", repo_id=REPO,
        files=(WeightFile("config.json", sha256=_sha(cfg), size=len(cfg)),
               WeightFile("model.safetensors", sha256=_sha(payload), size=len(payload)),
               WeightFile("extra/notes.txt", required=False))), request)


def _hub_folder(root: Path, payload: bytes) -> Path:
    (root / "extra").mkdir(parents=True)
    (root / "config.json").write_bytes(b'{"hidden": 8}')
    (root / "model.safetensors").write_bytes(payload)
    (root / "extra" / "notes.txt").write_text("hello")
    return root


# --------------------------------------------------------------------------- hashing / resolve


def test_sha256_file_matches_hashlib(tmp_path, payload):
    p = tmp_path / "f.bin"
    p.write_bytes(payload)
    seen = []
    assert sha256_file(p, chunk=4096, callback=seen.append) == _sha(payload)
    assert seen[-1] == len(payload) and len(seen) > 10


def test_missing_weights_message_says_how_to_get_them(tiny):
    with pytest.raises(WeightsError) as ei:
        resolve_weights("tiny-test")
    msg = str(ei.value)
    assert "model.pt" in msg
    assert "medfm weights fetch tiny-test" in msg and f"hf.co/{REPO}" in msg
    assert "300.0 kB" in msg  # download size
    assert "medfm weights import tiny-test PATH" in msg and "--weights PATH" in msg
    assert str(WeightsManager().model_dir("tiny-test")) in msg


def test_resolve_verified_and_hash_cached(tiny, payload):
    wm = WeightsManager()
    dest = wm.model_dir(tiny) / "model.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload)
    assert wm.resolve("tiny-test") == dest
    cache = json.loads((wm.root / ".verified.json").read_text())
    assert cache[str(dest.resolve())]["sha256"] == _sha(payload)
    # same size and mtime -> the cached hash is trusted (multi-GB files are hashed once) ...
    st = dest.stat()
    dest.write_bytes(bytes(reversed(payload)))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert wm.resolve("tiny-test") == dest
    assert wm.verify("tiny-test")[0]["status"] == OK
    assert wm.verify("tiny-test", rehash=True)[0]["status"] == MISMATCH  # bit rot is caught
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    # ... a changed mtime invalidates it and the mismatch is caught
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        wm.resolve("tiny-test")


def test_hash_mismatch_names_file_expected_and_actual(tiny, payload):
    wm = WeightsManager()
    dest = wm.model_dir(tiny) / "model.pt"
    dest.parent.mkdir(parents=True)
    bad = bytearray(payload)
    bad[1000] ^= 0xFF
    dest.write_bytes(bytes(bad))
    with pytest.raises(WeightsError) as ei:
        wm.resolve(tiny)
    msg = str(ei.value)
    assert str(dest) in msg and _sha(payload) in msg and _sha(bytes(bad)) in msg
    assert "medfm weights fetch tiny-test" in msg
    # verify=False skips the check (for callers that verified already)
    assert wm.resolve(tiny, verify=False) == dest


def test_partial_file_is_named_partial(tiny, payload):
    wm = WeightsManager()
    dest = wm.model_dir(tiny) / "model.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload[:1000])
    with pytest.raises(WeightsError, match="partial or corrupt: 1000 bytes, expected 300014"):
        wm.resolve(tiny)


def test_explicit_file_and_folder(tiny, multi, tmp_path, payload):
    wm = WeightsManager()
    f = tmp_path / "model.pt"
    f.write_bytes(payload)
    assert wm.resolve(tiny, explicit=f) == f
    # a released file name is verified even when given explicitly
    f.write_bytes(payload[::-1])
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        wm.resolve(tiny, explicit=f)
    # a renamed / fine-tuned checkpoint is the user's: returned as is (strict load checks it)
    own = tmp_path / "my_finetune.pt"
    own.write_bytes(b"x")
    assert wm.resolve(tiny, explicit=own) == own
    with pytest.raises(WeightsError, match="does not exist"):
        wm.resolve(tiny, explicit=tmp_path / "nope.pt")
    # a hub-layout folder: the whole folder for a multi-file model, one file on request
    hub = _hub_folder(tmp_path / "hub", payload)
    assert wm.resolve(multi, explicit=hub) == hub
    assert wm.resolve(multi, explicit=hub, filename="config.json") == hub / "config.json"
    (hub / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"config\.json missing in .*hub"):
        wm.resolve(multi, explicit=hub)


def test_hugging_face_cache_is_found_offline(tiny, multi, tmp_path, monkeypatch, payload):
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "models--testorg--tiny-model"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snap / "model.pt").write_bytes(payload)
    wm = WeightsManager()
    assert wm.resolve("tiny-test") == snap / "model.pt"
    # a HF cache repo folder given explicitly resolves to its snapshot (hub layout)
    _hub_folder(snap, payload)
    assert wm.resolve(multi, explicit=repo) == snap
    # the cached copy is verified like any other
    (snap / "model.pt").write_bytes(payload[::-1])
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        wm.resolve("tiny-test")
    # the weights folder wins over the cache
    wm.import_(tiny, _write(tmp_path / "model.pt", payload))
    assert wm.resolve("tiny-test") == wm.model_dir(tiny) / "model.pt"


# --------------------------------------------------------------------------- import / verify / list


def test_import_file_renamed_and_linked(tiny, tmp_path, payload):
    wm = WeightsManager()
    src = tmp_path / "downloaded_elsewhere.bin"
    src.write_bytes(payload)
    [placed] = wm.import_("tiny-test", src)
    assert placed == wm.model_dir(tiny) / "model.pt" and placed.read_bytes() == payload
    assert not os.path.samefile(placed, src)
    [linked] = wm.import_("tiny-test", src, copy="link")
    assert os.path.samefile(linked, src)
    assert wm.resolve("tiny-test") == linked
    assert not list(linked.parent.glob("*.tmp"))


def test_import_bad_hash_places_nothing(tiny, tmp_path, payload):
    wm = WeightsManager()
    src = tmp_path / "model.pt"
    src.write_bytes(payload[:-1] + b"X")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        wm.import_(tiny, src)
    assert not (wm.model_dir(tiny) / "model.pt").exists()
    with pytest.raises(WeightsError, match="does not exist"):
        wm.import_(tiny, tmp_path / "missing.pt")


def test_import_hub_folder_and_verify_statuses(multi, tiny, tmp_path, payload):
    wm = WeightsManager()
    hub = _hub_folder(tmp_path / "hub", payload)
    placed = wm.import_(multi, hub)
    folder = wm.model_dir(multi)
    assert sorted(placed) == sorted([folder / "config.json", folder / "model.safetensors",
                                     folder / "extra" / "notes.txt"])
    assert wm.resolve(multi) == folder
    rows = {r["file"]: r for r in wm.verify(multi)}
    assert rows["config.json"]["status"] == OK
    assert rows["model.safetensors"]["status"] == OK
    assert rows["extra/notes.txt"]["status"] == UNPINNED
    # break one file, truncate another; tiny has nothing installed
    (folder / "config.json").write_bytes(b'{"hidden": 9}')
    (folder / "model.safetensors").write_bytes(payload[:10])
    rows = {r["file"]: r for r in wm.verify(multi)}
    assert rows["config.json"]["status"] == MISMATCH
    assert rows["model.safetensors"]["status"] == PARTIAL
    assert wm.verify("tiny-test")[0]["status"] == MISSING
    everything = {(r["model"], r["file"]) for r in wm.verify()}
    assert ("tiny-test", "model.pt") in everything and ("multi-test", "config.json") in everything
    # a folder without the required files is refused with the missing names
    with pytest.raises(WeightsError, match="missing model.safetensors"):
        (hub / "model.safetensors").unlink()
        wm.import_(multi, hub)


def test_list_reports_presence_size_and_verified(tiny, multi, tmp_path, payload):
    wm = WeightsManager()
    rows = {r["model"]: r for r in wm.list()}
    assert rows["tiny-test"]["complete"] is False
    assert rows["tiny-test"]["files"][0]["present"] is False
    wm.import_(tiny, _write(tmp_path / "model.pt", payload))
    rows = {r["model"]: r for r in wm.list()}
    f = rows["tiny-test"]["files"][0]
    assert rows["tiny-test"]["complete"] is True
    assert (f["present"], f["size"], f["verified"]) == (True, len(payload), True)
    assert rows["multi-test"]["total_size"] == len(payload) + len(b'{"hidden": 8}')


def _write(p: Path, b: bytes) -> Path:
    p.write_bytes(b)
    return p


# --------------------------------------------------------------------------- downloads


class HubServer:
    """A tiny hub: ``GET /<repo>/resolve/<rev>/<file>`` -> 302 to ``/cdn/<file>`` (like hf.co),
    which serves bytes with Range support; ``cut_after`` bytes then drop the connection."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[dict[str, str | None]] = []
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.status: int | None = None  # force a status (401 gated...)
        self.linked_etag: dict[str, str] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "auth": self.headers.get("Authorization")})
                if server.status:
                    self.send_response(server.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                prefix = f"/{REPO}/resolve/main/"
                if self.path.startswith(prefix):
                    name = self.path[len(prefix):]
                    if name not in server.files:
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{name}")
                    if name in server.linked_etag:
                        self.send_header("X-Linked-Etag", f'"{server.linked_etag[name]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/cdn/"):
                    data = server.files[self.path[5:]]
                    start = 0
                    rng = self.headers.get("Range")
                    if rng:
                        start = int(rng.split("=")[1].split("-")[0])
                        if start >= len(data):
                            self.send_response(416)
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        self.send_response(206)
                        self.send_header("Content-Range",
                                         f"bytes {start}-{len(data) - 1}/{len(data)}")
                    else:
                        self.send_response(200)
                    body = data[start:]
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if server.cut_after is not None and server.cuts_left > 0:
                        server.cuts_left -= 1
                        self.wfile.write(body[:server.cut_after])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(body)
                    return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def file_requests(self) -> list[dict[str, str | None]]:
        return [r for r in self.requests if r["path"].startswith("/cdn/")]


@pytest.fixture
def hub(monkeypatch, payload, tmp_path):
    srv = HubServer({"model.pt": payload, "config.json": b'{"hidden": 8}',
                     "model.safetensors": payload, "extra/notes.txt": b"hello"})
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # never pick up a stored user token
    # small read blocks so a cut keeps most of what arrived (at most one block is lost)
    monkeypatch.setattr(weights_mod, "_DOWNLOAD_CHUNK", 4096)
    yield srv
    srv.close()


def test_offline_mode_gives_clear_error_and_no_request(tiny, monkeypatch):
    srv = HubServer({})
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set for every test by conftest
        with pytest.raises(WeightsError, match="offline mode is on.*HF_HUB_OFFLINE"):
            WeightsManager().fetch(tiny)
        assert srv.requests == []
    finally:
        srv.close()


def test_fetch_downloads_verifies_and_reports_progress(tiny, hub, payload):
    wm = WeightsManager()
    seen = []
    [path] = wm.fetch("tiny-test", progress=seen.append)
    assert path == wm.model_dir(tiny) / "model.pt" and path.read_bytes() == payload
    assert not list(path.parent.glob("*.part"))
    assert seen[-1].step == seen[-1].total == len(payload)
    assert [p.step for p in seen] == sorted(p.step for p in seen)
    assert wm.resolve("tiny-test") == path
    # already there and valid: no second download
    n = len(hub.file_requests())
    wm.fetch("tiny-test")
    assert len(hub.file_requests()) == n


def test_cut_download_leaves_no_final_file_then_resumes(tiny, hub, payload):
    wm = WeightsManager()
    dest = wm.model_dir(tiny) / "model.pt"
    hub.cut_after, hub.cuts_left = 100_000, 1
    with pytest.raises(WeightsError, match="interrupted.*fetch tiny-test.*resume"):
        wm.fetch(tiny, retries=0)
    assert not dest.exists()  # atomic: never a partial file at the final path
    part = dest.with_name("model.pt.part")
    kept = part.stat().st_size
    assert 100_000 - 4096 < kept <= 100_000
    assert part.read_bytes() == payload[:kept]
    with pytest.raises(WeightsError, match="interrupted download"):
        wm.resolve(tiny)  # resolve points at the resume
    [path] = wm.fetch(tiny)
    assert path.read_bytes() == payload and not part.exists()
    assert [r["range"] for r in hub.file_requests()] == [None, f"bytes={kept}-"]


def test_cut_download_resumes_automatically(tiny, hub, payload):
    hub.cut_after, hub.cuts_left = 50_000, 2
    [path] = WeightsManager().fetch(tiny, retries=3)
    assert path.read_bytes() == payload
    ranges = [r["range"] for r in hub.file_requests()]
    assert len(ranges) == 3 and ranges[0] is None
    starts = [int(r.split("=")[1].rstrip("-")) for r in ranges[1:]]
    assert 50_000 - 4096 < starts[0] <= 50_000 < starts[1] <= 100_000


def test_cancel_keeps_part_for_resume(tiny, hub, payload):
    wm = WeightsManager()
    gen = wm.fetch_iter(tiny)
    next(gen)
    next(gen)
    gen.close()  # what a napari worker's quit() does at the next yield
    dest = wm.model_dir(tiny) / "model.pt"
    assert not dest.exists() and dest.with_name("model.pt.part").exists()
    assert wm.fetch(tiny)[0].read_bytes() == payload


def test_concurrent_download_of_same_file_is_refused(tiny, hub, payload):
    from filelock import FileLock

    wm = WeightsManager()
    lock = FileLock(str(wm.root / ".locks" / "tiny-test" / "model.pt.lock"))
    # held by "another process"
    with lock, pytest.raises(WeightsError, match="another download of model.pt .* in progress"):
        wm.fetch(tiny)
    assert hub.file_requests() == []
    assert wm.fetch(tiny)[0].read_bytes() == payload


def test_corrupt_download_is_rejected(tiny, hub, payload):
    hub.files["model.pt"] = payload[:-3] + b"BAD"  # same size, wrong content
    wm = WeightsManager()
    with pytest.raises(WeightsError, match="corrupt.*nothing was installed"):
        wm.fetch(tiny)
    folder = wm.model_dir(tiny)
    assert not (folder / "model.pt").exists() and not (folder / "model.pt.part").exists()


def test_stale_part_restarts_from_scratch(tiny, hub, payload):
    wm = WeightsManager()
    part = wm.model_dir(tiny) / "model.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 5000)  # left over from some other file
    [path] = wm.fetch(tiny)
    assert path.read_bytes() == payload
    assert [r["range"] for r in hub.file_requests()] == ["bytes=5000-", None]


def test_hub_serving_another_release_is_refused_before_download(tiny, hub, payload):
    hub.linked_etag["model.pt"] = _sha(b"a newer release")
    wm = WeightsManager()
    with pytest.raises(WeightsError, match="now serves a different model.pt.*nothing was downloaded"):
        wm.fetch(tiny)
    folder = wm.model_dir(tiny)
    assert not (folder / "model.pt").exists() and not (folder / "model.pt.part").exists()
    hub.linked_etag["model.pt"] = _sha(payload)  # the hub's own sha256 matches: fine
    assert wm.fetch(tiny)[0].read_bytes() == payload


def test_unpinned_file_checked_against_hub_linked_etag(multi, hub, payload):
    wm = WeightsManager()
    hub.linked_etag["extra/notes.txt"] = _sha(b"hello")
    paths = wm.fetch(multi, files=["extra/notes.txt"])
    assert paths[0].read_text() == "hello"
    hub.linked_etag["extra/notes.txt"] = _sha(b"other")
    paths[0].unlink()
    with pytest.raises(WeightsError, match="corrupt"):
        wm.fetch(multi, files=["extra/notes.txt"])
    with pytest.raises(WeightsError, match="no file 'nope.bin'"):
        wm.fetch(multi, files=["nope.bin"])


def test_fetch_multi_file_repo_to_hub_layout(multi, hub, payload):
    wm = WeightsManager()
    paths = wm.fetch(multi)
    folder = wm.model_dir(multi)
    assert paths == [folder / "config.json", folder / "model.safetensors"]
    assert wm.resolve(multi) == folder


def test_gated_repo_message_and_token(tiny, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    hub.status = 401
    with pytest.raises(WeightsError, match="gated or private.*HF_TOKEN"):
        WeightsManager().fetch(tiny)
    assert hub.requests[-1]["auth"] == "Bearer hf_secret_test_token"
    assert not (WeightsManager().model_dir(tiny) / "model.pt").exists()


def test_missing_remote_file_404(request, hub):
    spec = _register(ModelSpec(id="ghost-test", family="test", tasks=(), modalities=(), dims=(2,),
                               builder="x:y", repo_id=REPO,
                               files=(WeightFile("ghost.bin"),)), request)
    with pytest.raises(WeightsError, match="HTTP 404"):
        WeightsManager().fetch(spec)
    assert not (WeightsManager().model_dir(spec) / "ghost.bin").exists()


def test_unreachable_endpoint_is_clear(tiny, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(WeightsError, match="interrupted.*cannot reach"):
        WeightsManager().fetch(tiny, retries=0)


# --------------------------------------------------------------------------- safe loading


def _net(width: int = 4, depth: int = 2):
    import torch

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def test_state_dict_roundtrip_pt_and_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from napari_medfm.runtime.safe_load import load_state_dict, load_strict

    net = _net()
    x = torch.randn(3, 4)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    torch.save({"state_dict": net.state_dict(), "epoch": 7}, tmp_path / "wrapped.pth")
    for name in ("net.pt", "net.safetensors", "wrapped.pth"):
        fresh = torch.nn.Sequential(*[type(m)(*((4, 4) if isinstance(m, torch.nn.Linear) else ()))
                                      for m in net])
        sd = load_state_dict(tmp_path / name)
        assert set(sd) == set(net.state_dict())
        load_strict(fresh, sd, what=name)
        assert torch.equal(fresh(x), net(x)), name


def test_load_strict_lists_missing_unexpected_and_shapes(tmp_path):
    import torch

    from napari_medfm.runtime.safe_load import load_strict

    model = _net(depth=8)  # 16 keys: 0.weight, 0.bias, 2.weight, ...
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {f"head.{i}.weight": torch.zeros(1) for i in range(12)}
    sd.pop("0.weight")
    sd["2.bias"] = torch.zeros(5)
    sd.update(extra)
    with pytest.raises(WeightsError) as ei:
        load_strict(_net(depth=8), sd, what="model.pt")
    msg = str(ei.value)
    assert "model.pt" in msg and "Sequential" in msg
    assert "1 missing keys: 0.weight" in msg
    assert "12 unexpected keys: head.0.weight" in msg and "(+2 more)" in msg
    assert "head.11.weight" not in msg  # only the first 10 are listed
    assert "1 shape mismatches: 2.bias (5,) (model (4,))" in msg
    # a clean dict loads
    load_strict(_net(depth=8), model.state_dict())


class _Evil:
    """A pickle whose reduce would run code: creates a marker folder when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_weights_only_refuses_code_in_pickles(tmp_path):
    import torch

    from napari_medfm.runtime.safe_load import load_checkpoint_tensors, load_state_dict

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Evil(str(marker))}, evil)
    with pytest.raises(WeightsError, match=r"refused to load evil\.pt.*posix\.mkdir|refused to load evil\.pt.*mkdir"):
        load_state_dict(evil)
    with pytest.raises(WeightsError, match="refused to load evil.pt"):
        load_checkpoint_tensors(evil, allow=("argparse.Namespace",))
    assert not marker.exists()
    # and the classic os.getcwd gadget
    class _Cwd:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save([_Cwd()], tmp_path / "cwd.pt")
    with pytest.raises(WeightsError, match="never runs arbitrary pickled code.*could run code"):
        load_state_dict(tmp_path / "cwd.pt")


def _training_checkpoint(path: Path):
    import argparse

    import torch

    teacher = _net().state_dict()
    ckpt = {
        "args": argparse.Namespace(arch="vit_base", lr=5e-5, out=Path("/tmp/run")),
        "epoch": 99,
        "student": {f"module.backbone.{k}": v + 1 for k, v in teacher.items()},
        "teacher": {f"module.backbone.{k}": v for k, v in teacher.items()}
        | {"module.head.w": torch.ones(3)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "fp16_scaler": {"scale": 65536.0, "_growth_tracker": 3},
    }
    torch.save(ckpt, path)
    return teacher


def test_namespace_checkpoint_tensors_with_allow_list(tmp_path):
    import torch

    from napari_medfm.runtime.safe_load import (
        extract_prefix,
        load_checkpoint_tensors,
        load_state_dict,
        load_strict,
    )

    path = tmp_path / "MerMED.pth"
    teacher = _training_checkpoint(path)
    # without the allow-list the Namespace is refused, with a message naming what it needs
    with pytest.raises(WeightsError, match=r"needs .*argparse\.Namespace.*--allow argparse\.Namespace"):
        load_state_dict(path)
    ckpt = load_checkpoint_tensors(path, allow=("argparse.Namespace", "pathlib.PosixPath"))
    assert set(ckpt) == {"student", "teacher", "optimizer"}  # args/epoch/scaler dropped
    assert torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], torch.zeros(4))
    backbone = extract_prefix(ckpt["teacher"], "module.backbone")
    assert set(backbone) == set(teacher)
    net = load_strict(_net(), backbone, what="MerMED.pth")
    assert all(torch.equal(net.state_dict()[k], teacher[k]) for k in teacher)
    with pytest.raises(WeightsError, match="no weights under 'backbone.'.*module"):
        extract_prefix(ckpt["teacher"], "backbone.")
    # a class outside the allow-list is still refused
    with pytest.raises(WeightsError, match="pathlib"):
        load_checkpoint_tensors(path, allow=("argparse.Namespace",))


def test_convert_to_safetensors_atomic(tmp_path):
    import torch
    from safetensors import safe_open

    from napari_medfm.runtime.safe_load import convert_to_safetensors, load_state_dict

    src = tmp_path / "MerMED.pth"
    teacher = _training_checkpoint(src)
    dst = tmp_path / "out" / "model.safetensors"
    convert_to_safetensors(src, dst, prefix="teacher.module.backbone.",
                           allow=("argparse.Namespace", "pathlib.PosixPath"),
                           dtype=torch.bfloat16)
    sd = load_state_dict(dst)
    assert set(sd) == set(teacher)
    assert all(sd[k].dtype == torch.bfloat16 for k in sd)
    assert torch.equal(sd["0.weight"], teacher["0.weight"].to(torch.bfloat16))
    with safe_open(str(dst), "pt") as fh:
        assert fh.metadata()["source"] == "MerMED.pth"
    assert [p.name for p in dst.parent.iterdir()] == ["model.safetensors"]
    # tied weights (shared storage) and views are stored as independent tensors
    w = torch.randn(4, 4)
    torch.save({"a": w, "b": w, "c": w[1:3]}, tmp_path / "tied.pt")
    out = convert_to_safetensors(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    sd = load_state_dict(out)
    assert torch.equal(sd["a"], sd["b"]) and torch.equal(sd["c"], w[1:3])
    # failure leaves nothing behind
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(WeightsError):
        convert_to_safetensors(src, bad, prefix="nothing.here.",
                               allow=("argparse.Namespace", "pathlib.PosixPath"))
    assert not bad.exists() and not list(tmp_path.glob(".bad*"))


def test_truncated_checkpoint_is_named(tmp_path):
    import torch

    from napari_medfm.runtime.safe_load import load_state_dict

    p = tmp_path / "net.pt"
    torch.save(_net().state_dict(), p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(WeightsError, match=r"cannot read checkpoint net\.pt"):
        load_state_dict(p)
    s = tmp_path / "net.safetensors"
    s.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(WeightsError, match=r"net\.safetensors"):
        load_state_dict(s)
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict(tmp_path / "absent.pt")
