"""Similar cases dock widget: query a similar-case index with the current image, a region of
it, or a sentence.

Thin: the query runs :func:`napari_medfm.tasks.retrieval.query.query_task` in a napari worker
(cancel stops it between steps); the CLI twin is ``medfm index query`` (``--text`` for
sentences). The GUI thread only captures plain inputs (the layer's image without copying its
pixels, the shown slice, the rectangle's world corners, the sentence); the worker builds the
query image with :func:`~napari_medfm.tasks.retrieval.query.build_query_image` (slice and
direction arithmetic live there), embeds and searches. Text queries use the index's own
vision-language model (BiomedCLIP, Merlin's text tower); image-only indexes say so.
Clicking a result reads that case in a worker and opens it with its own geometry.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import MedfmError
from ..geometry import geometry_of_layer
from ..io.types import MedicalImage
from ..progress import Progress
from ._common import format_error, hbox, start_task

_NONE = "(whole image)"
_ANY = "(any)"
_FROM_LAYER = "(from layer)"
HIT_ROLE = Qt.ItemDataRole.UserRole


def layer_image(layer: Any) -> MedicalImage:
    """The image of a napari Image layer in its displayed order (pixels not copied)."""
    md = dict(getattr(layer, "metadata", {}) or {})
    rgb = bool(getattr(layer, "rgb", False))
    geom = geometry_of_layer(layer)
    if getattr(layer, "multiscale", False):
        return MedicalImage(list(layer.data), geom, modality=md.get("modality", "SM"),
                            kind="wsi", name=layer.name, rgb=rgb, multiscale=True, metadata=md)
    spatial = layer.data.ndim - (1 if rgb else 0)
    if spatial not in (2, 3):
        raise MedfmError(f"{layer.name}: {spatial}D layers are not supported for similar cases")
    return MedicalImage(layer.data, geom, modality=md.get("modality", "OT"),
                        kind="volume" if spatial == 3 else "image2d", name=layer.name, rgb=rgb,
                        metadata=md)


def image_from_layer(layer: Any, current_index: int | None = None) -> MedicalImage:
    """A 2D :class:`MedicalImage` from a napari Image layer (the shown slice of a volume)."""
    from ..tasks.retrieval.query import build_query_image

    return build_query_image(layer_image(layer), slice_index=current_index)


def open_case_job(source_path: str, image_index: int) -> Generator[Progress, None, list[Any]]:
    """Worker body for opening a result: read the case (never on the GUI thread)."""
    from .. import io as mio

    yield Progress(0, 1, f"reading {Path(source_path).name}")
    images = [im for im in mio.read(source_path) if not im.is_label]
    k = int(image_index)
    return images[k:k + 1] if k < len(images) else images[:1]


def shape_world_corners(shapes: Any, index: int | None = None) -> np.ndarray:
    """World coordinates (z/y/x order) of one shape's vertices (default: selected or last)."""
    if not len(shapes.data):
        raise MedfmError(f"{shapes.name}: draw a rectangle first")
    sel = sorted(getattr(shapes, "selected_data", set()) or [])
    i = index if index is not None else (sel[-1] if sel else len(shapes.data) - 1)
    verts = np.asarray(shapes.data[i], dtype=float)
    return np.asarray([shapes.data_to_world(v) for v in verts], dtype=float)


class SimilarCasesWidget(QWidget):
    """Pick an index folder, a layer (and optionally a Shapes rectangle), k and filters;
    Search shows a gallery of the most similar cases; clicking one opens it."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.hits: list[Any] = []
        self.last_query_image: MedicalImage | None = None
        self.index_dims: tuple[int, ...] = (2,)  # spatial dims the index's model embeds

        self.index_edit = QLineEdit()
        self.index_edit.setPlaceholderText("index folder (medfm index build ...)")
        self.browse_button = QPushButton("Browse...")
        self.index_info = QLabel("")
        self.index_info.setWordWrap(True)
        self.layer_combo = QComboBox()
        self.region_combo = QComboBox()
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 200)
        self.k_spin.setValue(10)
        from ..models.encoder2d import MODALITY_NORMS

        self.query_modality_combo = QComboBox()
        self.query_modality_combo.addItem(_FROM_LAYER)
        for m in MODALITY_NORMS:
            self.query_modality_combo.addItem(m)
        self.query_modality_combo.setToolTip(
            "Modality used to normalise the query image (PNG/JPEG layers carry none)")
        self.modality_combo = QComboBox()
        self.modality_combo.addItem(_ANY)
        self.label_edit = QLineEdit()
        self.label_edit.setPlaceholderText("label / report text contains...")
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("(weights recorded in the index)")
        self.search_button = QPushButton("Find similar cases")
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("find cases like this sentence, e.g. right pleural "
                                          "effusion")
        self.text_button = QPushButton("Search text")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.gallery = QListWidget()
        self.gallery.setViewMode(QListView.ViewMode.IconMode)
        self.gallery.setIconSize(QSize(96, 96))
        self.gallery.setResizeMode(QListView.ResizeMode.Adjust)
        self.gallery.setWordWrap(True)
        self.gallery.setGridSize(QSize(128, 150))

        row = hbox(self.index_edit, self.browse_button)
        form = QFormLayout()
        form.addRow("Index", row)
        form.addRow("", self.index_info)
        form.addRow("Image layer", self.layer_combo)
        form.addRow("Region", self.region_combo)
        form.addRow("Image is", self.query_modality_combo)
        form.addRow("k", self.k_spin)
        form.addRow("Only modality", self.modality_combo)
        form.addRow("Label", self.label_edit)
        form.addRow("Weights", self.weights_edit)
        buttons = hbox(self.search_button, self.cancel_button)
        text_row = hbox((self.text_edit, 1), self.text_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addLayout(text_row)
        layout.addWidget(self.status)
        layout.addWidget(self.gallery, 1)

        self.browse_button.clicked.connect(self._browse)
        self.index_edit.editingFinished.connect(self.refresh_index_info)
        self.search_button.clicked.connect(lambda: self.search())
        self.text_button.clicked.connect(lambda: self.search_text())
        self.text_edit.returnPressed.connect(lambda: self.search_text())
        self.cancel_button.clicked.connect(self.cancel)
        self.gallery.itemClicked.connect(self._open_item)
        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            getattr(ev, name).connect(lambda _e=None: self._refresh_layers())
        self._refresh_layers()

    # ------------------------------------------------------------------ layers / index
    def _refresh_layers(self) -> None:
        from napari.layers import Image, Shapes

        cur, reg = self.layer_combo.currentText(), self.region_combo.currentText()
        self.layer_combo.clear()
        self.region_combo.clear()
        self.region_combo.addItem(_NONE)
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                self.layer_combo.addItem(layer.name)
            elif isinstance(layer, Shapes):
                self.region_combo.addItem(layer.name)
        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and not cur:
            cur = active.name
        for combo, text in ((self.layer_combo, cur), (self.region_combo, reg)):
            i = combo.findText(text)
            if i >= 0:
                combo.setCurrentIndex(i)

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Similar-case index folder",
                                             self.index_edit.text())
        if d:
            self.set_index(d)

    def set_index(self, path: str | Path) -> None:
        self.index_edit.setText(str(path))
        self.refresh_index_info()

    def refresh_index_info(self) -> dict[str, Any] | None:
        from ..tasks.retrieval.index import CaseIndex

        path = self.index_edit.text().strip()
        if not path:
            return None
        try:
            with CaseIndex.open(path) as idx:
                info = idx.info()
        except MedfmError as exc:
            self.index_info.setText(format_error(exc))
            return None
        self.index_info.setText(f"{info['model_id']}: {info['cases']} cases "
                                f"({info['index_type'] or 'not finalised'})")
        try:
            from ..runtime.registry import get_spec

            self.index_dims = tuple(get_spec(info["model_id"]).dims)
        except MedfmError:
            self.index_dims = (2,)
        from ..tasks.retrieval.query import supports_text

        if supports_text(info["model_id"]):
            self.text_edit.setToolTip(f"embedded with {info['model_id']}'s text tower")
        else:
            self.text_edit.setToolTip(f"text search needs a vision-language index; this one "
                                      f"holds {info['model_id']} (image-only) embeddings")
        cur = self.modality_combo.currentText()
        self.modality_combo.clear()
        self.modality_combo.addItem(_ANY)
        for m in sorted(k for k in info["modalities"] if k):
            self.modality_combo.addItem(m)
        i = self.modality_combo.findText(cur)
        self.modality_combo.setCurrentIndex(max(i, 0))
        return info

    # ------------------------------------------------------------------ query
    def query_source(self) -> dict[str, Any]:
        """The plain inputs of an image query, read on the GUI thread (no pixels copied):
        the layer's image, the shown slice, the rectangle's world corners, 3D-encoder mode."""
        name = self.layer_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise MedfmError("open an image first (no image layer selected)")
        layer = self.viewer.layers[name]
        image = layer_image(layer)
        is3d = len(image.spatial_shape) == 3
        k = None
        if is3d:
            k = int(round(float(layer.world_to_data(self.viewer.dims.point)[0])))
        region = self.region_combo.currentText()
        corners = None
        if region and region != _NONE and region in self.viewer.layers:
            corners = shape_world_corners(self.viewer.layers[region])
        return {"image": image, "slice_index": k, "corners_world": corners,
                "volume_mode": is3d and 2 not in self.index_dims}

    def query_image(self) -> MedicalImage:
        """The image (or region) that will be embedded (what the worker builds)."""
        from ..tasks.retrieval.query import build_query_image

        return build_query_image(**self.query_source())

    def _filters(self) -> dict[str, Any]:
        mod = self.modality_combo.currentText()
        return {"weights": self.weights_edit.text().strip() or None,
                "filter_modality": None if mod == _ANY else mod,
                "label": self.label_edit.text().strip() or None}

    def search(self) -> Any:
        """Start an image query in a worker; returns the worker (None if nothing to do)."""
        from ..tasks.retrieval.query import build_query_image, query_task

        index_dir = self.index_edit.text().strip()
        if not index_dir:
            self.status.setText("choose an index folder first")
            return None
        try:
            source = self.query_source()
        except MedfmError as exc:
            self.status.setText(format_error(exc))
            return None
        qmod = self.query_modality_combo.currentText()
        kw = {"modality": None if qmod == _FROM_LAYER else qmod, **self._filters()}
        k = self.k_spin.value()

        def job() -> Generator[Progress, None, list[Any]]:
            yield Progress(0, 4, "reading the query image")
            image = build_query_image(**source)
            hits = yield from query_task(index_dir, image, k, **kw)
            return image, hits

        return self._start(job, "searching...")

    def search_text(self, text: str | None = None) -> Any:
        """Start a text query ("find cases like this sentence") in a worker."""
        from ..tasks.retrieval.query import query_text_task

        index_dir = self.index_edit.text().strip()
        text = (text if text is not None else self.text_edit.text()).strip()
        if not index_dir:
            self.status.setText("choose an index folder first")
            return None
        if not text:
            self.status.setText("type a sentence first (e.g. \"right pleural effusion\")")
            return None
        kw = self._filters()
        k = self.k_spin.value()
        return self._start(lambda: query_text_task(index_dir, text, k, **kw),
                           f"searching for \u201c{text}\u201d...")

    def _start(self, job: Any, message: str) -> Any:
        self.search_button.setEnabled(False)
        self.text_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(message)
        self.worker = start_task(
            job,
            on_result=self._show_hits,
            on_error=self._on_error,
            on_progress=lambda p: self.status.setText(p.message),
            on_aborted=self._on_aborted,
            description="similar cases",
        )
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()

    def _done(self) -> None:
        self.search_button.setEnabled(True)
        self.text_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_error(self, exc: BaseException) -> None:
        self._done()
        self.status.setText(f"error: {format_error(exc)}")

    def _on_aborted(self) -> None:
        self._done()
        self.status.setText("cancelled")

    def _show_hits(self, out: Any) -> None:
        if isinstance(out, tuple):  # (query image, hits) of an image query
            self.last_query_image, hits = out
        else:
            hits = out
        self._done()
        self.hits = list(hits)
        self.gallery.clear()
        for h in self.hits:
            text = f"{h.rank}. {h.score:.3f}\n{Path(h.case_id).name}"
            if h.labels:
                text += f"\n{h.labels}"
            item = QListWidgetItem(text)
            item.setToolTip(f"{h.case_id}\n{h.source_path}\n{h.modality} {h.labels}".strip())
            item.setData(HIT_ROLE, h.rank - 1)
            if h.thumbnail:
                pm = QPixmap()
                if pm.loadFromData(h.thumbnail, "PNG"):
                    item.setIcon(QIcon(pm))
            self.gallery.addItem(item)
        msg = f"{len(self.hits)} similar cases" if self.hits else "no matches"
        if isinstance(out, tuple) and self.last_query_image is not None:
            qmod = self.query_modality_combo.currentText()
            used = self.last_query_image.modality if qmod == _FROM_LAYER else qmod
            msg += f" (query modality {used})"
        self.status.setText(msg)

    # ------------------------------------------------------------------ open a case
    def _open_item(self, item: QListWidgetItem) -> None:
        self.open_hit(int(item.data(HIT_ROLE)))

    def open_hit(self, i: int) -> Any:
        """Open result ``i`` as new layer(s) with the case's own geometry; the case is read in
        a worker (returned), the layers are added on the GUI thread when it is done."""
        h = self.hits[i]
        k = int((h.extra or {}).get("image_index", 0))
        self.status.setText(f"opening {h.case_id} ...")
        self.open_worker = start_task(lambda: open_case_job(h.source_path, k),
                                      on_result=lambda images: self._add_case(h, images),
                                      on_error=lambda exc: self.status.setText(
                                          f"cannot open {h.case_id}: {format_error(exc)}"),
                                      description="open case")
        return self.open_worker

    def _add_case(self, h: Any, images: list[Any]) -> list[Any]:
        from napari.layers import Layer

        added = []
        for im in images:
            data, kwargs, kind = im.layer_data()
            kwargs["name"] = f"similar #{h.rank}: {Path(h.case_id).name}"
            added.append(self.viewer.add_layer(Layer.create(data, kwargs, kind)))
        self.status.setText(f"opened {h.case_id}")
        return added
