"""The in-memory image container every reader returns and every task consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..geometry import Geometry

#: Kinds of image the plugin distinguishes.
KINDS = ("volume", "image2d", "wsi")


@dataclass
class MedicalImage:
    """Pixel data plus true physical geometry and de-identified header facts.

    Attributes
    ----------
    data
        numpy (or dask/zarr) array in numpy order: ``(z, y, x)`` for volumes, ``(y, x)`` for
        grey 2D, ``(y, x, c)`` for RGB(A). For ``multiscale`` images a list of such arrays,
        full resolution first.
    geometry
        Voxel -> LPS mm mapping of the (first level of the) spatial axes.
    modality
        DICOM-style modality code (``CT``, ``MR``, ``CR``, ``DX``, ``SM`` for slides, ``OP``
        for fundus photos, ``OT`` unknown).
    kind
        ``"volume"``, ``"image2d"`` or ``"wsi"``.
    name
        Layer name shown to the user (series description / number or file stem; never a
        patient identifier).
    metadata
        Header facts; never patient identifiers. Conventional keys (all optional):

        ``source_path`` (file/folder opened), ``source_files`` (DICOM: list of files, index k
        of numpy axis 0 <-> ``source_files[k]``; one entry for multi-frame),
        ``series_instance_uid``, ``study_instance_uid``, ``frame_of_reference_uid``,
        ``sop_class_uid``, ``series_description``, ``series_number``, ``transfer_syntax``,
        ``rescale`` ({"slope", "intercept"}), ``units`` ("HU" for CT), ``photometric``,
        ``slice_spacing`` / ``slice_thickness`` (mm), ``warnings`` (list of user-facing
        strings: gantry tilt, non-uniform spacing, ...), and for label maps
        ``label_names`` ({int: name}) and ``label_colors`` ({int: [r, g, b]} 0-255).
    is_label
        The image is a label map (segmentation) and becomes a napari Labels layer.
    """

    data: Any
    geometry: Geometry
    modality: str = "OT"
    kind: str = "volume"
    name: str = "image"
    rgb: bool = False
    multiscale: bool = False
    window: tuple[float, float] | None = None  # (center, width) default display window
    metadata: dict[str, Any] = field(default_factory=dict)
    is_label: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        base = self.data[0] if self.multiscale else self.data
        return tuple(base.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[:-1] if self.rgb else self.shape

    def contrast_limits(self) -> tuple[float, float] | None:
        """Display range from the default window (center/width), if any."""
        if self.window is None:
            return None
        c, w = self.window
        return (float(c - w / 2.0), float(c + w / 2.0))

    def full_metadata(self) -> dict[str, Any]:
        """Metadata as stored on a napari layer (always includes geometry/modality/kind)."""
        md = dict(self.metadata)
        md.setdefault("modality", self.modality)
        md["kind"] = self.kind
        md["geometry"] = self.geometry.to_dict()
        if self.window is not None:
            md.setdefault("window", list(self.window))
        return md

    def layer_data(self, **extra: Any) -> tuple[Any, dict[str, Any], str]:
        """A napari ``LayerDataTuple`` ``(data, kwargs, "image"|"labels")``; no napari import."""
        if self.is_label:
            kwargs = {"name": self.name, "metadata": self.full_metadata(), "multiscale": self.multiscale}
            kwargs.update(self.geometry.napari_kwargs())
            kwargs.update(extra)
            return (self.data, kwargs, "labels")
        kwargs: dict[str, Any] = {
            "name": self.name,
            "metadata": self.full_metadata(),
            "rgb": self.rgb,
            "multiscale": self.multiscale,
        }
        kwargs.update(self.geometry.napari_kwargs())
        cl = self.contrast_limits()
        if cl is not None and not self.rgb:
            kwargs["contrast_limits"] = cl
        if not self.rgb:
            kwargs.setdefault("colormap", "gray")
        kwargs.update(extra)
        return (self.data, kwargs, "image")

    def to_sitk(self) -> Any:
        """Materialise as a ``SimpleITK.Image`` with the geometry (not for WSI)."""
        if self.multiscale:
            raise ValueError("to_sitk is not available for multiscale (whole-slide) images")
        import SimpleITK as sitk

        arr = np.asarray(self.data)
        img = sitk.GetImageFromArray(arr, isVector=self.rgb)
        return self.geometry.apply_to_sitk(img)

    @classmethod
    def from_sitk(cls, image: Any, **kwargs: Any) -> MedicalImage:
        """Wrap a ``SimpleITK.Image`` (array copied into numpy order)."""
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(image)
        rgb = image.GetNumberOfComponentsPerPixel() > 1
        kwargs.setdefault("rgb", rgb)
        kwargs.setdefault("kind", "volume" if image.GetDimension() == 3 else "image2d")
        return cls(arr, Geometry.from_sitk(image), **kwargs)
