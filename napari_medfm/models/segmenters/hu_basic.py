"""``hu-basic``: a weights-free CT segmenter from Hounsfield thresholds and morphology.

Labels (value -> name), mutually exclusive, on the CT's own voxel grid:

====  =======  ==================================================================================
1     body     every other voxel inside the body outline (soft tissue, organs, muscle, fluid, skin)
2     lungs    lung parenchyma incl. its vessels (left + right, not separated)
3     bone     cortical + trabecular bone incl. enclosed marrow
4     fat      adipose tissue (-190 .. -30 HU) inside the body
5     air      gas *inside the body* that is not lung: bowel gas, airway outside the lungs,
               gas pockets. Air outside the patient is background (0).
6     vessels  contrast-enhanced blood pool (heart chambers, aorta, large veins) above the bone
               threshold; empty on scans without (dense) contrast
====  =======  ==================================================================================

Method (kernels are Euclidean balls in millimetres, built from exact distance maps that use the
voxel spacing, so the result does not depend on the voxel size or its anisotropy):

* **body**: HU > -500, a binary opening (radius 3 mm) detaches the table and blankets; every
  3D component that is big (>= 20 mL) and thick (an inscribed ball of radius >= 12 mm) is kept
  - the trunk, an arm lying beside it, both legs - while thin shells (table top, blankets) are
  not; holes are filled slice by slice in the axial plane (the image axis closest to the
  patient's head-foot axis) and the opening's losses are added back.
* **lungs**: gas (HU < -500) of the whole volume split into 3D connected components. A
  component is a candidate when at least half of it lies inside the body: the filled body or,
  per axial slice, the convex hull of the body tissue - so lungs cut by the volume's border (a
  tight crop around the thorax, where they are not enclosed by tissue) are found. A candidate
  is lung when (a) its median HU is that of aerated parenchyma (> -920 HU: lung holds vessels
  and interstitium; outside air and bowel gas are ~ -1000 HU, ~ -950 HU with partial volume
  and stool), (b) its most superior point lies within 60 mm of the most superior candidate gas
  (lungs are the highest gas-filled organs: bowel gas sits below the diaphragm), and (c) it
  holds at least 5 mL. The airway, where it is in the volume, joins both lungs into one
  component. The kept components are closed (5 mm) and their holes (vessels) filled per axial
  slice. Limits: lungs full of fluid/consolidation are not gas and are missed; severe
  emphysema with a median below -920 HU needs ``lung_median_min``.
* **bone and enhanced blood**: HU above a voxel-size dependent threshold
  (:func:`bone_threshold`: 200 HU at 1 mm voxels, 150 HU at 3 mm), closed (2 mm). Each thick
  part of that mask is split into blobs by a watershed of its distance map (the aorta lying on
  a vertebra becomes its own blob); a blob that is bright, homogeneous, holds no cortex-bright
  voxels and fades towards its rim is blood (:func:`blood_pool`). The rest is bone: its holes
  (marrow) are filled per axial slice, components smaller than 0.3 mL dropped. Thin enhanced
  vessels (no inscribed 4 mm ball) and calcified plaque stay bone.
* **fat**: -190 .. -30 HU inside the body, not lung, bone or blood.
* **air**: remaining gas inside the body (HU < -500) that is not lung.

Uses SimpleITK for components, distance-map morphology and the watershed; numpy/scipy for
thresholds, convex hulls and the per-slice hole filling.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...arrays import label_sums
from ...geometry import Geometry
from ...io.types import MedicalImage
from ...progress import Progress
from ...runtime.checks import check_ct
from .base import Segmenter, SegmentSettings

LABEL_NAMES: dict[int, str] = {1: "body", 2: "lungs", 3: "bone", 4: "fat", 5: "air",
                               6: "vessels"}
LABEL_COLORS: dict[int, list[int]] = {
    1: [177, 122, 101],
    2: [197, 165, 145],
    3: [241, 214, 145],
    4: [230, 220, 70],
    5: [80, 160, 220],
    6: [216, 101, 79],
}
LABEL_DESCRIPTIONS: dict[int, str] = {
    1: "other tissue inside the body outline (soft tissue, organs, muscle, fluid)",
    2: "lung parenchyma including intrapulmonary vessels",
    3: "bone (cortex, trabecular bone and enclosed marrow)",
    4: "adipose tissue (-190..-30 HU)",
    5: "gas inside the body that is not lung (bowel gas, airway outside the lungs)",
    6: "contrast-enhanced blood pool (heart chambers, great vessels) and other thick enhancing "
       "tissue above the bone threshold that is not bone-shaped (no brighter cortex)",
}


@dataclass(frozen=True)
class HUParams:
    """Thresholds (HU) and kernel radii (mm) of :func:`segment_hu`."""

    body_min: float = -500.0
    body_open_mm: float = 3.0
    body_part_min_ml: float = 20.0
    body_part_min_radius_mm: float = 12.0
    gas_max: float = -500.0
    lung_median_min: float = -920.0
    lung_top_margin_mm: float = 60.0
    lung_min_ml: float = 5.0
    lung_close_mm: float = 5.0
    lung_inside_min: float = 0.5
    bone_min: float | None = None  # None: from the voxel size, see bone_threshold()
    bone_close_mm: float = 2.0
    bone_min_ml: float = 0.3
    blood_core_mm: float = 4.0
    blood_min_ml: float = 2.0
    blood_split_mm: float = 1.5
    blood_margin_hu: float = 50.0
    blood_iqr_max: float = 90.0
    blood_bright_hu: float = 150.0
    blood_bright_max: float = 0.03
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


def _hull_2d(mask: np.ndarray) -> np.ndarray:
    """Convex hull (filled) of a 2D boolean mask, pixel squares included; the mask itself when
    its points are degenerate (a line).

    The hull of a mask is the hull of the outer corners of each row's first and last pixel, so
    at most ``4 * 2 * rows`` points go to Qhull; the hull is filled row by row from its
    half-planes.
    """
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask.copy()
    sub = mask[rows]
    first = np.argmax(sub, axis=1)
    last = sub.shape[1] - 1 - np.argmax(sub[:, ::-1], axis=1)
    r = rows.astype(np.float64)
    pts = np.concatenate([np.stack([r - 0.5, first - 0.5], 1), np.stack([r + 0.5, first - 0.5], 1),
                          np.stack([r - 0.5, last + 0.5], 1), np.stack([r + 0.5, last + 0.5], 1)])
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return mask.copy()
    out = mask.copy()
    ys = np.arange(rows[0], rows[-1] + 1, dtype=np.float64)
    lo = np.full(ys.shape, -np.inf)
    hi = np.full(ys.shape, np.inf)
    for a, b, c in hull.equations:  # a*y + b*x + c <= 0 inside
        if abs(b) < 1e-12:
            bad = a * ys + c > 1e-9
            lo[bad], hi[bad] = np.inf, -np.inf
        elif b > 0:
            hi = np.minimum(hi, (-c - a * ys) / b)
        else:
            lo = np.maximum(lo, (-c - a * ys) / b)
    lo_i = np.clip(np.ceil(lo - 1e-9), 0, mask.shape[1]).astype(int)
    hi_i = np.clip(np.floor(hi + 1e-9), -1, mask.shape[1] - 1).astype(int)
    for y, x0, x1 in zip(range(rows[0], rows[-1] + 1), lo_i, hi_i, strict=True):
        if x1 >= x0:
            out[y, x0:x1 + 1] = True
    return out


def _hull_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Per-slice convex hull of a boolean volume along numpy ``axis`` (the body outline of a
    volume cropped through the patient, where holes touching the border cannot be filled)."""
    out = np.moveaxis(mask.copy(), axis, 0)
    for k in range(out.shape[0]):
        if out[k].any():
            out[k] = _hull_2d(out[k])
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
    """Tissue (HU > ``body_min``) of every body part, holes filled per axial slice.

    The opening detaches the table and blankets; then every component that is both big
    (``body_part_min_ml``) and thick (an inscribed ball of ``body_part_min_radius_mm``: an arm
    beside the trunk, both legs) is kept, not only the largest; thin shells (table top,
    blankets, cables) are not.
    """
    from scipy import ndimage as ndi

    raw = hu > p.body_min
    opened = _morph(raw, geometry, p.body_open_mm, "open")
    cc = _components(opened, geometry)
    n = int(cc.max())
    if n == 0:
        return np.zeros_like(raw)
    idx = np.arange(1, n + 1)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    sizes = label_sums(cc, n + 1)[1:] * voxel_ml
    big = idx[sizes >= p.body_part_min_ml]
    keep = [1]
    sp = np.asarray(geometry.spacing, float)[::-1]  # numpy (z, y, x) order
    objs = ndi.find_objects(cc)
    for k in big[big != 1]:  # radius of the largest inscribed ball, in the part's box
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in objs[k - 1])
        part = np.pad(cc[box] == k, 1)
        if float(ndi.distance_transform_edt(part, sampling=sp).max()) >= p.body_part_min_radius_mm:
            keep.append(int(k))
    body = np.isin(cc, keep)
    body |= raw & _morph(body, geometry, p.body_open_mm + 1.0, "dilate")
    return _fill_slices(body, _axial_axis(geometry))


def lung_mask(hu: np.ndarray, geometry: Geometry, body: np.ndarray, p: HUParams) -> np.ndarray:
    """Aerated lung: gas components of the whole volume that lie inside the body outline.

    "Inside" is the filled body or, per axial slice, the convex hull of the body tissue: lungs
    cut by the volume's border (a tight crop around the thorax) are not enclosed by tissue and
    would be missed by hole filling alone. Outside air that the hull reaches (concavities,
    between arm and trunk) is excluded by its HU (~ -1000, median below ``lung_median_min``);
    the airway joins both lungs into one component where it is in the volume.
    """
    from scipy import ndimage as ndi

    axis = _axial_axis(geometry)
    inside = body | _hull_slices(body, axis)
    gas = hu < p.gas_max
    cc = _components(gas, geometry)
    n = int(cc.max())
    lungs = np.zeros_like(gas)
    if n == 0:
        return lungs
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    idx = np.arange(1, n + 1)
    sizes = label_sums(cc, n + 1)[1:].astype(np.float64)
    n_in = label_sums(cc, n + 1, inside)[1:]
    frac_in = n_in / np.maximum(sizes, 1.0)
    keep = idx[(sizes * voxel_ml >= p.lung_min_ml) & (frac_in >= p.lung_inside_min)]
    if keep.size == 0:
        return lungs
    # most superior physical point and median HU of each candidate component (the reference
    # "top" is over all gas inside the body, bowel gas included: lungs are the highest gas)
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
    raw = np.isin(cc, chosen)
    lungs = _morph(raw, geometry, p.lung_close_mm, "close")
    lungs = _fill_slices(lungs, axis) & (inside | raw)
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


def _drop_small(mask: np.ndarray, geometry: Geometry, min_ml: float) -> np.ndarray:
    cc = _components(mask, geometry)
    n = int(cc.max())
    if n == 0:
        return mask
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    sizes = label_sums(cc, n + 1)[1:]
    big = np.flatnonzero(sizes * voxel_ml >= min_ml) + 1
    return np.isin(cc, big)


def dense_mask(hu: np.ndarray, geometry: Geometry, body: np.ndarray, p: HUParams,
               fill: bool = True) -> np.ndarray:
    """Everything above the bone threshold (bone and enhanced blood), closed (and with
    ``fill`` its holes filled per axial slice), components smaller than ``bone_min_ml`` dropped."""
    dense = (hu >= bone_threshold(geometry, p)) & body
    dense = _morph(dense, geometry, p.bone_close_mm, "close") & body
    if fill:
        dense = _fill_slices(dense, _axial_axis(geometry)) & body
    return _drop_small(dense, geometry, p.bone_min_ml)


def blood_pool(hu: np.ndarray, geometry: Geometry, dense: np.ndarray, p: HUParams,
               features: list | None = None) -> np.ndarray:
    """Contrast-enhanced blood inside the dense (above bone threshold) mask.

    Each thick dense component is split into blobs by a watershed of its distance map (the
    aorta lying against a vertebra, the iliac vessels against the pelvis become separate
    blobs: their contact is a saddle of the distance to the non-dense tissue). A blob is blood
    when it is thick (an inscribed ball of ``blood_core_mm``, ``blood_min_ml``), its deep half
    is bright (median >= bone threshold + ``blood_margin_hu``) and homogeneous (interquartile
    range <= ``blood_iqr_max``: noise only, where trabecular bone is textured), almost none of
    it is far brighter than that median (at most ``blood_bright_max`` of its voxels above median
    + ``blood_bright_hu``: every bone blob holds some cortex, even at 3 mm voxels where the
    trabecular texture is smoothed away), and its outer layer is not brighter than its deep
    half (a blood pool fades into its wall). Optional ``features`` collects one dict per
    examined blob (for tuning and tests).
    """
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    blood = np.zeros_like(dense, dtype=bool)
    if not dense.any():
        return blood
    thr = bone_threshold(geometry, p)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    layer = float(max(geometry.spacing))
    dmap = sitk.SignedMaurerDistanceMap(_to_sitk(dense, geometry), insideIsPositive=True,
                                        squaredDistance=False, useImageSpacing=True)
    d = sitk.GetArrayFromImage(dmap).astype(np.float32)
    cc = _components(dense, geometry)
    for lab, sl in enumerate(ndi.find_objects(cc), start=1):
        if sl is None:
            continue
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1))
                    for s, n in zip(sl, cc.shape, strict=True))
        mine = cc[box] == lab
        dd = np.where(mine, d[box], 0.0)
        if dd.max() < p.blood_core_mm or mine.sum() * voxel_ml < p.blood_min_ml:
            continue
        ws = sitk.MorphologicalWatershed(sitk.GetImageFromArray(-dd), level=p.blood_split_mm,
                                         markWatershedLine=False, fullyConnected=True)
        regions = sitk.GetArrayFromImage(ws).astype(np.int32) * mine
        h = hu[box]
        for rlab, rsl in enumerate(ndi.find_objects(regions), start=1):
            if rsl is None:
                continue
            reg = regions[rsl] == rlab
            rd = dd[rsl]
            maxd = float(rd[reg].max())
            ml = float(reg.sum()) * voxel_ml
            if maxd < p.blood_core_mm or ml < p.blood_min_ml:
                continue
            rh = h[rsl]
            core = reg & (rd >= 0.5 * maxd)
            rim = reg & (rd <= layer)
            q25, med, q75 = np.percentile(rh[core], [25, 50, 75])
            rim_med = float(np.median(rh[rim])) if rim.any() else float(med)
            bright = float((rh[reg] > med + p.blood_bright_hu).mean())
            is_blood = bool(med >= thr + p.blood_margin_hu and q75 - q25 <= p.blood_iqr_max
                            and rim_med <= med and bright <= p.blood_bright_max)
            if features is not None:
                features.append({"ml": round(ml, 1), "radius_mm": round(maxd, 1),
                                 "bright_fraction": bright,
                                 "core_median": float(med), "core_iqr": float(q75 - q25),
                                 "rim_median": rim_med, "blood": is_blood})
            if is_blood:
                blood[box][rsl] |= reg  # views: writes into ``blood``
    return blood


def bone_and_blood(hu: np.ndarray, geometry: Geometry, body: np.ndarray,
                   p: HUParams) -> tuple[np.ndarray, np.ndarray]:
    """(bone, enhanced blood). The dense mask (closed, not yet filled) is split by
    :func:`blood_pool`; the rest is bone, whose holes (marrow) are then filled per axial slice
    (soft tissue enclosed by a ring of vessels and bone is not bone)."""
    dense = dense_mask(hu, geometry, body, p, fill=False)
    blood = blood_pool(hu, geometry, dense, p)
    bone = _fill_slices(dense & ~blood, _axial_axis(geometry)) & body & ~blood
    return _drop_small(bone, geometry, p.bone_min_ml), blood


def bone_mask(hu: np.ndarray, geometry: Geometry, body: np.ndarray, p: HUParams) -> np.ndarray:
    """Bone only (see :func:`bone_and_blood`)."""
    return bone_and_blood(hu, geometry, body, p)[0]


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
    yield Progress(2, total, "bone and enhanced blood")
    bone, blood = bone_and_blood(hu, geometry, body, p)
    bone &= ~lungs
    blood &= ~lungs
    yield Progress(3, total, "fat and gas")
    lo, hi = p.fat_range
    fat = body & (hu >= lo) & (hu <= hi) & ~lungs & ~bone & ~blood
    gas = body & (hu < p.gas_max) & ~lungs & ~bone & ~blood
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[body] = 1
    labels[fat] = 4
    labels[gas] = 5
    labels[blood] = 6
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
