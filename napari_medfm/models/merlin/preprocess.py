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

from ...errors import WrongModalityError
from ...geometry import Geometry
from ...io.types import MedicalImage

__all__ = [
    "PreprocessConfig",
    "DEFAULT_PREPROCESS",
    "Preprocessed",
    "check_ct",
    "preprocess",
    "build_transforms",
    "to_metatensor",
]

#: Modalities that are certainly not CT (refused even if their values look like HU).
_NOT_CT = {"MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "SM", "OP", "OCT", "XC", "ES",
           "GM", "OPT", "IVUS"}


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

    CT is recognised from the modality code; for images of unknown modality (``OT``) the
    intensity range must look like Hounsfield units (air around -1000 present).
    """
    name = image.name or "image"
    if image.multiscale or image.rgb or image.kind != "volume" or len(image.spatial_shape) != 3:
        raise WrongModalityError(
            f"{name}: {what} needs a 3D CT volume; got a {image.kind} image of shape "
            f"{image.shape} (2D images, colour images and whole slides are not supported)."
        )
    if min(image.spatial_shape) < 2:
        raise WrongModalityError(
            f"{name}: {what} needs a 3D CT volume; this one has a single slice {image.shape}."
        )
    mod = (image.modality or "OT").upper()
    if mod == "CT":
        return
    if mod in _NOT_CT:
        raise WrongModalityError(
            f"{name}: {what} is a CT model; this volume's modality is {mod}. Use a CT volume."
        )
    arr = np.asarray(image.data)
    sample = arr[:: max(1, arr.shape[0] // 16)]
    lo, hi = float(np.min(sample)), float(np.max(sample))
    air = float(np.mean(sample < -500))
    if not (lo >= -3100 and air > 0.005 and hi > 0):
        raise WrongModalityError(
            f"{name}: modality is {mod!r} and the values ({lo:.0f}..{hi:.0f}) do not look like CT "
            "Hounsfield units (no air near -1000 HU). If this is a CT, make sure it is in HU "
            "(rescale slope/intercept applied) and set its modality to CT."
        )


def to_metatensor(image: MedicalImage) -> Any:
    """``(1, x, y, z)`` float32 MONAI MetaTensor with the image's RAS affine."""
    import torch
    from monai.data import MetaTensor

    arr = np.asarray(image.data)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {arr.shape}")
    xyz = np.ascontiguousarray(arr.transpose(2, 1, 0)[None], dtype=np.float32)
    affine = torch.as_tensor(image.geometry.affine_ras(), dtype=torch.float64)
    return MetaTensor(torch.from_numpy(xyz), affine=affine, meta={"space": "RAS"})


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
