"""The one atomic-write helper and the one sha256 helper (bottom layer: no torch, no Qt).

Every file the package writes (label maps, DICOM-SEG, JSON/CSV reports, embeddings, index
files, weights) goes through :func:`atomic_write` or one of its shortcuts: the data is written
to a temporary name in the target's folder and moved into place with :func:`os.replace`, so a
reader never sees a half-written file and a failure leaves nothing behind.

Temporary files are created with ``os.open(..., 0o666)``, so they get the usual file mode under
the process umask without reading or changing it (``os.umask`` is process-wide: a worker
thread that sets it, even briefly, changes the mode of files other threads create).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "sha256_bytes", "sha256_file"]

DEFAULT_CHUNK = 1 << 22  # 4 MiB


def sha256_file(path: str | Path, chunk: int = DEFAULT_CHUNK,
                callback: Callable[[int], Any] | None = None) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks (``callback(bytes_done)`` per block)."""
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
            done += len(block)
            if callback is not None:
                callback(done)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _parent(path: Path, mkdir: bool) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if mkdir:
        parent.mkdir(parents=True, exist_ok=True)
    elif not parent.is_dir():
        from .writers import WriteError

        raise WriteError(path, f"folder does not exist: {parent}")
    return parent


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None, fsync: bool = False,
                mkdir: bool = True) -> Iterator[IO[Any]]:
    """``with atomic_open(p) as fh: ...`` - write ``fh``; ``p`` appears only if the block ends.

    ``mode`` is ``"w"`` (text) or ``"wb"``; ``fsync`` flushes to disk before the rename (index
    files, weights).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes new files only (mode 'w' or 'wb'), got {mode!r}")
    path = Path(path)
    _parent(path, mkdir)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        kw: dict[str, Any] = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False,
                       mkdir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb", fsync=fsync, mkdir=mkdir) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, mkdir: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", mkdir=mkdir) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, doc: Any, *, indent: int | None = 2,
                      mkdir: bool = True, **dump_kw: Any) -> Path:
    """Write ``doc`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w", mkdir=mkdir) as fh:
        json.dump(doc, fh, indent=indent, **dump_kw)
    return Path(path)


def atomic_write(path: str | Path, write_into: Callable[[Path], Any], *,
                 mkdir: bool = False, fsync: bool = False) -> Path:
    """Run ``write_into(tmp_path)`` in a hidden temp folder beside ``path``, then move into place.

    For writers that take a file name (SimpleITK, pydicom, faiss, safetensors). Every file the
    callback creates (e.g. a MetaImage ``.mhd`` plus its ``.zraw``) is moved with
    :func:`os.replace`, data files first and ``path`` last; the temporary folder is always
    removed, so a failure leaves neither a partial file nor debris.
    """
    path = Path(path)
    parent = _parent(path, mkdir)
    tmpdir = Path(tempfile.mkdtemp(prefix=".medfm-tmp-", dir=parent))
    try:
        tmp = tmpdir / path.name
        write_into(tmp)
        if not tmp.is_file():
            from .writers import WriteError

            raise WriteError(path, "writer produced no file")
        produced = sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name)
        for f in produced:
            if fsync:
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(f, parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path
