"""Weights manager: find, verify (sha256), download (resumable) and import model weights.

Layout on disk: ``<root>/<model_id>/<filename as in the hub repository>``, where ``root`` is
:func:`napari_medfm.runtime.paths.weights_dir` (``$MEDFM_HOME/weights``) unless given. A local
folder laid out like the hub repository (for instance a ``git clone`` of it or a Hugging Face
cache snapshot folder) works offline through ``explicit=`` / ``--weights``.

Nothing here touches the network except :meth:`WeightsManager.fetch`, which runs only when the
user asks for it (``medfm weights fetch ID``). Downloads go to ``<file>.part``, resume with an
HTTP ``Range`` request after a cut, are verified against the pinned sha256 and only then moved
into place with :func:`os.replace`, so a final path never holds a partial file.

Verified hashes are cached in ``<root>/.verified.json`` keyed by (path, size, mtime) so a
multi-GB checkpoint is hashed once, not at every model load.

This module is torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

from ..errors import WeightsError
from ..io.files import atomic_write_json, sha256_file  # noqa: F401 - sha256_file re-exported
from ..progress import Progress, drain
from .paths import weights_dir
from .registry import ModelSpec, WeightFile, get_spec, list_specs

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024 * 1024
_DOWNLOAD_CHUNK = 1024 * 1024
_CACHE_NAME = ".verified.json"
_PART_SUFFIX = ".part"
_TRUTHY = {"1", "on", "yes", "true"}

SpecLike = ModelSpec | str

#: Status values reported by :meth:`WeightsManager.verify` / :meth:`WeightsManager.list`.
OK, MISSING, PARTIAL, MISMATCH, UNPINNED = "ok", "missing", "partial", "hash mismatch", "unpinned"


# --------------------------------------------------------------------------- helpers


def human_size(n: int | None, unknown: str = "unknown size") -> str:
    """Byte count in decimal units (``1.2 GB``)."""
    if n is None:
        return unknown
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _as_spec(spec_or_id: SpecLike) -> ModelSpec:
    return spec_or_id if isinstance(spec_or_id, ModelSpec) else get_spec(spec_or_id)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _total_size(files: Iterable[WeightFile]) -> int | None:
    sizes = [f.size for f in files]
    if not sizes or any(s is None for s in sizes):
        return None
    return int(sum(s for s in sizes if s is not None))


def how_to_get(spec: ModelSpec, root: Path | None = None) -> str:
    """The three ways to provide a model's weights, as one user-facing sentence."""
    ways = []
    if spec.repo_id:
        total = _total_size(spec.required_files or spec.files)
        size = f"downloads {human_size(total)}" if total else "downloads"
        ways.append(f"`medfm weights fetch {spec.id}` ({size} from hf.co/{spec.repo_id})")
    ways.append(f"`medfm weights import {spec.id} PATH` (a file or a folder laid out like the hub repo)")
    ways.append("`--weights PATH` / the widget's weights field")
    where = f" They are expected in {root / spec.id}." if root is not None else ""
    return "Get them with " + ", or ".join(ways) + "." + where


def _cut(items: list[str], n: int = 10) -> str:
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --------------------------------------------------------------------------- manager


class WeightsManager:
    """Find, verify, download and import the weights of registered models.

    ``root`` defaults to :func:`weights_dir` (read at each call, so ``$MEDFM_HOME`` changes
    are honoured).
    """

    def __init__(self, root: Path | str | None = None):
        self._root = None if root is None else Path(root).expanduser()

    # ---- layout

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else weights_dir()

    def model_dir(self, spec_or_id: SpecLike) -> Path:
        """``<root>/<model_id>``: the hub-repo-like folder holding the model's files."""
        model_id = spec_or_id.id if isinstance(spec_or_id, ModelSpec) else spec_or_id
        return self.root / model_id

    def expected_path(self, spec_or_id: SpecLike, filename: str | None = None) -> Path:
        """Where ``resolve`` looks for a model's weights (file, or folder for multi-file models)."""
        spec = _as_spec(spec_or_id)
        wf = self._target_file(spec, filename)
        folder = self.model_dir(spec)
        return folder if wf is None else folder / wf.filename

    # ---- verification cache

    def _cache_path(self) -> Path:
        return self.root / _CACHE_NAME

    def _load_cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self._cache_path().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _cached_hash(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        entry = self._load_cache().get(str(path.resolve()))
        if (isinstance(entry, dict) and entry.get("size") == st.st_size
                and entry.get("mtime_ns") == st.st_mtime_ns):
            return entry.get("sha256")
        return None

    def _store_hash(self, path: Path, digest: str) -> None:
        try:
            st = path.stat()
            cache = self._load_cache()
            cache[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                          "sha256": digest}
            # drop entries of files that are gone
            cache = {k: v for k, v in cache.items() if Path(k).exists()}
            atomic_write_json(self._cache_path(), cache, indent=1, sort_keys=True)
        except OSError as exc:  # a read-only weights folder must not break loading
            log.debug("could not update the hash cache: %s", exc)

    def file_hash(self, path: str | Path, callback: Callable[[int], Any] | None = None) -> str:
        """sha256 of ``path``, from the cache when (size, mtime) are unchanged."""
        path = Path(path)
        digest = self._cached_hash(path)
        if digest is None:
            digest = sha256_file(path, callback=callback)
            self._store_hash(path, digest)
        return digest

    # ---- checks

    def _check_file(self, spec: ModelSpec, wf: WeightFile, path: Path,
                    rehash: bool = False) -> dict[str, Any]:
        """Status of one file (hashes it when pinned, through the cache unless ``rehash``)."""
        row: dict[str, Any] = {
            "model": spec.id, "file": wf.filename, "path": str(path), "required": wf.required,
            "expected_size": wf.size, "expected_sha256": wf.sha256, "size": None,
            "sha256": None, "status": MISSING, "message": "",
        }
        if not path.is_file():
            part = path.with_name(path.name + _PART_SUFFIX)
            row["message"] = f"{wf.filename} not found in {path.parent}"
            if part.exists():
                row["message"] += (f" (an interrupted download {part.name} of "
                                   f"{human_size(part.stat().st_size)} is there: "
                                   f"`medfm weights fetch {spec.id}` resumes it)")
            return row
        size = path.stat().st_size
        row["size"] = size
        if wf.size is not None and size != wf.size:
            row["status"] = PARTIAL
            row["message"] = (f"{path} is partial or corrupt: {size} bytes, expected {wf.size} "
                              f"({human_size(wf.size)}). Delete it and run "
                              f"`medfm weights fetch {spec.id}` or import a complete copy.")
            return row
        if not wf.sha256:
            row["status"] = UNPINNED
            row["message"] = f"{wf.filename}: present, no pinned sha256 to verify against"
            return row
        if rehash:
            digest = sha256_file(path)
            self._store_hash(path, digest)
        else:
            digest = self.file_hash(path)
        row["sha256"] = digest
        if digest.lower() != wf.sha256.lower():
            row["status"] = MISMATCH
            row["message"] = (f"{path}: sha256 mismatch: expected {wf.sha256}, got {digest}. "
                              f"The file is corrupt or a different release; delete it and run "
                              f"`medfm weights fetch {spec.id}` (or import the released file).")
            return row
        row["status"] = OK
        return row

    def _raise_if_bad(self, row: dict[str, Any]) -> None:
        if row["status"] in (PARTIAL, MISMATCH):
            raise WeightsError(row["message"])

    @staticmethod
    def _target_file(spec: ModelSpec, filename: str | None) -> WeightFile | None:
        """The WeightFile ``resolve`` returns a path to (None: the whole folder)."""
        if filename is not None:
            for wf in spec.files:
                if wf.filename == filename:
                    return wf
            return WeightFile(filename=filename)  # not declared: look for it, nothing to pin
        req = spec.required_files
        if len(req) == 1:
            return req[0]
        if not req and len(spec.files) == 1:
            return spec.files[0]
        return None

    # ---- resolve

    def resolve(self, spec_or_id: SpecLike, explicit: str | Path | None = None,
                filename: str | None = None, verify: bool = True) -> Path:
        """Path of a model's weights: a file, or the model folder for multi-file models.

        Order: ``explicit`` (a file, or a folder laid out like the hub repo) > ``<root>/<id>/``
        > :class:`WeightsError` saying how to get them. ``filename`` picks one file of the
        repository (default: the single required file; the folder when there are several).
        With ``verify`` the files are checked against the spec's pinned size and sha256.
        """
        spec = _as_spec(spec_or_id)
        target = self._target_file(spec, filename)

        if explicit is not None:
            exp = Path(explicit).expanduser()
            if not exp.exists():
                raise WeightsError(f"weights for {spec.id}: {exp} does not exist. "
                                   + how_to_get(spec, self.root))
            if exp.is_file():
                # a released file (matched by name) is verified; a renamed/fine-tuned checkpoint
                # is the user's responsibility (strict loading still checks every key and shape)
                declared = {wf.filename.rsplit("/", 1)[-1]: wf for wf in spec.files}
                wf = declared.get(exp.name)
                if verify and wf is not None:
                    self._raise_if_bad(self._check_file(spec, wf, exp))
                elif wf is None:
                    log.info("%s: %s is not a released file name; not hash-verified",
                             spec.id, exp.name)
                return exp
            snap = _hf_snapshot(exp, spec.revision)  # a Hugging Face cache folder of the repo
            if snap is not None and not self._has_files(spec, exp, target):
                exp = snap
            return self._resolve_in_folder(spec, exp, target, verify, explicit=True)

        folder = self.model_dir(spec)
        if not self._has_files(spec, folder, target) and spec.repo_id:
            # already in the Hugging Face cache (e.g. fetched by transformers)? use it offline
            snap = _hf_snapshot(_hf_cache_dir() / _hf_repo_folder(spec.repo_id), spec.revision)
            if snap is not None and self._has_files(spec, snap, target):
                log.info("%s: using the Hugging Face cache copy in %s", spec.id, snap)
                return self._resolve_in_folder(spec, snap, target, verify, explicit=True)
        return self._resolve_in_folder(spec, folder, target, verify, explicit=False)

    @staticmethod
    def _has_files(spec: ModelSpec, folder: Path, target: WeightFile | None) -> bool:
        wanted = [target] if target is not None else list(spec.required_files)
        if not wanted:
            return folder.is_dir()
        return all((folder / wf.filename).is_file() for wf in wanted)

    def _resolve_in_folder(self, spec: ModelSpec, folder: Path, target: WeightFile | None,
                           verify: bool, explicit: bool) -> Path:
        wanted = [target] if target is not None else list(spec.required_files)
        missing = [wf.filename for wf in wanted if not (folder / wf.filename).is_file()]
        if missing:
            where = f"{folder}" + ("" if explicit else " (the weights folder)")
            partial = [m for m in missing if (folder / (m + _PART_SUFFIX)).exists()]
            extra = (f" An interrupted download is there ({', '.join(partial)}): "
                     f"`medfm weights fetch {spec.id}` resumes it." if partial else "")
            raise WeightsError(
                f"weights for {spec.id} not found: {_cut(missing)} missing in {where}.{extra} "
                + how_to_get(spec, self.root))
        if not wanted and not folder.is_dir():
            raise WeightsError(f"weights for {spec.id} not found in {folder}. "
                               + how_to_get(spec, self.root))
        if verify:
            for wf in wanted:
                self._raise_if_bad(self._check_file(spec, wf, folder / wf.filename))
        return folder / target.filename if target is not None else folder

    # ---- verify / list

    def verify(self, spec_or_id: SpecLike | None = None,
               rehash: bool = False) -> list[dict[str, Any]]:
        """Status of every declared file: ok / missing / partial / hash mismatch / unpinned.

        ``rehash`` ignores the hash cache (to catch corruption that kept size and mtime).
        """
        specs = [_as_spec(spec_or_id)] if spec_or_id is not None else list_specs()
        rows: list[dict[str, Any]] = []
        for spec in specs:
            folder = self.model_dir(spec)
            for wf in spec.files:
                rows.append(self._check_file(spec, wf, folder / wf.filename, rehash=rehash))
        return rows

    def list(self) -> list[dict[str, Any]]:
        """Every registered model, its files, whether present, their size and verified state.

        Never hashes: ``verified`` is True/False from the cache of earlier checks, None if the
        file was not checked since it last changed (``medfm weights verify`` checks it).
        """
        out: list[dict[str, Any]] = []
        for spec in list_specs():
            folder = self.model_dir(spec)
            files = []
            for wf in spec.files:
                p = folder / wf.filename
                present = p.is_file()
                size = p.stat().st_size if present else None
                verified: bool | None = None
                if present and wf.sha256:
                    cached = self._cached_hash(p)
                    if cached is not None:
                        verified = cached.lower() == wf.sha256.lower()
                    if wf.size is not None and size != wf.size:
                        verified = False
                part = p.with_name(p.name + _PART_SUFFIX)
                files.append({
                    "file": wf.filename, "path": str(p), "present": present, "size": size,
                    "expected_size": wf.size, "required": wf.required, "pinned": bool(wf.sha256),
                    "verified": verified,
                    "partial_download": part.stat().st_size if part.exists() else None,
                })
            complete = all(f["present"] for f in files if f["required"])
            out.append({
                "model": spec.id, "family": spec.family, "repo_id": spec.repo_id,
                "needs_weights": spec.needs_weights, "dir": str(folder), "files": files,
                "complete": complete if spec.files else None,
                "total_size": _total_size(spec.required_files or spec.files),
                "licence": spec.licence,
            })
        return out

    # ---- import

    def import_(self, spec_or_id: SpecLike, path: str | Path, copy: bool | str = True,
                filename: str | None = None) -> list[Path]:
        """Bring local weights into ``<root>/<id>/`` (verified before anything is placed).

        ``path`` is a file (matched to the declared file by name; a model with one declared
        file takes it whatever its name, or pass ``filename``) or a folder laid out like the
        hub repository. ``copy=True`` copies; ``copy="link"`` (or False) hard-links when on
        the same file system, else symlinks.
        """
        spec = _as_spec(spec_or_id)
        src = Path(path).expanduser()
        if not src.exists():
            raise WeightsError(f"cannot import weights for {spec.id}: {src} does not exist")
        pairs: list[tuple[Path, WeightFile]] = []
        if src.is_file():
            by_name = {wf.filename.rsplit("/", 1)[-1]: wf for wf in spec.files}
            if filename is not None:
                wf = next((w for w in spec.files if w.filename == filename), None) \
                    or WeightFile(filename=filename)
            elif src.name in by_name:
                wf = by_name[src.name]
            elif len(spec.files) == 1:
                wf = spec.files[0]
            elif not spec.files:
                wf = WeightFile(filename=src.name)
            else:
                raise WeightsError(
                    f"cannot import {src} for {spec.id}: its name matches none of the model's "
                    f"files ({', '.join(w.filename for w in spec.files)}); rename it or pass "
                    "--file NAME")
            pairs.append((src, wf))
        else:
            if spec.files:
                missing = [wf.filename for wf in spec.required_files
                           if not (src / wf.filename).is_file()]
                if missing:
                    raise WeightsError(
                        f"cannot import {src} for {spec.id}: not laid out like hf.co/"
                        f"{spec.repo_id or spec.id}; missing {_cut(missing)}")
                pairs = [(src / wf.filename, wf) for wf in spec.files
                         if (src / wf.filename).is_file()]
            else:
                pairs = [(p, WeightFile(filename=p.relative_to(src).as_posix()))
                         for p in sorted(src.rglob("*")) if p.is_file()]
        # verify everything first: nothing is placed if one file is bad
        for p, wf in pairs:
            self._raise_if_bad(self._check_file(spec, wf, p))
        dest_dir = self.model_dir(spec)
        placed: list[Path] = []
        for p, wf in pairs:
            dest = dest_dir / wf.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists() and p.resolve() == dest.resolve():
                placed.append(dest)
                continue
            tmp = dest.with_name(f".{dest.name}.import-{os.getpid()}.tmp")
            try:
                if copy is True:
                    shutil.copyfile(p, tmp)
                    shutil.copystat(p, tmp)
                else:
                    try:
                        os.link(p, tmp)
                    except OSError:
                        os.symlink(p.resolve(), tmp)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            if wf.sha256:
                self._store_hash(dest, wf.sha256.lower())
            placed.append(dest)
            log.info("imported %s -> %s", p, dest)
        return placed

    # ---- fetch

    def fetch(self, spec_or_id: SpecLike, files: Iterable[str] | None = None,
              progress: Callable[[Progress], Any] | None = None, retries: int = 3) -> list[Path]:
        """Download a model's files from its hub repository (ONLY on explicit user request).

        Resumable (``<file>.part`` + HTTP Range), sha256-verified, atomically moved into place.
        ``progress`` is called with :class:`Progress` (bytes). Honours ``HF_ENDPOINT``,
        ``HF_TOKEN`` / ``hf auth login``, ``HF_HUB_OFFLINE`` and the usual proxy variables.
        """
        return drain(self.fetch_iter(spec_or_id, files, retries=retries), progress)

    def fetch_iter(self, spec_or_id: SpecLike, files: Iterable[str] | None = None,
                   retries: int = 3) -> Generator[Progress, None, list[Path]]:
        """Task-generator twin of :meth:`fetch` (yields byte progress; closing it cancels,
        keeping the ``.part`` file for a later resume)."""
        spec = _as_spec(spec_or_id)
        wanted = self.plan_fetch(spec, files)
        sourced = file_sources(spec)  # files from other repositories: fetched below
        folder = self.model_dir(spec)
        folder.mkdir(parents=True, exist_ok=True)
        todo: list[WeightFile] = []
        for wf in wanted:
            if wf.filename in sourced:
                continue
            dest = folder / wf.filename
            if dest.is_file():
                row = self._check_file(spec, wf, dest)
                if row["status"] in (OK, UNPINNED):
                    continue
                log.warning("%s; downloading it again", row["message"])
            todo.append(wf)
        known = _total_size(todo)
        self._check_space(folder, todo)
        total = known or 0
        base = 0
        for i, wf in enumerate(todo):
            dest = folder / wf.filename
            label = f"{wf.filename} ({i + 1}/{len(todo)})"
            gen = self._download_one(spec, wf, dest, retries)
            try:
                for got, size in gen:
                    overall = total if known else (size or 0)
                    step = base + got if known else got
                    yield Progress(step, overall, label)
            finally:
                gen.close()  # on cancel: close the connection, keep the .part, release the lock
            base += wf.size or 0
        if any(wf.filename in sourced for wf in wanted):
            yield from fetch_sourced_iter(spec, self, retries)
        return [folder / wf.filename for wf in wanted]

    def plan_fetch(self, spec_or_id: SpecLike,
                   files: Iterable[str] | None = None) -> list[WeightFile]:
        """The files :meth:`fetch` would download; raises :class:`WeightsError` up front when
        the model has no download location, a file name is unknown, or offline mode is on."""
        spec = _as_spec(spec_or_id)
        if not spec.repo_id:
            raise WeightsError(
                f"{spec.id} has no download location; "
                f"use `medfm weights import {spec.id} PATH` or `--weights PATH`")
        wanted = self._files_to_fetch(spec, files)
        if _offline():
            raise WeightsError(
                f"cannot download {spec.id}: offline mode is on (HF_HUB_OFFLINE is set). "
                f"Unset HF_HUB_OFFLINE to download from hf.co/{spec.repo_id}, or use "
                f"`medfm weights import {spec.id} PATH`.")
        return wanted

    @staticmethod
    def _files_to_fetch(spec: ModelSpec, files: Iterable[str] | None) -> list[WeightFile]:
        files = None if files is None else list(files)
        if not files:
            chosen = list(spec.required_files) or list(spec.files)
            if not chosen:
                raise WeightsError(f"{spec.id} declares no weight files to download")
            return chosen
        by_name = {wf.filename: wf for wf in spec.files}
        out = []
        for name in files:
            if name in by_name:
                out.append(by_name[name])
            elif spec.files:
                raise WeightsError(f"{spec.id} has no file {name!r}; its files: "
                                   + ", ".join(by_name))
            else:
                out.append(WeightFile(filename=name))
        return out

    @staticmethod
    def _check_space(folder: Path, todo: list[WeightFile]) -> None:
        need = sum((wf.size or 0) - _part_size(folder / wf.filename) for wf in todo)
        if need <= 0:
            return
        free = shutil.disk_usage(folder).free
        if free < need:
            raise WeightsError(f"not enough disk space in {folder}: {human_size(need)} needed, "
                               f"{human_size(free)} free. Set $MEDFM_HOME to a larger disk.")

    def _download_one(self, spec: ModelSpec, wf: WeightFile, dest: Path,
                      retries: int) -> Generator[tuple[int, int | None], None, None]:
        """Download one file into ``dest`` (via ``dest.part``), yielding (bytes, total).

        A lock file under ``<root>/.locks`` keeps two processes from appending to the same
        ``.part`` (the second one gets a clear error instead of waiting for gigabytes).
        """
        lock_path = self.root / ".locks" / spec.id / (wf.filename + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from filelock import FileLock, Timeout
        except ImportError:  # pragma: no cover - filelock comes with huggingface_hub
            yield from self._download_unlocked(spec, wf, dest, retries)
            return
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise WeightsError(f"another download of {wf.filename} for {spec.id} is in progress "
                               f"(lock {lock_path}); wait for it to finish") from None
        try:
            yield from self._download_unlocked(spec, wf, dest, retries)
        finally:
            lock.release()

    def _download_unlocked(self, spec: ModelSpec, wf: WeightFile, dest: Path,
                           retries: int) -> Generator[tuple[int, int | None], None, None]:
        import requests

        url = (f"{_hf_endpoint()}/{spec.repo_id}/resolve/"
               f"{urllib.parse.quote(spec.revision or 'main', safe='')}/"
               f"{urllib.parse.quote(wf.filename)}")
        part = dest.with_name(dest.name + _PART_SUFFIX)
        part.parent.mkdir(parents=True, exist_ok=True)
        # identity: byte offsets for Range must be those of the file, not of a gzip stream
        headers = {"User-Agent": "napari-medfm", "Accept-Encoding": "identity"}
        token = _hf_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        restarted = False
        attempt = 0
        while True:
            try:
                digest, server_sha = yield from _stream_to_part(requests, url, part, headers,
                                                                wf.size, spec, wf.sha256)
            except _Transient as exc:
                attempt += 1
                if attempt > retries:
                    raise WeightsError(
                        f"download of {wf.filename} for {spec.id} was interrupted ({exc.cause}); "
                        f"{human_size(_part_size(dest))} kept in {part.name}: run "
                        f"`medfm weights fetch {spec.id}` again to resume.") from None
                log.warning("download of %s interrupted (%s); resuming (%d/%d)",
                            wf.filename, exc.cause, attempt, retries)
                time.sleep(min(2.0 ** (attempt - 1), 10.0) * 0.1)
                continue
            size = part.stat().st_size
            expected = (wf.sha256 or server_sha or "").lower()
            bad = None
            if wf.size is not None and size != wf.size:
                bad = f"{size} bytes, expected {wf.size}"
            elif expected and digest != expected:
                bad = f"sha256 {digest}, expected {expected}"
            if bad:
                part.unlink(missing_ok=True)
                if not restarted:  # a stale .part from another revision: start over once
                    restarted = True
                    log.warning("%s: %s; downloading again from scratch", wf.filename, bad)
                    continue
                raise WeightsError(f"downloaded {wf.filename} for {spec.id} is corrupt ({bad}); "
                                   "nothing was installed. Try again later or check HF_ENDPOINT "
                                   "/ your proxy.")
            os.replace(part, dest)
            self._store_hash(dest, digest)
            log.info("downloaded %s (%s) -> %s", wf.filename, human_size(size), dest)
            return


class _Transient(Exception):
    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def _part_size(dest: Path) -> int:
    part = dest.with_name(dest.name + _PART_SUFFIX)
    try:
        return part.stat().st_size
    except OSError:
        return 0


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    return base / "hub"


def _hf_repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _hf_snapshot(folder: Path, revision: str | None) -> Path | None:
    """``folder/snapshots/<commit>`` of a Hugging Face cache repo folder, if it is one."""
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return None
    rev = revision or "main"
    ref = folder / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    cand = snaps / commit
    if cand.is_dir():
        return cand
    only = [p for p in snaps.iterdir() if p.is_dir()]
    return only[0] if len(only) == 1 and revision is None else None


def _hf_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no stored token / old huggingface_hub
        return None


def _stream_to_part(requests: Any, url: str, part: Path, headers: dict[str, str],
                    expected_size: int | None, spec: ModelSpec, pinned: str | None = None,
                    ) -> Generator[tuple[int, int | None], None, tuple[str, str | None]]:
    """GET ``url`` appending to ``part`` (resuming with Range); returns (sha256, server sha256)."""
    have = part.stat().st_size if part.exists() else 0
    h = hashlib.sha256()
    if have:
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        else:
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(DEFAULT_CHUNK), b""):
                    h.update(block)
    req_headers = dict(headers)
    if have:
        req_headers["Range"] = f"bytes={have}-"
    try:
        resp = requests.get(url, headers=req_headers, stream=True, timeout=(10, 60),
                            allow_redirects=True)
    except requests.exceptions.SSLError as exc:
        raise WeightsError(f"TLS error reaching {url}: {exc}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _Transient(f"cannot reach {url}: {type(exc).__name__}") from None
    with resp:
        server_sha = None
        for r in [*resp.history, resp]:
            etag = (r.headers.get("X-Linked-Etag") or "").strip('"').lower()
            if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
                server_sha = etag
        code = resp.status_code
        if code in (401, 403):
            raise WeightsError(
                f"access to hf.co/{spec.repo_id} was refused (HTTP {code}): the repository may be "
                f"gated or private. Accept its terms on https://huggingface.co/{spec.repo_id} "
                "while logged in, then `hf auth login` or set HF_TOKEN, and try again.")
        if code == 404:
            raise WeightsError(f"{url} was not found (HTTP 404): check the repository, revision "
                               "and file name (or HF_ENDPOINT).")
        if pinned and server_sha and server_sha != pinned.lower():
            raise WeightsError(
                f"hf.co/{spec.repo_id} (revision {spec.revision or 'main'}) now serves a different "
                f"{url.rsplit('/', 1)[-1]} (sha256 {server_sha}) than the pinned release "
                f"({pinned.lower()}); nothing was downloaded. Import the released file with "
                f"`medfm weights import {spec.id} PATH`, or update the pinned revision/hash.")
        if code == 416 and have:  # nothing left to send: the .part is complete (or stale)
            return h.hexdigest(), server_sha
        if code >= 500 or code == 429:
            raise _Transient(f"HTTP {code} from the server")
        if code not in (200, 206):
            raise WeightsError(f"download of {url} failed: HTTP {code}")
        total: int | None = expected_size
        if code == 200:  # server ignored Range: start again
            if have:
                h = hashlib.sha256()
                have = 0
            mode = "wb"
            length = resp.headers.get("Content-Length")
            if total is None and length and length.isdigit():
                total = int(length)
        else:
            mode = "ab"
            cr = resp.headers.get("Content-Range", "")
            if total is None and "/" in cr and cr.rsplit("/", 1)[1].isdigit():
                total = int(cr.rsplit("/", 1)[1])
        got = have
        yield got, total
        try:
            with open(part, mode) as fh:
                for block in resp.iter_content(_DOWNLOAD_CHUNK):
                    if not block:
                        continue
                    fh.write(block)
                    h.update(block)
                    got += len(block)
                    yield got, total
                fh.flush()
                os.fsync(fh.fileno())
        except GeneratorExit:
            raise
        except (requests.exceptions.RequestException, ConnectionError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) \
                    and exc.errno is not None and exc.errno in (28,):  # ENOSPC
                raise WeightsError(f"disk full while writing {part}") from None
            raise _Transient(type(exc).__name__) from None
        if total is not None and got < total:
            raise _Transient(f"connection closed after {got} of {total} bytes")
    return h.hexdigest(), server_sha


# --------------------------------------------------------------------------- conveniences


def resolve_weights(model_id: str, explicit: str | Path | None = None,
                    filename: str | None = None) -> Path:
    """Module-level :meth:`WeightsManager.resolve` with the default weights folder."""
    return WeightsManager().resolve(model_id, explicit=explicit, filename=filename)


# --------------------------------------------------------------------------- multi-repo layouts
# A spec may declare ``extras["file_sources"] = {"sub/name": (repo_id, name_in_that_repo)}``:
# files of its folder that come from another hub repository (BiomedCLIP's text/ folder holds
# the tokenizer files of the BiomedCLIP repository and the BERT config of BiomedBERT's).


def file_sources(spec_or_id: SpecLike) -> dict[str, tuple[str, str]]:
    """``{path in the model folder: (hub repository, file name there)}`` (may be empty)."""
    spec = _as_spec(spec_or_id)
    return {str(k): (str(v[0]), str(v[1]))
            for k, v in dict(spec.extras.get("file_sources", {}) or {}).items()}


def assemble_text_folder(folder: str | Path, config: str | Path | None = None,
                         subdir: str = "text",
                         tokenizer_files: Iterable[str] = ("vocab.txt", "tokenizer_config.json",
                                                           "special_tokens_map.json",
                                                           "tokenizer.json")) -> Path:
    """Make ``<folder>/<subdir>/`` from local copies of the two hub repositories.

    The tokenizer files found at the root of ``folder`` (as in the BiomedCLIP repository) are
    copied into ``subdir``; ``config`` (the text model's ``config.json``, or a folder holding
    it, e.g. a clone of the BiomedBERT repository) is copied there as ``config.json``. Files
    already in place are kept. Returns the text folder; raises :class:`WeightsError` when the
    config or the vocabulary is still missing.
    """
    folder = Path(folder).expanduser()
    text = folder / subdir
    text.mkdir(parents=True, exist_ok=True)
    for name in tokenizer_files:
        src, dst = folder / name, text / name
        if src.is_file() and not dst.exists():
            shutil.copy2(src, dst)
    if config is not None:
        c = Path(config).expanduser()
        c = c / "config.json" if c.is_dir() else c
        if not c.is_file():
            raise WeightsError(f"text model config {c} does not exist")
        if not (text / "config.json").exists():
            shutil.copy2(c, text / "config.json")
    missing = [n for n in ("config.json", "vocab.txt") if not (text / n).is_file()]
    if missing:
        raise WeightsError(f"{text}: {', '.join(missing)} missing (the config comes from the "
                           "text model's own repository; pass it as config=)")
    return text


def fetch_sourced_iter(spec_or_id: SpecLike, manager: WeightsManager | None = None,
                       retries: int = 3) -> Generator[Progress, None, list[Path]]:
    """Download the files a spec takes from other repositories (``file_sources``) into its
    folder, resumable and atomic like :meth:`WeightsManager.fetch_iter` (ONLY on explicit
    user request). Files already present are kept."""
    import dataclasses

    spec = _as_spec(spec_or_id)
    wm = manager or WeightsManager()
    sources = file_sources(spec)
    if not sources:
        return []
    if _offline():
        raise WeightsError(f"cannot download {spec.id}: offline mode is on (HF_HUB_OFFLINE)")
    folder = wm.model_dir(spec)
    declared = {wf.filename: wf for wf in spec.files}
    done: list[Path] = []
    todo = [(k, v) for k, v in sources.items() if not (folder / k).is_file()]
    for i, (local, (repo, name)) in enumerate(todo):
        wf0 = declared.get(local, WeightFile(local))
        src_spec = dataclasses.replace(spec, repo_id=repo, revision=None)
        wf = dataclasses.replace(wf0, filename=name)
        dest = folder / local
        gen = wm._download_one(src_spec, wf, dest, retries)
        try:
            for got, size in gen:
                yield Progress(got, size or 0, f"{local} from {repo} ({i + 1}/{len(todo)})")
        finally:
            gen.close()
        done.append(dest)
    return [folder / k for k in sources]


__all__ = [
    "MISMATCH", "MISSING", "OK", "PARTIAL", "UNPINNED", "WeightsManager", "how_to_get",
    "resolve_weights", "sha256_file", "assemble_text_folder", "fetch_sourced_iter",
    "file_sources",
]


# --------------------------------------------------------------------------- split zip releases
#
# Some releases are published as a split zip (``NAME.z01`` .. ``NAME.zNN`` + ``NAME.zip``, the
# ``.zip`` being the last "disk"), e.g. RadFM. A spec declares it in
# ``extras["archive"] = {"parts": (...in disk order...), "members": (...files to extract...),
# "download_size_estimate": bytes, "unpacked_size_estimate": bytes}``. The parts are fetched by
# the ordinary resumable, hash-verified download; the archive is then read directly across the
# parts (stored or deflated members, ZIP64, CRC-32 checked) and each member written to a
# temporary file moved into place atomically, its sha256 computed on the way and cached.

_ZIP_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_ZIP_CDH = b"PK\x01\x02"
_ZIP_LFH = b"PK\x03\x04"


class _Segments:
    """The parts of a split archive as one read-only byte stream (disk k starts at offset[k])."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self.sizes = [p.stat().st_size for p in self.paths]
        self.offsets = [0]
        for s in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + s)
        self.total = sum(self.sizes)

    def read_at(self, pos: int, n: int) -> bytes:
        out = bytearray()
        while n > 0 and pos < self.total:
            k = max(i for i, o in enumerate(self.offsets) if o <= pos)
            with open(self.paths[k], "rb") as fh:
                fh.seek(pos - self.offsets[k])
                block = fh.read(min(n, self.sizes[k] - (pos - self.offsets[k])))
            if not block:
                break
            out += block
            pos += len(block)
            n -= len(block)
        return bytes(out)

    def iter_range(self, pos: int, n: int, chunk: int = DEFAULT_CHUNK) -> Iterable[bytes]:
        while n > 0:
            block = self.read_at(pos, min(chunk, n))
            if not block:
                raise WeightsError("split zip: the archive ends early (a part is truncated)")
            yield block
            pos += len(block)
            n -= len(block)


def _u(b: bytes, off: int, size: int) -> int:
    return int.from_bytes(b[off:off + size], "little")


def split_zip_members(parts: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Members of a (split) zip: name, method, crc, compressed/uncompressed size and the
    absolute offset of the local header in the concatenated parts (disk order)."""
    seg = _Segments([Path(p) for p in parts])
    last = len(seg.paths) - 1
    tail_len = min(seg.sizes[last], 65557)
    tail_pos = seg.offsets[last] + seg.sizes[last] - tail_len
    tail = seg.read_at(tail_pos, tail_len)
    at = tail.rfind(_ZIP_EOCD)
    if at < 0:
        raise WeightsError(f"{seg.paths[last].name} is not the last part of a zip archive "
                           "(no end-of-central-directory record)")
    eocd = tail[at:at + 22]
    cd_disk, n_entries = _u(eocd, 6, 2), _u(eocd, 10, 2)
    cd_size, cd_off = _u(eocd, 12, 4), _u(eocd, 16, 4)
    if 0xFFFF in (cd_disk, n_entries) or 0xFFFFFFFF in (cd_size, cd_off):
        loc = tail[at - 20:at]
        if at < 20 or not loc.startswith(_ZIP64_LOCATOR):
            raise WeightsError("split zip: ZIP64 fields without a ZIP64 locator")
        z_disk, z_off = _u(loc, 4, 4), _u(loc, 8, 8)
        if z_disk >= len(seg.paths):
            raise WeightsError(f"split zip: the central directory is on part {z_disk + 1} but "
                               f"only {len(seg.paths)} parts were given (all of them, in order?)")
        rec = seg.read_at(seg.offsets[z_disk] + z_off, 56)
        if not rec.startswith(_ZIP64_EOCD):
            raise WeightsError("split zip: bad ZIP64 end-of-central-directory record")
        cd_disk, n_entries = _u(rec, 20, 4), _u(rec, 32, 8)
        cd_size, cd_off = _u(rec, 40, 8), _u(rec, 48, 8)
    if cd_disk >= len(seg.paths):
        raise WeightsError(f"split zip: the central directory is on part {cd_disk + 1} but only "
                           f"{len(seg.paths)} parts were given (all of them, in order?)")
    cd = seg.read_at(seg.offsets[cd_disk] + cd_off, cd_size)
    members: list[dict[str, Any]] = []
    pos = 0
    for _ in range(n_entries):
        if cd[pos:pos + 4] != _ZIP_CDH:
            raise WeightsError("split zip: corrupt central directory (parts out of order?)")
        flags, method, crc = _u(cd, pos + 8, 2), _u(cd, pos + 10, 2), _u(cd, pos + 16, 4)
        csize, usize = _u(cd, pos + 20, 4), _u(cd, pos + 24, 4)
        n, e, c = _u(cd, pos + 28, 2), _u(cd, pos + 30, 2), _u(cd, pos + 32, 2)
        disk, off = _u(cd, pos + 34, 2), _u(cd, pos + 42, 4)
        name = cd[pos + 46:pos + 46 + n].decode("utf-8" if flags & 0x800 else "cp437")
        extra = cd[pos + 46 + n:pos + 46 + n + e]
        x = 0
        while x + 4 <= len(extra):  # ZIP64 extended information (0x0001)
            tag, size = _u(extra, x, 2), _u(extra, x + 2, 2)
            if tag == 1:
                y = x + 4
                if usize == 0xFFFFFFFF:
                    usize, y = _u(extra, y, 8), y + 8
                if csize == 0xFFFFFFFF:
                    csize, y = _u(extra, y, 8), y + 8
                if off == 0xFFFFFFFF:
                    off, y = _u(extra, y, 8), y + 8
                if disk == 0xFFFF:
                    disk = _u(extra, y, 4)
            x += 4 + size
        if disk >= len(seg.paths):
            raise WeightsError(f"split zip: {name} starts on part {disk + 1} of "
                               f"{len(seg.paths)} given")
        members.append({"name": name, "flags": flags, "method": method, "crc": crc,
                        "compressed_size": csize, "size": usize,
                        "offset": seg.offsets[disk] + off})
        pos += 46 + n + e + c
    return members


def unpack_split_zip_iter(parts: Iterable[str | Path], dest_dir: str | Path,
                          members: Iterable[str] | None = None,
                          manager: WeightsManager | None = None,
                          ) -> Generator[Progress, None, list[Path]]:
    """Extract ``members`` (default: all files) of the split zip ``parts`` into ``dest_dir``.

    Yields byte progress; checks free space first and every member's CRC-32; each member goes
    to a temporary file and is moved into place only when complete (closing the generator
    removes the temporary file). The sha256 is computed while writing and cached by
    ``manager`` (so loading the model does not hash 50 GB again).
    """
    import zlib

    parts = [Path(p) for p in parts]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise WeightsError(f"cannot unpack: missing parts {', '.join(missing)}")
    seg = _Segments(parts)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    entries = [m for m in split_zip_members(parts) if not m["name"].endswith("/")]
    if members is not None:
        wanted = list(members)
        names = {m["name"].rsplit("/", 1)[-1]: m for m in entries}
        absent = [w for w in wanted if w not in names]
        if absent:
            raise WeightsError(f"the archive has no {', '.join(absent)}; it holds "
                               + _cut([m["name"] for m in entries]))
        entries = [names[w] for w in wanted]
    need = sum(m["size"] for m in entries)
    free = shutil.disk_usage(dest_dir).free
    if free < need:
        raise WeightsError(f"not enough disk space in {dest_dir} to unpack {parts[-1].name}: "
                           f"{human_size(need)} needed, {human_size(free)} free. Free some space "
                           "or set $MEDFM_HOME to a larger disk.")
    out_paths: list[Path] = []
    done = 0
    for m in entries:
        if m["flags"] & 0x1:
            raise WeightsError(f"{m['name']} is encrypted in the archive")
        if m["method"] not in (0, 8):
            raise WeightsError(f"{m['name']}: unsupported zip compression method {m['method']}")
        lfh = seg.read_at(m["offset"], 30)
        if not lfh.startswith(_ZIP_LFH):
            raise WeightsError(f"split zip: no local header for {m['name']} (parts out of order?)")
        start = m["offset"] + 30 + _u(lfh, 26, 2) + _u(lfh, 28, 2)
        dest = dest_dir / m["name"].rsplit("/", 1)[-1]
        tmp = dest.with_name(f".{dest.name}.unpack-{os.getpid()}.tmp")
        inflate = zlib.decompressobj(-15) if m["method"] == 8 else None
        crc, h, written = 0, hashlib.sha256(), 0
        label = f"unpacking {dest.name}"
        ok = False
        try:
            with open(tmp, "wb") as fh:
                for block in seg.iter_range(start, m["compressed_size"]):
                    data = inflate.decompress(block) if inflate is not None else block
                    fh.write(data)
                    crc = zlib.crc32(data, crc)
                    h.update(data)
                    written += len(data)
                    yield Progress(done + written, need, label)
                if inflate is not None:
                    tail = inflate.flush()
                    fh.write(tail)
                    crc = zlib.crc32(tail, crc)
                    h.update(tail)
                    written += len(tail)
                fh.flush()
                os.fsync(fh.fileno())
            if written != m["size"] or crc != m["crc"]:
                raise WeightsError(f"{m['name']} in {parts[-1].name} is corrupt (CRC-32/size "
                                   "mismatch): delete the parts and fetch them again")
            os.replace(tmp, dest)
            ok = True
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise WeightsError(f"disk full while unpacking {dest.name} into {dest_dir}") from None
            raise
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        if manager is not None:
            manager._store_hash(dest, h.hexdigest())
        done += written
        out_paths.append(dest)
        log.info("unpacked %s (%s)", dest, human_size(written))
    return out_paths


def unpack_split_zip(parts: Iterable[str | Path], dest_dir: str | Path,
                     members: Iterable[str] | None = None,
                     progress: Callable[[Progress], Any] | None = None,
                     manager: WeightsManager | None = None) -> list[Path]:
    """Blocking twin of :func:`unpack_split_zip_iter`."""
    return drain(unpack_split_zip_iter(parts, dest_dir, members, manager), progress)


def _archive(spec: ModelSpec) -> dict[str, Any]:
    arch = spec.extras.get("archive")
    if not arch or not arch.get("parts"):
        raise WeightsError(f"{spec.id} is not released as a split archive")
    return arch


def fetch_archive_iter(spec_or_id: SpecLike, manager: WeightsManager | None = None, *,
                       keep_parts: bool = True, retries: int = 3,
                       ) -> Generator[Progress, None, list[Path]]:
    """Download a split-zip release (resumable, verified) and unpack it into the model folder.

    Nothing is downloaded when the unpacked files are already there. The free disk space is
    checked up front for the parts still to download plus the unpacked files. With
    ``keep_parts=False`` the parts are deleted after a successful unpack.
    """
    spec = _as_spec(spec_or_id)
    mgr = manager or WeightsManager()
    arch = _archive(spec)
    parts = list(arch["parts"])
    members = list(arch.get("members") or ()) or None
    folder = mgr.model_dir(spec)
    if members and all((folder / m).is_file() for m in members):
        return [folder / m for m in members]
    mgr.plan_fetch(spec, parts)  # offline mode / no repository: clear error before anything
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {wf.filename: wf for wf in spec.files}
    sizes = [by_name[p].size if p in by_name else None for p in parts]
    have = sum((folder / p).stat().st_size if (folder / p).is_file() else _part_size(folder / p)
               for p in parts)
    total_dl = (sum(s for s in sizes if s is not None) if all(s is not None for s in sizes)
                else int(arch.get("download_size_estimate") or 0))
    unpacked = int(arch.get("unpacked_size_estimate") or 0)
    need = max(total_dl - have, 0) + unpacked
    free = shutil.disk_usage(folder).free
    if need and free < need:
        raise WeightsError(
            f"not enough disk space in {folder} for {spec.id}: its release is a split zip of "
            f"about {human_size(total_dl)} ({human_size(max(total_dl - have, 0))} still to "
            f"download) that unpacks to about {human_size(unpacked)}: {human_size(need)} needed, "
            f"{human_size(free)} free. Free some space or set $MEDFM_HOME to a larger disk (the "
            "parts can be deleted after unpacking: --delete-parts).")
    yield from mgr.fetch_iter(spec, parts, retries=retries)
    paths = yield from unpack_split_zip_iter([folder / p for p in parts], folder, members, mgr)
    if not keep_parts:
        for p in parts:
            with contextlib.suppress(OSError):
                (folder / p).unlink()
    return paths


def fetch_archive(spec_or_id: SpecLike, manager: WeightsManager | None = None, *,
                  keep_parts: bool = True, retries: int = 3,
                  progress: Callable[[Progress], Any] | None = None) -> list[Path]:
    """Blocking twin of :func:`fetch_archive_iter`."""
    return drain(fetch_archive_iter(spec_or_id, manager, keep_parts=keep_parts, retries=retries),
                 progress)


__all__ += ["fetch_archive", "fetch_archive_iter", "split_zip_members", "unpack_split_zip",
            "unpack_split_zip_iter"]
