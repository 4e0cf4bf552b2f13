"""Input checks shared by every model adapter (one rule per question, one message).

:func:`check_ct` is the single "is this a 3D CT in Hounsfield units?" rule used by Merlin,
the segmenters (hu-basic, TotalSegmentator, CT bundles) and any CT model to come.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import WrongModalityError

__all__ = ["NOT_CT", "check_ct", "check_volume"]

#: Modalities that are certainly not CT (refused even if their values look like HU).
NOT_CT = frozenset({"MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "SM", "OP", "OCT",
                    "XC", "ES", "GM", "OPT", "IVUS"})


def check_volume(image: Any, what: str, *, min_slices: int = 2) -> None:
    """Raise :class:`WrongModalityError` unless ``image`` is a grey 3D volume (not a slide)."""
    name = getattr(image, "name", None) or "image"
    if (image.multiscale or image.rgb or image.kind != "volume"
            or len(image.spatial_shape) != 3):
        raise WrongModalityError(
            f"{name}: {what} needs a 3D CT volume; got a {image.kind} image of shape "
            f"{image.shape} (2D images, colour images and whole slides are not supported).")
    if min(image.spatial_shape) < min_slices:
        raise WrongModalityError(
            f"{name}: {what} needs a 3D CT volume; this one has a single slice {image.shape}.")


def check_ct(image: Any, what: str = "this model", *, min_slices: int = 2) -> None:
    """Raise :class:`WrongModalityError` unless ``image`` is a 3D CT volume in HU.

    Accepted: modality ``CT``; or a modality that is not known to be something else (``OT``,
    empty) whose metadata says ``units: HU`` or whose values look like Hounsfield units
    (some air near -1000 HU, nothing below -3100, something above 0). Modalities in
    :data:`NOT_CT` (MR, PET, X-ray, ...) are refused whatever their values.
    """
    check_volume(image, what, min_slices=min_slices)
    name = getattr(image, "name", None) or "image"
    mod = str(image.modality or "OT").upper()
    if mod == "CT":
        return
    if mod in NOT_CT:
        raise WrongModalityError(
            f"{name}: {what} is a CT model (Hounsfield units); this volume's modality is {mod}. "
            "Use a CT volume, or a model for that modality.")
    units = str((image.metadata or {}).get("units", "")).upper()
    if units == "HU":
        return
    arr = np.asarray(image.data)
    sample = arr[:: max(1, arr.shape[0] // 16)]
    lo, hi = float(np.min(sample)), float(np.max(sample))
    air = float(np.mean(sample < -500))
    if not (lo >= -3100 and air > 0.005 and hi > 0):
        raise WrongModalityError(
            f"{name}: {what} is a CT model; modality is {mod!r} and the values ({lo:.0f}..{hi:.0f})"
            " do not look like CT Hounsfield units (no air near -1000 HU). If this is a CT, make "
            "sure it is in HU (rescale slope/intercept applied) and set its modality to CT.")
