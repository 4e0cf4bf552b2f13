"""Merlin preprocessing: the MONAI chain of the released model, applied in memory.

``Orientation("RAS") -> Spacing((1.5, 1.5, 3.0), bilinear) -> ScaleIntensityRange(-1000, 1000,
0, 1, clip) -> SpatialPad((224, 224, 160)) -> CenterSpatialCrop((224, 224, 160))``

The input is a :class:`~napari_medfm.io.types.MedicalImage` (numpy order ``(z, y, x)``, LPS
geometry). It is wrapped in a MONAI ``MetaTensor`` in MONAI's own layout ``(C, x, y, z)`` (the
reversed numpy order) with the RAS affine of its geometry, so the MONAI *array* transforms give
exactly what MONAI's dictionary chain gives when it loads the same file (tested), without
temporary files.

Also: :func:`check_ct` (refuse 2D images and non-CT volumes with a clear message).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ...geometry import Geometry
from ...io.types import MedicalImage
from ...runtime.checks import check_ct as _check_ct
from ...runtime.inference import to_metatensor as _to_metatensor

__all__ = [
    "PreprocessConfig",
    "DEFAULT_PREPROCESS",
    "Preprocessed",
    "check_ct",
    "preprocess",
    "build_transforms",
    "to_metatensor",
]



@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the Merlin preprocessing (defaults = the released model)."""

    axcodes: str = "RAS"
    pixdim: tuple[float, float, float] = (1.5, 1.5, 3.0)
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0
    spatial_size: tuple[int, int, int] = (224, 224, 160)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["chain"] = (
            f"Orientation({self.axcodes}) -> Spacing({self.pixdim}, bilinear) -> "
            f"ScaleIntensityRange({self.a_min}, {self.a_max}, {self.b_min}, {self.b_max}, clip) -> "
            f"SpatialPad({self.spatial_size}) -> CenterSpatialCrop({self.spatial_size})"
        )
        return d


DEFAULT_PREPROCESS = PreprocessConfig()


@dataclass
class Preprocessed:
    """Network input and the geometry of its grid (to map results back onto the CT)."""

    tensor: Any  # torch.Tensor (1, H, W, D) float32, MONAI layout (RAS x, y, z)
    affine_ras: np.ndarray  # 4x4 index (i=x, j=y, k=z) -> RAS mm of ``tensor``'s grid

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_affine_ras(self.affine_ras)


def check_ct(image: MedicalImage, what: str = "Merlin") -> None:
    """Raise :class:`WrongModalityError` unless ``image`` is a 3D CT volume (in HU).

    The package's one CT rule (:func:`napari_medfm.runtime.checks.check_ct`), named for Merlin.
    """
    _check_ct(image, what)


def to_metatensor(image: MedicalImage) -> Any:
    """``(1, x, y, z)`` float32 MONAI MetaTensor with the image's RAS affine
    (:func:`napari_medfm.runtime.inference.to_metatensor`)."""
    return _to_metatensor(image, np.float32, channel=True)


def build_transforms(config: PreprocessConfig = DEFAULT_PREPROCESS) -> Any:
    """The MONAI array-transform chain (a ``monai.transforms.Compose``)."""
    from monai.transforms import (
        CenterSpatialCrop,
        Compose,
        Orientation,
        ScaleIntensityRange,
        Spacing,
        SpatialPad,
    )

    return Compose([
        Orientation(axcodes=config.axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=config.pixdim, mode="bilinear"),
        ScaleIntensityRange(a_min=config.a_min, a_max=config.a_max, b_min=config.b_min,
                            b_max=config.b_max, clip=True),
        SpatialPad(spatial_size=config.spatial_size),
        CenterSpatialCrop(roi_size=config.spatial_size),
    ])


def preprocess(image: MedicalImage, config: PreprocessConfig = DEFAULT_PREPROCESS,
               check: bool = True) -> Preprocessed:
    """Run the Merlin chain on ``image``; returns the ``(1, 224, 224, 160)`` tensor + its grid."""
    import torch

    if check:
        check_ct(image)
    mt = build_transforms(config)(to_metatensor(image))
    affine = np.asarray(mt.affine, dtype=float)
    tensor = torch.as_tensor(mt.as_tensor() if hasattr(mt, "as_tensor") else mt,
                             dtype=torch.float32).contiguous()
    return Preprocessed(tensor=tensor, affine_ras=affine)
