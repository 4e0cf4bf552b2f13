"""Review dock: go through a cohort case by case, judge and correct model outputs, measure
agreement (twin of ``medfm review`` / ``medfm validate``).

Thin: the cohort, store, output convention, edits and metrics live in
:mod:`napari_medfm.tasks.review` and :mod:`napari_medfm.tasks.validate`. Reading a case,
writing an edit, running a model and computing metrics happen in napari workers; the workers
never touch Qt (they return plain results that the GUI thread turns into layers/tables).

Keyboard (while the viewer window is active): Alt+Right / Alt+Left next / previous case,
Alt+A / Alt+E / Alt+R accept / edit / reject the selected output, Alt+S save the edit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QKeySequence, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QShortcut,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import MedfmError
from ..io.types import MedicalImage
from ..tasks.review import OUTPUTS, VERDICTS, ReviewStore
from . import block_triton_in_gui
from ._common import format_error, hbox, layer_named, refill_combo, start_task

_SEG_HEADERS = ("label", "dice", "hd95 mm", "asd mm", "vol pred mL", "vol ref mL")


def remembered_reviewer() -> str | None:
    """The reviewer name remembered from an earlier session (``$MEDFM_HOME/review.json``)."""
    from ..runtime.paths import medfm_home

    f = medfm_home() / "review.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("reviewer") or None
    except (OSError, ValueError, AttributeError):
        return None


def remember_reviewer(name: str) -> None:
    from ..io.writers import atomic_write
    from ..runtime.paths import medfm_home

    home = medfm_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        atomic_write(home / "review.json", lambda tmp: tmp.write_text(
            json.dumps({"reviewer": name}), encoding="utf-8"))
    except (OSError, MedfmError):
        pass


def default_store_path(cohort: str | Path) -> Path:
    """``cohort.csv`` -> ``cohort.review.db`` beside it; a folder -> ``<folder>/review.db``."""
    c = Path(cohort)
    return c / "review.db" if c.is_dir() else c.with_name(c.stem + ".review.db")


class ReviewWidget(QWidget):
    """Cohort -> case navigation -> layers -> verdicts/notes -> edits -> agreement metrics."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.store: ReviewStore | None = None
        self.loaded: Any = None  # tasks.review.LoadedCase of the case on screen
        self.index: int = -1
        self.worker: Any = None
        self.layers: list[Any] = []  # layers of the case on screen
        self.labels_layer: Any = None
        self.seg_rows: list[dict[str, Any]] = []
        self.findings_result: Any = None
        self.last_edit: dict[str, Any] | None = None
        self.plots: dict[str, bytes] = {}
        self.model_labels: Any = None
        self._pending = -1
        self._after: Any = None  # run once the current worker has finished

        self.open_button = QPushButton("Open cohort...")
        self.store_button = QPushButton("Open review...")
        self.store_label = QLabel("no cohort")
        self.store_label.setWordWrap(True)
        self.reviewer_edit = QLineEdit(remembered_reviewer() or "")
        self.reviewer_edit.setPlaceholderText("your name (asked once)")
        self.prev_button = QPushButton("< Previous")
        self.next_button = QPushButton("Next >")
        self.jump_spin = QSpinBox()
        self.jump_spin.setRange(1, 1)
        self.jump_button = QPushButton("Go")
        self.case_label = QLabel("")
        self.case_label.setWordWrap(True)
        self.output_combo = QComboBox()
        for o in OUTPUTS:
            self.output_combo.addItem(o)
        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText("note (optional)")
        self.verdict_buttons = {v: QPushButton(v.capitalize()) for v in VERDICTS}
        self.verdict_label = QLabel("")
        self.verdict_label.setWordWrap(True)
        self.save_edit_button = QPushButton("Save edit (new version)")
        self.model_combo = QComboBox()
        # long model ids must not widen the dock (the canvas keeps the room)
        self.model_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(12)
        self.run_model_button = QPushButton("Run model on this case")
        self.findings_table = QTableWidget(0, 2)
        self.findings_table.setHorizontalHeaderLabels(["finding", "probability"])
        self.findings_table.verticalHeader().setVisible(False)
        self.report_view = QPlainTextEdit()
        self.report_view.setReadOnly(True)
        self.report_view.setMaximumHeight(120)
        self.pred_combo = QComboBox()
        self.ref_combo = QComboBox()
        self.compare_button = QPushButton("Compare labels")
        self.seg_table = QTableWidget(0, len(_SEG_HEADERS))
        self.seg_table.setHorizontalHeaderLabels(list(_SEG_HEADERS))
        self.seg_table.verticalHeader().setVisible(False)
        self.findings_button = QPushButton("Validate findings CSV...")
        self.plot_label = QLabel("")
        self.plot_label.setAlignment(Qt.AlignCenter)
        self.calibration_label = QLabel("")
        self.calibration_label.setAlignment(Qt.AlignCenter)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.export_button = QPushButton("Export CSV...")

        top = QGridLayout()  # two columns: the dock stays narrow enough to leave the canvas room
        top.addWidget(self.open_button, 0, 0)
        top.addWidget(self.store_button, 0, 1)
        top.addWidget(self.export_button, 1, 0, 1, 2)
        nav = hbox(self.prev_button, self.jump_spin, self.jump_button, self.next_button)
        verdicts = hbox(*self.verdict_buttons.values())
        form = QFormLayout()
        form.addRow("Reviewer", self.reviewer_edit)
        form.addRow("Output", self.output_combo)
        form.addRow("Note", self.note_edit)
        model_row = hbox(self.model_combo, self.run_model_button)
        cmp_form = QFormLayout()
        cmp_form.addRow("Prediction", self.pred_combo)
        cmp_form.addRow("Reference", self.ref_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.store_label)
        layout.addLayout(nav)
        layout.addWidget(self.case_label)
        layout.addLayout(form)
        layout.addLayout(verdicts)
        layout.addWidget(self.verdict_label)
        layout.addWidget(self.save_edit_button)
        layout.addLayout(model_row)
        layout.addWidget(QLabel("Findings"))
        layout.addWidget(self.findings_table)
        layout.addWidget(QLabel("Draft report"))
        layout.addWidget(self.report_view)
        layout.addWidget(QLabel("Agreement"))
        layout.addLayout(cmp_form)
        layout.addWidget(self.compare_button)
        layout.addWidget(self.seg_table)
        layout.addWidget(self.findings_button)
        plots = hbox(self.plot_label, self.calibration_label)
        layout.addLayout(plots)
        layout.addWidget(self.status)

        self._fill_models()
        self.open_button.clicked.connect(lambda: self._ask_cohort())
        self.store_button.clicked.connect(lambda: self._ask_store())
        self.export_button.clicked.connect(lambda: self.export_csv())
        self.prev_button.clicked.connect(lambda: self.previous_case())
        self.next_button.clicked.connect(lambda: self.next_case())
        self.jump_button.clicked.connect(lambda: self.go_to(self.jump_spin.value() - 1))
        for v, b in self.verdict_buttons.items():
            b.clicked.connect(lambda _=False, v=v: self.set_verdict(v))
        self.save_edit_button.clicked.connect(lambda: self.save_edit())
        self.run_model_button.clicked.connect(lambda: self.run_model())
        self.compare_button.clicked.connect(lambda: self.compare())
        self.findings_button.clicked.connect(lambda: self._ask_findings())
        self.reviewer_edit.editingFinished.connect(self._reviewer_edited)
        self.shortcuts = []
        for keys, fn in (("Alt+Right", self.next_case), ("Alt+Left", self.previous_case),
                         ("Alt+A", lambda: self.set_verdict("accept")),
                         ("Alt+E", lambda: self.set_verdict("edit")),
                         ("Alt+R", lambda: self.set_verdict("reject")),
                         ("Alt+S", self.save_edit)):
            sc = QShortcut(QKeySequence(keys), self)
            sc.setContext(Qt.WindowShortcut)
            sc.activated.connect(lambda fn=fn: fn())
            self.shortcuts.append(sc)
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh_layers)
        ev.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._update_buttons()

    # ------------------------------------------------------------------ helpers
    def _fill_models(self) -> None:
        """Models that can produce a missing output: ``(output, model id)`` per entry."""
        self.model_combo.clear()
        self.model_combo.addItem("(model for a missing output)", None)
        try:
            from ..runtime.registry import list_specs

            for output, task in (("segmentation", "segment"), ("findings", "findings"),
                                 ("report", "report")):
                for spec in list_specs(task=task):
                    self.model_combo.addItem(f"{output}: {spec.id}", (output, spec.id))
        except Exception:  # a broken registry must not break the dock
            pass

    def _labels_layers(self) -> list[Any]:
        return [lyr for lyr in self.viewer.layers if type(lyr).__name__ == "Labels"]

    def _refresh_layers(self, *_a: Any) -> None:
        names = [lyr.name for lyr in self._labels_layers()]
        refill_combo(self.pred_combo, names)
        refill_combo(self.ref_combo, names)

    def _update_buttons(self) -> None:
        have = self.store is not None and bool(self.store.cases)
        busy = self.worker is not None
        for b in (self.prev_button, self.next_button, self.jump_button, self.export_button,
                  *self.verdict_buttons.values(), self.run_model_button):
            b.setEnabled(have and not busy)
        self.save_edit_button.setEnabled(have and not busy and self.labels_layer is not None)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def _on_error(self, exc: BaseException) -> None:
        self._set_status(f"Error: {format_error(exc)}")

    def _start(self, gen_factory: Any, on_result: Any, description: str) -> Any:
        block_triton_in_gui()
        w: Any = None

        def finished() -> None:  # runs from the event loop, after ``w`` is assigned below
            self._on_finished(w)

        w = start_task(gen_factory, on_result=on_result, on_error=self._on_error,
                       on_finished=finished, description=description)
        self.worker = w
        self._update_buttons()
        return w

    def _on_finished(self, w: Any = None) -> None:
        if w is None or self.worker is w:
            self.worker = None
        self._update_buttons()
        after, self._after = self._after, None
        if after is not None:
            after()

    # ------------------------------------------------------------------ cohort / store
    def _ask_cohort(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Cohort CSV (or cancel to pick a folder)",
                                              "", "CSV (*.csv)")
        if not path:
            path = QFileDialog.getExistingDirectory(self, "Cohort folder")
        if path:
            store, _ = QFileDialog.getSaveFileName(self, "Review store",
                                                   str(default_store_path(path)),
                                                   "Review store (*.db)")
            if store:
                self.open_cohort(path, store)

    def _ask_store(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Review store", "", "Review store (*.db)")
        if path:
            self.open_store(path)

    def open_cohort(self, cohort: str | Path, store: str | Path | None = None) -> Any:
        """Start (or reopen) the review of a cohort CSV/folder; loads the current case."""
        path = Path(store) if store else default_store_path(cohort)
        try:
            st = ReviewStore(path, cohort)
        except MedfmError as exc:
            self._set_status(f"Error: {exc}")
            raise
        return self._use_store(st)

    def open_store(self, path: str | Path) -> Any:
        """Reopen a review: resumes at the case it was left on."""
        try:
            st = ReviewStore(path)
        except MedfmError as exc:
            self._set_status(f"Error: {exc}")
            raise
        return self._use_store(st)

    def _use_store(self, st: ReviewStore) -> Any:
        if self.store is not None:
            self.store.close()
        self.store = st
        if st.reviewer and not self.reviewer_edit.text().strip():
            self.reviewer_edit.setText(st.reviewer)
        elif self.reviewer_edit.text().strip() and not st.reviewer:
            st.set_reviewer(self.reviewer_edit.text().strip())
        self.jump_spin.setRange(1, max(1, len(st.cases)))
        s = st.summary()
        self.store_label.setText(f"{st.path.name}: {s['cases']} cases, {s['reviewed']} reviewed, "
                                 f"{s['edits']} edits")
        return self.go_to(st.position)

    def set_reviewer(self, name: str) -> None:
        """The reviewer's name (kept in the store and remembered for the next session)."""
        name = str(name).strip()
        if not name:
            raise MedfmError("the reviewer name is empty")
        self.reviewer_edit.setText(name)
        remember_reviewer(name)
        if self.store is not None:
            self.store.set_reviewer(name)

    def _reviewer_edited(self) -> None:
        name = self.reviewer_edit.text().strip()
        if name and self.store is not None and name != self.store.reviewer:
            self.set_reviewer(name)

    def _need_reviewer(self) -> str:
        name = self.reviewer_edit.text().strip() or (self.store.reviewer if self.store else "")
        if not name:
            name, ok = QInputDialog.getText(self, "Reviewer", "Your name (recorded with every "
                                            "verdict and edit):")
            name = name.strip() if ok else ""
            if not name:
                raise MedfmError("a reviewer name is needed")
        if self.store is not None and self.store.reviewer != name:
            self.set_reviewer(name)
        return name

    # ------------------------------------------------------------------ navigation
    @property
    def case(self) -> Any:
        return None if self.store is None or self.index < 0 else self.store.cases[self.index]

    def next_case(self) -> Any:
        return self.go_to(self.index + 1)

    def previous_case(self) -> Any:
        return self.go_to(self.index - 1)

    def go_to(self, index: int) -> Any:
        """Open case ``index`` (0-based, clamped): records the position, reads in a worker."""
        from ..tasks.review import load_case

        if self.store is None or not self.store.cases:
            self._set_status("Open a cohort first.")
            return None
        if self.worker is not None:
            self._set_status("Busy: wait for the current task.")
            return None
        index = self.store.set_position(index)
        case = self.store.cases[index]
        edit = self.store.latest_edit(case.case_id)
        work = self.store.work_dir
        self._set_status(f"Reading {case.case_id}...")
        self._pending = index
        return self._start(lambda: load_case(case, work_dir=work,
                                             latest_edit=edit["path"] if edit else None),
                           self._on_case, f"review {case.case_id}")

    def _clear_case(self) -> None:
        for lyr in self.layers:
            if lyr in self.viewer.layers:
                self.viewer.layers.remove(lyr)
        self.layers = []
        self.labels_layer = None
        self.model_labels = None

    def _on_case(self, loaded: Any) -> None:
        self._clear_case()
        self.loaded = loaded
        self.index = self._pending
        self.jump_spin.setValue(self.index + 1)
        img = loaded.image
        data, kwargs, _ = img.layer_data(name=f"{loaded.case.case_id}")
        self.layers.append(self.viewer.add_image(data, **kwargs))
        seg = loaded.edit if loaded.edit is not None else loaded.segmentation
        self.model_labels = loaded.segmentation
        if loaded.segmentation is not None and loaded.edit is not None:
            self.layers.append(self._add_labels(loaded.segmentation, img,
                                                f"{loaded.case.case_id} model", visible=False,
                                                editable=False))
        if seg is not None:
            which = "edit" if loaded.edit is not None else "segmentation"
            self.labels_layer = self._add_labels(seg, img, f"{loaded.case.case_id} {which}")
            self.layers.append(self.labels_layer)
            self.viewer.layers.selection.active = self.labels_layer
        self._show_findings(loaded.findings)
        self.report_view.setPlainText(loaded.report or "")
        self._show_case_text()
        note = "; ".join(loaded.notes)
        self._set_status(f"{loaded.case.case_id} loaded." + (f" {note}" if note else ""))
        self._update_buttons()

    def _add_labels(self, lab: MedicalImage, img: MedicalImage, name: str, *,
                    visible: bool = True, editable: bool = True) -> Any:
        md = dict(lab.metadata)
        md.setdefault("source_path", img.metadata.get("source_path"))
        arr = np.array(lab.data, copy=True) if editable else np.asarray(lab.data)
        labels = MedicalImage(arr, img.geometry, modality="SEG", kind="volume", name=name,
                              metadata=md, is_label=True)
        data, kwargs, _ = labels.layer_data()
        layer = self.viewer.add_labels(data, **kwargs)
        layer.visible = visible
        if not editable:
            layer.editable = False
        return layer

    def _show_findings(self, findings: list[dict[str, Any]] | None) -> None:
        rows = findings or []
        self.findings_table.setRowCount(len(rows))
        for i, f in enumerate(rows):
            p = f.get("probability", f.get("score"))
            self.findings_table.setItem(i, 0, QTableWidgetItem(str(f.get("finding", "?"))))
            self.findings_table.setItem(i, 1, QTableWidgetItem(
                "" if p is None else f"{float(p):.3f}"))

    def _show_case_text(self) -> None:
        if self.store is None or self.case is None:
            return
        c = self.case
        v = self.store.verdicts(c.case_id)
        parts = [f"{o}: {v[(c.case_id, o)]['verdict']}" for o in OUTPUTS if (c.case_id, o) in v]
        have = [o for o, x in (("segmentation", self.loaded.segmentation),
                               ("findings", self.loaded.findings),
                               ("report", self.loaded.report)) if x]
        prov = self.loaded.provenance.get("model") if self.loaded else None
        self.case_label.setText(
            f"Case {self.index + 1} / {len(self.store.cases)}: {c.case_id}"
            f" | outputs: {', '.join(have) or 'none (run a model)'}"
            + (f" | model {prov}" if prov else ""))
        self.verdict_label.setText("Verdicts: " + (", ".join(parts) if parts else "none yet"))

    # ------------------------------------------------------------------ verdicts / edits
    def set_verdict(self, verdict: str, output: str | None = None,
                    note: str | None = None) -> dict[str, Any] | None:
        """Record ``verdict`` (accept/edit/reject) for an output of the case on screen."""
        if self.store is None or self.case is None:
            self._set_status("Open a cohort first.")
            return None
        out = output or self.output_combo.currentText()
        try:
            who = self._need_reviewer()
            rec = self.store.set_verdict(self.case.case_id, out, verdict,
                                         self.note_edit.text() if note is None else note, who)
        except MedfmError as exc:
            self._set_status(f"Error: {exc}")
            return None
        if note is None:
            self.note_edit.clear()
        self._show_case_text()
        self._set_status(f"{self.case.case_id}: {out}: {verdict}")
        return rec

    def save_edit(self) -> Any:
        """Write the Labels layer as a new version beside the model's output (in a worker)."""
        from ..tasks.review import save_edited_segmentation

        if self.store is None or self.case is None or self.labels_layer is None:
            self._set_status("No segmentation on screen to save.")
            return None
        if self.worker is not None:
            self._set_status("Busy: wait for the current task.")
            return None
        try:
            who = self._need_reviewer()
        except MedfmError as exc:
            self._set_status(f"Error: {exc}")
            return None
        edited = MedicalImage.from_layer(self.labels_layer)  # source order
        labels = np.array(edited.data, copy=True)  # a snapshot: painting may go on
        md = self.labels_layer.metadata or {}
        names = {int(k): str(v) for k, v in (md.get("label_names") or {}).items()}
        colors = {int(k): v for k, v in (md.get("label_colors") or {}).items()}
        loaded = self.loaded
        original = loaded.segmentation_path
        prov = dict(loaded.provenance)
        store, case, geometry = self.store, self.case, loaded.image.geometry
        note = self.note_edit.text()

        def _task():
            yield from ()
            rec = save_edited_segmentation(store, case, labels, geometry, label_names=names,
                                           label_colors=colors, original=original,
                                           provenance=prov, reviewer=who)
            store.set_verdict(case.case_id, "segmentation", "edit", note, who)
            return rec

        self._set_status("Saving the edit...")
        return self._start(_task, self._on_saved, f"save edit {case.case_id}")

    def _on_saved(self, rec: dict[str, Any]) -> None:
        self.last_edit = rec
        self.note_edit.clear()
        self._show_case_text()
        self._set_status(f"Saved {Path(rec['path']).name} (version {rec['version']}; the model's "
                         "output is untouched).")

    def run_model(self, model_id: str | None = None, output: str = "segmentation",
                  device: str | None = None) -> Any:
        """Run a model for one output (segmentation, findings or report) on the case on
        screen (worker); the result is written to the work folder and the case reloaded."""
        from ..tasks.review import compute_outputs

        if model_id is None and self.model_combo.currentData():
            output, model_id = self.model_combo.currentData()
        mid = model_id
        if not mid or self.store is None or self.loaded is None:
            self._set_status("Choose a model.")
            return None
        if output not in OUTPUTS:
            self._set_status(f"Unknown output {output!r}.")
            return None
        if self.worker is not None:
            self._set_status("Busy: wait for the current task.")
            return None
        case, image, work = self.loaded.case, self.loaded.image, self.store.work_dir

        kw = {f"{'segment' if output == 'segmentation' else output}_model": mid}

        def _task():
            return (yield from compute_outputs(case, image, work, device=device, **kw))

        self._set_status(f"Running {mid} on {case.case_id}...")
        return self._start(_task, self._on_model_done, f"{mid} {case.case_id}")

    def _on_model_done(self, written: dict[str, Any]) -> None:
        self._set_status("Wrote " + ", ".join(Path(p).name for p in written.values()))
        self._after = lambda: self.go_to(self.index)  # reload once this worker is done

    # ------------------------------------------------------------------ metrics
    def compare(self, pred: str | None = None, ref: str | None = None,
                mapping: str | Path | dict | None = None) -> Any:
        """Dice / HD95 / ASD / volumes between two Labels layers (worker) into the table.

        Default: the model's output (prediction) against the edit on screen (reference)."""
        from ..tasks.validate import compare_label_maps, read_label_mapping

        pl = layer_named(self._labels_layers(), pred or self.pred_combo.currentText())
        rl = layer_named(self._labels_layers(), ref or self.ref_combo.currentText())
        if pl is None or rl is None:
            self._set_status("Choose two Labels layers to compare.")
            return None
        if self.worker is not None:
            self._set_status("Busy: wait for the current task.")
            return None
        p_img, r_img = MedicalImage.from_layer(pl), MedicalImage.from_layer(rl)
        p_img.name, r_img.name = pl.name, rl.name
        mp = None if mapping is None else read_label_mapping(mapping)

        def _task():
            return (yield from compare_label_maps(p_img, r_img, mapping=mp,
                                                  case=self.case.case_id if self.case else ""))

        self._set_status(f"Comparing {pl.name} with {rl.name}...")
        return self._start(_task, self._on_compared, "agreement")

    def _on_compared(self, res: Any) -> None:
        self.seg_rows = res.rows
        self.seg_table.setRowCount(len(res.rows))
        for i, r in enumerate(res.rows):
            cells = [r["label"]] + ["-" if r[k] is None else f"{r[k]:.3f}"
                                    for k in ("dice", "hd95_mm", "asd_mm", "volume_pred_ml",
                                              "volume_ref_ml")]
            for j, c in enumerate(cells):
                self.seg_table.setItem(i, j, QTableWidgetItem(c))
        self.seg_table.resizeColumnsToContents()
        self._set_status(f"{len(res.rows)} structures compared."
                         + (" " + "; ".join(res.notes) if res.notes else ""))

    def _ask_findings(self) -> None:
        preds, _ = QFileDialog.getOpenFileName(self, "Predictions CSV", "", "CSV (*.csv)")
        if not preds:
            return
        labels, _ = QFileDialog.getOpenFileName(self, "Labels CSV", "", "CSV (*.csv)")
        if not labels:
            return
        out, _ = QFileDialog.getSaveFileName(self, "Save metrics CSV",
                                             str(Path(preds).with_name("findings_metrics.csv")),
                                             "CSV (*.csv)")
        self.validate_findings(preds, labels, out or None)

    def validate_findings(self, preds: str | Path, labels: str | Path,
                          out_csv: str | Path | None = None, *, threshold: float = 0.5,
                          n_boot: int = 1000) -> Any:
        """AUROC (CI), sensitivity/specificity, calibration over a cohort (worker); the plots
        are shown here and, with ``out_csv``, saved as PNG next to it."""
        from ..tasks.validate import (
            findings_figures,
            findings_metrics,
            save_findings_plots,
            write_findings_csv,
        )

        if self.worker is not None:
            self._set_status("Busy: wait for the current task.")
            return None

        def _task():
            yield from ()
            res = findings_metrics(preds, labels, threshold=threshold, n_boot=n_boot)
            paths = {}
            if out_csv:
                write_findings_csv(res, out_csv)
                paths = save_findings_plots(res, out_csv)
            return res, findings_figures(res), paths

        self._set_status("Validating findings...")
        return self._start(_task, self._on_findings, "validate findings")

    def _on_findings(self, out: Any) -> None:
        res, figs, paths = out
        self.findings_result = res
        self.plots = figs
        for label, kind in ((self.plot_label, "roc"), (self.calibration_label, "calibration")):
            pix = QPixmap()
            pix.loadFromData(figs[kind], "PNG")
            label.setPixmap(pix.scaledToWidth(min(220, pix.width()),
                                              Qt.SmoothTransformation))
            label.setToolTip(f"{kind} plot (full size saved next to the metrics CSV)")
        aucs = ", ".join(f"{r['finding']} {r['auroc']:.2f}" for r in res.rows
                         if r["auroc"] is not None)
        self._set_status(f"AUROC: {aucs or '-'}" + (f"; plots saved beside {Path(paths['roc']).parent}"
                                                    if paths else "")
                         + ("; " + "; ".join(res.messages[:3]) if res.messages else ""))

    # ------------------------------------------------------------------ export
    def export_csv(self, path: str | Path | None = None) -> Path | None:
        if self.store is None:
            return None
        if path is None:
            p, _ = QFileDialog.getSaveFileName(self, "Export review", str(
                self.store.path.with_suffix(".csv")), "CSV (*.csv)")
            if not p:
                return None
            path = p
        out = self.store.export_csv(path)
        self._set_status(f"Exported {out.name}")
        return out

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt name
        if self.store is not None:
            self.store.close()
            self.store = None
        super().closeEvent(event)
