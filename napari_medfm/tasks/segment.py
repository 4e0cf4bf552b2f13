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
import json
import math
import os
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GeometryError, MedfmError, WrongModalityError
from ..geometry import Geometry
from ..io.types import MedicalImage
from ..progress import Progress

BUNDLE_PREFIX = "bundle:"

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


@dataclass
class SegmentSettings:
    """User-tunable inference settings (ignored by models they do not apply to)."""

    roi_size: tuple[int, ...] | None = None  # None: the model's own default
    overlap: float | None = None  # None: the model's default (0.25 unless a bundle says)
    sw_batch_size: int | None = None  # None: the model's default (1 unless a bundle says)
    device: str | None = None  # None/"auto": cuda > mps > cpu
    precision: str = "fp32"  # fp32 | fp16 | bf16 | auto

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi_size"] = list(self.roi_size) if self.roi_size else None
        return d


class Segmenter:
    """A segmentation model that labels a :class:`MedicalImage` on its own voxel grid."""

    model_id: str = "segmenter"
    label_names: dict[int, str]
    label_colors: dict[int, list[int]]
    weights_sha256: str | None = None
    default_roi: tuple[int, ...] | None = None
    uses_windows: bool = False

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "weights_sha256": self.weights_sha256,
                "labels": {int(k): v for k, v in self.label_names.items()}}

    def check_input(self, image: MedicalImage) -> None:
        """Refuse images the model is not made for (raise :class:`WrongModalityError`)."""
        if image.kind != "volume" or image.rgb or image.multiscale or len(image.shape) != 3:
            raise WrongModalityError(
                f"{self.model_id} segments 3D volumes; {image.name!r} is a {image.kind} of shape "
                f"{image.shape}")

    def run(self, image: MedicalImage,
            settings: SegmentSettings) -> Generator[Progress, None, np.ndarray]:
        """Yield progress; return integer labels with ``image``'s shape (numpy order)."""
        raise NotImplementedError


def check_ct(image: MedicalImage, model_id: str) -> None:
    """CT (or an unlabelled volume that looks like HU) only."""
    units = str(image.metadata.get("units", "")).upper()
    if image.modality == "CT" or units == "HU":
        return
    if image.modality in ("OT", "", None):
        arr = np.asarray(image.data)
        if arr.size and float(arr.min()) < -500:  # air in HU
            return
    raise WrongModalityError(
        f"{model_id} is a CT model (Hounsfield units) but {image.name!r} is {image.modality}"
        f"{' with units ' + units if units else ''}; use a model for that modality")


# ----------------------------------------------------------------------------- loading


def load_segmenter(name: str, weights: str | Path | None = None,
                   device: str | None = None) -> Segmenter:
    """A ready :class:`Segmenter` for ``hu-basic``, ``totalsegmentator`` or ``bundle:PATH``.

    ``bundle:PATH`` is resolved directly (no registry entry): PATH is a local MONAI bundle
    folder with ``configs/inference.json``, ``configs/metadata.json`` and ``models/model.pt``
    (or ``model.ts``); ``weights`` then overrides the checkpoint file.
    """
    if name.startswith(BUNDLE_PREFIX):
        from ..models.segmenters.bundle import BundleSegmenter

        folder = name[len(BUNDLE_PREFIX):]
        if not folder:
            raise MedfmError("bundle:PATH needs the path of a MONAI bundle folder, e.g. "
                             "bundle:/data/spleen_ct_segmentation")
        return BundleSegmenter(folder, weights=weights, device=device)
    from ..runtime.registry import get_spec, load_model

    spec = get_spec(name)
    if "segment" not in spec.tasks:
        raise MedfmError(f"{name} is not a segmentation model (tasks: {', '.join(spec.tasks)}); "
                         "segmentation models: hu-basic, totalsegmentator, bundle:PATH")
    return load_model(name, weights=weights, device=device)


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

    @property
    def name(self) -> str:
        """Layer name: ``"<image> <model>"``."""
        return f"{self.source_name} {self.model_id}"

    def present_names(self) -> dict[int, str]:
        """Names of the label values that occur (plus named values, value 0 excluded)."""
        vals = {int(v) for v in np.unique(self.labels) if v}
        names = {int(k): v for k, v in self.label_names.items() if int(k)}
        for v in vals:
            names.setdefault(v, f"label {v}")
        return dict(sorted(names.items()))

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


def segment(image: MedicalImage, model: Segmenter | str,
            settings: SegmentSettings | None = None, *, weights: str | Path | None = None,
            ) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image``; yields progress, returns a :class:`SegmentationResult` on its grid."""
    settings = settings or SegmentSettings()
    t0 = time.perf_counter()
    seg = model if isinstance(model, Segmenter) else load_segmenter(model, weights=weights,
                                                                   device=settings.device)
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
    flat = lab.ravel().astype(np.int64)
    n = int(flat.max()) + 1 if flat.size else 1
    counts = np.bincount(flat, minlength=n)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    means = stds = None
    if intensities is not None:
        vals = np.asarray(intensities, dtype=np.float64).ravel()
        if vals.size != flat.size:
            raise GeometryError(f"labels {lab.shape} and image {np.shape(intensities)} differ")
        sums = np.bincount(flat, weights=vals, minlength=n)
        sq = np.bincount(flat, weights=vals * vals, minlength=n)
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


def _atomic_text(path: Path, write: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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

    return _atomic_text(Path(path), _w)


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
    """``OUT.nii.gz`` -> ``OUT.json`` (also ``.nii``, ``.nrrd``, ``.mha``, ``.dcm``)."""
    p = Path(output)
    name = p.name
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_name(name + ".json")


def write_sidecar(path: str | Path, doc: dict[str, Any]) -> Path:
    return _atomic_text(Path(path), lambda fh: json.dump(doc, fh, indent=2))


def save_labels(result: SegmentationResult, path: str | Path) -> Path:
    """Write the labels as NIfTI/NRRD/MHA (by extension) or DICOM-SEG (``.dcm``).

    DICOM-SEG needs the source DICOM files (``source_files`` in the source metadata, set by the
    DICOM reader): for other inputs a clear error says to pick a NIfTI/NRRD output instead.
    """
    p = Path(path)
    names = result.present_names()
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


# ----------------------------------------------------------------------------- generic network


def to_metatensor(image: MedicalImage, dtype: Any = np.float32) -> Any:
    """The image as a MONAI ``MetaTensor`` ``(X, Y, Z)`` (no channel) with its RAS affine.

    This is what ``LoadImage`` gives for the same data read from a NIfTI file (array in (i, j, k) index order, ``affine`` index -> RAS mm), so MONAI transforms
    behave identically on a napari layer and on a file.
    """
    import torch
    from monai.data import MetaTensor

    arr = np.asarray(image.data)
    xyz = np.ascontiguousarray(np.transpose(arr, (2, 1, 0))).astype(dtype, copy=False)
    aff = torch.as_tensor(image.geometry.affine_ras(), dtype=torch.float64)
    meta = {"original_affine": image.geometry.affine_ras(),
            "spatial_shape": np.asarray(xyz.shape), "original_channel_dim": float("nan"),
            "space": "RAS", "filename_or_obj": image.name}
    return MetaTensor(torch.from_numpy(xyz), affine=aff, meta=meta)


def geometry_of_metatensor(t: Any) -> Geometry:
    """Geometry of a channel-first MetaTensor (its RAS affine)."""
    return Geometry.from_affine_ras(np.asarray(t.affine, dtype=float))


def resample_labels_to(labels_xyz: np.ndarray, src: Geometry, dst: Geometry,
                       dst_shape_zyx: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resample of a (x, y, z)-order label array on ``src`` onto ``dst``.

    Uses SimpleITK; voxels of ``dst`` outside ``src``'s field of view become 0.
    """
    import SimpleITK as sitk

    lab_zyx = np.ascontiguousarray(np.transpose(labels_xyz, (2, 1, 0)))
    img = src.to_sitk(lab_zyx.astype(np.uint16))
    ref = dst.to_sitk(np.zeros(tuple(dst_shape_zyx), dtype=np.uint8))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt16)
    return sitk.GetArrayFromImage(out)


class NetworkSegmenter(Segmenter):
    """A torch network run MONAI-Label style: RAS + spacing + intensity window -> sliding
    window -> softmax/argmax -> nearest-neighbour resample back onto the source grid.

    ``network`` maps ``(N, 1, *roi)`` windows to ``(N, C, *roi)`` logits; channel ``c`` is
    label value ``c``.
    """

    uses_windows = True

    def __init__(self, network: Any, label_names: dict[int, str], *, model_id: str,
                 roi_size: Sequence[int], spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
                 intensity: tuple[float, float, float, float] | None = (-1000, 1000, 0, 1),
                 device: Any = None, weights_sha256: str | None = None,
                 label_colors: dict[int, list[int]] | None = None, ct_only: bool = True):
        self.network = network
        self.model_id = model_id
        self.label_names = {int(k): v for k, v in label_names.items()}
        self.label_colors = dict(label_colors or {})
        self.default_roi = tuple(int(r) for r in roi_size)
        self.spacing = tuple(spacing) if spacing else None
        self.intensity = intensity
        self.weights_sha256 = weights_sha256
        self.ct_only = ct_only
        self._device = device

    def check_input(self, image: MedicalImage) -> None:
        super().check_input(image)
        if self.ct_only:
            check_ct(image, self.model_id)

    def preprocess(self, image: MedicalImage) -> Any:
        from monai.transforms import Orientation, ScaleIntensityRange, Spacing

        x = to_metatensor(image)[None]  # (1, X, Y, Z)
        x = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
        if self.spacing:
            x = Spacing(pixdim=self.spacing, mode="bilinear")(x)
        if self.intensity:
            a0, a1, b0, b1 = self.intensity
            x = ScaleIntensityRange(a_min=a0, a_max=a1, b_min=b0, b_max=b1, clip=True)(x)
        return x

    def run(self, image: MedicalImage,
            settings: SegmentSettings) -> Generator[Progress, None, np.ndarray]:
        import torch

        from ..runtime.device import pick_device
        from .sliding_window import sliding_window_gen

        device = pick_device(settings.device or self._device)
        self.device_name = str(device)
        self.network.to(device).eval()
        yield Progress(0, 1, "preprocessing")
        x = self.preprocess(image)
        grid = geometry_of_metatensor(x)
        inp = x.as_tensor()[None].float()
        roi = settings.roi_size or self.default_roi
        overlap = 0.25 if settings.overlap is None else settings.overlap
        bs = settings.sw_batch_size or 1
        self.effective = {"roi_size": list(roi), "overlap": overlap, "sw_batch_size": bs}
        total = batches(inp.shape[2:], roi, overlap, bs) + 2
        gen = sliding_window_gen(inp, self.network, roi, bs, overlap, mode="gaussian",
                                 sw_device=device, device="cpu", precision=settings.precision)
        logits = yield from relay(gen, total)
        yield Progress(total - 1, total, "postprocessing")
        pred = torch.argmax(logits[0], dim=0).numpy().astype(np.uint16)
        del logits
        labels = resample_labels_to(pred, grid, image.geometry, image.shape)
        yield Progress(total, total, "done")
        return labels


def batches(spatial: Sequence[int], roi: Sequence[int], overlap: float, sw_batch_size: int) -> int:
    """Number of window batches the sliding-window generator will yield for one image."""
    from .sliding_window import window_count

    n = window_count(tuple(int(s) for s in spatial), tuple(int(r) for r in roi), overlap)
    return (n + sw_batch_size - 1) // sw_batch_size


def relay(gen: Generator[Progress, None, Any], total: int,
          offset: int = 1) -> Generator[Progress, None, Any]:
    """Re-yield a sub-generator's progress ``offset`` steps in, out of ``total`` overall."""
    first = True
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if first and p.step == 0:  # the sub-task's own "started" event
            first = False
            continue
        yield Progress(p.step + offset, total, p.message)
