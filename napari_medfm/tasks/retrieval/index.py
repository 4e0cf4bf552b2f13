"""The similar-case index: faiss vectors + SQLite case table + a manifest, crash-safe.

Folder layout::

    DIR/manifest.json      written LAST (temp + os.replace); names the faiss file and its sha256
    DIR/index.faiss        faiss index over L2-normalised float32 vectors (inner product = cosine)
    DIR/meta.sqlite        info (model id, weights sha256, dim), chunks, cases, deleted, failures
    DIR/vectors/chunk-NNNNNN.npz   the embeddings themselves, one file per committed chunk

Index types (decided by the number of live vectors when the faiss file is (re)built):

* ``N <= FLAT_MAX`` (100,000): exact ``IndexFlatIP`` (brute force is a few ms per query
  at this size and has perfect recall);
* above: ``IndexHNSWFlat`` (M=32, efConstruction=80, efSearch=128 by default; see
  ``benchmarks/bench_ann.py`` for the recall/latency trade-off). Both are wrapped in
  ``IndexIDMap2`` so faiss ids are the SQLite ``vector_id``.

Crash safety: a build commits one chunk at a time - the chunk's vectors are written to a
temporary file and renamed into ``vectors/``, then its case rows and the chunk record are
inserted in ONE SQLite transaction. A crash leaves either a committed chunk or nothing (an
orphan ``.npz`` without its chunk row is deleted on the next open). The faiss file is written
to a temporary name and ``os.replace``d, and the manifest (with the faiss file's sha256) is
written after it, so :meth:`CaseIndex.open_for_search` never loads a half-written or stale
index. Raw vectors stay on disk, so ``rebuild`` never needs the model again.

Deletions are tombstones (the ``deleted`` table): searches exclude them with a faiss
``IDSelector``; ``rebuild`` drops them from the faiss file and the chunk files.

One index = one (model id, weights sha256, dim): adding vectors from anything else raises
:class:`IndexMismatchError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MedfmError

FORMAT_VERSION = 1
FLAT_MAX = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128

#: (faiss path, size, mtime_ns) -> sha256 already verified in this process (large indexes
#: are hashed once per process, not at every query)
_VERIFIED: dict[tuple[str, int, int], str] = {}
#: (faiss path, sha256) -> loaded faiss index, shared by queries of this process
_LOADED: dict[tuple[str, str], Any] = {}

MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
SQLITE_FILE = "meta.sqlite"
VECTOR_DIR = "vectors"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(
    chunk_id INTEGER PRIMARY KEY, file TEXT NOT NULL, n INTEGER NOT NULL,
    sha256 TEXT NOT NULL, source TEXT);
CREATE TABLE IF NOT EXISTS cases(
    vector_id INTEGER PRIMARY KEY, case_id TEXT UNIQUE NOT NULL, item_key TEXT,
    source_path TEXT, modality TEXT, labels TEXT, report TEXT, thumbnail BLOB,
    model_id TEXT NOT NULL, weights_sha256 TEXT NOT NULL, chunk_id INTEGER NOT NULL,
    extra TEXT);
CREATE INDEX IF NOT EXISTS cases_item ON cases(item_key);
CREATE INDEX IF NOT EXISTS cases_modality ON cases(modality);
CREATE TABLE IF NOT EXISTS deleted(vector_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS failures(item_key TEXT PRIMARY KEY, error TEXT, chunk_id INTEGER);
"""


class RetrievalIndexError(MedfmError):
    """Base for similar-case index problems."""


class IndexMismatchError(RetrievalIndexError):
    """Vectors from another model / weights / dimension were offered to an index."""


class IndexCorruptError(RetrievalIndexError):
    """The index folder is incomplete (interrupted build) or its files do not match."""


@dataclass
class CaseRecord:
    """One indexed case (one embedded image)."""

    case_id: str
    source_path: str = ""
    modality: str = ""
    labels: str = ""
    report: str = ""
    thumbnail: bytes | None = None
    item_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    vector_id: int
    case_id: str
    source_path: str
    modality: str = ""
    labels: str = ""
    report: str = ""
    thumbnail: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": round(float(self.score), 6), "case_id": self.case_id,
                "path": self.source_path, "modality": self.modality, "labels": self.labels,
                "vector_id": self.vector_id}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def versions() -> dict[str, str]:
    import faiss

    from ... import __version__

    return {"faiss": faiss.__version__, "napari_medfm": __version__}


class CaseIndex:
    """A similar-case index folder (see the module docstring)."""

    def __init__(self, root: Path, conn: sqlite3.Connection):
        self.root = Path(root)
        self.conn = conn
        self._faiss = None
        self._manifest: dict[str, Any] | None = None

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _connect(root: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(root / SQLITE_FILE), timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    @classmethod
    def exists(cls, root: str | Path) -> bool:
        return (Path(root) / SQLITE_FILE).is_file()

    @classmethod
    def open(cls, root: str | Path) -> CaseIndex:
        """Open an existing index folder for adding/deleting/inspection (no faiss load)."""
        root = Path(root)
        if not cls.exists(root):
            raise IndexCorruptError(f"{root}: not a similar-case index (no {SQLITE_FILE}); "
                                    "create one with `medfm index build`")
        idx = cls(root, cls._connect(root))
        if not idx.info_value("model_id"):
            raise IndexCorruptError(f"{root}: index has no model recorded (created by an "
                                    "interrupted first chunk?): delete the folder and rebuild")
        idx._cleanup_orphans()
        return idx

    @classmethod
    def create_or_open(cls, root: str | Path, *, model_id: str, weights_sha256: str, dim: int,
                       weights_path: str | None = None) -> CaseIndex:
        """Open ``root`` (checking model/weights/dim) or create a new empty index there."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / VECTOR_DIR).mkdir(exist_ok=True)
        conn = cls._connect(root)
        idx = cls(root, conn)
        if idx.info_value("model_id") is None:
            with idx._tx():
                for k, v in (("model_id", model_id), ("weights_sha256", weights_sha256),
                             ("dim", str(int(dim))), ("metric", "cosine"),
                             ("format_version", str(FORMAT_VERSION)),
                             ("weights_path", weights_path or ""),
                             ("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))):
                    conn.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (k, v))
        idx.check_compatible(model_id, weights_sha256, dim)
        if weights_path and not idx.info_value("weights_path"):
            with idx._tx():
                conn.execute("INSERT OR REPLACE INTO info VALUES ('weights_path', ?)",
                             (weights_path,))
        idx._cleanup_orphans()
        return idx

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> CaseIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ facts
    def info_value(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM info WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    @property
    def model_id(self) -> str:
        return self.info_value("model_id") or ""

    @property
    def weights_sha256(self) -> str:
        return self.info_value("weights_sha256") or ""

    @property
    def weights_path(self) -> str:
        return self.info_value("weights_path") or ""

    @property
    def dim(self) -> int:
        return int(self.info_value("dim") or 0)

    def check_compatible(self, model_id: str, weights_sha256: str, dim: int) -> None:
        """Refuse vectors from another model, other weights or another dimension.

        ``dim`` 0 means "not known yet" (models without an ``embedding_dim``): the dimension is
        then fixed by the first committed chunk and checked from there on.
        """
        have = (self.model_id, self.weights_sha256, self.dim)
        dim_clash = bool(dim) and bool(have[2]) and int(dim) != have[2]
        if have[:2] != (model_id, weights_sha256) or dim_clash:
            raise IndexMismatchError(
                f"{self.root}: this index holds {have[0]} embeddings (weights sha256 "
                f"{have[1][:12]}..., dim {have[2]}); refusing to mix in {model_id} (weights "
                f"{weights_sha256[:12]}..., dim {dim}). One index per model and weights: use "
                "another --index folder"
            )

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0])

    def deleted_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM deleted").fetchone()[0])

    def done_item_keys(self) -> set[str]:
        """Input items already committed (embedded or recorded as failed)."""
        rows = self.conn.execute(
            "SELECT item_key FROM cases WHERE item_key IS NOT NULL "
            "UNION SELECT item_key FROM failures")
        return {r[0] for r in rows}

    def failures(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in
                self.conn.execute("SELECT item_key, error FROM failures ORDER BY item_key")]

    def chunk_ids(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT chunk_id FROM chunks ORDER BY chunk_id")]

    def records(self, vector_ids: Iterable[int] | None = None) -> dict[int, CaseRecord]:
        cols = ("vector_id, case_id, source_path, modality, labels, report, thumbnail, item_key, "
                "extra")
        if vector_ids is None:
            rows = self.conn.execute(f"SELECT {cols} FROM cases ORDER BY vector_id").fetchall()
        else:
            ids = [int(v) for v in vector_ids]
            rows = []
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                q = f"SELECT {cols} FROM cases WHERE vector_id IN ({','.join('?' * len(part))})"
                rows += self.conn.execute(q, part).fetchall()
        return {r[0]: CaseRecord(case_id=r[1], source_path=r[2] or "", modality=r[3] or "",
                                 labels=r[4] or "", report=r[5] or "", thumbnail=r[6],
                                 item_key=r[7], extra=json.loads(r[8]) if r[8] else {})
                for r in rows}

    def vector_id_of(self, case_id: str) -> int | None:
        row = self.conn.execute("SELECT vector_id FROM cases WHERE case_id=?",
                                (case_id,)).fetchone()
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ chunks (crash-safe)
    def _chunk_path(self, chunk_id: int) -> Path:
        return self.root / VECTOR_DIR / f"chunk-{chunk_id:06d}.npz"

    def _cleanup_orphans(self) -> None:
        """Delete vector files whose chunk transaction never committed, and temp files."""
        vd = self.root / VECTOR_DIR
        if not vd.is_dir():
            return
        known = {Path(r[0]).name for r in self.conn.execute("SELECT file FROM chunks")}
        for f in vd.iterdir():
            if f.name.startswith(".") and f.name.endswith(".tmp") or (
                    f.name.startswith("chunk-") and f.name not in known):
                with contextlib.suppress(OSError):
                    f.unlink()

    def load_chunk(self, chunk_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(vector ids int64, vectors float32) of a committed chunk (checksum verified)."""
        row = self.conn.execute("SELECT file, sha256 FROM chunks WHERE chunk_id=?",
                                (chunk_id,)).fetchone()
        if row is None:
            raise IndexCorruptError(f"{self.root}: chunk {chunk_id} is not committed")
        path = self.root / row[0]
        if not path.is_file() or _sha256(path) != row[1]:
            raise IndexCorruptError(f"{path}: vector chunk missing or corrupt (checksum)")
        with np.load(path) as z:
            return z["ids"].astype(np.int64), z["vectors"].astype(np.float32)

    def add_chunk(self, vectors: np.ndarray, records: Sequence[CaseRecord], *,
                  model_id: str, weights_sha256: str,
                  failures: Sequence[tuple[str, str]] = (), source: str | None = None,
                  ) -> list[int]:
        """Commit one chunk: vectors file (atomic rename) then rows (one transaction).

        Returns the new vector ids. Cases whose ``case_id`` already exists are refused.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(records):
            raise ValueError(f"{len(records)} records but vectors of shape {vectors.shape}")
        self.check_compatible(model_id, weights_sha256, vectors.shape[1] if len(vectors) else
                              self.dim)
        if not np.all(np.isfinite(vectors)):
            raise MedfmError("embeddings contain NaN/inf; refusing to index them")
        ids_exist = [r.case_id for r in records if self.vector_id_of(r.case_id) is not None]
        if ids_exist:
            raise MedfmError(f"{self.root}: case ids already indexed: {ids_exist[:5]} "
                             "(delete them first or use other case ids)")
        vecs = l2_normalise(vectors) if len(vectors) else vectors.reshape(0, max(self.dim, 1))
        (self.root / VECTOR_DIR).mkdir(exist_ok=True)
        last = self.conn.execute("SELECT MAX(chunk_id) FROM chunks").fetchone()[0]
        chunk_id = 0 if last is None else int(last) + 1
        maxid = self.conn.execute(
            "SELECT MAX(m) FROM (SELECT MAX(vector_id) m FROM cases "
            "UNION ALL SELECT MAX(vector_id) FROM deleted)").fetchone()[0]
        first = 0 if maxid is None else int(maxid) + 1
        ids = np.arange(first, first + len(vecs), dtype=np.int64)
        path = self._chunk_path(chunk_id)
        import io

        buf = io.BytesIO()
        np.savez(buf, ids=ids, vectors=vecs)
        data = buf.getvalue()
        _atomic_write_bytes(path, data)
        digest = hashlib.sha256(data).hexdigest()
        with self._tx() as c:
            if not self.dim and len(vecs):
                c.execute("INSERT OR REPLACE INTO info VALUES ('dim', ?)", (str(vecs.shape[1]),))
            c.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                      (chunk_id, f"{VECTOR_DIR}/{path.name}", len(vecs), digest, source))
            for vid, r in zip(ids.tolist(), records, strict=False):
                c.execute(
                    "INSERT INTO cases (vector_id, case_id, item_key, source_path, modality, "
                    "labels, report, thumbnail, model_id, weights_sha256, chunk_id, extra) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (vid, r.case_id, r.item_key, r.source_path, r.modality, r.labels, r.report,
                     r.thumbnail, model_id, weights_sha256, chunk_id,
                     json.dumps(r.extra) if r.extra else None))
            for key, err in failures:
                c.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (key, err, chunk_id))
        return ids.tolist()

    def delete(self, case_ids: Iterable[str]) -> list[str]:
        """Tombstone cases (excluded from searches at once; dropped by :meth:`rebuild`).

        Returns the case ids that were not found.
        """
        missing = []
        with self._tx() as c:
            for cid in case_ids:
                row = c.execute("SELECT vector_id FROM cases WHERE case_id=?", (cid,)).fetchone()
                if row is None:
                    missing.append(cid)
                    continue
                c.execute("INSERT OR IGNORE INTO deleted VALUES (?)", (row[0],))
                c.execute("DELETE FROM cases WHERE vector_id=?", (row[0],))
        if self.manifest_path.is_file():
            self._write_manifest(self.read_manifest())  # counts changed; faiss unchanged
        return missing

    # ------------------------------------------------------------------ faiss file
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        p = self.manifest_path
        if not p.is_file():
            raise IndexCorruptError(
                f"{self.root}: no {MANIFEST} - the build was interrupted before the index was "
                "finalised. Run the same `medfm index build` again to resume, or "
                "`medfm index rebuild`")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise IndexCorruptError(f"{p}: unreadable manifest ({exc})") from exc

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        dead = {r[0] for r in self.conn.execute("SELECT vector_id FROM deleted")}
        ids_all, vec_all = [], []
        for cid in self.chunk_ids():
            ids, vecs = self.load_chunk(cid)
            if dead:
                keep = ~np.isin(ids, np.fromiter(dead, np.int64))
                ids, vecs = ids[keep], vecs[keep]
            ids_all.append(ids)
            vec_all.append(vecs)
        if not ids_all:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(ids_all), np.concatenate(vec_all)

    @staticmethod
    def new_faiss(dim: int, n: int, *, flat_max: int = FLAT_MAX, hnsw_m: int = HNSW_M,
                  ef_construction: int = HNSW_EF_CONSTRUCTION) -> tuple[Any, str]:
        import faiss

        if n <= flat_max:
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat"
        hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        return faiss.IndexIDMap2(hnsw), "hnsw"

    def finalize(self, *, force_rebuild: bool = False, flat_max: int = FLAT_MAX,
                 compact: bool = False) -> dict[str, Any]:
        """Bring ``index.faiss`` up to date with the committed chunks, then write the manifest.

        Incremental when possible (the current faiss file is valid, no tombstones need
        dropping and the index type still fits the size); a full rebuild otherwise.
        """
        import faiss

        chunks = self.chunk_ids()
        man = None
        with contextlib.suppress(IndexCorruptError):
            man = self.read_manifest()
        live = self.count()
        want_type = "flat" if live <= flat_max else "hnsw"
        incremental = (
            not force_rebuild and man is not None and man.get("index_type") == want_type
            and self._faiss_file_ok(man)
        )
        if incremental:
            index = faiss.read_index(str(self.root / FAISS_FILE))
            done = set(man.get("chunks_in_faiss", []))
            todo = [c for c in chunks if c not in done]
            for cid in todo:
                ids, vecs = self.load_chunk(cid)
                if len(ids):
                    index.add_with_ids(vecs, ids)
            index_type = want_type
            in_faiss = sorted(done | set(todo))
        else:
            if compact:
                self._compact_chunks()
                chunks = self.chunk_ids()
            ids, vecs = self._live_vectors()
            index, index_type = self.new_faiss(self.dim, len(ids), flat_max=flat_max)
            if len(ids):
                step = 65536
                for i in range(0, len(ids), step):
                    index.add_with_ids(vecs[i:i + step], ids[i:i + step])
            in_faiss = chunks
            if force_rebuild or compact:
                dead = [r[0] for r in self.conn.execute("SELECT vector_id FROM deleted")]
                if dead and compact:
                    with self._tx() as c:
                        c.execute("DELETE FROM deleted")
        target = self.root / FAISS_FILE
        tmp = self.root / f".{FAISS_FILE}.{os.getpid()}.tmp"
        try:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        man = {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "weights_path": self.weights_path,
            "dim": self.dim,
            "metric": "cosine (inner product of L2-normalised vectors)",
            "index_type": index_type,
            "hnsw": ({"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
                      "efSearch": HNSW_EF_SEARCH} if index_type == "hnsw" else None),
            "index_file": FAISS_FILE,
            "index_sha256": _sha256(target),
            "vectors_in_faiss": int(index.ntotal),
            "chunks_in_faiss": in_faiss,
            **versions(),
        }
        man = self._write_manifest(man)
        self._faiss = None
        return man

    def rebuild(self, *, flat_max: int = FLAT_MAX) -> dict[str, Any]:
        """Full rebuild of the faiss file from the stored vectors, dropping tombstones."""
        return self.finalize(force_rebuild=True, compact=True, flat_max=flat_max)

    def _compact_chunks(self) -> None:
        """Rewrite chunk files without tombstoned vectors (one transaction for the swap)."""
        dead = {r[0] for r in self.conn.execute("SELECT vector_id FROM deleted")}
        if not dead:
            return
        dead_arr = np.fromiter(dead, np.int64)
        import io

        for cid in self.chunk_ids():
            ids, vecs = self.load_chunk(cid)
            keep = ~np.isin(ids, dead_arr)
            if keep.all():
                continue
            buf = io.BytesIO()
            np.savez(buf, ids=ids[keep], vectors=vecs[keep])
            data = buf.getvalue()
            new = self.root / VECTOR_DIR / f"chunk-{cid:06d}-c{int(time.time() * 1e6)}.npz"
            _atomic_write_bytes(new, data)
            old = self.conn.execute("SELECT file FROM chunks WHERE chunk_id=?", (cid,)).fetchone()
            with self._tx() as c:
                c.execute("UPDATE chunks SET file=?, n=?, sha256=? WHERE chunk_id=?",
                          (f"{VECTOR_DIR}/{new.name}", int(keep.sum()),
                           hashlib.sha256(data).hexdigest(), cid))
            with contextlib.suppress(OSError):
                (self.root / old[0]).unlink()

    def _faiss_file_ok(self, man: dict[str, Any]) -> bool:
        p = self.root / man.get("index_file", FAISS_FILE)
        if not p.is_file():
            return False
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(key) == man.get("index_sha256"):
            return True  # hashed already in this process and unchanged since
        ok = _sha256(p) == man.get("index_sha256")
        if ok:
            _VERIFIED[key] = man["index_sha256"]
        return ok

    def _write_manifest(self, man: dict[str, Any]) -> dict[str, Any]:
        man = dict(man)
        man.update(count=self.count(), deleted=self.deleted_count(),
                   failures=len(self.failures()),
                   updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _atomic_write_bytes(self.manifest_path, json.dumps(man, indent=2).encode())
        return man

    def load_faiss(self) -> Any:
        """The faiss index, only if the manifest vouches for it and it is up to date."""
        if self._faiss is not None:
            return self._faiss
        import faiss

        man = self.read_manifest()
        if (man.get("model_id"), man.get("weights_sha256"), int(man.get("dim", 0))) != (
                self.model_id, self.weights_sha256, self.dim):
            raise IndexCorruptError(f"{self.root}: manifest and meta.sqlite disagree on the model")
        if not self._faiss_file_ok(man):
            raise IndexCorruptError(
                f"{self.root}: {FAISS_FILE} is missing or does not match its checksum in "
                f"{MANIFEST} (interrupted write?). Run `medfm index rebuild --index {self.root}`")
        pending = [c for c in self.chunk_ids() if c not in set(man.get("chunks_in_faiss", []))]
        if pending:
            raise IndexCorruptError(
                f"{self.root}: {len(pending)} committed chunk(s) are not in the faiss index yet "
                "(interrupted build). Run the build again to resume, or `medfm index rebuild`")
        key = (str((self.root / FAISS_FILE).resolve()), man["index_sha256"])
        index = _LOADED.get(key)
        if index is None:
            index = faiss.read_index(str(self.root / FAISS_FILE))
            if len(_LOADED) >= 4:
                _LOADED.pop(next(iter(_LOADED)))
            _LOADED[key] = index
        self._manifest = man
        self._faiss = index
        return index

    # ------------------------------------------------------------------ search
    def allowed_ids(self, modality: str | None = None, label: str | None = None) -> np.ndarray | None:
        """Vector ids passing the filters (None = no restriction beyond tombstones)."""
        if not modality and not label and not self.deleted_count():
            return None
        q, args = "SELECT vector_id FROM cases WHERE 1=1", []
        if modality:
            q += " AND lower(modality)=lower(?)"
            args.append(modality)
        if label:
            q += " AND (lower(labels) LIKE lower(?) OR lower(report) LIKE lower(?))"
            args += [f"%{label}%", f"%{label}%"]
        return np.asarray([r[0] for r in self.conn.execute(q, args)], dtype=np.int64)

    def search(self, queries: np.ndarray, k: int = 10, *, modality: str | None = None,
               label: str | None = None, ef_search: int | None = None,
               with_thumbnails: bool = True) -> list[list[Hit]]:
        """Top-``k`` cases (cosine similarity) for each query vector."""
        import faiss

        index = self.load_faiss()
        q = l2_normalise(queries)
        if q.shape[1] != self.dim:
            raise IndexMismatchError(f"query has dim {q.shape[1]}, index has {self.dim}")
        allowed = self.allowed_ids(modality, label)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in range(len(q))]
        k_eff = int(min(k, index.ntotal if allowed is None else len(allowed)))
        if k_eff <= 0:
            return [[] for _ in range(len(q))]
        is_hnsw = (self._manifest or {}).get("index_type") == "hnsw"
        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        if is_hnsw:
            params = faiss.SearchParametersHNSW(efSearch=int(ef_search or max(HNSW_EF_SEARCH,
                                                                              2 * k_eff)))
            if sel is not None:
                params.sel = sel
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        D, I = index.search(q, k_eff, params=params)  # noqa: E741
        want = {int(i) for i in I.reshape(-1) if i >= 0}
        recs = self.records(want)
        out: list[list[Hit]] = []
        for d_row, i_row in zip(D, I, strict=False):
            hits = []
            for s, vid in zip(d_row.tolist(), i_row.tolist(), strict=False):
                r = recs.get(int(vid))
                if vid < 0 or r is None:
                    continue
                hits.append(Hit(rank=len(hits) + 1, score=float(s), vector_id=int(vid),
                                case_id=r.case_id, source_path=r.source_path, modality=r.modality,
                                labels=r.labels, report=r.report,
                                thumbnail=r.thumbnail if with_thumbnails else None,
                                extra=r.extra))
            out.append(hits)
        return out

    # ------------------------------------------------------------------ summary
    def info(self) -> dict[str, Any]:
        """Facts for ``medfm index info``."""
        man: dict[str, Any] = {}
        state = "ok"
        try:
            man = self.read_manifest()
            self.load_faiss()
        except IndexCorruptError as exc:
            state = str(exc)
        mods = dict(self.conn.execute(
            "SELECT COALESCE(modality, ''), COUNT(*) FROM cases GROUP BY modality").fetchall())
        return {
            "index": str(self.root),
            "state": state,
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "weights_path": self.weights_path,
            "dim": self.dim,
            "cases": self.count(),
            "deleted": self.deleted_count(),
            "failures": len(self.failures()),
            "chunks": len(self.chunk_ids()),
            "index_type": man.get("index_type"),
            "vectors_in_faiss": man.get("vectors_in_faiss"),
            "modalities": mods,
            "faiss": man.get("faiss"),
            "napari_medfm": man.get("napari_medfm"),
            "updated": man.get("updated"),
        }
