"""Shared 2D preprocessing for the 2D encoders (MerMED-FM, RAD-DINO, DINOv2).

Pipeline (numpy in, ``float32 (3, S, S)`` out; torch only for the resize):

1. **Pick a 2D plane.** 2D images pass through. Whole-slide (multiscale) images use the
   smallest pyramid level whose short side is still >= ``size`` (a thumbnail of the slide).
   Volumes are refused with :class:`~napari_medfm.errors.WrongModalityError` unless the caller
   selects a slice explicitly (``slice_index=int`` along numpy axis 0, or ``"middle"``).
2. **Intensities to [0, 1].** CT (``modality`` CT, or ``metadata['units'] == 'HU'``) is
   windowed in Hounsfield units (default window centre 40 / width 400, soft tissue; pass
   ``ct_window=(c, w)`` to change it) then clipped to [0, 1]. 8-bit data are divided by 255.
   Anything else (12/16-bit radiographs, float data) is scaled between its 0.5 and 99.5
   percentiles (robust to burnt-in text and collimator edges).
3. **Channels.** Grey -> replicated to 3 channels; RGBA -> alpha dropped.
4. **Geometry.** ``resize="squash"`` (MerMED-FM, the release's ``Resize((224, 224))``): the
   whole plane is resized to ``size`` x ``size`` (bilinear, antialiased, aspect not kept, no
   crop), exactly torchvision's ``Resize((size, size), antialias=True)`` on the [0, 1] tensor.
   ``resize="crop"``: planes more than 4x larger than needed are first block-averaged to about
   twice the target size; then the short side is resized to ``size`` (antialiased bilinear),
   then centre crop ``size`` x ``size`` (the usual evaluation transform of DINO-style encoders).
5. **Normalisation** with the per-modality mean/std of MerMED-FM (see :data:`MODALITY_NORMS`)
   or the caller's own mean/std (RAD-DINO / DINOv2 use their processor's values).

Modalities are canonicalised from DICOM codes (CR/DX -> CXR, OP -> fundus, SM -> pathology,
US -> ultrasound, OPT/OCT -> OCT, XC -> dermatology). For the per-modality statistics an
unknown or missing modality (``OT``, plain PNG files) is an error listing the modalities
(:class:`UnknownModalityError`, see :func:`resolve_modality`); ImageNet statistics are used only
when the caller forces the fallback (``modality="imagenet"`` or ``allow_fallback=True``), with a
loud :class:`ModalityFallbackWarning`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import WrongModalityError

log = logging.getLogger(__name__)

#: MerMED-FM per-modality (mean, std), channel order RGB.
MODALITY_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fundus": ((0.3378, 0.2133, 0.1329), (0.2964, 0.1900, 0.1393)),
    "OCT": ((0.1983,) * 3, (0.2217,) * 3),
    "CXR": ((0.5076,) * 3, (0.3122,) * 3),
    "pathology": ((0.7214, 0.6050, 0.7054), (0.2486, 0.2714, 0.2457)),
    "CT": ((0.3301,) * 3, (0.3252,) * 3),
    "ultrasound": ((0.1469,) * 3, (0.1806,) * 3),
    "dermatology": ((0.6614, 0.5189, 0.4714), (0.2396, 0.2199, 0.2286)),
}

#: Fallback statistics, used only when the caller forces it (see :func:`resolve_modality`).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: The name of the forced fallback (ImageNet statistics) in :func:`resolve_modality` results.
FALLBACK_MODALITY = "imagenet"


class UnknownModalityError(WrongModalityError):
    """The image's modality is missing or not one MerMED-FM was trained on (message lists them)."""


class ModalityFallbackWarning(UserWarning):
    """ImageNet statistics are used because the caller forced the fallback."""

#: Default CT window (centre, width) in HU for 2D CT slices.
DEFAULT_CT_WINDOW = (40.0, 400.0)

_ALIASES = {
    "cr": "CXR", "dx": "CXR", "cxr": "CXR", "chest": "CXR", "xray": "CXR", "x-ray": "CXR",
    "op": "fundus", "fundus": "fundus", "cfp": "fundus",
    "sm": "pathology", "pathology": "pathology", "wsi": "pathology", "histology": "pathology",
    "ct": "CT",
    "us": "ultrasound", "ultrasound": "ultrasound",
    "opt": "OCT", "oct": "OCT",
    "xc": "dermatology", "dermatology": "dermatology", "derm": "dermatology",
}


def canonical_modality(modality: str | None) -> str | None:
    """Map a DICOM code or a free-form name to a key of :data:`MODALITY_NORMS` (or None)."""
    if not modality:
        return None
    return _ALIASES.get(str(modality).strip().lower())


def norm_for(modality: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for a modality key (or alias); ImageNet statistics for ``"imagenet"``.

    Lenient lookup (unknown -> ImageNet) kept for callers with their own rules; MerMED-FM
    resolves the modality with :func:`resolve_modality` first, which never falls back silently.
    """
    key = canonical_modality(modality)
    return MODALITY_NORMS.get(key, IMAGENET_NORM) if key else IMAGENET_NORM


def modality_choices() -> str:
    """Human-readable list of the accepted modalities (for error messages and help)."""
    return ", ".join(MODALITY_NORMS)


def resolve_modality(modality: str | None = None, image: Any = None, *,
                     allow_fallback: bool = False, model: str = "MerMED-FM") -> str:
    """The :data:`MODALITY_NORMS` key used to normalise ``image`` (or ``"imagenet"``).

    ``modality`` (the caller's choice) wins over ``image.modality``; an image without a
    modality whose ``metadata['units']`` is ``'HU'`` is CT. DICOM codes and aliases are
    accepted (:func:`canonical_modality`). ``modality="imagenet"`` forces the ImageNet
    statistics; ``allow_fallback=True`` uses them when the modality is unknown. Both emit a
    :class:`ModalityFallbackWarning` (and a log warning). Otherwise an unknown or missing
    modality raises :class:`UnknownModalityError` listing the modalities.
    """
    given = modality if modality not in (None, "") else getattr(image, "modality", None)
    name = None if given in (None, "") else str(given).strip()
    what = f"{getattr(image, 'name', None) or 'image'}"
    if name is None:
        md = getattr(image, "metadata", None) or {}
        if md.get("units") == "HU":
            return "CT"
    if name is not None and name.lower() == FALLBACK_MODALITY:
        _warn_fallback(f"{what}: {model} normalised with ImageNet statistics (forced by "
                       f"modality='imagenet'); the released model expects one of "
                       f"{modality_choices()}")
        return FALLBACK_MODALITY
    key = canonical_modality(name)
    if key is not None:
        return key
    if allow_fallback:
        _warn_fallback(f"{what}: modality {name!r} is not one {model} knows; normalised with "
                       f"ImageNet statistics (fallback forced) - embeddings will differ from "
                       f"the released model's. Modalities: {modality_choices()}")
        return FALLBACK_MODALITY
    got = "no modality" if name is None else f"modality {name!r}"
    raise UnknownModalityError(
        f"{what}: {got}; {model} normalises each modality with its own statistics - choose "
        f"one of: {modality_choices()} (CLI --modality; DICOM codes CR/DX, OP, SM, CT, US, "
        f"OPT, XC are recognised), or 'imagenet' to force ImageNet statistics"
    )


def _warn_fallback(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, ModalityFallbackWarning, stacklevel=3)


def _is_ct(image: Any, modality: str | None) -> bool:
    if canonical_modality(modality) == "CT":
        return True
    md = getattr(image, "metadata", None) or {}
    return md.get("units") == "HU"


def select_plane(image: Any, size: int = 224, slice_index: int | str | None = None) -> np.ndarray:
    """The 2D pixel array (``(y, x)`` or ``(y, x, c)``) an encoder sees for ``image``.

    ``image`` is a :class:`~napari_medfm.io.types.MedicalImage`.
    """
    if getattr(image, "multiscale", False):
        levels = list(image.data)
        chosen = levels[0]
        for lvl in levels:  # full resolution first, smaller after
            sh = lvl.shape[:2]
            if min(sh) >= size:
                chosen = lvl
        return np.asarray(chosen)
    arr = np.asarray(image.data)
    spatial = arr.ndim - (1 if getattr(image, "rgb", False) else 0)
    if spatial == 2:
        return arr
    if spatial != 3:
        raise WrongModalityError(f"{image.name}: expected a 2D image, got shape {arr.shape}")
    if slice_index is None:
        raise WrongModalityError(
            f"{image.name}: this is a 3D {image.modality} volume of shape {arr.shape}; 2D encoders "
            "take one slice at a time - choose a slice (slice_index=N or 'middle', CLI --slice)"
        )
    n = arr.shape[0]
    k = n // 2 if slice_index == "middle" else int(slice_index)
    if not -n <= k < n:
        raise WrongModalityError(f"{image.name}: slice {k} out of range (volume has {n} slices)")
    return arr[k]


def prereduce(plane: np.ndarray, size: int) -> np.ndarray:
    """Block-average a plane much larger than ``size`` down to about ``2 * size`` (float32).

    A cheap first step before the antialiased resize (a 4288x2848 fundus photo would otherwise
    be converted to float and filtered at full resolution); planes already small are returned
    unchanged (dtype kept).
    """
    a = np.asarray(plane)
    f = min(a.shape[0], a.shape[1]) // (2 * size)
    if f < 2:
        return a
    if a.dtype == np.uint8 and (a.ndim == 2 or a.shape[-1] in (3, 4)):
        from PIL import Image  # SIMD box reduction, much faster than numpy/torch here

        return np.asarray(Image.fromarray(a).reduce(f), dtype=np.float32)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()[None]
    out = F.avg_pool2d(t, kernel_size=f, stride=f)[0]
    return (out[0] if a.ndim == 2 else out.permute(1, 2, 0)).contiguous().numpy()


def to_unit(plane: np.ndarray, *, ct: bool = False,
            ct_window: tuple[float, float] = DEFAULT_CT_WINDOW,
            dtype: Any = None) -> np.ndarray:
    """Intensities of one plane to float32 in [0, 1] (see the module docstring), shape kept.

    ``dtype`` is the plane's original dtype when it was already block-averaged to float.
    """
    a = np.asarray(plane)
    src = np.dtype(dtype) if dtype is not None else a.dtype
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if ct:
        c, w = ct_window
        lo = c - w / 2.0
        return np.clip((a.astype(np.float32) - lo) / float(w), 0.0, 1.0)
    if src == np.uint8:
        return a.astype(np.float32) / 255.0
    if src == np.bool_:
        return a.astype(np.float32)
    f = a.astype(np.float32)
    finite = np.isfinite(f)
    if not finite.all():
        f = np.where(finite, f, 0.0)
    step = max(1, int(np.sqrt(f.shape[0] * f.shape[1] / 262144)))  # percentiles on <= ~256k px
    lo, hi = np.percentile(f[::step, ::step], [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((f - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_rgb_chw(unit: np.ndarray) -> np.ndarray:
    """(y, x) or (y, x, c) in [0, 1] -> (3, y, x) float32 (grey replicated)."""
    if unit.ndim == 2:
        return np.repeat(unit[None], 3, axis=0).astype(np.float32, copy=False)
    if unit.ndim == 3:
        c = unit.shape[-1]
        if c == 1:
            return np.repeat(unit[..., 0][None], 3, axis=0)
        if c >= 3:
            return np.ascontiguousarray(np.moveaxis(unit[..., :3], -1, 0), dtype=np.float32)
        if c == 2:  # grey + alpha
            return np.repeat(unit[..., 0][None], 3, axis=0)
    raise ValueError(f"cannot make a 3-channel image from shape {unit.shape}")


def resize_center_crop(chw: np.ndarray, size: int, crop: int | None = None) -> np.ndarray:
    """Short side to ``size`` (antialiased bilinear), then centre crop ``crop`` (default ``size``)."""
    import torch
    import torch.nn.functional as F

    crop = size if crop is None else crop
    _, h, w = chw.shape
    scale = size / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    t = torch.from_numpy(np.ascontiguousarray(chw))[None]
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=(scale < 1),
                          align_corners=False)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return t[0, :, top:top + crop, left:left + crop].clamp_(0, 1).numpy()


def resize_square(chw: np.ndarray, size: int) -> np.ndarray:
    """The whole plane to ``size`` x ``size`` (bilinear, antialiased, aspect not kept).

    Identical to torchvision ``Resize((size, size), antialias=True)`` on a float tensor (the
    MerMED-FM release's downstream transform).
    """
    import torch
    import torch.nn.functional as F

    _, h, w = chw.shape
    t = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))[None]
    if (h, w) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return t[0].numpy()


def preprocess(
    image: Any,
    *,
    size: int = 224,
    modality: str | None = None,
    slice_index: int | str | None = None,
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: str = "crop",
    allow_fallback: bool = False,
) -> np.ndarray:
    """A :class:`MedicalImage` -> normalised ``float32 (3, size, size)`` network input.

    ``modality`` overrides ``image.modality`` (used to pick the CT path and the mean/std).
    Without ``mean``/``std`` the modality is resolved by :func:`resolve_modality` (an unknown
    one is an error unless ``allow_fallback``). ``resize``: ``"squash"`` (MerMED-FM release) or
    ``"crop"`` (short side then centre crop).
    """
    mod = modality or getattr(image, "modality", None)
    if mean is None or std is None:
        key = resolve_modality(modality, image, allow_fallback=allow_fallback)
        mean, std = norm_for(key)
        if key == "CT":
            mod = "CT"
    plane = select_plane(image, size=size, slice_index=slice_index)
    dtype = plane.dtype
    ct = _is_ct(image, mod)
    if resize == "squash":
        chw = resize_square(to_rgb_chw(to_unit(plane, ct=ct, ct_window=ct_window)), size)
    elif resize == "crop":
        unit = to_unit(prereduce(plane, size), ct=ct, ct_window=ct_window, dtype=dtype)
        chw = resize_center_crop(to_rgb_chw(unit), size)
    else:
        raise ValueError(f"resize must be 'squash' or 'crop', not {resize!r}")
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return ((chw - m) / s).astype(np.float32)


def unit_rgb_uint8(image: Any, *, size: int = 224, modality: str | None = None,
                   slice_index: int | str | None = None,
                   ct_window: tuple[float, float] = DEFAULT_CT_WINDOW) -> np.ndarray:
    """The selected plane as ``uint8 (y, x, 3)`` after windowing (for image processors/thumbnails)."""
    mod = modality or getattr(image, "modality", None)
    plane = select_plane(image, size=size, slice_index=slice_index)
    dtype = plane.dtype
    unit = to_unit(prereduce(plane, size), ct=_is_ct(image, mod), ct_window=ct_window, dtype=dtype)
    rgb = np.moveaxis(to_rgb_chw(unit), 0, -1)
    return np.round(rgb * 255.0).astype(np.uint8)
