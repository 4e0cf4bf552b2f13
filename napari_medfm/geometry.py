"""The one place where physical geometry is handled.

Conventions
-----------
* Physical space is DICOM patient space, **LPS millimetres** (x toward patient Left,
  y toward Posterior, z toward Superior), as SimpleITK and DICOM use it.
* :class:`Geometry` stores ``spacing``, ``origin`` and ``direction`` in **SimpleITK order**
  (x, y, z): ``direction[:, j]`` is the unit LPS vector along image axis ``j`` (x = column).
* napari layers hold arrays in **numpy order** (z, y, x) and their world coordinates are the
  same LPS millimetres, also in reversed order, so that for every voxel index ``idx`` (numpy
  order)::

      layer.data_to_world(idx)[::-1] == sitk_image.TransformIndexToPhysicalPoint(idx[::-1])

  :meth:`Geometry.napari_affine` builds that (ndim+1)x(ndim+1) matrix:
  ``A = R (D diag(spacing)) R`` with ``R`` the axis-reversal permutation, translation ``origin[::-1]``.

Nothing in this module imports Qt, napari or torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Geometry",
    "ObliqueGeometryWarning",
    "LPS_TO_RAS",
    "orientation_code",
]

#: Flip of the first two axes: LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_AXIS_LETTERS_LPS = (("L", "R"), ("P", "A"), ("S", "I"))


class ObliqueGeometryWarning(UserWarning):
    """Raised (as a warning) when napari cannot slice a volume faithfully in 2D."""


def orientation_code(direction: np.ndarray) -> str:
    """Return the 3-letter orientation code (ITK/DICOM 'LPS' style) of a 3x3 direction matrix.

    Each letter names the patient direction toward which the corresponding image axis
    (x, y, z) *increases*, e.g. an identity matrix gives ``"LPS"`` and a NIfTI in RAS
    gives ``"RAS"``.
    """
    d = np.asarray(direction, dtype=float)
    if d.shape != (3, 3):
        raise ValueError(f"orientation_code needs a 3x3 direction, got {d.shape}")
    letters = []
    for j in range(3):
        col = d[:, j]
        k = int(np.argmax(np.abs(col)))
        letters.append(_AXIS_LETTERS_LPS[k][0 if col[k] > 0 else 1])
    return "".join(letters)


def _as_tuple(values: Any, n: int, what: str) -> tuple[float, ...]:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{what} needs {n} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} has non-finite values: {arr.tolist()}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid -> LPS physical space mapping (SimpleITK conventions, x/y/z order).

    Parameters
    ----------
    spacing
        Voxel size in mm along image axes (x, y[, z]).
    origin
        LPS position (mm) of the centre of voxel index 0.
    direction
        ndim x ndim matrix whose column ``j`` is the unit direction of image axis ``j``.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        n = len(self.spacing)
        if n not in (2, 3):
            raise ValueError(f"Geometry supports 2D or 3D, got {n} spacing values")
        object.__setattr__(self, "spacing", _as_tuple(self.spacing, n, "spacing"))
        object.__setattr__(self, "origin", _as_tuple(self.origin, n, "origin"))
        d = np.asarray(self.direction, dtype=float).reshape(n, n)
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if not np.allclose(d.T @ d, np.eye(n), atol=1e-4):
            raise ValueError("direction must be orthonormal (columns are unit axis directions)")
        d = d.copy()
        d.setflags(write=False)
        object.__setattr__(self, "direction", d)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, ndim: int = 3, spacing: Any = None) -> Geometry:
        """Unit (or given) spacing, zero origin, identity direction."""
        sp = (1.0,) * ndim if spacing is None else spacing
        return cls(tuple(sp), (0.0,) * ndim, np.eye(ndim))

    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        """Geometry of a ``SimpleITK.Image`` (2D or 3D)."""
        n = image.GetDimension()
        return cls(
            tuple(image.GetSpacing()),
            tuple(image.GetOrigin()),
            np.asarray(image.GetDirection(), dtype=float).reshape(n, n),
        )

    @classmethod
    def from_affine_ras(cls, affine: np.ndarray) -> Geometry:
        """From a 4x4 NIfTI/MONAI-style affine mapping (i, j, k) index -> RAS mm."""
        a = np.asarray(affine, dtype=float)
        lps = LPS_TO_RAS @ a[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        return cls(tuple(spacing), tuple(LPS_TO_RAS @ a[:3, 3]), lps / spacing)

    @classmethod
    def from_napari_affine(cls, affine: np.ndarray) -> Geometry:
        """Inverse of :meth:`napari_affine`: recover the geometry from a layer's affine.

        ``affine`` is the (ndim+1)x(ndim+1) matrix of napari's ``layer.affine.affine_matrix``
        combined with scale/translate (use :func:`napari_medfm.geometry.layer_world_matrix`
        style composition before calling if the layer also has scale/translate).
        """
        a = np.asarray(affine, dtype=float)
        n = a.shape[0] - 1
        lin = a[:n, :n][::-1, ::-1]  # back to (x, y, z) order
        spacing = np.linalg.norm(lin, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("affine has a zero-length axis")
        return cls(tuple(spacing), tuple(a[:n, n][::-1]), lin / spacing)

    # ------------------------------------------------------------------ properties
    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def is_identity_direction(self) -> bool:
        return bool(np.allclose(self.direction, np.eye(self.ndim), atol=1e-6))

    @property
    def is_axis_aligned(self) -> bool:
        """True when every image axis lies along a patient axis (flips/permutations allowed)."""
        d = np.abs(self.direction)
        return bool(np.allclose(d.max(axis=0), 1.0, atol=1e-5))

    @property
    def obliquity_degrees(self) -> float:
        """Largest angle (degrees) between an image axis and its nearest patient axis."""
        cosines = np.clip(np.abs(self.direction).max(axis=0), -1.0, 1.0)
        return float(np.degrees(np.arccos(cosines.min())))

    @property
    def orientation(self) -> str:
        """Orientation code (e.g. ``'LPS'``, ``'RAS'``); 2D geometries return e.g. ``'LP'``."""
        if self.ndim == 3:
            return orientation_code(self.direction)
        d = np.eye(3)
        d[:2, :2] = self.direction
        return orientation_code(d)[:2]

    # ------------------------------------------------------------------ conversions
    def index_to_physical(self, index_xyz: Any) -> np.ndarray:
        """LPS point of a continuous index given in (x, y, z) order. Accepts (..., ndim)."""
        idx = np.asarray(index_xyz, dtype=float)
        m = self.direction * np.asarray(self.spacing)
        return idx @ m.T + np.asarray(self.origin)

    def physical_to_index(self, point_xyz: Any) -> np.ndarray:
        """Continuous (x, y, z) index of LPS point(s)."""
        p = np.asarray(point_xyz, dtype=float) - np.asarray(self.origin)
        m = self.direction * np.asarray(self.spacing)
        return p @ np.linalg.inv(m).T

    def napari_affine(self) -> np.ndarray:
        """(ndim+1)x(ndim+1) data-to-world matrix in napari's (z, y, x) order."""
        n = self.ndim
        lin = self.direction * np.asarray(self.spacing)  # columns scaled
        a = np.eye(n + 1)
        a[:n, :n] = lin[::-1, ::-1]
        a[:n, n] = np.asarray(self.origin)[::-1]
        return a

    def affine_ras(self) -> np.ndarray:
        """4x4 index (i=x, j=y, k=z) -> RAS mm affine, as NIfTI/MONAI/nibabel use it."""
        if self.ndim != 3:
            raise ValueError("affine_ras is defined for 3D geometries")
        a = np.eye(4)
        a[:3, :3] = LPS_TO_RAS @ (self.direction * np.asarray(self.spacing))
        a[:3, 3] = LPS_TO_RAS @ np.asarray(self.origin)
        return a

    def display_transpose(self) -> tuple[int, ...] | None:
        """numpy-axes order that puts each image axis along its nearest patient axis.

        napari slices in world space along its displayed axes, so a volume whose image axes are
        *permuted* relative to the patient axes (coronal or sagittal acquisitions: e.g. rows
        running head-to-foot) cannot be sliced in 2D (napari raises a singular-matrix error).
        Presenting the array transposed (a free view) with the correspondingly permuted geometry
        keeps every voxel at exactly the same LPS position while making the linear part
        diagonal-dominant. Returns ``None`` when no transpose is needed (axial data, flips only).
        """
        if self.ndim != 3:
            return None
        nearest = np.argmax(np.abs(self.direction), axis=0)  # patient axis of each image axis (xyz)
        if sorted(nearest.tolist()) != [0, 1, 2]:
            # two image axes nearest the same patient axis (strongly oblique): keep as is
            return None
        if nearest.tolist() == [0, 1, 2]:
            return None
        # new image axis j (xyz) = old image axis whose nearest patient axis is j
        perm_xyz = [int(np.where(nearest == j)[0][0]) for j in range(3)]
        # numpy order is reversed: new numpy axis k <- old numpy axis 2 - perm_xyz[2 - k]
        return tuple(2 - perm_xyz[2 - k] for k in range(3))

    def transposed(self, np_axes: Any) -> Geometry:
        """Geometry of ``array.transpose(np_axes)`` (the same voxels, axes permuted)."""
        n = self.ndim
        axes = [int(a) for a in np_axes]
        if sorted(axes) != list(range(n)):
            raise ValueError(f"not a permutation of {n} axes: {axes}")
        perm_xyz = [n - 1 - axes[n - 1 - j] for j in range(n)]
        return Geometry(
            tuple(self.spacing[i] for i in perm_xyz),
            self.origin,
            self.direction[:, perm_xyz],
        )

    def napari_kwargs(self, warn: bool = True) -> dict[str, Any]:
        """Keyword arguments for a napari layer that place it in LPS world space.

        ``scale``/``translate`` when the direction is the identity (cheapest for napari),
        otherwise the full ``affine``. For volumes whose axes are not aligned with the patient
        axes an :class:`ObliqueGeometryWarning` is emitted, because napari's 2D slicing is
        then not along a true image plane.
        """
        if self.is_identity_direction:
            return {
                "scale": tuple(self.spacing[::-1]),
                "translate": tuple(self.origin[::-1]),
            }
        if warn and self.ndim == 3 and not self.is_axis_aligned:
            warnings.warn(
                f"Volume is oblique ({self.obliquity_degrees:.1f} deg from the patient axes, "
                f"orientation ~{self.orientation}); napari shows it with its exact affine, but "
                "2D slices are cut through world space and may look sheared/resampled. "
                "Use 3D view or resample to an axis-aligned grid for reading.",
                ObliqueGeometryWarning,
                stacklevel=2,
            )
        return {"affine": self.napari_affine()}

    def apply_to_sitk(self, image: Any) -> Any:
        """Set this geometry on a ``SimpleITK.Image`` (in place) and return it."""
        if image.GetDimension() != self.ndim:
            raise ValueError(
                f"geometry is {self.ndim}D but the image is {image.GetDimension()}D"
            )
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.reshape(-1)))
        return image

    def to_sitk(self, array: np.ndarray) -> Any:
        """Wrap a numpy-order array in a ``SimpleITK.Image`` carrying this geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.asarray(array), isVector=False)
        return self.apply_to_sitk(img)

    def same_grid(self, other: Geometry, shape: Any = None, other_shape: Any = None,
                  atol: float = 1e-3) -> bool:
        """Whether two geometries (and optional numpy shapes) describe the same voxel grid."""
        if self.ndim != other.ndim:
            return False
        if shape is not None and other_shape is not None and tuple(shape) != tuple(other_shape):
            return False
        return bool(
            np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=1e-4)
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly representation (stored in ``layer.metadata['geometry']``)."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.reshape(-1).tolist(),
            "space": "LPS",
            "order": "xyz",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        n = len(d["spacing"])
        return cls(tuple(d["spacing"]), tuple(d["origin"]), np.asarray(d["direction"]).reshape(n, n))

    def __eq__(self, other: object) -> bool:  # dataclass eq would compare arrays elementwise
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.same_grid(other, atol=1e-6)

    def __hash__(self) -> int:
        return hash((self.spacing, self.origin, tuple(np.round(self.direction, 6).reshape(-1))))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        og = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"Geometry(spacing=({sp}), origin=({og}), orientation={self.orientation})"


def layer_world_matrix(layer: Any) -> np.ndarray:
    """Full data-to-world matrix of a napari layer from its public transform attributes.

    napari maps data to world as ``affine @ translate @ rotate @ shear @ scale`` (its
    ``CompositeAffine`` under a free ``affine``). Built here from the public ``affine``,
    ``scale``, ``translate`` and, when present, ``rotate`` and ``shear`` (upper-triangular
    coefficients or a full matrix), so it reads no private napari attribute and imports
    nothing from napari.
    """
    n = layer.ndim
    aff = np.asarray(getattr(layer.affine, "affine_matrix", layer.affine), dtype=float)
    aff = aff[-(n + 1):, -(n + 1):]
    linear = np.diag(np.asarray(layer.scale, dtype=float))
    shear = getattr(layer, "shear", None)
    if shear is not None:
        sh = np.asarray(shear, dtype=float)
        if sh.ndim == 1:
            full = np.eye(n)
            full[np.triu_indices(n, 1)] = sh
            sh = full
        linear = sh @ linear
    rotate = getattr(layer, "rotate", None)
    if rotate is not None:
        linear = np.asarray(rotate, dtype=float) @ linear
    st = np.eye(n + 1)
    st[:n, :n] = linear
    st[:n, n] = np.asarray(layer.translate, dtype=float)
    return aff @ st


def geometry_of_layer(layer: Any) -> Geometry:
    """Geometry of a napari Image/Labels layer from its transforms (RGB/channel axes excluded)."""
    m = layer_world_matrix(layer)
    return Geometry.from_napari_affine(m)


def spacing_is_uniform(positions: np.ndarray, rtol: float = 1e-3) -> tuple[bool, float, float]:
    """Check that sorted 1D slice positions are evenly spaced.

    Returns ``(uniform, min_step, max_step)``.
    """
    p = np.asarray(positions, dtype=float)
    if p.size < 2:
        return True, math.nan, math.nan
    steps = np.diff(p)
    mn, mx = float(np.min(steps)), float(np.max(steps))
    return bool(abs(mx - mn) <= rtol * max(abs(mx), 1e-6) + 1e-4), mn, mx
