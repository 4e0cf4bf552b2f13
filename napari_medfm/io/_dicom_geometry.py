"""Slice geometry for the DICOM reader (private helper of :mod:`napari_medfm.io.dicom`).

* :func:`stack_geometry` turns per-slice ImagePositionPatient / ImageOrientationPatient /
  PixelSpacing into a :class:`~napari_medfm.geometry.Geometry` (direction columns: row
  direction, column direction, slice normal; slices sorted ascending along the normal, as
  SimpleITK's ``ImageSeriesReader`` + GDCM's IPP sorter do), and detects non-uniform spacing
  and gantry tilt.
* :func:`resample_uniform` puts slices at uneven positions onto an evenly spaced grid (linear
  interpolation between the two neighbouring slices).
* :func:`correct_tilt` resamples a sheared (gantry-tilted) stack onto an orthogonal grid with
  SimpleITK, so that the result has a true, orthonormal geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..geometry import Geometry, spacing_is_uniform

#: Tilt below this angle (degrees) is treated as rounding noise in the positions.
TILT_TOLERANCE_DEG = 0.1


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def orthonormal_iop(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction (re-orthogonalised) and slice normal from an IOP."""
    r = _unit(np.asarray(iop[:3], dtype=float))
    c = np.asarray(iop[3:6], dtype=float)
    c = _unit(c - np.dot(c, r) * r)  # remove rounding skew so the matrix is orthonormal
    n = _unit(np.cross(r, c))
    return r, c, n


@dataclass
class StackGeometry:
    """Outcome of :func:`stack_geometry`."""

    geometry: Geometry
    order: np.ndarray  # input index of each output slice (ascending along the normal)
    positions: np.ndarray  # sorted distances along the normal (mm)
    uniform: bool = True
    min_step: float = math.nan
    max_step: float = math.nan
    shear_per_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    tilt_degrees: float = 0.0
    duplicates: bool = False


def stack_geometry(ipps: np.ndarray, iop: np.ndarray, pixel_spacing: tuple[float, float],
                   fallback_spacing: float = 1.0) -> StackGeometry:
    """Geometry of a stack of parallel slices.

    ``ipps``: (n, 3) LPS positions of each slice's first voxel; ``iop``: 6 direction cosines;
    ``pixel_spacing``: DICOM order (row spacing = y, column spacing = x);
    ``fallback_spacing``: slice spacing used when there is a single slice.
    """
    ipps = np.asarray(ipps, dtype=float).reshape(-1, 3)
    r, c, n = orthonormal_iop(np.asarray(iop, dtype=float))
    dist = ipps @ n
    order = np.argsort(dist, kind="stable")
    pos = dist[order]
    sy, sx = float(pixel_spacing[0]), float(pixel_spacing[1])
    direction = np.column_stack([r, c, n])
    out = StackGeometry(
        geometry=Geometry((sx, sy, fallback_spacing), tuple(ipps[order[0]]), direction),
        order=order,
        positions=pos,
    )
    if len(pos) < 2:
        return out
    steps = np.diff(pos)
    if np.any(steps < 1e-3):
        out.duplicates = True
        return out
    uniform, mn, mx = spacing_is_uniform(pos, rtol=1e-2)
    out.uniform, out.min_step, out.max_step = uniform, mn, mx
    span = pos[-1] - pos[0]
    dz = span / (len(pos) - 1)
    # in-plane drift of the slice origins per mm travelled along the normal (gantry tilt)
    first, last = ipps[order[0]], ipps[order[-1]]
    drift = (last - first) - np.dot(last - first, n) * n
    shear = drift / span
    tilt = math.degrees(math.atan(float(np.linalg.norm(shear))))
    if tilt > TILT_TOLERANCE_DEG and np.linalg.norm(drift) > 0.1 * min(sx, sy):
        out.shear_per_mm, out.tilt_degrees = shear, tilt
    out.geometry = Geometry((sx, sy, dz), tuple(first), direction)
    return out


def resample_uniform(data: np.ndarray, positions: np.ndarray, step: float | None = None):
    """Linear interpolation along axis 0 from uneven ``positions`` onto an even grid.

    Returns ``(new_data, new_positions)``; the span (first..last) is kept and the step is the
    median of the input steps (unless given). Integer data are rounded back to their dtype.
    """
    pos = np.asarray(positions, dtype=float)
    if step is None:
        step = float(np.median(np.diff(pos)))
    count = int(round((pos[-1] - pos[0]) / step)) + 1
    step = (pos[-1] - pos[0]) / (count - 1)
    new_pos = pos[0] + step * np.arange(count)
    out = np.empty((count,) + data.shape[1:], dtype=data.dtype)
    for j, z in enumerate(new_pos):
        k = int(np.clip(np.searchsorted(pos, z, side="right") - 1, 0, len(pos) - 2))
        t = float(np.clip((z - pos[k]) / (pos[k + 1] - pos[k]), 0.0, 1.0))
        if t < 1e-6:
            out[j] = data[k]
        elif t > 1 - 1e-6:
            out[j] = data[k + 1]
        else:
            v = data[k].astype(np.float32) * (1 - t) + data[k + 1].astype(np.float32) * t
            out[j] = np.rint(v) if out.dtype.kind in "iu" else v
    return out, new_pos


def correct_tilt(data: np.ndarray, geometry: Geometry, shear_per_mm: np.ndarray,
                 fill: float) -> tuple[np.ndarray, Geometry]:
    """Resample a gantry-tilted stack onto an orthogonal grid (SimpleITK, linear).

    ``geometry`` is the stack's geometry *ignoring* the tilt (row, col, normal directions;
    spacing along the normal); slice ``k`` really lies ``k * dz * shear_per_mm`` further in
    plane. The output grid keeps directions and spacing and grows in plane to hold every
    voxel of the tilted stack.
    """
    import SimpleITK as sitk

    sp = np.asarray(geometry.spacing)
    d = geometry.direction
    o = np.asarray(geometry.origin)
    n = d[:, 2]
    s = np.asarray(shear_per_mm, dtype=float) * sp[2]  # in-plane shift per slice (mm)
    nz, ny, nx = data.shape[:3]
    # physical corners of the true (sheared) stack, expressed in the output index frame
    corners = []
    for i in (0, nx - 1):
        for j in (0, ny - 1):
            for k in (0, nz - 1):
                p = o + d @ (np.array([i, j, k]) * sp) + k * s
                corners.append(d.T @ (p - o) / sp)
    corners = np.asarray(corners)
    lo = np.floor(corners.min(axis=0) + 1e-6)
    hi = np.ceil(corners.max(axis=0) - 1e-6)
    size = (hi - lo).astype(int) + 1
    new_origin = o + d @ (lo * sp)

    src = sitk.GetImageFromArray(data)
    geometry.apply_to_sitk(src)
    ref = sitk.Image([int(v) for v in size], src.GetPixelID())
    ref.SetSpacing(tuple(sp))
    ref.SetOrigin(tuple(new_origin))
    ref.SetDirection(tuple(d.reshape(-1)))
    # output (true) point p -> point of the untilted source image: q = p - s * ((p - o).n / dz)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple((np.eye(3) - np.outer(s, n) / sp[2]).reshape(-1)))
    tx.SetCenter(tuple(o))
    out = sitk.Resample(src, ref, tx, sitk.sitkLinear, float(fill), src.GetPixelID())
    arr = sitk.GetArrayFromImage(out)
    return arr, Geometry.from_sitk(out)
