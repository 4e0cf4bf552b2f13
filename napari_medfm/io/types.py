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
        """A napari ``LayerDataTuple`` ``(data, kwargs, "image"|"labels")``; no napari import.

        Coronal/sagittal volumes are handed to napari as a transposed *view* (see
        :meth:`Geometry.display_transpose`) with the matching geometry, so napari can slice
        them; ``metadata['display_transpose']`` records it and :meth:`from_layer` undoes it.
        """
        data, geometry = self.data, self.geometry
        md = self.full_metadata()
        axes = None if (self.multiscale or self.rgb) else geometry.display_transpose()
        if axes is not None:
            data = data.transpose(axes)
            geometry = geometry.transposed(axes)
            md["display_transpose"] = list(axes)
        if self.is_label:
            kwargs = {"name": self.name, "metadata": md, "multiscale": self.multiscale}
            kwargs.update(geometry.napari_kwargs())
            kwargs.update(label_display_kwargs(md))
            kwargs.update(extra)
            return (data, kwargs, "labels")
        kwargs: dict[str, Any] = {
            "name": self.name,
            "metadata": md,
            "rgb": self.rgb,
            "multiscale": self.multiscale,
        }
        kwargs.update(geometry.napari_kwargs())
        cl = self.contrast_limits()
        if cl is not None and not self.rgb:
            kwargs["contrast_limits"] = cl
        if not self.rgb:
            kwargs.setdefault("colormap", "gray")
        kwargs.update(extra)
        return (data, kwargs, "image")

    @classmethod
    def from_layer(cls, layer: Any) -> MedicalImage:
        """The image behind a napari Image/Labels layer, in its *source* axis order.

        Geometry comes from the layer's own transforms (so it is right even for layers we did
        not create); a display transpose applied by :meth:`layer_data` is undone so that
        ``metadata['source_files']`` indexing and writers see the source order again.
        """
        from ..geometry import geometry_of_layer

        md = dict(getattr(layer, "metadata", None) or {})
        multiscale = bool(getattr(layer, "multiscale", False))
        data = layer.data
        geometry = geometry_of_layer(layer) if not multiscale else Geometry.from_dict(md["geometry"])
        data, geometry = undo_display_transpose(data, geometry, md)
        md.pop("display_transpose", None)
        is_label = type(layer).__name__ == "Labels"
        kind = md.get("kind") or ("volume" if geometry.ndim == 3 else "image2d")
        window = md.get("window")
        return cls(
            data, geometry,
            modality=str(md.get("modality", "OT")),
            kind=kind,
            name=str(getattr(layer, "name", "image")),
            rgb=bool(getattr(layer, "rgb", False)),
            multiscale=multiscale,
            window=tuple(window) if window is not None and len(window) == 2 else None,
            metadata=md,
            is_label=is_label,
        )

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


def undo_display_transpose(data: Any, geometry: Geometry, metadata: dict[str, Any] | None) -> tuple[Any, Geometry]:
    """Map layer-order ``data``/``geometry`` back to source order (see ``display_transpose``)."""
    axes = (metadata or {}).get("display_transpose")
    if not axes:
        return data, geometry
    inv = [int(i) for i in np.argsort(axes)]
    return data.transpose(inv), geometry.transposed(inv)


def label_display_kwargs(metadata: dict[str, Any]) -> dict[str, Any]:
    """Labels-layer kwargs that show the label colours and names (no napari import).

    ``metadata['label_colors']`` ({value: [r, g, b] 0-255}) becomes a direct colormap given as
    a plain dict (napari turns it into a ``DirectLabelColormap``; values without a colour are
    drawn yellow so that nothing painted is invisible) and ``metadata['label_names']`` becomes
    the layer's ``features`` (napari shows the name of the label under the cursor).
    """
    out: dict[str, Any] = {}
    colors = metadata.get("label_colors") or {}
    names = metadata.get("label_names") or {}
    if colors:
        table: dict[Any, Any] = {None: (1.0, 1.0, 0.0, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for k, rgb in colors.items():
            try:
                key = int(k)
                vals = [float(c) for c in list(rgb)[:3]]
            except (TypeError, ValueError):
                continue
            scale = 255.0 if max(vals, default=0.0) > 1.0 else 1.0
            table[key] = (*(v / scale for v in vals), 1.0)
        out["colormap"] = table
    if names:
        items = sorted((int(k), str(v)) for k, v in names.items() if str(k).lstrip("-").isdigit())
        if not any(k == 0 for k, _ in items):
            items.insert(0, (0, "background"))
        out["features"] = {"index": [k for k, _ in items], "name": [v for _, v in items]}
    return out
