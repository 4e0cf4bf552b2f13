"""Findings dock widget (Merlin): zero-shot findings, top phenotypes and "why" overlays.

Thin: the work is :func:`napari_medfm.tasks.findings.findings_task` / ``explain_task`` run in
a cancellable napari worker; the CLI twin is ``medfm zero-shot`` (and ``medfm embed``).
Nothing is added to the viewer before a task has finished (a cancelled run leaves nothing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
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
from ._common import format_error, layer_named, refill_combo, start_task

_COLUMNS = ("Kind", "Name", "Probability", "")
_BAR = 20


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
    """The image behind a napari layer, in source order (see ``MedicalImage.from_layer``)."""
    if getattr(layer, "multiscale", False):
        raise ValueError(f"{layer.name}: multiscale layers are not supported by Merlin")
    img = MedicalImage.from_layer(layer)
    img.data = np.asarray(img.data)
    return img


class FindingsWidget(QWidget):
    """Pick a CT layer and Merlin weights, run, read findings/phenotypes, show why-maps."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from ..runtime.registry import list_specs

        self.viewer = napari_viewer
        self.result: Any = None
        self.model: Any = None
        self._model_key: tuple | None = None
        self._image: MedicalImage | None = None
        self._layer: Any = None
        self.worker: Any = None
        self.config_name: str | None = None  # "tiny" in tests; None = released model

        self.layer_combo = QComboBox()
        self.model_combo = QComboBox()
        for spec in list_specs(task="zero-shot", modality="CT"):
            self.model_combo.addItem(spec.id)
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("CLIP checkpoint or folder (default: $MEDFM_HOME)")
        self.weights_button = QPushButton("...")
        self.tokenizer_edit = QLineEdit()
        self.tokenizer_edit.setPlaceholderText("tokenizer folder (default: next to weights)")
        self.prompts_edit = QLineEdit()
        self.prompts_edit.setPlaceholderText("prompt file (default: packaged 31 findings)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
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
        form.addRow("CT layer", self.layer_combo)
        form.addRow("Model", self.model_combo)
        wrow = QHBoxLayout()
        wrow.addWidget(self.weights_edit)
        wrow.addWidget(self.weights_button)
        form.addRow("Weights", wrow)
        form.addRow("Tokenizer", self.tokenizer_edit)
        form.addRow("Prompts", self.prompts_edit)
        form.addRow("Device", self.device_combo)
        form.addRow("Top phenotypes", self.topk_spin)
        runrow = QHBoxLayout()
        runrow.addWidget(self.run_button)
        runrow.addWidget(self.cancel_button)
        outrow = QHBoxLayout()
        for b in (self.why_button, self.copy_button, self.export_button):
            outrow.addWidget(b)
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
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh_layers)
        ev.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._set_outputs_enabled(False)

    # ------------------------------------------------------------------ layers
    def _ct_layers(self) -> list[Any]:
        return [lyr for lyr in self.viewer.layers
                if type(lyr).__name__ == "Image" and lyr.ndim == 3
                and not getattr(lyr, "rgb", False)
                and not (lyr.metadata or {}).get("medfm_why")]

    def _refresh_layers(self, *_args: Any) -> None:
        refill_combo(self.layer_combo, [lyr.name for lyr in self._ct_layers()])

    def target_layer(self) -> Any | None:
        layers = self._ct_layers()
        found = layer_named(layers, self.layer_combo.currentText())
        return found if found is not None else (layers[-1] if layers else None)

    # ------------------------------------------------------------------ running
    def _model_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.tokenizer_edit.text().strip():
            kw["tokenizer"] = self.tokenizer_edit.text().strip()
        if self.config_name:
            kw["config"] = self.config_name
        return kw

    def _task(self, image: MedicalImage):
        from ..runtime.registry import load_model
        from ..tasks.findings import findings_task

        model_id = self.model_combo.currentText() or "merlin"
        weights = self.weights_edit.text().strip() or None
        device = self.device_combo.currentText()
        kw = self._model_kwargs()
        key = (model_id, weights, device, tuple(sorted(kw.items())))
        if self.model is None or self._model_key != key:
            yield Progress(0, 1, f"loading {model_id}")
            self.model = load_model(model_id, weights=weights, device=device, **kw)
            self._model_key = key
            warn = self.model.memory_warning()
            if warn:
                yield Progress(0, 1, warn)
        prompts = self.prompts_edit.text().strip() or None
        result = yield from findings_task(self.model, image, prompts,
                                          top_k=self.topk_spin.value())
        return result

    def run(self) -> Any:
        """Start a run on the chosen CT layer; returns the worker (None if nothing to do)."""
        layer = self.target_layer()
        if layer is None:
            self.status.setText("No 3D image layer: open a CT first.")
            return None
        try:
            image = image_from_layer(layer)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self._layer, self._image = layer, image
        self.result = None
        self._busy(True)
        self.status.setText(f"Running Merlin on {layer.name} ...")
        self.worker = start_task(lambda: self._task(image), on_result=self._on_result,
                                 on_error=self._on_error, on_progress=self._on_progress,
                                 on_aborted=self._on_aborted, description="Merlin findings")
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

    def _on_result(self, result: Any) -> None:
        self._busy(False)
        self.worker = None
        self.result = result
        self._fill_table(result)
        self._set_outputs_enabled(True)
        self.progress.setValue(self.progress.maximum())
        p = result.provenance
        self.status.setText(f"{result.image_name}: {len(result.findings)} findings, "
                            f"{len(result.phenotypes)} phenotypes ({p['device']}, "
                            f"{p['elapsed_s']} s)")

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
        from ..tasks.findings import explain_task

        key = key or self.selected_key()
        if self.result is None or key is None:
            self.status.setText("Select a finding or phenotype row first.")
            return None
        image, layer, result, model = self._image, self._layer, self.result, self.model
        self.status.setText(f"Computing why-map for {key} ...")
        self.worker = start_task(lambda: explain_task(model, image, result, key),
                                 on_result=lambda why: self._add_why(why, layer),
                                 on_error=self._on_error, description="Merlin why-map")
        return self.worker

    def _add_why(self, why: MedicalImage, ct_layer: Any) -> None:
        self.worker = None
        why.metadata["medfm_why"] = True
        # on the CT's own grid: layer_data gives it the CT layer's transform (and display transpose)
        data, kwargs, _ = why.layer_data(colormap="inferno", blending="additive", opacity=0.5,
                                         contrast_limits=(0.0, 1.0))
        self.viewer.add_image(data, **kwargs)
        self.status.setText(f"Added {why.name} (Grad-CAM, 0..1) over {ct_layer.name}.")

    # ------------------------------------------------------------------ copy / export
    def copy(self) -> str:
        text = self.result.to_csv() if self.result is not None else ""
        cb = QApplication.clipboard()
        if cb is not None:
            cb.setText(text)
        return text

    def export(self, path: str | Path) -> Path:
        """Write the result as ``.json`` or ``.csv`` (by suffix), atomically."""
        if self.result is None:
            raise ValueError("nothing to export: run first")
        path = Path(path)
        text = self.result.to_json() if path.suffix.lower() == ".json" else self.result.to_csv()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
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
        path, _ = QFileDialog.getOpenFileName(self, "Merlin CLIP checkpoint", "",
                                              "Checkpoints (*.pt *.pth *.safetensors)")
        if path:
            self.weights_edit.setText(path)


__all__ = ["FindingsWidget", "image_from_layer"]
