"""Window / level dock widget: HU presets for the active (or chosen) image layer.

Thin: the values and the logic live in :mod:`napari_medfm.windowing`; the CLI twin is
``medfm open PATH --window PRESET`` (and ``medfm demo --window PRESET``).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..windowing import (
    AUTO,
    HEADER_DEFAULT,
    PRESETS,
    apply_window,
    auto_window,
    header_window,
    limits_to_window,
    resolve_window,
)
from ._common import hbox

_ACTIVE = "(active image layer)"


class WindowWidget(QWidget):
    """Preset picker (soft tissue, lung, bone, brain, liver, mediastinum, header default,
    automatic) plus centre/width fields, applied to the active or the chosen image layer."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.applied: tuple[float, float] | None = None

        self.layer_combo = QComboBox()
        self.preset_combo = QComboBox()
        for key, p in PRESETS.items():
            self.preset_combo.addItem(p.label, key)
        self.preset_combo.addItem("Header default (from the file)", HEADER_DEFAULT)
        self.preset_combo.addItem("Automatic (1-99 percentile)", AUTO)

        self.center_spin = QDoubleSpinBox()
        self.width_spin = QDoubleSpinBox()
        for spin in (self.center_spin, self.width_spin):
            spin.setRange(-100_000.0, 100_000.0)
            spin.setDecimals(1)
            spin.setSingleStep(10.0)
        self.width_spin.setMinimum(0.1)

        self.apply_button = QPushButton("Apply preset")
        self.set_button = QPushButton("Set centre / width")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Layer", self.layer_combo)
        form.addRow("Preset", self.preset_combo)
        form.addRow("Centre (L)", self.center_spin)
        form.addRow("Width (W)", self.width_spin)
        buttons = hbox(self.apply_button, self.set_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.apply_button.clicked.connect(lambda: self.apply_preset())
        self.set_button.clicked.connect(lambda: self.apply_center_width())
        self.preset_combo.activated.connect(lambda _i: self.apply_preset())
        self.layer_combo.activated.connect(lambda _i: self._show_current())
        ev = self.viewer.layers.events
        ev.inserted.connect(self._refresh_layers)
        ev.removed.connect(self._refresh_layers)
        ev.reordered.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._on_active)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def _image_layers(self) -> list[Any]:
        return [
            lyr for lyr in self.viewer.layers
            if type(lyr).__name__ == "Image" and not getattr(lyr, "rgb", False)
        ]

    def _refresh_layers(self, *_args: Any) -> None:
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItem(_ACTIVE)
        for lyr in self._image_layers():
            self.layer_combo.addItem(lyr.name)
        idx = self.layer_combo.findText(current)
        self.layer_combo.setCurrentIndex(max(idx, 0))
        self.layer_combo.blockSignals(False)
        self._show_current()

    def _on_active(self, *_args: Any) -> None:
        if self.layer_combo.currentText() == _ACTIVE:
            self._show_current()

    def target_layer(self) -> Any | None:
        """The chosen image layer, or the active one, or the topmost grey image layer."""
        name = self.layer_combo.currentText()
        images = self._image_layers()
        if name and name != _ACTIVE:
            for lyr in images:
                if lyr.name == name:
                    return lyr
        active = self.viewer.layers.selection.active
        if active is not None and active in images:
            return active
        return images[-1] if images else None

    def _show_current(self) -> None:
        layer = self.target_layer()
        if layer is None:
            self.status.setText("No grey-level image layer: open a CT/MR/X-ray first.")
            return
        c, w = limits_to_window(*layer.contrast_limits)
        self.center_spin.setValue(c)
        self.width_spin.setValue(w)
        units = (layer.metadata or {}).get("units", "")
        self.status.setText(f"{layer.name}: L {c:g} / W {w:g} {units}".strip())

    # ------------------------------------------------------------------ actions
    def select_preset(self, key: str) -> None:
        idx = self.preset_combo.findData(key)
        if idx < 0:
            raise ValueError(f"unknown preset {key!r}")
        self.preset_combo.setCurrentIndex(idx)

    def apply_preset(self, key: str | None = None) -> tuple[float, float] | None:
        """Apply a preset (default: the one selected) and return the new contrast limits.

        Fixed presets and a stored header window apply at once. The automatic window (also the
        header fallback) reads percentiles of the data: that runs in a worker and is applied
        when it returns; called with ``key`` (scripts, tests) this waits for it (the event loop
        keeps running), from the picker it returns ``None`` at once.
        """
        wait = key is not None
        if key is not None:
            self.select_preset(key)
        key = self.preset_combo.currentData()
        layer = self.target_layer()
        if layer is None:
            self.status.setText("No grey-level image layer to window.")
            return None
        if key == AUTO or (key == HEADER_DEFAULT and header_window(layer) is None):
            return self._apply_auto(layer, wait)
        try:
            c, w = resolve_window(key, layer)
            limits = apply_window(layer, c, w)
        except ValueError as exc:
            self.status.setText(str(exc))
            return None
        self._show_current()
        return limits

    def _apply_auto(self, layer: Any, wait: bool) -> tuple[float, float] | None:
        from ._common import start_task, wait_for

        data = layer.data  # a reference, read in the worker

        def _task():
            yield from ()
            return auto_window(data)

        def _apply(win: tuple[float, float]) -> None:
            if layer in self.viewer.layers:
                self.applied = apply_window(layer, *win)
                self._show_current()

        def _failed(exc: BaseException) -> None:
            self.status.setText(str(exc))

        self.applied: tuple[float, float] | None = None
        self.status.setText(f"{layer.name}: computing the automatic window...")
        worker = start_task(_task, on_result=_apply, on_error=_failed,
                            description="automatic window")
        self.worker = worker
        if not wait:
            return None
        try:
            wait_for(worker)
        except ValueError:
            return None
        return self.applied

    def apply_center_width(self, center: float | None = None,
                           width: float | None = None) -> tuple[float, float] | None:
        """Apply the centre/width fields (or the given values)."""
        if center is not None:
            self.center_spin.setValue(center)
        if width is not None:
            self.width_spin.setValue(width)
        layer = self.target_layer()
        if layer is None:
            self.status.setText("No grey-level image layer to window.")
            return None
        limits = apply_window(layer, self.center_spin.value(), self.width_spin.value())
        self._show_current()
        return limits
