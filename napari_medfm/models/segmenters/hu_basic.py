"""``hu-basic``: a weights-free CT segmenter from Hounsfield thresholds and morphology.

Labels (value -> name), mutually exclusive, on the CT's own voxel grid:

====  =======  ==================================================================================
1     body     every other voxel inside the body outline (soft tissue, organs, muscle, fluid, skin)
2     lungs    lung parenchyma incl. its vessels (left + right, not separated)
3     bone     cortical + trabecular bone incl. enclosed marrow
4     fat      adipose tissue (-190 .. -30 HU) inside the body
5     air      gas *inside the body* that is not lung: bowel gas, airway outside the lungs,
               gas pockets. Air outside the patient is background (0).
====  =======  ==================================================================================

Method (kernels are Euclidean balls in millimetres, built from exact distance maps that use the
voxel spacing, so the result does not depend on the voxel size or its anisotropy):

* **body**: HU > -500, a binary opening (radius 3 mm) detaches the table and blankets, the
  largest 3D component is kept, holes are filled slice by slice in the axial plane (the image
  axis closest to the patient's head-foot axis) and the opening's losses are added back.
* **lungs**: gas (HU < -500) inside the body split into 3D connected components. A component is
  lung when (a) its median HU is that of aerated parenchyma (> -920 HU: lung holds vessels and
  interstitium; bowel gas is ~ -1000 HU, ~ -950 HU with partial volume and stool) and (b) its
  most superior point lies within 60 mm of the most superior gas in the body (lungs are the
  highest gas-filled organs: bowel gas sits below the diaphragm), and (c) it holds at least
  5 mL. The kept components are closed (5 mm) and their holes (vessels) filled per axial slice. Limits: lungs full of fluid/consolidation are not
  gas and are missed; severe emphysema with a median below -920 HU needs ``lung_median_min``.
* **bone**: HU above a voxel-size dependent threshold (:func:`bone_threshold`: 200 HU at 1 mm
  voxels, 150 HU at 3 mm), closed (2 mm), holes (marrow) filled per axial slice, components smaller
  than 0.3 mL dropped. Dense contrast in vessels or the urinary tract above that threshold is a
  known false positive.
* **fat**: -190 .. -30 HU inside the body, not lung or bone.
* **air**: remaining gas inside the body (HU < -500) that is not lung.

Uses SimpleITK for components and distance-map morphology; numpy/scipy for thresholds and the
per-slice hole filling.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...geometry import Geometry
from ...io.types import MedicalImage
from ...progress import Progress
from ...runtime.checks import check_ct
from .base import Segmenter, SegmentSettings

LABEL_NAMES: dict[int, str] = {1: "body", 2: "lungs", 3: "bone", 4: "fat", 5: "air"}
LABEL_COLORS: dict[int, list[int]] = {
    1: [177, 122, 101],
    2: [197, 165, 145],
    3: [241, 214, 145],
    4: [230, 220, 70],
    5: [80, 160, 220],
}
LABEL_DESCRIPTIONS: dict[int, str] = {
    1: "other tissue inside the body outline (soft tissue, organs, muscle, fluid)",
    2: "lung parenchyma including intrapulmonary vessels",
    3: "bone (cortex, trabecular bone and enclosed marrow)",
    4: "adipose tissue (-190..-30 HU)",
    5: "gas inside the body that is not lung (bowel gas, airway outside the lungs)",
}


@dataclass(frozen=True)
class HUParams:
    """Thresholds (HU) and kernel radii (mm) of :func:`segment_hu`."""

    body_min: float = -500.0
    body_open_mm: float = 3.0
    gas_max: float = -500.0
    lung_median_min: float = -920.0
    lung_top_margin_mm: float = 60.0
    lung_min_ml: float = 5.0
    lung_close_mm: float = 5.0
    bone_min: float | None = None  # None: from the voxel size, see bone_threshold()
    bone_close_mm: float = 2.0
    bone_min_ml: float = 0.3
    fat_range: tuple[float, float] = (-190.0, -30.0)


def _axial_axis(geometry: Geometry) -> int:
    """numpy axis (0..2) whose image direction is closest to the patient S/I axis."""
    j = int(np.argmax(np.abs(geometry.direction[2, :])))  # image axis j in x/y/z order
    return 2 - j


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill holes of a boolean volume slice by slice along numpy ``axis``."""
    from scipy import ndimage as ndi

    out = np.moveaxis(mask.copy(), axis, 0)
    for k in range(out.shape[0]):
        if out[k].any():
            out[k] = ndi.binary_fill_holes(out[k])
    return np.moveaxis(out, 0, axis)


def _to_sitk(mask: np.ndarray, geometry: Geometry):
    return geometry.to_sitk(mask.astype(np.uint8))


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).astype(bool)


def _within(mask: np.ndarray, geometry: Geometry, mm: float) -> np.ndarray:
    """Voxels within ``mm`` (Euclidean, physical units) of a True voxel: a dilation by a ball."""
    import SimpleITK as sitk

    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    d = sitk.SignedMaurerDistanceMap(_to_sitk(mask, geometry), insideIsPositive=False,
                                     squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayViewFromImage(d) <= mm


def _morph(mask: np.ndarray, geometry: Geometry, mm: float, op: str) -> np.ndarray:
    """Binary morphology with a Euclidean ball of radius ``mm`` in physical units.

    Built from exact distance maps (SimpleITK Maurer, with the voxel spacing), so the kernel is a
    true ball in millimetres on anisotropic grids; the radius is at least the finest voxel
    spacing (one voxel). Erosion treats outside the field of view as foreground, so structures
    cut by the image border are not eaten away from the cut.
    """
    r = max(float(mm), min(geometry.spacing)) * (1.0 + 1e-6)
    mask = np.asarray(mask, dtype=bool)
    if op == "dilate":
        return _within(mask, geometry, r)
    if op == "erode":
        return ~_within(~mask, geometry, r)
    if op == "open":
        return _within(~_within(~mask, geometry, r), geometry, r)
    if op == "close":
        return ~_within(~_within(mask, geometry, r), geometry, r)
    raise ValueError(op)  # pragma: no cover - internal


def _components(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Connected components (26-connectivity), relabelled by decreasing size."""
    import SimpleITK as sitk

    cc = sitk.ConnectedComponent(_to_sitk(mask, geometry), True)
    cc = sitk.RelabelComponent(cc, sortByObjectSize=True)
    return sitk.GetArrayFromImage(cc)


def _superior_mm(geometry: Geometry, index_zyx: np.ndarray) -> np.ndarray:
    """LPS z (superior, mm) of numpy-order voxel indices (N, 3)."""
    return geometry.index_to_physical(np.asarray(index_zyx, dtype=float)[:, ::-1])[:, 2]


def body_mask(hu: np.ndarray, geometry: Geometry, p: HUParams) -> np.ndarray:
    raw = hu > p.body_min
    opened = _morph(raw, geometry, p.body_open_mm, "open")
    cc = _components(opened, geometry)
    if cc.max() == 0:
        return np.zeros_like(raw)
    body = cc == 1
    body |= raw & _morph(body, geometry, p.body_open_mm + 1.0, "dilate")
    return _fill_slices(body, _axial_axis(geometry))


def lung_mask(hu: np.ndarray, geometry: Geometry, body: np.ndarray, p: HUParams) -> np.ndarray:
    from scipy import ndimage as ndi

    gas = (hu < p.gas_max) & body
    cc = _components(gas, geometry)
    n = int(cc.max())
    lungs = np.zeros_like(gas)
    if n == 0:
        return lungs
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    idx = np.arange(1, n + 1)
    sizes = ndi.sum_labels(np.ones_like(cc, dtype=np.float32), cc, idx)
    keep = idx[sizes * voxel_ml >= p.lung_min_ml]
    if keep.size == 0:
        return lungs
    # most superior physical point of each candidate component
    objs = ndi.find_objects(cc)
    tops, medians = {}, {}
    for lab in keep:
        sl = objs[lab - 1]
        sub = cc[sl] == lab
        pts = np.argwhere(sub) + np.array([s.start for s in sl])
        tops[lab] = float(_superior_mm(geometry, pts).max())
        medians[lab] = float(np.median(hu[sl][sub]))
    top_all = max(tops.values())
    chosen = [lab for lab in keep
              if medians[lab] > p.lung_median_min and tops[lab] >= top_all - p.lung_top_margin_mm]
    if not chosen:
        return lungs
    lungs = np.isin(cc, chosen)
    lungs = _morph(lungs, geometry, p.lung_close_mm, "close")
    lungs = _fill_slices(lungs, _axial_axis(geometry)) & body
    return lungs


def bone_threshold(geometry: Geometry, p: HUParams) -> float:
    """Bone threshold in HU: ``p.bone_min`` or 200 HU at ~1 mm voxels falling to 150 HU at 3 mm.

    Thin cortices (ribs, vertebral end plates) lose contrast to partial-volume averaging in
    thick voxels, so coarse grids need a lower threshold; fine grids use a higher one, which
    keeps contrast-enhanced vessels (~150-300 HU) out of the bone label.
    """
    if p.bone_min is not None:
        return float(p.bone_min)
    size = float(np.prod(geometry.spacing)) ** (1.0 / len(geometry.spacing))
    return float(np.clip(225.0 - 25.0 * size, 150.0, 200.0))


def bone_mask(hu: np.ndarray, geometry: Geometry, body: np.ndarray, p: HUParams) -> np.ndarray:
    from scipy import ndimage as ndi

    bone = (hu >= bone_threshold(geometry, p)) & body
    bone = _morph(bone, geometry, p.bone_close_mm, "close")
    bone = _fill_slices(bone, _axial_axis(geometry)) & body
    cc = _components(bone, geometry)
    n = int(cc.max())
    if n == 0:
        return bone
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    sizes = ndi.sum_labels(np.ones_like(cc, dtype=np.float32), cc, np.arange(1, n + 1))
    big = np.flatnonzero(sizes * voxel_ml >= p.bone_min_ml) + 1
    return np.isin(cc, big)


def segment_hu(hu: np.ndarray, geometry: Geometry,
               params: HUParams | None = None) -> Generator[Progress, None, np.ndarray]:
    """Label a CT volume given in HU (numpy order z, y, x). Yields one Progress per structure.

    Returns a ``uint8`` label map of the same shape (values in :data:`LABEL_NAMES`).
    """
    p = params or HUParams()
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu-basic needs a 3D CT volume, got an array of shape {hu.shape}")
    hu = hu.astype(np.float32, copy=False)
    total = 5
    yield Progress(0, total, "body outline")
    body = body_mask(hu, geometry, p)
    yield Progress(1, total, "lungs")
    lungs = lung_mask(hu, geometry, body, p)
    yield Progress(2, total, "bone")
    bone = bone_mask(hu, geometry, body, p) & ~lungs
    yield Progress(3, total, "fat and gas")
    lo, hi = p.fat_range
    fat = body & (hu >= lo) & (hu <= hi) & ~lungs & ~bone
    gas = body & (hu < p.gas_max) & ~lungs & ~bone
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[body] = 1
    labels[fat] = 4
    labels[gas] = 5
    labels[bone] = 3
    labels[lungs] = 2
    yield Progress(total, total, "done")
    return labels


class HUBasicSegmenter(Segmenter):
    """The ``hu-basic`` model object (implements :class:`~napari_medfm.runtime.contracts.Segmenter`)."""

    model_id = "hu-basic"
    weights_sha256 = None
    device_name = "cpu"

    def __init__(self, params: HUParams | None = None):
        self.params = params or HUParams()
        self.label_names = dict(LABEL_NAMES)
        self.label_colors = {k: list(v) for k, v in LABEL_COLORS.items()}

    def check_input(self, image: MedicalImage) -> None:
        super().check_input(image)
        check_ct(image, self.model_id)

    def run(self, image: MedicalImage,
            settings: SegmentSettings) -> Generator[Progress, None, np.ndarray]:
        return (yield from segment_hu(np.asarray(image.data), image.geometry, self.params))


def build(spec: Any, weights: Any = None, device: Any = None, *,
          params: HUParams | None = None) -> HUBasicSegmenter:
    """Registry builder: ``hu-basic`` needs no weights and runs on the CPU.

    ``params``: thresholds and kernel radii (:class:`HUParams`); ``weights``/``device`` are
    accepted for the common builder signature and unused.
    """
    return HUBasicSegmenter(params)
