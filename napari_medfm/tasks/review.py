"""Review a cohort case by case: verdicts, edited segmentations, a crash-safe store, CSV export.

Cohort
------
:func:`load_cohort` reads a CSV with an ``image`` column and optional ``id``, ``labels``
(the segmentation to review), ``findings`` and ``report`` columns (relative paths are relative
to the CSV; ``report`` may also hold the text itself), or a folder whose readable images
(files, DICOM sub-folders) are the cases.

Where a case's model outputs are found (first hit wins)
-------------------------------------------------------
For an image ``<stem>.<ext>`` (``<stem>`` = the file name without its format extension, or
the DICOM folder's name):

* segmentation: the CSV ``labels`` column, else ``<stem>.seg.nii.gz`` (or ``.seg.nii``,
  ``.seg.nrrd``, ``.seg.mha``) in the review's work folder, else beside the image. Its
  provenance is the ``<stem>.seg.json`` run report written by ``medfm segment``
  (``model``, ``weights_sha256``), its structure names the ``<stem>.seg.labels.json``
  sidecar of the label writers;
* findings: the CSV ``findings`` column, else ``<stem>.findings.json`` (a list of
  ``{"finding", "probability"}`` or ``{"findings": [...]}``);
* draft report: the CSV ``report`` column, else ``<stem>.report.txt`` or
  ``<stem>.report.json`` (``{"text": ...}``).

Missing outputs can be produced on demand (:func:`compute_outputs`, run it in a worker):
segmentation through :func:`napari_medfm.tasks.segment.segment`, findings through a
``FindingsModel``, a draft report through a ``ReportGenerator``; models come from
:func:`napari_medfm.runtime.cache.get_model`. Results are written to the work folder with the
names above, so the next visit finds them.

Store
-----
:class:`ReviewStore` is one SQLite file in WAL mode (``synchronous=FULL``): every verdict,
edit and move to another case is one committed transaction, so killing the program loses at
most the action in flight, and reopening the store resumes at the same case with every
verdict and edit. Verdicts are append-only (the latest per case and output counts; the
history is kept).

Edits
-----
:func:`save_edited_segmentation` writes a corrected label map as a **new version** beside
the model's output, never over it: ``<stem>.seg.edit-<n>.nii.gz`` (+ ``.labels.json``
structure names via :func:`napari_medfm.io.writers.write_labels`) and
``<stem>.seg.edit-<n>.json`` with the provenance: the original's file, model id and weights
hash, the reviewer and the time. The file is written (atomically) before the store records
it; a file from an interrupted save that the store never recorded is not reused (numbers
only grow).

No Qt or napari imports here.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import sqlite3
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedfmError
from ..geometry import Geometry
from ..io.types import MedicalImage
from ..progress import Progress

__all__ = [
    "OUTPUTS",
    "VERDICTS",
    "Case",
    "LoadedCase",
    "ReviewStore",
    "case_stem",
    "compute_outputs",
    "find_outputs",
    "load_case",
    "load_cohort",
    "save_edited_segmentation",
]

#: Outputs a verdict can be about.
OUTPUTS = ("segmentation", "findings", "report")
#: Verdicts.
VERDICTS = ("accept", "edit", "reject")

SEG_SUFFIXES = (".seg.nii.gz", ".seg.nii", ".seg.nrrd", ".seg.mha")
_IMAGE_EXTS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm",
               ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".bmp")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS cases(idx INTEGER PRIMARY KEY, case_id TEXT UNIQUE NOT NULL,
    image TEXT NOT NULL, labels TEXT, findings TEXT, report TEXT, extra TEXT);
CREATE TABLE IF NOT EXISTS verdicts(id INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL,
    output TEXT NOT NULL, verdict TEXT NOT NULL, note TEXT, reviewer TEXT, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits(id INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL,
    output TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, original TEXT,
    model TEXT, weights_sha256 TEXT, reviewer TEXT, time TEXT NOT NULL);
"""
EXPORT_COLUMNS = ("case", "image", "output", "verdict", "note", "reviewer", "time",
                  "edit_version", "edit_path", "model", "weights_sha256")


def now() -> str:
    """UTC time stamp, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ============================================================================ cohort
def case_stem(path: str | Path) -> str:
    """``ct.nii.gz`` -> ``ct``; a DICOM folder -> its name."""
    p = Path(path)
    name = p.name
    low = name.lower()
    for ext in _IMAGE_EXTS:
        if low.endswith(ext) and len(low) > len(ext):
            return name[: -len(ext)]
    return name


@dataclass
class Case:
    """One case of a cohort (paths are absolute)."""

    index: int
    case_id: str
    image: Path
    labels: Path | None = None
    findings: Path | None = None
    report: str | None = None  # a path or the text itself
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return case_stem(self.image)


def _is_output_name(name: str) -> bool:
    low = name.lower()
    return (low.startswith(".") or ".seg." in low or ".edit-" in low or low.endswith(
        (".json", ".csv", ".txt", ".yaml", ".yml", ".db", ".db-wal", ".db-shm", ".png.json"))
        or "_seg." in low or low.endswith("_seg"))


def _unique_ids(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        if i in seen:
            seen[i] += 1
            out.append(f"{i}_{seen[i]}")
        else:
            seen[i] = 1
            out.append(i)
    return out


def load_cohort(source: str | Path) -> list[Case]:
    """Cases from a cohort CSV (``image`` [+ ``id``, ``labels``, ``findings``, ``report``]) or a
    folder of images. Raises :class:`MedfmError` with the reason for an unusable cohort."""
    src = Path(source)
    if not src.exists():
        raise MedfmError(f"{src}: no such cohort file or folder")
    if src.is_dir():
        from ..io import can_read

        items = [p for p in sorted(src.iterdir()) if not _is_output_name(p.name)]
        images = [p for p in items if can_read(p)]
        if not images:
            raise MedfmError(f"{src}: the folder holds no images we can read")
        ids = _unique_ids([case_stem(p) for p in images])
        return [Case(i, cid, Path(os.path.abspath(p))) for i, (cid, p) in enumerate(zip(ids, images, strict=True))]
    with open(src, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [dict(r) for r in reader]
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "image" not in header:
        raise MedfmError(f"{src.name}: a cohort CSV needs an 'image' column (has: "
                         f"{', '.join(header) or 'nothing'})")
    base = src.parent

    def _path(v: str | None) -> Path | None:
        if not v or not str(v).strip():
            return None
        p = Path(str(v).strip()).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else base / p))  # links kept

    cases = []
    norm = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in rows]
    norm = [r for r in norm if r.get("image")]
    if not norm:
        raise MedfmError(f"{src.name}: no rows with an image")
    ids = _unique_ids([r.get("id") or case_stem(r["image"]) for r in norm])
    for i, (cid, r) in enumerate(zip(ids, norm, strict=True)):
        report = r.get("report") or None
        if report:
            rp = _path(report)
            report = str(rp) if rp is not None and rp.is_file() else report
        extra = {k: v for k, v in r.items()
                 if k not in ("image", "id", "labels", "findings", "report") and v}
        cases.append(Case(i, cid, _path(r["image"]), _path(r.get("labels")),  # type: ignore[arg-type]
                          _path(r.get("findings")), report, extra))
    return cases


def find_outputs(case: Case, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Paths of the outputs already computed for ``case`` (see the module docstring).

    ``{"segmentation": Path|None, "findings": Path|None, "report": Path|str|None}``.
    """
    folders = [Path(work_dir)] if work_dir else []
    folders.append(case.image.parent)
    stem = case.stem

    def _first(names: Sequence[str]) -> Path | None:
        for d in folders:
            for n in names:
                f = d / n
                if f.is_file():
                    return f
        return None

    seg = case.labels if case.labels is not None and case.labels.exists() else None
    seg = seg or _first([stem + s for s in SEG_SUFFIXES])
    fin = case.findings if case.findings is not None and case.findings.is_file() else None
    fin = fin or _first([stem + ".findings.json"])
    rep: Any = case.report or _first([stem + ".report.txt", stem + ".report.json"])
    return {"segmentation": seg, "findings": fin, "report": rep}


# ============================================================================ store
class ReviewStore:
    """Crash-safe review state of one cohort (SQLite, WAL, one transaction per action).

    ``ReviewStore(path, cohort)`` creates the store for a cohort (CSV, folder or list of
    :class:`Case`) or reopens it; ``ReviewStore(path)`` reopens an existing one.
    Thread-safe (one connection behind a lock), so a worker may record an edit it wrote.
    """

    def __init__(self, path: str | Path, cohort: str | Path | Sequence[Case] | None = None):
        self.path = Path(path)
        new = not self.path.exists()
        if new and cohort is None:
            raise MedfmError(f"{self.path}: no review store here; give a cohort to start one")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise MedfmError(f"{self.path}: the file system does not support SQLite WAL mode")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        n = self._db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        if n == 0:
            if cohort is None:
                raise MedfmError(f"{self.path}: the store holds no cases")
            cases = cohort if isinstance(cohort, Sequence) and not isinstance(cohort, str) \
                else load_cohort(cohort)  # type: ignore[arg-type]
            with self._tx() as db:
                for c in cases:
                    db.execute("INSERT INTO cases VALUES (?,?,?,?,?,?,?)",
                               (c.index, c.case_id, str(c.image),
                                None if c.labels is None else str(c.labels),
                                None if c.findings is None else str(c.findings), c.report,
                                json.dumps(c.extra)))
                src = None if isinstance(cohort, Sequence) and not isinstance(cohort, str) \
                    else str(Path(cohort).resolve())  # type: ignore[arg-type]
                db.execute("INSERT OR REPLACE INTO meta VALUES ('cohort', ?)", (src,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('created', ?)", (now(),))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('position', '0')")
        self.cases = self._load_cases()

    # ------------------------------------------------------------------ plumbing
    def _tx(self) -> Any:
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self_inner, et, ev, tb):
                try:
                    store._db.execute("COMMIT" if et is None else "ROLLBACK")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _load_cases(self) -> list[Case]:
        out = []
        for r in self._query("SELECT * FROM cases ORDER BY idx"):
            out.append(Case(int(r["idx"]), r["case_id"], Path(r["image"]),
                            None if r["labels"] is None else Path(r["labels"]),
                            None if r["findings"] is None else Path(r["findings"]),
                            r["report"], json.loads(r["extra"] or "{}")))
        return out

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def work_dir(self) -> Path:
        """Folder for on-demand outputs and edits that cannot go beside the model's output."""
        d = self.path.with_name(self.path.name + ".outputs")
        return d

    # ------------------------------------------------------------------ meta
    def meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows and rows[0]["value"] is not None else default

    def set_meta(self, key: str, value: str | None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def position(self) -> int:
        """Index of the case under review (kept across restarts)."""
        try:
            pos = int(self.meta("position", "0") or 0)
        except ValueError:
            pos = 0
        return min(max(pos, 0), max(len(self.cases) - 1, 0))

    def set_position(self, index: int) -> int:
        if not self.cases:
            raise MedfmError("the cohort is empty")
        index = min(max(int(index), 0), len(self.cases) - 1)
        self.set_meta("position", str(index))
        return index

    @property
    def reviewer(self) -> str | None:
        return self.meta("reviewer")

    def set_reviewer(self, name: str) -> None:
        name = str(name).strip()
        if not name:
            raise MedfmError("the reviewer name is empty")
        self.set_meta("reviewer", name)

    def case(self, key: int | str) -> Case:
        if isinstance(key, int):
            return self.cases[key]
        for c in self.cases:
            if c.case_id == key:
                return c
        raise MedfmError(f"no case {key!r} in this cohort")

    # ------------------------------------------------------------------ verdicts
    def set_verdict(self, case_id: str, output: str, verdict: str, note: str = "",
                    reviewer: str | None = None) -> dict[str, Any]:
        """Record a verdict (one transaction) and return it."""
        if output not in OUTPUTS:
            raise MedfmError(f"unknown output {output!r}; one of {', '.join(OUTPUTS)}")
        if verdict not in VERDICTS:
            raise MedfmError(f"unknown verdict {verdict!r}; one of {', '.join(VERDICTS)}")
        self.case(case_id)
        who = reviewer or self.reviewer
        if not who:
            raise MedfmError("set the reviewer name first")
        t = now()
        with self._tx() as db:
            db.execute("INSERT INTO verdicts(case_id, output, verdict, note, reviewer, time) "
                       "VALUES (?,?,?,?,?,?)", (case_id, output, verdict, note or "", who, t))
        return {"case": case_id, "output": output, "verdict": verdict, "note": note or "",
                "reviewer": who, "time": t}

    def verdicts(self, case_id: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """Current (latest) verdict per ``(case, output)``."""
        sql = ("SELECT * FROM verdicts WHERE id IN (SELECT MAX(id) FROM verdicts "
               + ("WHERE case_id=? " if case_id else "") + "GROUP BY case_id, output)")
        rows = self._query(sql, (case_id,) if case_id else ())
        return {(r["case_id"], r["output"]): {k: v for k, v in dict(r).items() if k != "id"}
                for r in rows}

    def history(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM verdicts ORDER BY id")]

    # ------------------------------------------------------------------ edits
    def record_edit(self, case_id: str, path: str | Path, version: int, *, output: str =
                    "segmentation", original: str | Path | None = None, model: str | None = None,
                    weights_sha256: str | None = None, reviewer: str | None = None,
                    time: str | None = None) -> dict[str, Any]:
        row = {"case_id": case_id, "output": output, "version": int(version), "path": str(path),
               "original": None if original is None else str(original), "model": model,
               "weights_sha256": weights_sha256, "reviewer": reviewer or self.reviewer,
               "time": time or now()}
        with self._tx() as db:
            db.execute("INSERT INTO edits(case_id, output, version, path, original, model, "
                       "weights_sha256, reviewer, time) VALUES (:case_id, :output, :version, "
                       ":path, :original, :model, :weights_sha256, :reviewer, :time)", row)
        return row

    def edits(self, case_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM edits" + (" WHERE case_id=?" if case_id else "") + " ORDER BY id"
        return [dict(r) for r in self._query(sql, (case_id,) if case_id else ())]

    def latest_edit(self, case_id: str) -> dict[str, Any] | None:
        e = self.edits(case_id)
        return e[-1] if e else None

    # ------------------------------------------------------------------ export
    def export_rows(self) -> list[dict[str, Any]]:
        verdicts = self.verdicts()
        edits: dict[str, dict[str, Any]] = {}
        for e in self.edits():
            edits[e["case_id"]] = e
        rows = []
        for c in self.cases:
            for out in OUTPUTS:
                v = verdicts.get((c.case_id, out))
                e = edits.get(c.case_id) if out == "segmentation" else None
                if v is None and e is None:
                    continue
                rows.append({
                    "case": c.case_id, "image": str(c.image), "output": out,
                    "verdict": v["verdict"] if v else "", "note": v["note"] if v else "",
                    "reviewer": (v or e or {}).get("reviewer") or "",
                    "time": (v or e or {}).get("time") or "",
                    "edit_version": e["version"] if e else "",
                    "edit_path": e["path"] if e else "",
                    "model": (e or {}).get("model") or "",
                    "weights_sha256": (e or {}).get("weights_sha256") or "",
                })
        return rows

    def export_csv(self, path: str | Path) -> Path:
        """One row per reviewed (case, output): the current verdict, note, reviewer, time and
        the latest edited version with its provenance. Atomic."""
        from ..io.writers import atomic_write

        rows = self.export_rows()

        def _w(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS))
                w.writeheader()
                w.writerows(rows)

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(p, _w)

    def summary(self) -> dict[str, int]:
        v = self.verdicts()
        done = {c for c, _ in v}
        return {"cases": len(self.cases), "reviewed": len(done), "verdicts": len(v),
                "edits": len(self.edits())}


# ============================================================================ loading
@dataclass
class LoadedCase:
    """What the dock shows for one case (read in a worker)."""

    case: Case
    image: MedicalImage
    segmentation: MedicalImage | None = None  # the model's output, on the image grid
    segmentation_path: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # model, weights_sha256
    edit: MedicalImage | None = None  # the latest edited version, if any
    edit_path: Path | None = None
    findings: list[dict[str, Any]] | None = None
    report: str | None = None
    notes: list[str] = field(default_factory=list)


def _pick_image(images: list[MedicalImage], path: Path) -> MedicalImage:
    imgs = [im for im in images if not im.is_label]
    if not imgs:
        raise MedfmError(f"{path.name}: holds no image")
    vols = [im for im in imgs if im.kind == "volume"]
    return (vols or imgs)[0]


def _read_provenance(seg_path: Path) -> dict[str, Any]:
    from .segment import sidecar_path

    side = sidecar_path(seg_path)
    if not side.is_file():
        return {}
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    keep = ("model", "weights_sha256", "edited_from", "format", "reviewer", "time", "version")
    return {k: doc[k] for k in keep if k in doc}


def _on_image_grid(lab: MedicalImage, image: MedicalImage, notes: list[str]) -> MedicalImage:
    from .validate import align_to_reference

    arr, msgs = align_to_reference(lab, image)
    notes.extend(msgs)
    lab.data = arr
    if msgs:
        lab.geometry = image.geometry
    return lab


def _read_findings(p: Path) -> list[dict[str, Any]]:
    doc = json.loads(p.read_text(encoding="utf-8"))
    if isinstance(doc, dict):
        doc = doc.get("findings", doc.get("results", []))
    if not isinstance(doc, list):
        raise MedfmError(f"{p.name}: expected a list of findings")
    return [d for d in doc if isinstance(d, dict)]


def _read_report(rep: Any) -> str:
    p = Path(str(rep)) if rep and len(str(rep)) < 4096 else None
    if p is not None and p.is_file():
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            doc = json.loads(text)
            return str(doc.get("text") or doc.get("report") or "") if isinstance(doc, dict) \
                else str(doc)
        return text
    return str(rep)


def load_case(case: Case, *, work_dir: str | Path | None = None,
              latest_edit: str | Path | None = None) -> Generator[Progress, None, LoadedCase]:
    """Read a case's image and its outputs (and its latest edit). Run in a worker."""
    from ..io import read
    from .validate import load_label_map

    yield Progress(0, 4, f"reading {case.case_id}")
    image = _pick_image(read(case.image), case.image)
    image.data = np.asarray(image.data) if not image.multiscale else image.data
    out = find_outputs(case, work_dir)
    loaded = LoadedCase(case, image)
    yield Progress(1, 4, "segmentation")
    if out["segmentation"] is not None and image.kind == "volume":
        try:
            seg = load_label_map(out["segmentation"])
            loaded.segmentation = _on_image_grid(seg, image, loaded.notes)
            loaded.segmentation_path = Path(out["segmentation"])
            loaded.provenance = _read_provenance(loaded.segmentation_path)
        except MedfmError as exc:
            loaded.notes.append(f"segmentation not loaded: {exc}")
    if latest_edit is not None and Path(latest_edit).is_file():
        try:
            loaded.edit = _on_image_grid(load_label_map(latest_edit), image, loaded.notes)
            loaded.edit_path = Path(latest_edit)
        except MedfmError as exc:
            loaded.notes.append(f"edited segmentation not loaded: {exc}")
    elif latest_edit is not None:
        loaded.notes.append(f"edited segmentation {Path(latest_edit).name} is missing on disk")
    yield Progress(2, 4, "findings")
    if out["findings"] is not None:
        try:
            loaded.findings = _read_findings(Path(out["findings"]))
        except (OSError, ValueError, MedfmError) as exc:
            loaded.notes.append(f"findings not loaded: {exc}")
    yield Progress(3, 4, "report")
    if out["report"]:
        try:
            loaded.report = _read_report(out["report"])
        except (OSError, ValueError) as exc:
            loaded.notes.append(f"report not loaded: {exc}")
    yield Progress(4, 4, "done")
    return loaded


def compute_outputs(case: Case, image: MedicalImage, out_dir: str | Path, *,
                    segment_model: str | None = None, findings_model: str | None = None,
                    report_model: str | None = None, device: str | None = None,
                    ) -> Generator[Progress, None, dict[str, Path]]:
    """Run the chosen models on a case and write their outputs (names of the convention) to
    ``out_dir``; returns ``{output: path}``. A generator: run it in a worker."""
    from ..runtime.cache import get_model

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = case.stem
    written: dict[str, Path] = {}
    if segment_model:
        from .segment import (
            BUNDLE_PREFIX,
            SegmentSettings,
            label_statistics,
            load_segmenter,
            save_labels,
            segment,
            sidecar_dict,
            sidecar_path,
            write_sidecar,
        )

        model = (load_segmenter(segment_model, device=device)
                 if segment_model.startswith(BUNDLE_PREFIX)
                 else get_model(segment_model, device=device))
        result = yield from segment(image, model, SegmentSettings(device=device))
        target = save_labels(result, d / f"{stem}.seg.nii.gz")
        stats = label_statistics(result.labels, np.asarray(image.data), result.geometry,
                                 result.present_names())
        write_sidecar(sidecar_path(target), sidecar_dict(result, stats, input_path=case.image,
                                                         output_path=target,
                                                         image_shape=image.shape))
        written["segmentation"] = target
    if findings_model:
        yield Progress(0, 1, f"findings {findings_model}")
        model = get_model(findings_model, device=device)
        found = model.findings(image)
        doc = {"model": findings_model, "weights_sha256": getattr(model, "weights_sha256", None),
               "findings": [{k: (float(v) if isinstance(v, np.floating) else v)
                             for k, v in f.items()} for f in found]}
        written["findings"] = _write_text(d / f"{stem}.findings.json", json.dumps(doc, indent=1))
    if report_model:
        yield Progress(0, 1, f"report {report_model}")
        model = get_model(report_model, device=device)
        pieces = []
        for piece in model.stream([image], "Write the findings and impression.",
                                  max_new_tokens=512):
            pieces.append(str(piece))
            yield Progress(len(pieces), 0, "writing the report")
        doc = {"model": report_model, "weights_sha256": getattr(model, "weights_sha256", None),
               "text": "".join(pieces)}
        written["report"] = _write_text(d / f"{stem}.report.json", json.dumps(doc, indent=1))
    return written


def _write_text(path: Path, text: str) -> Path:
    from ..io.writers import atomic_write

    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


# ============================================================================ edits
def _edit_base(original: Path | None, case: Case, work_dir: Path) -> tuple[Path, str, str]:
    """(folder, base name without extension, extension) of the edited versions."""
    ext = ".nii.gz"
    if original is not None:
        low = original.name.lower()
        for s in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha"):
            if low.endswith(s):
                base = original.name[: -len(s)]
                ext = ".nrrd" if s == ".seg.nrrd" else s
                if s == ".seg.nrrd":
                    base += ".seg"
                folder = original.parent
                if os.access(folder, os.W_OK):
                    return folder, base, ext
                return work_dir, base, ext
        base = case_stem(original) + ".seg"
        folder = original.parent if os.access(original.parent, os.W_OK) else work_dir
        return folder, base, ext
    return work_dir, case.stem + ".seg", ext


def save_edited_segmentation(store: ReviewStore, case: Case | str, labels: np.ndarray,
                             geometry: Geometry, *, label_names: dict[int, str] | None = None,
                             label_colors: dict[int, Any] | None = None,
                             original: str | Path | None = None,
                             provenance: dict[str, Any] | None = None,
                             reviewer: str | None = None) -> dict[str, Any]:
    """Write ``labels`` as the next edited version of the case's segmentation and record it.

    Never writes over ``original`` (the model's output) or an earlier version. Returns the
    store's edit record (``path``, ``version``, ``model``, ``weights_sha256``, ...).
    """
    from ..io.writers import write_labels
    from .segment import sidecar_path

    c = store.case(case) if isinstance(case, str) else case
    who = reviewer or store.reviewer
    if not who:
        raise MedfmError("set the reviewer name first")
    orig = None if original is None else Path(original)
    prov = dict(provenance or {})
    if orig is not None and not prov:
        prov = _read_provenance(orig)
    folder, base, ext = _edit_base(orig, c, store.work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    done = [int(e["version"]) for e in store.edits(c.case_id)]
    n = max(done, default=0) + 1
    while any((folder / f"{base}.edit-{n}{s}").exists() for s in (ext, ".json")):
        n += 1  # an unrecorded file of an interrupted save: never reused
    target = folder / f"{base}.edit-{n}{ext}"
    if orig is not None and target.resolve() == orig.resolve():  # pragma: no cover - paranoia
        raise MedfmError("refusing to write over the model's output")
    t = now()
    write_labels(target, np.asarray(labels), geometry, label_names=label_names,
                 label_colors=label_colors)
    model = prov.get("model")
    sha = prov.get("weights_sha256")
    if prov.get("edited_from"):  # editing an edit: keep the model's provenance
        model = prov.get("model")
    doc = {"format": "napari-medfm-edit/1", "version": n, "model": model, "weights_sha256": sha,
           "edited_from": None if orig is None else str(orig), "reviewer": who, "time": t,
           "case": c.case_id, "labels": {str(k): v for k, v in (label_names or {}).items()}}
    _write_text(sidecar_path(target), json.dumps(doc, indent=1))
    return store.record_edit(c.case_id, target, n, original=orig, model=model,
                             weights_sha256=sha, reviewer=who, time=t)
