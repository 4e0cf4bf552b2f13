"""Building a similar-case index: collect inputs, embed in batches, commit in chunks, resume.

``build_index`` is a task generator (``Progress`` per batch of images) so the CLI shows a bar,
a widget can cancel between batches, and a crash or Ctrl-C loses at most the chunk in flight:
running the same build again skips every input item already committed (or recorded as failed)
and continues. With ``shard=(i, n)`` the process embeds only items ``i, i+n, i+2n, ...`` into
``DIR/shards/IIII-of-NNNN/``; :func:`merge_shards` folds the shards into ``DIR`` (itself
resumable: merged chunks are remembered).
"""

from __future__ import annotations

import csv
import io as _io
import logging
import os
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MedfmError
from ...progress import Progress
from .index import CaseIndex, CaseRecord, IndexCorruptError

log = logging.getLogger(__name__)

_SKIP_SUFFIXES = {".csv", ".txt", ".json", ".xml", ".md", ".names", ".yaml", ".yml", ".py",
                  ".npz", ".npy", ".sqlite", ".faiss", ".html", ".pdf"}
_LABEL_FILES = ("labels.csv",)


@dataclass
class CaseItem:
    """One input (file or DICOM folder) to embed; may yield several images."""

    path: Path
    case_id: str
    labels: str = ""
    report: str = ""
    modality: str | None = None

    @property
    def key(self) -> str:
        return str(self.path.resolve())


@dataclass
class BuildResult:
    index_dir: Path
    added: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- inputs
def _is_dicom_file(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    ext = p.suffix[1:]
    if ext and ext.isalpha() and len(ext) <= 5:
        return False  # a real extension (png, jpg, nii, ...); DICOM UIDs give numeric "suffixes"
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    from ...io import dicom  # files without preamble: ask the DICOM reader's sniffer

    try:
        return bool(dicom.can_read(p))
    except Exception:  # a sniffer must never abort a walk
        return False


def _read_label_table(folder: Path) -> dict[str, tuple[str, str]]:
    """``labels.csv`` beside images: {relative path: (labels, report)}."""
    out: dict[str, tuple[str, str]] = {}
    for name in _LABEL_FILES:
        f = folder / name
        if not f.is_file():
            continue
        with open(f, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rel = row.get("path") or row.get("file")
                if rel:
                    out[rel.strip()] = ((row.get("labels") or row.get("label") or "").strip(),
                                        (row.get("report") or "").strip())
    return out


def _from_csv(csv_path: Path) -> list[CaseItem]:
    items = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        if not cols & {"path", "file"}:
            raise MedfmError(f"{csv_path.name}: CSV needs a 'path' column (found: "
                             f"{', '.join(sorted(cols)) or 'no header'})")
        for n, row in enumerate(reader, start=2):
            rel = (row.get("path") or row.get("file") or "").strip()
            if not rel:
                continue
            p = Path(rel).expanduser()
            if not p.is_absolute():
                p = csv_path.parent / p
            if not p.exists():
                raise MedfmError(f"{csv_path.name} line {n}: {rel} does not exist")
            items.append(CaseItem(
                path=p, case_id=(row.get("case_id") or rel).strip(),
                labels=(row.get("labels") or row.get("label") or "").strip(),
                report=(row.get("report") or "").strip(),
                modality=(row.get("modality") or "").strip() or None))
    return items


def _from_folder(root: Path) -> list[CaseItem]:
    from ... import io as mio

    items: list[CaseItem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        if d.name.startswith("."):
            dirnames.clear()
            continue
        labels = _read_label_table(d)
        files = [d / f for f in sorted(filenames) if not f.startswith(".")]
        dicoms = [f for f in files if _is_dicom_file(f)]
        if dicoms:
            items.append(CaseItem(path=d, case_id=str(d.relative_to(root)) if d != root
                                  else root.name))
        for f in files:
            if f in dicoms or f.suffix.lower() in _SKIP_SUFFIXES:
                continue
            try:
                ok = mio.can_read(f)
            except Exception:  # a sniffer must never abort a walk
                ok = False
            if not ok:
                continue
            rel = str(f.relative_to(root))
            lab, rep = _lookup_labels(f, root, labels)
            items.append(CaseItem(path=f, case_id=rel, labels=lab, report=rep))
    return items


def _lookup_labels(f: Path, root: Path, local: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """Labels of ``f`` from a ``labels.csv`` in its folder or an ancestor (up to 2 levels
    above the input folder, so ``data/labels.csv`` naming ``patches/x.png`` labels
    ``data/patches`` inputs too)."""
    stop = {root, root.parent, root.parent.parent}
    anc = f.parent
    while True:
        table = local if anc == f.parent else _read_label_table(anc)
        rel = f.relative_to(anc).as_posix()
        if rel in table:
            return table[rel]
        if anc == root.parent.parent or anc == anc.parent or (
                anc not in stop and root not in anc.parents and anc != root):
            return "", ""
        anc = anc.parent


def collect_inputs(inputs: Iterable[str | Path]) -> list[CaseItem]:
    """Files, folders (recursive; a folder of DICOM files is one item, split into series on
    reading) and CSV files (``path``/``file`` column, optional ``labels``/``label``,
    ``report``, ``modality``, ``case_id``). ``labels.csv`` files found in folders label
    the images they name. Case ids are paths relative to the input folder."""
    from ... import io as mio

    items: list[CaseItem] = []
    for inp in inputs:
        p = Path(inp).expanduser()
        if not p.exists():
            raise MedfmError(f"{p}: no such file or folder")
        if p.is_file() and p.suffix.lower() == ".csv":
            items += _from_csv(p)
        elif p.is_dir():
            items += _from_folder(p)
        else:
            if not mio.can_read(p):
                raise MedfmError(f"{p.name}: not an image format napari-medfm reads")
            items.append(CaseItem(path=p, case_id=p.name))
    seen: dict[str, int] = {}
    keys: set[str] = set()
    out = []
    for it in items:
        if it.key in keys:
            continue
        keys.add(it.key)
        if it.case_id in seen:
            seen[it.case_id] += 1
            it.case_id = f"{it.case_id}~{seen[it.case_id]}"
        else:
            seen[it.case_id] = 0
        out.append(it)
    return out


# ---------------------------------------------------------------------------- embedding
def thumbnail_png(image: Any, *, size: int = 96, slice_index: Any = None,
                  modality: str | None = None) -> bytes | None:
    """Small PNG (max side ``size``) of what the encoder sees (windowed, 8-bit RGB)."""
    from PIL import Image

    from ...models import encoder2d

    try:
        rgb = encoder2d.unit_rgb_uint8(image, size=size, modality=modality,
                                       slice_index=slice_index)
    except MedfmError:
        return None
    im = Image.fromarray(rgb)
    im.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = _io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def read_item(item: CaseItem) -> list[tuple[CaseRecord, Any]]:
    """Read an input into (record, image) pairs; label maps are skipped."""
    from ... import io as mio
    from ...models import encoder2d

    images = [im for im in mio.read(item.path) if not getattr(im, "is_label", False)]
    if not images:
        raise MedfmError(f"{item.path.name}: no image inside")
    out = []
    for k, im in enumerate(images):
        cid, src = item.case_id, str(item.path)
        files = (im.metadata or {}).get("source_files") or []
        if len(images) > 1:
            if item.path.is_dir() and files:
                first = Path(files[0])
                cid = f"{item.case_id}/{first.name}" if len(files) == 1 else f"{item.case_id}#{k}"
                src = str(first) if len(files) == 1 else src
            else:
                cid = f"{item.case_id}#{k}"
        mod = item.modality or encoder2d.canonical_modality(im.modality) or im.modality
        out.append((CaseRecord(case_id=cid, source_path=src, modality=mod or "",
                               labels=item.labels, report=item.report, item_key=item.key,
                               extra={"image_index": k} if len(images) > 1 else {}), im))
    return out


def embedding_key(model: Any) -> str:
    """Which of ``model.embed``'s outputs an index stores: the joint image-text space for
    vision-language models that have one beside their image features (Merlin's 512-d
    ``contrastive_embedding``, so text queries search the same vectors), else
    ``image_embedding``."""
    if hasattr(model, "text_features") and hasattr(model, "zero_shot_from"):
        return "contrastive_embedding"
    return "image_embedding"


def model_dim(model: Any) -> int:
    """Embedding size of a loaded model; 0 when the model does not say (then the first
    committed chunk fixes the index's dimension)."""
    if embedding_key(model) != "image_embedding":
        return 0
    return int(getattr(model, "embedding_dim", 0) or 0)


def embed_images(model: Any, images: Sequence[Any], modalities: Sequence[str | None],
                 slice_index: Any = None) -> np.ndarray:
    """``(N, D)`` embeddings: ``embed_batch`` of the 2D encoders, or ``embed`` one image at a
    time for other registered encoders (e.g. Merlin on whole or cropped CT volumes)."""
    if hasattr(model, "embed_batch"):
        return model.embed_batch(list(images), modality=list(modalities),
                                 slice_index=slice_index)
    key = embedding_key(model)
    return np.stack([np.asarray(model.embed(im)[key], np.float32).reshape(-1)
                     for im in images])


def _embed_safely(model: Any, pairs: list[tuple[CaseRecord, Any]], slice_index: Any,
                  ) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
    """Embed a batch; on a model error fall back to one image at a time to isolate it.

    Returns (vectors of the good ones, their indices, (index, error) of the bad ones).
    """
    mods = [r.modality or None for r, _ in pairs]
    try:
        v = embed_images(model, [im for _, im in pairs], mods, slice_index)
        return v, list(range(len(pairs))), []
    except MedfmError:
        pass
    good, vecs, errs = [], [], []
    for i, (_r, im) in enumerate(pairs):
        try:
            vecs.append(embed_images(model, [im], [mods[i]], slice_index)[0])
            good.append(i)
        except MedfmError as exc:
            errs.append((i, str(exc)))
    return (np.stack(vecs) if vecs else None), good, errs


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based) -> (i, n); None -> from torchrun ``RANK``/``WORLD_SIZE`` if n > 1."""
    if text is None:
        ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if ws > 1:
            return int(os.environ.get("RANK", "0")), ws
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise MedfmError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise MedfmError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def shard_dir(index_dir: str | Path, i: int, n: int) -> Path:
    return Path(index_dir) / "shards" / f"{i:04d}-of-{n:04d}"


def build_index(
    index_dir: str | Path,
    model: Any,
    items: Sequence[CaseItem],
    *,
    chunk_size: int = 64,
    batch_size: int = 16,
    slice_index: int | str | None = None,
    shard: tuple[int, int] | None = None,
    finalize: bool = True,
    thumbnail_size: int = 96,
) -> Generator[Progress, None, BuildResult]:
    """Embed ``items`` into the index at ``index_dir`` (created or resumed).

    Yields ``Progress`` after every batch; commits every ``chunk_size`` items. Items that
    cannot be read/embedded are recorded as failures (with the cause) and skipped.
    """
    if chunk_size < 1 or batch_size < 1:
        raise MedfmError("chunk size and batch size must be >= 1")
    if shard is not None:
        i, n = shard
        items = list(items)[i::n]
        index_dir = shard_dir(index_dir, i, n)
    index_dir = Path(index_dir)
    wp = getattr(model, "weights_path", None)
    idx = CaseIndex.create_or_open(index_dir, model_id=model.spec.id,
                                   weights_sha256=model.weights_sha256, dim=model_dim(model),
                                   weights_path=str(wp) if wp else None)
    try:
        done = idx.done_item_keys()
        todo = [it for it in items if it.key not in done]
        res = BuildResult(index_dir=index_dir, skipped=len(items) - len(todo))
        total = len(todo)
        step = 0
        yield Progress(0, total, f"{res.skipped} already indexed" if res.skipped else "starting")
        for c0 in range(0, total, chunk_size):
            chunk = todo[c0:c0 + chunk_size]
            recs: list[CaseRecord] = []
            vecs: list[np.ndarray] = []
            fails: list[tuple[str, str]] = []
            for b0 in range(0, len(chunk), batch_size):
                batch = chunk[b0:b0 + batch_size]
                pairs: list[tuple[CaseRecord, Any]] = []
                owner: list[CaseItem] = []
                for it in batch:
                    try:
                        got = read_item(it)
                    except MedfmError as exc:
                        fails.append((it.key, str(exc)))
                        continue
                    pairs += got
                    owner += [it] * len(got)
                if pairs:
                    v, good, errs = _embed_safely(model, pairs, slice_index)
                    bad_items = {owner[i].key: err for i, err in errs}
                    for gi, vi in zip(good, range(len(good)), strict=False):
                        rec, im = pairs[gi]
                        if owner[gi].key in bad_items:
                            continue  # all-or-nothing per input item
                        spatial = len(getattr(im, "spatial_shape", ()))
                        rec.thumbnail = thumbnail_png(
                            im, size=thumbnail_size,
                            slice_index=slice_index if slice_index is not None or spatial != 3
                            else "middle",
                            modality=rec.modality or None)
                        recs.append(rec)
                        vecs.append(v[vi])
                    fails += list(bad_items.items())
                step += len(batch)
                yield Progress(step, total, f"embedded {step}/{total}")
            arr = np.stack(vecs) if vecs else np.zeros((0, max(idx.dim, 1)), np.float32)
            idx.add_chunk(arr, recs, model_id=model.spec.id,
                          weights_sha256=model.weights_sha256, failures=fails)
            res.added += len(recs)
            res.failed += fails
            for key, err in fails:
                log.warning("skipped %s: %s", Path(key).name, err)
            yield Progress(step, total, f"committed chunk ({res.added} cases)")
        if finalize:
            res.manifest = idx.finalize()
        return res
    finally:
        idx.close()


def merge_shards(index_dir: str | Path, shard_dirs: Sequence[str | Path] | None = None,
                 ) -> Generator[Progress, None, dict[str, Any]]:
    """Fold shard indexes (default: ``DIR/shards/*``) into ``DIR``; resumable, then finalise."""
    index_dir = Path(index_dir)
    dirs = [Path(d) for d in shard_dirs] if shard_dirs else sorted(
        p for p in (index_dir / "shards").glob("*") if p.is_dir())
    if not dirs:
        raise MedfmError(f"{index_dir}: no shard folders to merge (expected {index_dir}/shards/*)")
    shards = [CaseIndex.open(d) for d in dirs]
    try:
        first = shards[0]
        main = CaseIndex.create_or_open(index_dir, model_id=first.model_id,
                                        weights_sha256=first.weights_sha256, dim=first.dim,
                                        weights_path=first.weights_path)
        for s in shards[1:]:
            main.check_compatible(s.model_id, s.weights_sha256, s.dim)
        merged = {r[0] for r in main.conn.execute("SELECT source FROM chunks")}
        work = [(s, cid) for s in shards for cid in s.chunk_ids()]
        yield Progress(0, len(work), "merging shards")
        for n, (s, cid) in enumerate(work, start=1):
            tag = f"{s.root.name}:{cid}"
            if tag in merged:
                continue
            ids, vecs = s.load_chunk(cid)
            recs = s.records(ids.tolist())
            keep = [i for i, vid in enumerate(ids.tolist()) if vid in recs]
            fails = [(k, e) for k, e in s.conn.execute(
                "SELECT item_key, error FROM failures WHERE chunk_id=?", (cid,))]
            main.add_chunk(vecs[keep], [recs[int(ids[i])] for i in keep],
                           model_id=s.model_id, weights_sha256=s.weights_sha256,
                           failures=fails, source=tag)
            yield Progress(n, len(work), f"merged {tag}")
        man = main.finalize()
        main.close()
        return man
    finally:
        for s in shards:
            s.close()


def finalize_index(index_dir: str | Path) -> dict[str, Any]:
    """Bring the faiss file of an index folder up to date (after an interrupted build)."""
    with CaseIndex.open(index_dir) as idx:
        try:
            return idx.finalize()
        except IndexCorruptError:
            return idx.rebuild()
