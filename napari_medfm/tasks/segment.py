"""Segmentation task: model -> label map on the source geometry, statistics, sidecar, outputs.

Inference follows MONAI Label's shape: **pre** (orientation, spacing, intensity) -> **inferer**
(sliding window, :func:`~napari_medfm.tasks.sliding_window.sliding_window_gen`, one progress
event per window batch) -> **post** (activation, argmax) -> **inverse** (back onto the source
voxel grid, nearest neighbour for labels), so the result always shares the input's grid and a
napari Labels layer built from it sits exactly on the CT.

Everything here is a generator (``yield Progress``; ``return`` the result): the CLI drains it with
a progress bar, the widget runs it in a napari worker and cancels it between window batches.

Models:

* ``hu-basic`` - weights-free (registry spec), :mod:`napari_medfm.models.segmenters.hu_basic`.
* ``bundle:PATH`` - a local MONAI bundle folder (model-zoo layout), resolved here without a
  registry entry: :mod:`napari_medfm.models.segmenters.bundle`.
* ``totalsegmentator`` - optional extra, :mod:`napari_medfm.models.segmenters.totalseg`.

No Qt/napari imports; torch/MONAI only inside functions.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import label_sums
from ..errors import GeometryError, MedfmError, MixedSeriesError
from ..geometry import Geometry
from ..io.files import atomic_open, atomic_write_json
from ..io.types import MedicalImage
from ..models.segmenters.base import (  # noqa: F401 - re-exported: the segmentation API
    BUNDLE_PREFIX,
    NetworkSegmenter,
    Segmenter,
    SegmentSettings,
    WindowedSegmenter,
)
from ..progress import Progress
from ..runtime.checks import check_ct  # noqa: F401 - re-exported
from ..runtime.inference import (  # noqa: F401 - re-exported
    batches,
    geometry_of_metatensor,
    relay,
    resample_labels_to,
    to_metatensor,
)

#: The run report written beside every output: ``OUT.json``.
REPORT_SUFFIX = ".json"

#: Colours for label values without one (cycled), 0-255 RGB.
_PALETTE = [
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
]


def default_colors(label_names: dict[int, str]) -> dict[int, list[int]]:
    """A distinct colour for every label value (deterministic)."""
    return {int(v): list(_PALETTE[(int(v) - 1) % len(_PALETTE)]) for v in label_names if int(v)}


# ----------------------------------------------------------------------------- loading


def bundle_folder(name: str) -> Path | None:
    """The folder of a ``bundle:PATH`` model id (None for registry models)."""
    if not name.startswith(BUNDLE_PREFIX):
        return None
    folder = name[len(BUNDLE_PREFIX):]
    if not folder:
        raise MedfmError("bundle:PATH needs the path of a MONAI bundle folder, e.g. "
                         "bundle:/data/spleen_ct_segmentation")
    return Path(folder).expanduser()


def load_segmenter(name: str, weights: str | Path | None = None,
                   device: str | None = None) -> Segmenter:
    """A ready :class:`Segmenter` for ``hu-basic``, ``totalsegmentator`` or ``bundle:PATH``,
    from the process-wide model cache (:func:`napari_medfm.runtime.cache.get_model`).

    ``bundle:PATH`` is resolved directly (no registry entry): PATH is a local MONAI bundle
    folder with ``configs/inference.json``, ``configs/metadata.json`` and ``models/model.pt``
    (or ``model.ts``); ``weights`` then overrides the checkpoint file. A bundle runs only once
    it is trusted (:mod:`napari_medfm.runtime.trust`): its config is code.
    """
    from ..runtime.cache import cache_key, get_model, model_cache

    folder = bundle_folder(name)
    if folder is not None:
        from ..models.segmenters.bundle import BundleSegmenter
        from ..runtime.trust import bundle_hash

        if not folder.is_dir():
            raise MedfmError(f"{folder}: bundle folder not found")
        key = (*cache_key(name, weights, device), bundle_hash(folder))
        return model_cache.get_or_build(
            key, lambda: BundleSegmenter(folder, weights=weights, device=device))
    from ..runtime.registry import get_spec

    spec = get_spec(name)
    if "segment" not in spec.tasks:
        raise MedfmError(f"{name} is not a segmentation model (tasks: {', '.join(spec.tasks)}); "
                         "segmentation models: hu-basic, totalsegmentator, bundle:PATH")
    return get_model(name, weights=weights, device=device)


def segmenter_choices() -> list[str]:
    """Registered segmentation model ids (bundles are addressed as ``bundle:PATH``)."""
    from ..runtime.registry import list_specs

    return [s.id for s in list_specs(task="segment")]


# ----------------------------------------------------------------------------- result


@dataclass
class SegmentationResult:
    """A label map on the source grid plus everything needed to save or display it."""

    labels: np.ndarray
    geometry: Geometry
    label_names: dict[int, str]
    label_colors: dict[int, list[int]]
    model_id: str
    weights_sha256: str | None
    settings: dict[str, Any]
    elapsed_s: float
    source_name: str = "image"
    source_metadata: dict[str, Any] = field(default_factory=dict)
    #: per-label statistics (:func:`label_statistics`), filled by :func:`segment_image`
    stats: list[dict[str, Any]] = field(default_factory=list)
    _present: dict[int, str] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """Layer name: ``"<image> <model>"``."""
        return f"{self.source_name} {self.model_id}"

    def present_names(self, refresh: bool = False) -> dict[int, str]:
        """Names of the label values that occur (plus named values, value 0 excluded).

        Computed once (``np.unique`` over the whole map: done in the worker by
        :func:`segment_image`) and cached; ``refresh=True`` recomputes it after edits.
        """
        if self._present is not None and not refresh:
            return dict(self._present)
        vals = {int(v) for v in np.unique(self.labels) if v}
        names = {int(k): v for k, v in self.label_names.items() if int(k)}
        for v in vals:
            names.setdefault(v, f"label {v}")
        self._present = dict(sorted(names.items()))
        return dict(self._present)

    def to_medical_image(self) -> MedicalImage:
        """As a label :class:`MedicalImage` (metadata: source keys + label names/colours)."""
        md = {k: v for k, v in self.source_metadata.items()
              if k not in ("window", "geometry", "kind", "label_names", "label_colors")}
        md["label_names"] = self.present_names()
        md["label_colors"] = {int(k): list(v) for k, v in self.label_colors.items()}
        md["segmentation"] = {"model": self.model_id, "weights_sha256": self.weights_sha256,
                              "settings": self.settings}
        return MedicalImage(self.labels, self.geometry, modality="SEG", kind="volume",
                            name=self.name, metadata=md, is_label=True)


def segment(image: MedicalImage, model: Any,
            settings: SegmentSettings | None = None, *, weights: str | Path | None = None,
            ) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image``; yields progress, returns a :class:`SegmentationResult` on its grid."""
    settings = settings or SegmentSettings()
    t0 = time.perf_counter()
    seg = load_segmenter(model, weights=weights, device=settings.device) \
        if isinstance(model, str) else model
    seg.check_input(image)
    labels = yield from seg.run(image, settings)
    labels = np.asarray(labels)
    if tuple(labels.shape) != tuple(image.shape):
        raise GeometryError(f"{seg.model_id} returned labels of shape {labels.shape} for an image "
                            f"of shape {image.shape}: not on the source grid")
    if labels.dtype.kind not in "iub":
        raise MedfmError(f"{seg.model_id} returned non-integer labels ({labels.dtype})")
    top = int(labels.max()) if labels.size else 0
    labels = labels.astype(np.uint8 if top < 256 else np.uint16, copy=False)
    settings_d = settings.to_dict()
    settings_d.update(getattr(seg, "effective", {}) or {})  # what the model actually used
    settings_d["device"] = getattr(seg, "device_name", None) or settings.device or "cpu"
    colors = default_colors(seg.label_names)
    colors.update({int(k): list(v) for k, v in seg.label_colors.items()})
    return SegmentationResult(
        labels=labels, geometry=image.geometry,
        label_names={int(k): v for k, v in seg.label_names.items()}, label_colors=colors,
        model_id=seg.model_id, weights_sha256=seg.weights_sha256, settings=settings_d,
        elapsed_s=time.perf_counter() - t0, source_name=image.name,
        source_metadata=dict(image.metadata))


# ----------------------------------------------------------------------------- statistics


def label_statistics(labels: np.ndarray, intensities: np.ndarray | None, geometry: Geometry,
                     label_names: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Per-label voxel count, volume (mL) and mean/std intensity (HU for CT).

    One row per non-zero value present (plus named values, with zero volume when absent).
    """
    lab = np.asarray(labels)
    n = int(lab.max()) + 1 if lab.size else 1
    counts = label_sums(lab, n)  # chunked: a worker never holds the GIL for long
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    means = stds = None
    if intensities is not None:
        vals = np.asarray(intensities)
        if vals.size != lab.size:
            raise GeometryError(f"labels {lab.shape} and image {np.shape(intensities)} differ")
        sums = label_sums(lab, n, vals)
        sq = label_sums(lab, n, vals, squares=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
            stds = np.sqrt(np.maximum(sq / counts - means * means, 0.0))
    names = {int(k): v for k, v in (label_names or {}).items()}
    values = sorted({v for v in range(1, n) if counts[v]} | {v for v in names if v > 0})
    rows = []
    for v in values:
        c = int(counts[v]) if v < n else 0
        row: dict[str, Any] = {"value": v, "name": names.get(v, f"label {v}"), "voxels": c,
                               "volume_ml": round(c * voxel_ml, 4)}
        if means is not None:
            ok = c > 0 and v < n
            row["mean"] = round(float(means[v]), 2) if ok else None
            row["std"] = round(float(stds[v]), 2) if ok else None
        rows.append(row)
    return rows


STAT_COLUMNS = ("value", "name", "voxels", "volume_ml", "mean", "std")


def write_statistics_csv(rows: Sequence[dict[str, Any]], path: str | Path,
                         unit: str = "HU") -> Path:
    """Write statistics rows as CSV (atomic). Columns: value, name, voxels, volume_ml, mean/std."""
    header = ["value", "name", "voxels", "volume_ml", f"mean_{unit.lower()}", f"std_{unit.lower()}"]

    def _w(fh):
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow([r["value"], r["name"], r["voxels"], r["volume_ml"],
                        "" if r.get("mean") is None else r["mean"],
                        "" if r.get("std") is None else r["std"]])

    with atomic_open(path, "w", newline="") as fh:
        _w(fh)
    return Path(path)


def sidecar_dict(result: SegmentationResult, stats: Sequence[dict[str, Any]], *,
                 input_path: str | Path | None = None, output_path: str | Path | None = None,
                 image_shape: Sequence[int] | None = None, unit: str = "HU") -> dict[str, Any]:
    """The JSON run report written beside every ``medfm segment`` output."""
    from .. import __version__

    def _clean(x: Any) -> Any:
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return {
        "format": "napari-medfm-segmentation/1",
        "model": result.model_id,
        "weights_sha256": result.weights_sha256,
        "labels": {str(k): v for k, v in result.present_names().items()},
        "structures": [
            {"value": r["value"], "name": r["name"], "voxels": r["voxels"],
             "volume_ml": r["volume_ml"], f"mean_{unit.lower()}": _clean(r.get("mean")),
             f"std_{unit.lower()}": _clean(r.get("std"))}
            for r in stats
        ],
        "settings": result.settings,
        "input": {
            "path": None if input_path is None else str(input_path),
            "shape": list(image_shape) if image_shape is not None else list(result.labels.shape),
            "geometry": result.geometry.to_dict(),
            "orientation": result.geometry.orientation,
        },
        "output": None if output_path is None else str(output_path),
        "elapsed_s": round(result.elapsed_s, 3),
        "napari_medfm": __version__,
    }


def sidecar_path(output: str | Path) -> Path:
    """The run report beside an output: ``OUT.nii.gz`` -> ``OUT.json`` (also ``.nii``, ``.nrrd``,
    ``.mha``, ``.dcm``); the one stem rule of :func:`napari_medfm.io.writers.sidecar_path`
    (which names the label table ``OUT.labels.json`` the same way)."""
    from ..io.writers import sidecar_path as _sidecar

    return _sidecar(output, REPORT_SUFFIX)


def write_sidecar(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write the JSON run report (atomic)."""
    return atomic_write_json(path, doc, indent=2)


def save_labels(result: SegmentationResult, path: str | Path) -> Path:
    """Write the labels as NIfTI/NRRD/MHA (by extension) or DICOM-SEG (``.dcm``).

    DICOM-SEG needs the source DICOM files (``source_files`` in the source metadata, set by the
    DICOM reader): for other inputs a clear error says to pick a NIfTI/NRRD output instead.
    """
    p = Path(path)
    names = result.present_names(refresh=True)  # the labels may have been edited
    colors = {k: tuple(v) for k, v in result.label_colors.items() if k in names}
    if p.suffix.lower() == ".dcm":
        files = result.source_metadata.get("source_files")
        if not files:
            raise MedfmError(
                f"{p.name}: DICOM-SEG output needs a DICOM input (it references the source "
                f"series); {result.source_name!r} was not read from DICOM. Write .nii.gz, "
                ".nrrd or .mha instead.")
        from ..io.dicom_seg import write_dicom_seg

        return write_dicom_seg(p, result.labels, result.geometry, list(files),
                               label_names=names, label_colors=colors,
                               algorithm=f"napari-medfm {result.model_id}")
    from ..io.writers import write_labels

    return write_labels(p, result.labels, result.geometry, label_names=names,
                        label_colors=colors)


# ----------------------------------------------------------------------------- orchestration
# The one segmentation flow: ``medfm segment`` drains segment_file, the Segmentation dock runs
# segment_image (and save_outputs) in workers. Neither shell repeats any of it.


def segment_image(image: MedicalImage, model: Any, settings: SegmentSettings | None = None, *,
                  weights: str | Path | None = None,
                  ) -> Generator[Progress, None, SegmentationResult]:
    """Segment an in-memory image and compute its statistics (``result.stats``).

    ``image.data`` may be a lazy/array-like view of a layer: it is materialised here (in the
    caller's worker thread), never on the GUI thread.
    """
    if not isinstance(image.data, np.ndarray) and not image.multiscale:
        image = _materialised(image)
    result = yield from segment(image, model, settings, weights=weights)
    result.stats = label_statistics(result.labels, image.data, result.geometry,
                                    result.present_names())
    return result


def _materialised(image: MedicalImage) -> MedicalImage:
    from dataclasses import replace

    return replace(image, data=np.asarray(image.data))


def pick_volume(images: Sequence[MedicalImage], path: str | Path,
                series: int | None = None) -> MedicalImage:
    """The one 3D volume of a read (``series`` picks among several, else a clear error)."""
    path = Path(path)
    vols = [im for im in images if im.kind == "volume" and not im.is_label]
    if not vols:
        kinds = ", ".join(sorted({im.kind for im in images})) or "nothing"
        raise MedfmError(f"{path.name}: no 3D volume to segment (found {kinds})")
    if series is not None:
        if not 0 <= series < len(vols):
            raise MedfmError(f"--series {series}: {path.name} holds {len(vols)} volume(s)")
        return vols[series]
    if len(vols) > 1:
        listing = "; ".join(f"{i}: {im.name} {im.shape}" for i, im in enumerate(vols))
        raise MixedSeriesError(f"{path.name} holds {len(vols)} volumes ({listing}); choose one "
                               "with --series N")
    return vols[0]


def check_output(output: str | Path, image: MedicalImage | None = None,
                 source: str | Path | None = None) -> None:
    """Refuse an output name (or, given the image, an output it cannot go to) before any work."""
    out = Path(output)
    if out.suffix.lower() == ".json":
        raise MedfmError(f"{out.name}: give the label file (e.g. seg.nii.gz); the JSON report is "
                         "written beside it")
    if image is not None and out.suffix.lower() == ".dcm" \
            and not image.metadata.get("source_files"):
        what = Path(source).name if source is not None else repr(image.name)
        raise MedfmError(f"{out.name}: DICOM-SEG output needs a DICOM input; {what} is not "
                         "DICOM. Use --output OUT.nii.gz (or .nrrd/.mha) instead.")


@dataclass
class SegmentFileResult:
    """What :func:`segment_file` wrote."""

    result: SegmentationResult
    output: Path
    report: Path
    stats_csv: Path | None = None


def save_outputs(result: SegmentationResult, output: str | Path, *,
                 input_path: str | Path | None = None,
                 image_shape: Sequence[int] | None = None, report: bool = True,
                 stats_csv: str | Path | None = None) -> Generator[Progress, None, SegmentFileResult]:
    """Write the labels (NIfTI/NRRD/MHA/DICOM-SEG), the JSON run report and optional CSV."""
    n = 1 + int(report) + int(stats_csv is not None)
    yield Progress(0, n, f"writing {Path(output).name}")
    written = save_labels(result, output)
    side = sidecar_path(written)
    if report:
        yield Progress(1, n, "writing the run report")
        doc = sidecar_dict(result, result.stats, input_path=input_path, output_path=written,
                           image_shape=image_shape)
        side = write_sidecar(side, doc)
    csv_path = None
    if stats_csv is not None:
        csv_path = write_statistics_csv(result.stats, stats_csv)
    yield Progress(n, n, f"saved {written.name}")
    return SegmentFileResult(result=result, output=written, report=side, stats_csv=csv_path)


def segment_file(input_path: str | Path, output: str | Path, model: Any,
                 settings: SegmentSettings | None = None, *, weights: str | Path | None = None,
                 series: int | None = None, stats_csv: str | Path | None = None,
                 ) -> Generator[Progress, None, SegmentFileResult]:
    """Read ``input_path``, segment its volume and write ``output`` + ``OUT.json`` (+ CSV).

    The whole ``medfm segment`` flow; ``result.elapsed_s`` covers reading to writing.
    """
    from ..io import read

    t0 = time.perf_counter()
    src = Path(input_path)
    check_output(output)
    image = pick_volume(read(src), src, series)
    check_output(output, image, src)
    settings = settings or SegmentSettings()
    seg = load_segmenter(model, weights=weights, device=settings.device) \
        if isinstance(model, str) else model
    result = yield from segment_image(image, seg, settings)
    result.elapsed_s = time.perf_counter() - t0
    saved = yield from _quiet(save_outputs(result, output, input_path=src,
                                           image_shape=image.shape, stats_csv=stats_csv))
    return saved


def _quiet(gen: Generator[Progress, None, Any]) -> Generator[Progress, None, Any]:
    """Run a sub-task without re-yielding its progress (keeps the caller's bar total)."""
    from ..progress import drain

    return drain(gen)
    yield  # pragma: no cover - makes this a generator
