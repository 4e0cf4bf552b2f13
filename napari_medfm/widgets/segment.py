"""Segmentation dock widget (twin of ``medfm segment``).

Thin: picks an image layer, a model and settings, runs
:func:`napari_medfm.tasks.segment.segment_image` in a napari generator worker (progress per
window batch; Cancel stops at the next batch and adds nothing; statistics are computed there
too), then shows the result as a Labels layer on the image's exact transform with structure
names on hover, a statistics table (volume mL, mean/std HU) and Save CSV / NIfTI / DICOM-SEG
buttons whose writing also runs in workers. The GUI thread only reads the widgets and takes
a view of the layer's data. A MONAI bundle runs only once the user trusted it (a dialog asks:
its config is code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import MedfmError
from ..io.types import MedicalImage
from ..progress import Progress
from ..tasks.segment import BUNDLE_PREFIX, SegmentSettings, bundle_folder, segmenter_choices
from ._common import (
    format_error,
    hbox,
    image_from_layer,
    layer_named,
    refill_combo,
    start_task,
    wait_for,
)

BUNDLE_ITEM = "bundle folder..."
_TABLE_HEADERS = ("value", "structure", "voxels", "volume (mL)", "mean", "std")


class SegmentWidget(QWidget):
    """Image + model + device/window settings -> Run / Cancel -> Labels layer, table, saving."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.result: Any = None
        self.stats: list[dict[str, Any]] = []
        self.labels_layer: Any = None
        self._source_layer: Any = None

        self._source_image: MedicalImage | None = None
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        for mid in segmenter_choices():
            self.model_combo.addItem(mid, mid)
        self.model_combo.addItem(BUNDLE_ITEM, BUNDLE_ITEM)
        self.device_combo = QComboBox()
        for d in ("auto", "cpu", "cuda", "mps"):
            self.device_combo.addItem(d)
        self.precision_combo = QComboBox()
        for p in ("fp32", "fp16", "bf16", "auto"):
            self.precision_combo.addItem(p)
        self.roi_spin = QSpinBox()
        self.roi_spin.setRange(0, 1024)
        self.roi_spin.setSpecialValueText("model default")
        self.roi_spin.setToolTip("sliding-window edge in voxels (0: the model's own)")
        self.overlap_spin = QDoubleSpinBox()
        self.overlap_spin.setRange(-0.01, 0.95)
        self.overlap_spin.setSingleStep(0.05)
        self.overlap_spin.setDecimals(2)
        self.overlap_spin.setSpecialValueText("model default")
        self.overlap_spin.setValue(-0.01)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 64)
        self.batch_spin.setSpecialValueText("model default")

        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.table = QTableWidget(0, len(_TABLE_HEADERS))
        self.table.setHorizontalHeaderLabels(list(_TABLE_HEADERS))
        self.table.verticalHeader().setVisible(False)
        self.save_csv_button = QPushButton("Save CSV")
        self.save_nifti_button = QPushButton("Save NIfTI")
        self.save_seg_button = QPushButton("Save DICOM-SEG")
        for b in (self.save_csv_button, self.save_nifti_button, self.save_seg_button):
            b.setEnabled(False)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        form.addRow("Window (voxels)", self.roi_spin)
        form.addRow("Overlap", self.overlap_spin)
        form.addRow("Windows per batch", self.batch_spin)
        run_row = hbox(self.run_button, self.cancel_button)
        save_row = hbox(self.save_csv_button, self.save_nifti_button, self.save_seg_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        layout.addLayout(save_row)

        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(lambda: self.cancel())
        self.model_combo.activated.connect(self._on_model_chosen)
        self.save_csv_button.clicked.connect(lambda: self.save_csv())
        self.save_nifti_button.clicked.connect(lambda: self.save_nifti())
        self.save_seg_button.clicked.connect(lambda: self.save_dicom_seg())
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh_layers)
        ev.removed.connect(self._refresh_layers)
        ev.reordered.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ pickers
    def _image_layers(self) -> list[Any]:
        return [lyr for lyr in self.viewer.layers
                if type(lyr).__name__ == "Image" and not getattr(lyr, "rgb", False)
                and lyr.ndim == 3]

    def _refresh_layers(self, *_args: Any) -> None:
        refill_combo(self.image_combo, [lyr.name for lyr in self._image_layers()])

    def image_layer(self) -> Any | None:
        return layer_named(self._image_layers(), self.image_combo.currentText())

    def set_bundle(self, folder: str | Path) -> str:
        """Add (or select) ``bundle:FOLDER`` in the model picker; returns the model id."""
        mid = f"{BUNDLE_PREFIX}{Path(folder)}"
        idx = self.model_combo.findData(mid)
        if idx < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, f"bundle: {Path(folder).name}",
                                        mid)
            idx = self.model_combo.findData(mid)
        self.model_combo.setCurrentIndex(idx)
        return mid

    def _on_model_chosen(self, _index: int) -> None:
        if self.model_combo.currentData() != BUNDLE_ITEM:
            return
        folder = QFileDialog.getExistingDirectory(self, "MONAI bundle folder")
        if folder:
            self.set_bundle(folder)
        else:
            self.model_combo.setCurrentIndex(0)

    def settings(self) -> SegmentSettings:
        roi = self.roi_spin.value()
        ov = self.overlap_spin.value()
        return SegmentSettings(
            roi_size=(roi, roi, roi) if roi else None,
            overlap=None if ov < 0 else float(ov),
            sw_batch_size=self.batch_spin.value() or None,
            device=self.device_combo.currentText(),
            precision=self.precision_combo.currentText(),
        )

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Start segmentation in a worker; returns the worker (``None`` if nothing to do)."""
        from ..tasks.segment import load_segmenter, segment_image

        layer = self.image_layer()
        if layer is None:
            self.status.setText("No 3D image layer: open a CT first.")
            return None
        model = self.model_combo.currentData()
        if not model or model == BUNDLE_ITEM:
            self.status.setText("Choose a model (or a MONAI bundle folder).")
            return None
        try:
            image = image_from_layer(layer, what="segmentation", volume=True)  # a view: no copy
            if not self._bundle_trusted(model):
                self.status.setText("Not run: the MONAI bundle is not trusted (its config runs "
                                    "Python code).")
                return None
        except MedfmError as exc:
            self.status.setText(f"Error: {exc}")
            return None
        settings = self.settings()
        self._source_layer = layer
        self._source_image = image

        def _task():  # worker thread: plain inputs only, no Qt
            seg = load_segmenter(model, device=settings.device)
            return (yield from segment_image(image, seg, settings))

        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the first progress event
        self.status.setText(f"Segmenting {layer.name} with {model}...")
        self.worker = start_task(_task, on_result=self._on_result, on_error=self._on_error,
                                 on_progress=self._on_progress, on_aborted=self._on_aborted,
                                 on_finished=self._on_finished,
                                 description=f"segment {model}", progress=False)
        return self.worker

    def _bundle_trusted(self, model: str) -> bool:
        """A MONAI bundle's config is code: ask once (remembered by content hash)."""
        folder = bundle_folder(model)
        if folder is None or not folder.is_dir():
            return True  # registry model (or a missing folder: the worker reports it)
        from ..runtime.trust import is_trusted, trust_bundle

        if is_trusted(folder):
            return True
        if not self.ask_trust(folder):
            return False
        trust_bundle(folder)
        return True

    def ask_trust(self, folder: Path) -> bool:
        """Yes/No dialog: run this bundle's config (Python code)?"""
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self, "Trust this MONAI bundle?",
            f"{folder}\n\nA MONAI bundle's config runs Python code on this computer "
            "(`_target_` imports and `$` expressions). Run it only if it comes from a source "
            "you trust.\n\nTrust this bundle? (Remembered until its configs change.)",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("Cancelling (stops after the current window batch)...")

    def _on_progress(self, p: Any) -> None:
        if p.total:
            self.progress.setRange(0, int(p.total))
            self.progress.setValue(int(p.step))
        if p.message:
            self.status.setText(p.message)

    def _on_finished(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None

    def _on_aborted(self) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText("Cancelled: nothing was added.")

    def _on_error(self, exc: BaseException) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText(f"Error: {format_error(exc)}")

    def _on_result(self, result: Any) -> None:
        src = self._source_image
        self.result = result
        img = result.to_medical_image()
        md = dict(src.metadata) if src is not None else {}
        md.update(img.metadata)
        labels = MedicalImage(result.labels, result.geometry, modality="SEG", kind="volume",
                              name=result.name, metadata=md, is_label=True)
        # same transform (and display transpose) as the image layer it came from
        data, kwargs, _ = labels.layer_data()
        self.labels_layer = self.viewer.add_labels(data, **kwargs)
        self.stats = list(result.stats)  # computed in the worker
        self._fill_table()
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        unit = md.get("units", "HU") or ""
        self.status.setText(f"{result.name}: {len(self.stats)} structures in "
                            f"{result.elapsed_s:.1f} s (intensities in {unit}).")
        self.save_csv_button.setEnabled(True)
        self.save_nifti_button.setEnabled(True)
        self.save_seg_button.setEnabled(bool(result.source_metadata.get("source_files")))

    def _fill_table(self) -> None:
        self.table.setRowCount(len(self.stats))
        for i, r in enumerate(self.stats):
            cells = (r["value"], r["name"], r["voxels"], f"{r['volume_ml']:.2f}",
                     "" if r.get("mean") is None else f"{r['mean']:.1f}",
                     "" if r.get("std") is None else f"{r['std']:.1f}")
            for j, c in enumerate(cells):
                self.table.setItem(i, j, QTableWidgetItem(str(c)))
        self.table.resizeColumnsToContents()

    # ------------------------------------------------------------------ saving
    def _ask(self, title: str, filt: str, suffix: str) -> Path | None:
        name = (self.result.name if self.result else "segmentation").replace(" ", "_")
        path, _ = QFileDialog.getSaveFileName(self, title, name + suffix, filt)
        return Path(path) if path else None

    def _need_result(self) -> None:
        if self.result is None:
            raise MedfmError("run a segmentation first")

    def save_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the statistics table (in a worker). With ``path`` (scripts, tests) wait and
        return the written path; from the button, return ``None`` at once."""
        from ..tasks.segment import write_statistics_csv

        self._need_result()
        wait = path is not None
        p = Path(path) if path else self._ask("Save statistics", "CSV (*.csv)", ".csv")
        if p is None:
            return None
        stats = list(self.stats)

        def _task():
            yield from ()
            return write_statistics_csv(stats, p)

        return self._write(_task, p, wait)

    def save_nifti(self, path: str | Path | None = None) -> Path | None:
        self._need_result()
        wait = path is not None
        p = Path(path) if path else self._ask("Save labels", "NIfTI (*.nii.gz *.nii)", ".nii.gz")
        return self._save(p, wait)

    def save_dicom_seg(self, path: str | Path | None = None) -> Path | None:
        self._need_result()
        if not self.result.source_metadata.get("source_files"):
            exc = MedfmError(f"{self.result.source_name!r} was not read from DICOM: DICOM-SEG "
                             "needs the source series; save NIfTI instead")
            self.status.setText(f"Error: {format_error(exc)}")
            raise exc
        wait = path is not None
        p = Path(path) if path else self._ask("Save DICOM-SEG", "DICOM (*.dcm)", ".dcm")
        return self._save(p, wait)

    def _save(self, p: Path | None, wait: bool) -> Path | None:
        from ..tasks.segment import save_labels

        if p is None:
            return None
        result = self._current_result()  # GUI thread: takes the (edited) layer's data view

        def _task():
            yield Progress(0, 1, f"writing {p.name}")
            return save_labels(result, p)

        return self._write(_task, p, wait)

    def _write(self, task: Any, p: Path, wait: bool) -> Path | None:
        self.status.setText(f"Saving {p.name}...")

        def _done(out: Any) -> None:
            self.status.setText(f"Saved {Path(out).name}")

        def _failed(exc: BaseException) -> None:
            self.status.setText(f"Error: {format_error(exc)}")

        worker = start_task(task, on_result=_done, on_error=_failed,
                            description=f"save {p.name}")
        self.save_worker = worker
        if not wait:
            return None
        return wait_for(worker)

    def _current_result(self) -> Any:
        """The result with any edits the user painted into the Labels layer (a view, no copy)."""
        r = self.result
        layer = self.labels_layer
        if layer is not None and layer in self.viewer.layers:
            edited = MedicalImage.from_layer(layer)  # back in source order
            if np.shape(edited.data) == r.labels.shape:
                r.labels = edited.data
        return r
