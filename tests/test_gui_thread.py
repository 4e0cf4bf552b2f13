"""Every MedFM dock reads Qt state only on the GUI thread (workers take plain inputs).

Generic over the docks of the plugin manifest (napari.yaml), so docks added later are covered:
each dock is opened in a real viewer with a real CT, the getters of all its Qt child widgets
(``text``, ``currentText``, ``value``, ``isChecked``, ...) are wrapped to record calls made off
the main thread, the dock is driven (its ``run()``/``search()``, or a specific driver) and the
test waits until every worker has finished.
"""

from __future__ import annotations

import threading

import pytest
from conftest import real_path

pytestmark = pytest.mark.gui

PLUGIN = "napari-medfm"
CT = "ct/totalseg_nifti/example_ct_sm.nii.gz"

GETTERS = ("text", "currentText", "currentData", "currentIndex", "value", "isChecked",
           "isEnabled", "toPlainText", "itemText", "itemData", "count", "findData", "findText",
           "rowCount", "item", "selectedItems", "currentItem", "currentRow", "checkState")

#: Docks that still read Qt in a worker at this commit (their owner fixes them): reported as
#: xfail, not hidden. Remove an entry once that dock passes.
KNOWN_OFF_THREAD: dict[str, str] = {}


def _docks() -> list[tuple[str, str]]:
    from napari_medfm.cli.demo import plugin_dock_widgets

    return plugin_dock_widgets()


def spy_on_qt_reads(root) -> list[str]:
    """Wrap the getters of ``root`` and all its child widgets; returns the list of off-thread
    reads (``"QComboBox.currentText in Thread-3"``) it fills."""
    from qtpy.QtWidgets import QWidget

    off: list[str] = []
    main = threading.main_thread()

    def wrap(obj, name):
        orig = getattr(obj, name)

        def spy(*args, **kwargs):
            if threading.current_thread() is not main:
                off.append(f"{type(obj).__name__}.{name} in {threading.current_thread().name}")
            return orig(*args, **kwargs)

        setattr(obj, name, spy)

    for widget in [root, *root.findChildren(QWidget)]:
        for name in GETTERS:
            if callable(getattr(type(widget), name, None)):
                wrap(widget, name)
    return off


def _drive(w, tmp_path) -> None:
    kind = type(w).__name__
    if kind == "SegmentWidget":
        w.model_combo.setCurrentIndex(w.model_combo.findData("hu-basic"))
        w.run()
    elif kind == "WindowWidget":
        for i in range(w.preset_combo.count()):
            w.apply_preset(w.preset_combo.itemData(i))
    elif kind == "SimilarCasesWidget":
        (tmp_path / "no_index").mkdir()
        w.index_edit.setText(str(tmp_path / "no_index"))
        w.search()
    elif callable(getattr(w, "run", None)):
        w.run()


@pytest.mark.parametrize("display,python_name", _docks(), ids=[d for d, _ in _docks()])
def test_dock_reads_qt_only_on_the_gui_thread(make_napari_viewer, qtbot, tmp_path, display,
                                              python_name):
    from qtpy.QtCore import QThreadPool

    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.io import volume

    img = volume.read(real_path(CT))[0]
    viewer = make_napari_viewer()
    data, kwargs, _ = layer_tuple(img)
    viewer.add_image(data, **kwargs)
    try:
        _dock, w = viewer.window.add_plugin_dock_widget(PLUGIN, display)
    except Exception as exc:  # noqa: BLE001 - a dock whose extra is missing
        pytest.skip(f"{display} cannot be opened here: {type(exc).__name__}: {exc}")
    off = spy_on_qt_reads(w)
    _drive(w, tmp_path)
    pool = QThreadPool.globalInstance()
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=180_000)
    qtbot.wait(200)  # result slots (which may start a save or a follow-up worker)
    qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=60_000)
    if type(w).__name__ == "SegmentWidget":  # and the writing workers of the save buttons
        assert w.result is not None, w.status.text()
        w.save_nifti(tmp_path / "seg.nii.gz")
        w.save_csv(tmp_path / "seg.csv")
    reason = KNOWN_OFF_THREAD.get(type(w).__name__)
    if off and reason:
        pytest.xfail(reason)
    assert not off, f"{display} read Qt state off the GUI thread: {sorted(set(off))}"


def test_the_spy_sees_an_off_thread_read(qtbot):
    from qtpy.QtWidgets import QComboBox, QWidget

    root = QWidget()
    qtbot.addWidget(root)
    combo = QComboBox(root)
    combo.addItem("x")
    off = spy_on_qt_reads(root)
    combo.currentText()
    assert off == []
    t = threading.Thread(target=combo.currentText)
    t.start()
    t.join()
    assert off and off[0].startswith("QComboBox.currentText")
