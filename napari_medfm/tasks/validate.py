"""Agreement metrics: segmentations against a reference, findings against cohort labels.

Segmentation (:func:`compare_label_maps`, :func:`validate_segmentations`)
-----------------------------------------------------------------------
Per structure: Dice, the 95th-percentile Hausdorff distance (``hd95_mm``) and the mean
(symmetric) surface distance (``asd_mm``) in millimetres on the reference's voxel spacing, and
the volumes of prediction and reference (mL). The numbers are MONAI's: Dice is
:func:`monai.metrics.compute_dice`, the distances come from
:func:`monai.metrics.utils.get_edge_surface_distance` with ``spacing=`` (the function
``compute_hausdorff_distance`` and ``compute_average_surface_distance`` call) and the same
percentile/mean reductions, so they equal ``compute_hausdorff_distance(..., percentile=95,
spacing=...)`` and ``compute_average_surface_distance(..., symmetric=True, spacing=...)``.
What makes it fast on a 100+ label map is only *where* MONAI is called: one pass over each
label map finds every structure's bounding box (:func:`scipy.ndimage.find_objects`), each
structure is cropped to the union of its two boxes plus a margin before MONAI sees it, and
the edges/distances are computed once for both distance metrics. Cropping changes no value:
all surface points and their nearest neighbours lie inside the union box.

Labels are matched by value, or by name through a mapping ``{pred_name: [ref_name, ...]}``
(YAML/JSON file, :func:`read_label_mapping`) so that a model's ``lungs`` is scored against
a reference's five lobes. A label present on one side only gets ``dice`` 0 and ``None``
distances. Grids that differ: the prediction is resampled onto the reference grid with
nearest neighbour (SimpleITK) and a note says so; grids that do not overlap in space are
refused (:class:`~napari_medfm.errors.GeometryError`).

Findings (:func:`findings_metrics`)
-----------------------------------
Per finding over a cohort: AUROC (scikit-learn) with a seeded percentile-bootstrap
confidence interval, sensitivity and specificity at a threshold, Brier score, and the points
of a calibration curve; :func:`save_findings_plots` draws ROC and calibration plots with
matplotlib (Agg) as PNG files.

No Qt or napari imports here; torch/MONAI/scipy/sklearn are imported on use.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, MedfmError
from ..geometry import Geometry
from ..io.types import MedicalImage
from ..progress import Progress

__all__ = [
    "SEG_COLUMNS",
    "FINDINGS_COLUMNS",
    "Structure",
    "CaseMetrics",
    "CohortMetrics",
    "FindingsResult",
    "load_label_map",
    "read_label_mapping",
    "structures_to_score",
    "align_to_reference",
    "segmentation_metrics",
    "monai_metrics_label_by_label",
    "compare_label_maps",
    "match_cases",
    "validate_segmentations",
    "write_seg_csv",
    "read_predictions",
    "read_labels_table",
    "findings_metrics",
    "write_findings_csv",
    "save_findings_plots",
]

#: Columns of a segmentation metrics row (the ``--json`` objects and the CSV header).
SEG_COLUMNS = ("case", "label", "dice", "hd95_mm", "asd_mm", "volume_pred_ml", "volume_ref_ml")

#: Columns of a findings metrics row.
FINDINGS_COLUMNS = ("finding", "n", "n_pos", "n_neg", "auroc", "auroc_ci_low", "auroc_ci_high",
                    "threshold", "sensitivity", "specificity", "brier")

#: Extensions of label files picked up when PRED/REF is a folder.
LABEL_FILE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm")

_MARGIN = 2  # voxels of context around each structure's box (MONAI's own crop uses 1)


# ============================================================================ label maps
def load_label_map(path: str | Path) -> MedicalImage:
    """Read a label file (NIfTI/NRRD/MHA/DICOM-SEG) as a label map with its structure names.

    Names come from the file itself (Slicer fields, DICOM-SEG segments) or its sidecar
    (``<stem>.labels.json``, ``<stem>.json``, ``labels*.json`` beside it).
    """
    from ..io import read
    from ..io.volume import SUFFIXES

    p = Path(path)
    if not p.exists():
        raise MedfmError(f"{p}: no such label file")
    name = p.name.lower()
    if any(name.endswith(s) for s in SUFFIXES):
        from ..io.volume import read as read_volume

        img = read_volume(p, as_labels=True)[0]
    else:
        images = read(p)
        labs = [im for im in images if im.is_label]
        if not labs:
            raise MedfmError(f"{p.name}: holds no label map (segmentation)")
        img = labs[0]
    arr = np.asarray(img.data)
    if img.geometry.ndim != 3 or arr.ndim != 3:
        raise MedfmError(f"{p.name}: a 3D label map is needed, got shape {arr.shape}")
    img.data = arr
    return img


def _names_of(img: MedicalImage) -> dict[int, str]:
    return {int(k): str(v) for k, v in (img.metadata.get("label_names") or {}).items()}


def read_label_mapping(source: str | Path | Mapping[str, Any]) -> dict[str, list[str]]:
    """A name mapping ``{pred_name: [ref_name, ...]}`` from a YAML/JSON file or a dict.

    A single string value means a one-element list. Raises :class:`MedfmError` naming the
    file for anything else.
    """
    where = "mapping"
    if isinstance(source, Mapping):
        doc: Any = source
    else:
        p = Path(source)
        where = p.name
        if not p.is_file():
            raise MedfmError(f"{p}: mapping file not found")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() == ".json":
                doc = json.loads(text)
            else:
                import yaml

                doc = yaml.safe_load(text)
        except Exception as exc:
            raise MedfmError(f"{where}: not valid YAML/JSON ({exc})") from exc
    if not isinstance(doc, Mapping) or not doc:
        raise MedfmError(f"{where}: expected 'pred_name: [ref_name, ...]' entries")
    out: dict[str, list[str]] = {}
    for k, v in doc.items():
        vals = [v] if isinstance(v, (str, int)) else v
        if not isinstance(vals, (list, tuple)) or not vals:
            raise MedfmError(f"{where}: entry {k!r} must be a reference name or a list of them")
        out[str(k)] = [str(x) for x in vals]
    return out


@dataclass
class Structure:
    """One row to score: a label name and the values that make it up on each side."""

    label: str
    pred_values: tuple[int, ...]
    ref_values: tuple[int, ...]


def _lookup(name: str, names: Mapping[int, str]) -> int | None:
    low = name.strip().lower()
    for v, n in names.items():
        if n.strip().lower() == low:
            return int(v)
    if low.isdigit():  # a bare value is allowed too
        return int(low)
    return None


def structures_to_score(pred_values: Iterable[int], ref_values: Iterable[int],
                        pred_names: Mapping[int, str], ref_names: Mapping[int, str],
                        mapping: Mapping[str, Sequence[str]] | None = None,
                        ) -> tuple[list[Structure], list[str]]:
    """Which (pred values, ref values) pairs to score, plus messages about unknown names.

    Without ``mapping``: every non-zero value present on either side, matched by value and
    named by the reference (else the prediction, else ``label N``). With it: one row per
    mapping entry; names not found are reported and skipped, the others are kept.
    """
    msgs: list[str] = []
    pv, rv = set(int(v) for v in pred_values), set(int(v) for v in ref_values)
    if mapping is None:
        rows = []
        for v in sorted((pv | rv) - {0}):
            label = ref_names.get(v) or pred_names.get(v) or f"label {v}"
            rows.append(Structure(label, (v,), (v,)))
        return rows, msgs
    rows = []
    for pred_name, ref_list in mapping.items():
        p = _lookup(pred_name, pred_names)
        if p is None:
            known = ", ".join(sorted(pred_names.values())[:12]) or "none"
            msgs.append(f"prediction has no label named {pred_name!r} (known: {known}); "
                        "entry skipped")
            continue
        refs, missing = [], []
        for rn in ref_list:
            r = _lookup(rn, ref_names)
            (missing if r is None else refs).append(rn if r is None else r)
        if missing:
            msgs.append(f"reference has no label named {', '.join(map(repr, missing))} "
                        f"(mapping entry {pred_name!r})"
                        + ("; scored against the others" if refs else "; entry skipped"))
        if not refs:
            continue
        rows.append(Structure(pred_name, (p,), tuple(sorted(set(refs)))))
    return rows, msgs


# ============================================================================ grids
def _overlaps(src: Geometry, src_shape: Sequence[int], dst: Geometry,
              dst_shape: Sequence[int]) -> bool:
    """Whether the field of view of grid ``src`` intersects grid ``dst`` (physical space)."""
    nx, ny, nz = (int(s) for s in reversed(tuple(src_shape)))
    corners = np.array([[i, j, k] for i in (-0.5, nx - 0.5) for j in (-0.5, ny - 0.5)
                        for k in (-0.5, nz - 0.5)], dtype=float)
    phys = np.array([src.index_to_physical(c) for c in corners])
    idx = np.array([dst.physical_to_index(p) for p in phys])
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    ext = np.array(list(reversed(tuple(dst_shape))), dtype=float)
    return bool(np.all(hi > -0.5) and np.all(lo < ext - 0.5))


def align_to_reference(pred: MedicalImage, ref: MedicalImage) -> tuple[np.ndarray, list[str]]:
    """The prediction's labels on the reference grid, plus a note when it had to be resampled.

    Same grid: returned as is. Different grid that overlaps the reference in space:
    nearest-neighbour resampling (SimpleITK; outside the prediction's field of view = 0).
    No overlap: :class:`GeometryError`.
    """
    from ..runtime.inference import resample_labels_to

    p_arr, r_arr = np.asarray(pred.data), np.asarray(ref.data)
    if pred.geometry.same_grid(ref.geometry, p_arr.shape, r_arr.shape):
        return p_arr, []
    if not _overlaps(pred.geometry, p_arr.shape, ref.geometry, r_arr.shape):
        raise GeometryError(
            f"{pred.name} and {ref.name} do not overlap in space (prediction grid "
            f"{pred.geometry!r} {p_arr.shape}, reference grid {ref.geometry!r} {r_arr.shape}); "
            "is it the right case?")
    xyz = np.transpose(p_arr, (2, 1, 0))
    out = resample_labels_to(xyz, pred.geometry, ref.geometry, r_arr.shape)
    note = (f"{pred.name}: grid {p_arr.shape} {pred.geometry!r} differs from the reference "
            f"{r_arr.shape} {ref.geometry!r}; resampled onto the reference grid "
            "(nearest neighbour)")
    top = int(p_arr.max()) if p_arr.size else 0
    return out.astype(p_arr.dtype if top < 65536 else np.int32, copy=False), [note]


# ============================================================================ metrics
def _spacing_zyx(geometry: Geometry) -> tuple[float, ...]:
    return tuple(float(s) for s in reversed(geometry.spacing))


def _boxes(arr: np.ndarray) -> list[tuple[slice, ...] | None]:
    from scipy import ndimage

    a = np.asarray(arr)
    if a.size == 0 or int(a.max()) == 0:
        return []
    if a.dtype.kind not in "iu" or a.dtype.itemsize > 4:
        a = a.astype(np.int32)
    return ndimage.find_objects(a)


def _union_box(boxes: Sequence[tuple[slice, ...] | None], values: Iterable[int],
               acc: list[list[int]] | None) -> list[list[int]] | None:
    for v in values:
        b = boxes[v - 1] if 0 < v <= len(boxes) else None
        if b is None:
            continue
        if acc is None:
            acc = [[s.start, s.stop] for s in b]
        else:
            for i, s in enumerate(b):
                acc[i][0] = min(acc[i][0], s.start)
                acc[i][1] = max(acc[i][1], s.stop)
    return acc


def _mask(arr: np.ndarray, values: Sequence[int]) -> np.ndarray:
    return arr == values[0] if len(values) == 1 else np.isin(arr, values)


def _percentile(d: Any, q: float | None) -> float:
    """MONAI's percentile Hausdorff reduction of one direction's distances."""
    try:
        from monai.metrics.hausdorff_distance import _compute_percentile_hausdorff_distance

        return float(_compute_percentile_hausdorff_distance(d, q))
    except ImportError:  # pragma: no cover - older/newer MONAI layout
        import torch

        if d.numel() == 0:
            return float("nan")
        return float(d.max() if not q else torch.quantile(d.float(), q / 100.0))


def _pair_metrics(p: np.ndarray, r: np.ndarray, spacing: Sequence[float],
                  hd_percentile: float | None) -> tuple[float, float | None, float | None]:
    """(dice, hd, asd) of two boolean masks on one grid, via MONAI (both non-empty)."""
    import torch
    from monai.metrics import compute_dice
    from monai.metrics.utils import get_edge_surface_distance

    tp = torch.from_numpy(np.ascontiguousarray(p))
    tr = torch.from_numpy(np.ascontiguousarray(r))
    dice = float(compute_dice(tp[None, None].float(), tr[None, None].float(),
                              include_background=True)[0, 0])
    _, dists, _ = get_edge_surface_distance(tp, tr, distance_metric="euclidean",
                                            spacing=list(spacing), symmetric=True)
    hd = max(_percentile(d, hd_percentile) for d in dists)
    allv = torch.cat(dists)
    asd = float(allv.mean()) if allv.numel() else float("nan")
    return dice, _finite(hd), _finite(asd)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _present(boxes: Sequence[tuple[slice, ...] | None]) -> list[int]:
    return [i + 1 for i, b in enumerate(boxes) if b is not None]


def _crop(box: list[list[int]], shape: Sequence[int], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(0, a - margin), min(shape[k], b + margin))
                 for k, (a, b) in enumerate(box))


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float],
                         structures: Sequence[Structure] | None = None, *,
                         hd_percentile: float | None = 95, case: str = "",
                         boxes: tuple[Any, Any] | None = None,
                         ) -> Generator[Progress, None, list[dict[str, Any]]]:
    """Per-structure rows (:data:`SEG_COLUMNS`) for two label maps on one grid (numpy order).

    One pass over each map finds every structure's box; masks, voxel counts and MONAI's
    metrics are then computed on each structure's crop only. ``hd_percentile=None`` (or 100)
    gives the full Hausdorff distance (under ``hd95_mm``). Yields one :class:`Progress` per
    structure.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise GeometryError(f"prediction {pred.shape} and reference {ref.shape} differ in shape "
                            "(align them first)")
    pb, rb = boxes if boxes is not None else (_boxes(pred), _boxes(ref))
    if structures is None:
        structures, _ = structures_to_score(_present(pb), _present(rb), {}, {})
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    n = len(structures)
    yield Progress(0, n, f"{case}: {n} structures" if case else f"{n} structures")
    rows = []
    shape = pred.shape
    for i, s in enumerate(structures):
        bp = _union_box(pb, s.pred_values, None)
        br = _union_box(rb, s.ref_values, None)
        row: dict[str, Any] = {"case": case, "label": s.label, "dice": None, "hd95_mm": None,
                               "asd_mm": None, "volume_pred_ml": 0.0, "volume_ref_ml": 0.0}
        if bp is None and br is None:
            row["note"] = "absent on both sides"
        elif bp is None or br is None:
            only = pred if br is None else ref
            vals = s.pred_values if br is None else s.ref_values
            vox = int(_mask(only[_crop(bp or br, shape, 0)], vals).sum())
            row["volume_pred_ml" if br is None else "volume_ref_ml"] = round(vox * voxel_ml, 4)
            row["dice"] = 0.0
            row["note"] = "missing in the prediction" if bp is None else "missing in the reference"
        else:
            box = _union_box(rb, s.ref_values, [list(x) for x in bp])
            sl = _crop(box, shape, _MARGIN)
            mp, mr = _mask(pred[sl], s.pred_values), _mask(ref[sl], s.ref_values)
            row["volume_pred_ml"] = round(int(mp.sum()) * voxel_ml, 4)
            row["volume_ref_ml"] = round(int(mr.sum()) * voxel_ml, 4)
            dice, hd, asd = _pair_metrics(mp, mr, spacing_zyx, hd_percentile)
            row.update(dice=dice, hd95_mm=hd, asd_mm=asd)
        rows.append(row)
        yield Progress(i + 1, n, s.label)
    return rows


def monai_metrics_label_by_label(pred: np.ndarray, ref: np.ndarray,
                                 spacing_zyx: Sequence[float], values: Iterable[int],
                                 ) -> list[dict[str, Any]]:
    """The plain way (reference and benchmark baseline): MONAI's three metric functions on
    full-size one-hot masks, one label at a time."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
    )

    out = []
    sp = list(spacing_zyx)
    for v in values:
        p = torch.from_numpy(np.asarray(pred) == v)[None, None].float()
        r = torch.from_numpy(np.asarray(ref) == v)[None, None].float()
        out.append({
            "value": int(v),
            "dice": float(compute_dice(p, r, include_background=True)[0, 0]),
            "hd95_mm": float(compute_hausdorff_distance(p, r, include_background=True,
                                                        percentile=95, spacing=sp)[0, 0]),
            "asd_mm": float(compute_average_surface_distance(p, r, include_background=True,
                                                             symmetric=True, spacing=sp)[0, 0]),
        })
    return out


@dataclass
class CaseMetrics:
    """Rows of one case plus what was noticed on the way (resampling, unknown names)."""

    case: str
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def compare_label_maps(pred: MedicalImage, ref: MedicalImage, *,
                       mapping: Mapping[str, Sequence[str]] | None = None, case: str = "",
                       hd_percentile: float | None = 95,
                       ) -> Generator[Progress, None, CaseMetrics]:
    """Score a predicted label map against a reference (any grids that overlap)."""
    arr, notes = align_to_reference(pred, ref)
    r_arr = np.asarray(ref.data)
    pn, rn = _names_of(pred), _names_of(ref)
    boxes = (_boxes(arr), _boxes(r_arr))
    structs, msgs = structures_to_score(_present(boxes[0]), _present(boxes[1]), pn, rn, mapping)
    notes += msgs
    rows = yield from segmentation_metrics(arr, r_arr, _spacing_zyx(ref.geometry), structs,
                                           hd_percentile=hd_percentile, case=case, boxes=boxes)
    return CaseMetrics(case, rows, notes)


# ============================================================================ cohorts
def _label_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        low = f.name.lower()
        if f.name.startswith(".") or not f.is_file():
            continue
        suf = next((s for s in LABEL_FILE_SUFFIXES if low.endswith(s) and len(low) > len(s)),
                   None)
        if suf is None:
            continue
        out.setdefault(case_key(f), f)
    return out


def case_key(path: str | Path) -> str:
    """Case name of a label file: the file name without its format and a ``.seg`` suffix."""
    name = Path(path).name
    low = name.lower()
    for s in LABEL_FILE_SUFFIXES:
        if low.endswith(s) and len(low) > len(s):
            name = name[: -len(s)]
            break
    for tail in (".seg", "_seg"):
        if name.lower().endswith(tail) and len(name) > len(tail):
            name = name[: -len(tail)]
    return name


def match_cases(pred: str | Path, ref: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Pair prediction and reference files: two files, or two folders matched by file name."""
    p, r = Path(pred), Path(ref)
    for x, what in ((p, "--pred"), (r, "--ref")):
        if not x.exists():
            raise MedfmError(f"{what} {x}: no such file or folder")
    if p.is_file() and r.is_file():
        return [(case_key(r), p, r)], []
    if p.is_dir() != r.is_dir():
        # a DICOM-SEG folder can stand for one label file; otherwise both must be folders
        if p.is_dir() and not _label_files(p):
            return [(case_key(r), p, r)], []
        if r.is_dir() and not _label_files(r):
            return [(r.name, p, r)], []
        raise MedfmError("--pred and --ref must both be files or both be folders")
    pf, rf = _label_files(p), _label_files(r)
    if not rf:
        raise MedfmError(f"{r}: no label files (NIfTI/NRRD/MHA/DICOM-SEG) in the folder")
    msgs = []
    pairs = [(k, pf[k], rf[k]) for k in sorted(rf) if k in pf]
    miss_pred = sorted(set(rf) - set(pf))
    miss_ref = sorted(set(pf) - set(rf))
    if miss_pred:
        msgs.append(f"{len(miss_pred)} reference case(s) have no prediction: "
                    + ", ".join(miss_pred[:10]) + (" ..." if len(miss_pred) > 10 else ""))
    if miss_ref:
        msgs.append(f"{len(miss_ref)} prediction(s) have no reference: "
                    + ", ".join(miss_ref[:10]) + (" ..." if len(miss_ref) > 10 else ""))
    if not pairs:
        raise MedfmError(f"no case of {p} matches a reference file name in {r}")
    return pairs, msgs


@dataclass
class CohortMetrics:
    """All rows of a cohort, and every message (missing cases, resampling, bad files)."""

    rows: list[dict[str, Any]]
    messages: list[str]
    failed: list[str] = field(default_factory=list)


def validate_segmentations(pred: str | Path, ref: str | Path, *,
                           mapping: str | Path | Mapping[str, Any] | None = None,
                           hd_percentile: float | None = 95,
                           ) -> Generator[Progress, None, CohortMetrics]:
    """Score label files or folders (``medfm validate seg``); a bad case is reported and
    skipped, the other cases are kept."""
    mp = None if mapping is None else read_label_mapping(mapping)
    pairs, messages = match_cases(pred, ref)
    rows: list[dict[str, Any]] = []
    failed = []
    n = len(pairs)
    yield Progress(0, n, f"{n} case(s)")
    for i, (case, pf, rf) in enumerate(pairs):
        try:
            p_img, r_img = load_label_map(pf), load_label_map(rf)
            gen = compare_label_maps(p_img, r_img, mapping=mp, case=case,
                                     hd_percentile=hd_percentile)
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    res = stop.value
                    break
            rows.extend(res.rows)
            messages.extend(f"{case}: {m}" if not m.startswith(case) else m for m in res.notes)
        except MedfmError as exc:
            failed.append(case)
            messages.append(f"{case}: skipped: {exc}")
        except Exception as exc:  # one unreadable case must not lose the others
            failed.append(case)
            messages.append(f"{case}: skipped: {type(exc).__name__}: {exc}")
        yield Progress(i + 1, n, case)
    return CohortMetrics(rows, messages, failed)


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    from ..io.writers import atomic_write

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def _w(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in rows:
                w.writerow([_fmt(r.get(c)) for c in header])

    return atomic_write(p, _w)


def write_seg_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write segmentation rows as CSV (:data:`SEG_COLUMNS`, empty cell = null); atomic."""
    return _write_csv(path, SEG_COLUMNS, rows)


# ============================================================================ findings
_CASE_COLUMNS = ("case", "id", "image", "file", "path", "filename")


def _read_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    p = Path(path)
    if not p.is_file():
        raise MedfmError(f"{p}: CSV file not found")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = [dict(r) for r in reader]
        header = list(reader.fieldnames or [])
    if not header:
        raise MedfmError(f"{p.name}: empty CSV")
    return header, rows


def _case_column(header: Sequence[str], where: str) -> str:
    low = {h.lower(): h for h in header}
    for c in _CASE_COLUMNS:
        if c in low:
            return low[c]
    raise MedfmError(f"{where}: needs a case column (one of {', '.join(_CASE_COLUMNS)}); "
                     f"has {', '.join(header)}")


def _num(x: Any) -> float | None:
    try:
        v = float(str(x).strip())
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_predictions(path: str | Path) -> dict[str, dict[str, float]]:
    """``{finding: {case: probability}}`` from a long (``case, finding, probability``) or
    wide (``case, <finding>, <finding>, ...``) CSV."""
    p = Path(path)
    header, rows = _read_rows(p)
    cc = _case_column(header, p.name)
    low = {h.lower(): h for h in header}
    out: dict[str, dict[str, float]] = {}
    if "finding" in low:
        pc = next((low[c] for c in ("probability", "prob", "score") if c in low), None)
        if pc is None:
            raise MedfmError(f"{p.name}: long format needs a 'probability' (or 'score') column")
        for r in rows:
            v = _num(r.get(pc))
            if v is not None:
                out.setdefault(r[low["finding"]].strip(), {})[r[cc].strip()] = v
        return out
    for h in header:
        if h == cc:
            continue
        vals = {r[cc].strip(): _num(r.get(h)) for r in rows}
        if vals and all(v is not None for v in vals.values()):
            out[h.strip()] = vals  # type: ignore[assignment]
    if not out:
        raise MedfmError(f"{p.name}: no numeric finding columns")
    return out


def _truthy(x: str) -> bool | None:
    s = str(x).strip().lower()
    if s in ("1", "1.0", "true", "yes", "y", "positive", "pos"):
        return True
    if s in ("0", "0.0", "false", "no", "n", "negative", "neg"):
        return False
    return None


def read_labels_table(path: str | Path) -> dict[str, dict[str, int]]:
    """``{finding: {case: 0/1}}`` from a labels CSV in one of three layouts.

    * long binary: ``case, finding, label`` with label 0/1;
    * wide binary: ``case, <finding>, ...`` with 0/1 cells;
    * class names (the corpus ``labels.csv``): ``case/file, label`` where ``label`` is the
      name of what the case shows; one or more rows per case. Finding F is positive for a
      case whose labels include F and negative for every other case.
    """
    p = Path(path)
    header, rows = _read_rows(p)
    cc = _case_column(header, p.name)
    low = {h.lower(): h for h in header}
    out: dict[str, dict[str, int]] = {}
    lab = next((low[c] for c in ("label", "value", "target") if c in low), None)
    if "finding" in low and lab:
        for r in rows:
            t = _truthy(r.get(lab, ""))
            if t is not None:
                out.setdefault(r[low["finding"]].strip(), {})[r[cc].strip()] = int(t)
        return out
    if lab and not all(_truthy(r.get(lab, "")) is not None for r in rows):
        cases: dict[str, set[str]] = {}
        for r in rows:
            cases.setdefault(r[cc].strip(), set()).add(r[lab].strip())
        for f in sorted(set().union(*cases.values())):
            out[f] = {c: int(f in s) for c, s in cases.items()}
        return out
    for h in header:
        if h == cc:
            continue
        vals = {r[cc].strip(): _truthy(r.get(h, "")) for r in rows}
        if vals and all(v is not None for v in vals.values()):
            out[h.strip()] = {c: int(v) for c, v in vals.items()}  # type: ignore[arg-type]
    if not out:
        raise MedfmError(f"{p.name}: no 0/1 label columns, 'finding,label' rows or class-name "
                         "'label' column")
    return out


@dataclass
class FindingsResult:
    rows: list[dict[str, Any]]
    messages: list[str]
    #: per finding: {"y": [...], "p": [...]} (for plots)
    data: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _bootstrap_auc(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int,
                   ci: float) -> tuple[float | None, float | None]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = len(y)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yb = y[idx]
        if yb.min() == yb.max():
            continue  # a resample with one class has no AUROC
        aucs.append(roc_auc_score(yb, p[idx]))
    if len(aucs) < max(10, n_boot // 10):
        return None, None
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(aucs, [a, 1.0 - a])
    return float(lo), float(hi)


def findings_metrics(preds: str | Path | Mapping[str, Mapping[str, float]],
                     labels: str | Path | Mapping[str, Mapping[str, int]], *,
                     threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                     ci: float = 0.95, findings: Sequence[str] | None = None,
                     ) -> FindingsResult:
    """Per-finding AUROC (+ bootstrap CI), sensitivity/specificity at ``threshold``, Brier.

    Findings are matched by name (case-insensitive) and cases by id; unmatched ones are
    reported in ``messages`` and the rest is scored. A finding whose cases are all positive or
    all negative gets ``None`` for AUROC (and a message).
    """
    from sklearn.metrics import brier_score_loss, roc_auc_score

    P = read_predictions(preds) if not isinstance(preds, Mapping) else preds
    L = read_labels_table(labels) if not isinstance(labels, Mapping) else labels
    lmap = {k.lower(): k for k in L}
    msgs: list[str] = []
    rows: list[dict[str, Any]] = []
    data: dict[str, dict[str, np.ndarray]] = {}
    wanted = list(findings) if findings else list(P)
    for f in wanted:
        if f not in P:
            msgs.append(f"{f}: no predictions for this finding")
            continue
        lk = lmap.get(f.lower())
        if lk is None:
            msgs.append(f"{f}: no labels for this finding (labels have: "
                        + ", ".join(sorted(L)[:12]) + ")")
            continue
        cases = [c for c in P[f] if c in L[lk]]
        missing = len(set(L[lk]) - set(P[f]))
        if missing:
            msgs.append(f"{f}: {missing} labelled case(s) have no prediction (left out)")
        extra = len(set(P[f]) - set(L[lk]))
        if extra:
            msgs.append(f"{f}: {extra} predicted case(s) have no label (left out)")
        if not cases:
            msgs.append(f"{f}: no case has both a prediction and a label")
            continue
        y = np.array([L[lk][c] for c in cases], dtype=int)
        p = np.array([P[f][c] for c in cases], dtype=float)
        npos = int(y.sum())
        row: dict[str, Any] = {"finding": f, "n": len(y), "n_pos": npos, "n_neg": len(y) - npos,
                               "auroc": None, "auroc_ci_low": None, "auroc_ci_high": None,
                               "threshold": threshold}
        if 0 < npos < len(y):
            row["auroc"] = float(roc_auc_score(y, p))
            row["auroc_ci_low"], row["auroc_ci_high"] = _bootstrap_auc(y, p, n_boot, seed, ci)
        else:
            msgs.append(f"{f}: all {len(y)} cases are "
                        + ("positive" if npos else "negative") + "; AUROC undefined")
        pred_pos = p >= threshold
        row["sensitivity"] = float(pred_pos[y == 1].mean()) if npos else None
        row["specificity"] = float((~pred_pos[y == 0]).mean()) if npos < len(y) else None
        row["brier"] = (float(brier_score_loss(y, p)) if np.all((p >= 0) & (p <= 1))
                        else None)
        rows.append(row)
        data[f] = {"y": y, "p": p}
    if not rows:
        raise MedfmError("no finding could be scored: " + "; ".join(msgs))
    return FindingsResult(rows, msgs, data)


def write_findings_csv(result: FindingsResult, path: str | Path) -> Path:
    return _write_csv(path, FINDINGS_COLUMNS, result.rows)


def findings_figures(result: FindingsResult, n_bins: int = 10) -> dict[str, bytes]:
    """``{"roc": png_bytes, "calibration": png_bytes}`` drawn with matplotlib's Agg backend."""
    from matplotlib.figure import Figure
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    out = {}
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for r in result.rows:
        d = result.data.get(r["finding"])
        if d is None or r["auroc"] is None:
            continue
        fpr, tpr, _ = roc_curve(d["y"], d["p"])
        ax.plot(fpr, tpr, label=f"{r['finding']} (AUROC {r['auroc']:.2f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC")
    ax.legend(loc="lower right", fontsize=7)
    out["roc"] = _png(fig)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    for r in result.rows:
        d = result.data.get(r["finding"])
        if d is None or d["y"].min() == d["y"].max() or not np.all((d["p"] >= 0) & (d["p"] <= 1)):
            continue
        frac, mean = calibration_curve(d["y"], d["p"], n_bins=n_bins, strategy="uniform")
        ax.plot(mean, frac, marker="o", label=r["finding"])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title("Calibration")
    ax.legend(loc="upper left", fontsize=7)
    out["calibration"] = _png(fig)
    return out


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_findings_plots(result: FindingsResult, csv_path: str | Path) -> dict[str, Path]:
    """Write ``<csv stem>.roc.png`` and ``<csv stem>.calibration.png`` next to ``csv_path``."""
    from ..io.writers import atomic_write

    base = Path(csv_path)
    stem = base.name[:-4] if base.name.lower().endswith(".csv") else base.name
    paths = {}
    for kind, png in findings_figures(result).items():
        target = base.with_name(f"{stem}.{kind}.png")
        atomic_write(target, lambda tmp, b=png: tmp.write_bytes(b))
        paths[kind] = target
    return paths
