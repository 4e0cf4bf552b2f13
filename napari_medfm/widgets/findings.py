"""Findings dock: finding probabilities of any FindingsModel, and "why" overlays.

One dock for every model whose spec has the task ``zero-shot``, ``findings`` or ``probe`` and
that takes the layer's dimensions: Merlin (CT; zero-shot findings, top phenotypes, 5-year
risks, Grad-CAM maps), BiomedCLIP (2D; zero-shot with the shipped CXR / pathology / fundus
prompt sets, patch-similarity maps), RadFM yes/no questions, probe heads (a probe folder).
Nothing here is model specific: the model list comes from the registry, the fields shown from
the spec (a tokenizer for models that ship one, phenotypes for models with that task, a folder
picker for folder-shaped weights), and the work from
:func:`napari_medfm.tasks.zeroshot.zero_shot` / ``explain_task`` run in a cancellable worker.

The worker takes a plain :class:`FindingsRequest` captured on the GUI thread (model id,
weights, options, prompt file, modality, region corners) and never touches Qt; the model comes
from the shared cache (:func:`napari_medfm.runtime.cache.get_model`). Nothing is added to the
viewer before a task has finished (a cancelled run leaves nothing). CLI twin: ``medfm
zero-shot`` (and ``medfm findings`` for probes).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..io.types import MedicalImage
from ..progress import Progress
from ._common import format_error, hbox, layer_named, refill_combo, start_task

_COLUMNS = ("Kind", "Name", "Probability", "")
_BAR = 20
_FROM_LAYER = "(from layer)"
_NONE = "(whole image)"
FINDINGS_TASKS = ("zero-shot", "findings", "probe")


class _NumberItem(QTableWidgetItem):
    """Table item sorting by a number (probability) rather than by its text."""

    def __init__(self, text: str, value: float) -> None:
        super().__init__(text)
        self.value = float(value)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _NumberItem):
            return self.value < other.value
        return super().__lt__(other)


def image_from_layer(layer: Any) -> MedicalImage:
    """The image behind a napari layer, in source order (see ``MedicalImage.from_layer``);
    the data are not copied (workers materialise them)."""
    return MedicalImage.from_layer(layer)


def layer_dims(layer: Any) -> int:
    """Spatial dimensions of an Image layer (slides and RGB photos are 2D)."""
    if getattr(layer, "multiscale", False):
        return 2
    return int(layer.ndim - (1 if getattr(layer, "rgb", False) else 0))


def findings_specs(dims: int | None = None, modality: str | None = None) -> list[Any]:
    """Registered finding-probability models for a layer: those taking its dims, the ones
    that list its modality first."""
    from ..models.encoder2d import canonical_modality
    from ..runtime.registry import list_specs

    seen: dict[str, Any] = {}
    for task in FINDINGS_TASKS:
        for s in list_specs(task=task, dims=dims):
            seen.setdefault(s.id, s)
    specs = sorted(seen.values(), key=lambda s: s.id)
    mod = canonical_modality(modality) or modality
    return sorted(specs, key=lambda s: 0 if mod in s.modalities else 1)


@dataclass
class FindingsRequest:
    """Everything a findings run needs, captured on the GUI thread (no Qt objects)."""

    model_id: str
    weights: str | None = None
    device: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    prompts: str | None = None
    modality: str | None = None
    top_k: int = 20
    region: np.ndarray | None = None  # world corners of a Shapes rectangle (z/y/x order)


def findings_job(request: FindingsRequest, image: MedicalImage
                 ) -> Generator[Progress, None, tuple[Any, MedicalImage, Any]]:
    """Worker body: load the model (shared cache), materialise the image or its region, run
    :func:`~napari_medfm.tasks.zeroshot.zero_shot`. Returns (model, image used, result)."""
    from ..runtime.cache import get_model
    from ..tasks.retrieval.query import region_image
    from ..tasks.zeroshot import zero_shot

    yield Progress(0, 1, f"loading {request.model_id}")
    model = get_model(request.model_id, weights=request.weights, device=request.device,
                      **request.options)
    warn = model.memory_warning() if hasattr(model, "memory_warning") else None
    if warn:
        yield Progress(0, 1, warn)
    if request.region is not None:
        image = region_image(image, request.region)
    elif not image.multiscale:
        image.data = np.asarray(image.data)
    result = yield from zero_shot(model, image, request.prompts, top_k=request.top_k,
                                  modality=request.modality)
    return model, image, result


class FindingsWidget(QWidget):
    """Pick an image layer and a findings model, run, read probabilities, show why-maps."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from ..models.encoder2d import MODALITY_NORMS

        self.viewer = napari_viewer
        self.result: Any = None
        self.model: Any = None
        self._image: MedicalImage | None = None
        self._layer: Any = None
        self.worker: Any = None
        self.config_name: str | None = None  # "tiny" in tests; None = released model
        self._specs: dict[str, Any] = {}

        self.layer_combo = QComboBox()
        self.region_combo = QComboBox()
        self.model_combo = QComboBox()
        self.weights_label = QLabel("Weights")
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("checkpoint or folder (default: $MEDFM_HOME)")
        self.weights_button = QPushButton("...")
        self.tokenizer_label = QLabel("Tokenizer")
        self.tokenizer_edit = QLineEdit()
        self.tokenizer_edit.setPlaceholderText("tokenizer folder (default: next to weights)")
        self.prompts_edit = QLineEdit()
        self.prompts_edit.setPlaceholderText("prompt / question file (default: the model's own)")
        self.modality_combo = QComboBox()
        self.modality_combo.addItem(_FROM_LAYER)
        for m in MODALITY_NORMS:
            self.modality_combo.addItem(m)
        self.modality_combo.setToolTip("What a 2D image is (PNG/JPEG files carry no modality); "
                                       "picks the prompt set and is recorded in the output")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.topk_label = QLabel("Top phenotypes")
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(0, 1692)
        self.topk_spin.setValue(20)

        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.table = QTableWidget(0, len(_COLUMNS))
        self.table.setHorizontalHeaderLabels(_COLUMNS)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.setSortingEnabled(True)

        self.why_button = QPushButton("Why? (overlay)")
        self.copy_button = QPushButton("Copy")
        self.export_button = QPushButton("Export...")

        form = QFormLayout()
        form.addRow("Image layer", self.layer_combo)
        form.addRow("Region", self.region_combo)
        form.addRow("Model", self.model_combo)
        wrow = hbox(self.weights_edit, self.weights_button)
        form.addRow(self.weights_label, wrow)
        form.addRow(self.tokenizer_label, self.tokenizer_edit)
        form.addRow("Prompts", self.prompts_edit)
        form.addRow("Image is", self.modality_combo)
        form.addRow("Device", self.device_combo)
        form.addRow(self.topk_label, self.topk_spin)
        runrow = hbox(self.run_button, self.cancel_button)
        outrow = hbox(self.why_button, self.copy_button, self.export_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(runrow)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)
        layout.addLayout(outrow)

        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(lambda: self.cancel())
        self.why_button.clicked.connect(lambda: self.show_why())
        self.copy_button.clicked.connect(lambda: self.copy())
        self.export_button.clicked.connect(lambda: self._export_dialog())
        self.weights_button.clicked.connect(lambda: self._browse_weights())
        self.layer_combo.currentTextChanged.connect(lambda _t: self._refresh_models())
        self.model_combo.currentTextChanged.connect(lambda _t: self._model_changed())
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh_layers)
        ev.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._set_outputs_enabled(False)

    # ------------------------------------------------------------------ layers / models
    def _image_layers(self) -> list[Any]:
        return [lyr for lyr in self.viewer.layers
                if type(lyr).__name__ == "Image" and layer_dims(lyr) in (2, 3)
                and not (lyr.metadata or {}).get("medfm_why")]

    def _refresh_layers(self, *_args: Any) -> None:
        refill_combo(self.layer_combo, [lyr.name for lyr in self._image_layers()])
        shapes = [lyr.name for lyr in self.viewer.layers if type(lyr).__name__ == "Shapes"]
        refill_combo(self.region_combo, [_NONE, *shapes])
        self._refresh_models()

    def target_layer(self) -> Any | None:
        layers = self._image_layers()
        found = layer_named(layers, self.layer_combo.currentText())
        return found if found is not None else (layers[-1] if layers else None)

    def _refresh_models(self) -> None:
        layer = self.target_layer()
        dims = layer_dims(layer) if layer is not None else None
        mod = (layer.metadata or {}).get("modality") if layer is not None else None
        specs = findings_specs(dims, mod)
        self._specs = {s.id: s for s in specs}
        current = self.model_combo.currentText()
        self.model_combo.blockSignals(True)
        refill_combo(self.model_combo, [s.id for s in specs],
                     keep=current if current in self._specs else (specs[0].id if specs else ""))
        self.model_combo.blockSignals(False)
        self.modality_combo.setEnabled(dims != 3)
        self.region_combo.setEnabled(dims == 2)
        self._model_changed()

    def current_spec(self) -> Any | None:
        return self._specs.get(self.model_combo.currentText())

    def _model_changed(self) -> None:
        """Show the fields the chosen model's spec asks for (nothing per model id)."""
        spec = self.current_spec()
        if spec is None:
            return
        is_probe = "probe" in spec.tasks
        self.weights_label.setText("Probe folder" if is_probe else "Weights")
        self.weights_edit.setPlaceholderText(
            "probe folder (medfm train probe ...)" if is_probe
            else "checkpoint or folder (default: $MEDFM_HOME)")
        has_tok = bool(spec.extras.get("tokenizer_files"))
        self.tokenizer_label.setVisible(has_tok)
        self.tokenizer_edit.setVisible(has_tok)
        has_pheno = "phenotype" in spec.tasks
        self.topk_label.setVisible(has_pheno)
        self.topk_spin.setVisible(has_pheno)

    # ------------------------------------------------------------------ running
    def _model_kwargs(self, spec: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if spec is not None and spec.extras.get("tokenizer_files") \
                and self.tokenizer_edit.text().strip():
            kw["tokenizer"] = self.tokenizer_edit.text().strip()
        if self.config_name:
            kw["config"] = self.config_name
        return kw

    def _region_corners(self, layer: Any) -> np.ndarray | None:
        name = self.region_combo.currentText()
        if layer_dims(layer) != 2 or not name or name == _NONE or name not in self.viewer.layers:
            return None
        from .similar import shape_world_corners

        return shape_world_corners(self.viewer.layers[name])

    def request(self, layer: Any) -> FindingsRequest:
        """The plain inputs of a run, read from the dock's widgets (GUI thread)."""
        spec = self.current_spec()
        model_id = spec.id if spec is not None else (self.model_combo.currentText() or "merlin")
        mod = self.modality_combo.currentText()
        return FindingsRequest(
            model_id=model_id,
            weights=self.weights_edit.text().strip() or None,
            device=self.device_combo.currentText(),
            options=self._model_kwargs(spec),
            prompts=self.prompts_edit.text().strip() or None,
            modality=None if (mod == _FROM_LAYER or layer_dims(layer) == 3) else mod,
            top_k=self.topk_spin.value() if spec is None or "phenotype" in spec.tasks else 0,
            region=self._region_corners(layer),
        )

    def run(self) -> Any:
        """Start a run on the chosen layer; returns the worker (None if nothing to do)."""
        from ..errors import MedfmError

        layer = self.target_layer()
        if layer is None:
            self.status.setText("No image layer: open a CT or a 2D image first.")
            return None
        if self.current_spec() is None:
            self.status.setText(f"No findings model takes {layer_dims(layer)}D images.")
            return None
        try:
            image = image_from_layer(layer)
            req = self.request(layer)
        except (ValueError, MedfmError) as exc:
            self.status.setText(format_error(exc))
            return None
        self._layer, self._image = layer, image
        self.result = None
        self._busy(True)
        self.status.setText(f"Running {req.model_id} on {layer.name} ...")
        self.worker = start_task(lambda: findings_job(req, image), on_result=self._on_result,
                                 on_error=self._on_error, on_progress=self._on_progress,
                                 on_aborted=self._on_aborted,
                                 description=f"{req.model_id} findings")
        return self.worker

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("Cancelling at the next step ...")

    def _busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self._set_outputs_enabled(False)

    def _set_outputs_enabled(self, on: bool) -> None:
        for b in (self.why_button, self.copy_button, self.export_button):
            b.setEnabled(on)
        if on and self.model is not None:
            from ..tasks.zeroshot import can_explain

            self.why_button.setEnabled(can_explain(self.model))

    def _on_progress(self, p: Progress) -> None:
        self.progress.setRange(0, max(p.total, 1))
        self.progress.setValue(p.step)
        if p.message:
            self.status.setText(p.message)

    def _on_error(self, exc: BaseException) -> None:
        self._busy(False)
        self.worker = None
        self.status.setText(f"Error: {format_error(exc)}")

    def _on_aborted(self) -> None:
        self._busy(False)
        self.worker = None
        self.status.setText("Cancelled.")

    def _on_result(self, out: Any) -> None:
        model, image, result = out
        self._busy(False)
        self.worker = None
        self.model, self._image, self.result = model, image, result
        self._fill_table(result)
        self._set_outputs_enabled(True)
        self.progress.setValue(self.progress.maximum())
        p = result.provenance
        extra = f", {len(result.phenotypes)} phenotypes" if result.phenotypes else ""
        self.status.setText(f"{result.image_name}: {len(result.findings)} findings{extra} "
                            f"({p.get('model')}, {p.get('modality')}, {p.get('device')}, "
                            f"{p.get('elapsed_s')} s)")

    def _fill_table(self, result: Any) -> None:
        rows: list[tuple[str, str, str, float]] = []
        rows += [("finding", f["finding"], f["finding"], f["probability"])
                 for f in result.findings]
        rows += [("phenotype", f"{p['name']} ({p['phecode']})", p["phecode"], p["probability"])
                 for p in result.phenotypes]
        rows += [("5-year", f"output {r['output']}", "", r["probability"])
                 for r in result.five_year or ()]
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for i, (kind, name, key, prob) in enumerate(rows):
            kind_item = QTableWidgetItem(kind)
            kind_item.setData(Qt.ItemDataRole.UserRole, key)
            self.table.setItem(i, 0, kind_item)
            self.table.setItem(i, 1, QTableWidgetItem(name))
            self.table.setItem(i, 2, _NumberItem(f"{prob:.3f}", prob))
            self.table.setItem(i, 3, _NumberItem("\u2588" * round(_BAR * prob), prob))
        self.table.setSortingEnabled(True)
        self.table.sortItems(2, Qt.SortOrder.DescendingOrder)

    # ------------------------------------------------------------------ why overlay
    def selected_key(self) -> str | None:
        """Finding name or phecode of the selected row (None for 5-year rows / nothing)."""
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        key = item.data(Qt.ItemDataRole.UserRole)
        return key or None

    def show_why(self, key: str | None = None) -> Any:
        """Compute the why-map of the selected (or given) finding/phenotype; adds a layer."""
        from ..tasks.zeroshot import can_explain, explain_task

        key = key or self.selected_key()
        if self.result is None or key is None:
            self.status.setText("Select a finding or phenotype row first.")
            return None
        if not can_explain(self.model):
            self.status.setText(f"{self.result.provenance.get('model')} draws no why-maps.")
            return None
        image, layer, result, model = self._image, self._layer, self.result, self.model
        self.status.setText(f"Computing why-map for {key} ...")
        self.worker = start_task(lambda: explain_task(model, image, result, key),
                                 on_result=lambda why: self._add_why(why, layer),
                                 on_error=self._on_error, description="why-map")
        return self.worker

    def _add_why(self, why: MedicalImage, src_layer: Any) -> None:
        self.worker = None
        why.metadata["medfm_why"] = True
        # on the image's own grid: layer_data gives it the source layer's transform
        data, kwargs, _ = why.layer_data(colormap="inferno", blending="additive", opacity=0.5,
                                         contrast_limits=(0.0, 1.0))
        self.viewer.add_image(data, **kwargs)
        method = why.metadata.get("method", "why-map")
        self.status.setText(f"Added {why.name} ({method}, 0..1) over {src_layer.name}.")

    # ------------------------------------------------------------------ copy / export
    def copy(self) -> str:
        text = self.result.to_csv() if self.result is not None else ""
        cb = QApplication.clipboard()
        if cb is not None:
            cb.setText(text)
        return text

    def export(self, path: str | Path) -> Path:
        """Write the result as ``.json`` or ``.csv`` (by suffix), atomically."""
        from ..io.writers import atomic_write

        if self.result is None:
            raise ValueError("nothing to export: run first")
        path = Path(path)
        text = self.result.to_json() if path.suffix.lower() == ".json" else self.result.to_csv()
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.status.setText(f"Saved {path.name}")
        return path

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export findings", "findings.csv",
                                              "CSV (*.csv);;JSON (*.json)")
        if path:
            try:
                self.export(path)
            except OSError as exc:
                self.status.setText(f"Error: {exc}")

    def _browse_weights(self) -> None:
        spec = self.current_spec()
        folder = spec is not None and ("probe" in spec.tasks or len(spec.required_files) > 1)
        if folder:
            title = "Probe folder" if "probe" in spec.tasks else f"{spec.id} weights folder"
            path = QFileDialog.getExistingDirectory(self, title, self.weights_edit.text())
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "",
                                                  "Checkpoints (*.pt *.pth *.bin *.safetensors)")
        if path:
            self.weights_edit.setText(path)


__all__ = ["FindingsRequest", "FindingsWidget", "findings_job", "findings_specs",
           "image_from_layer", "layer_dims"]
