"""Helpers shared by the dock widgets: layers -> images, task generators in napari workers.

Rules every dock keeps (tests/test_gui_thread.py checks them on every dock of the manifest):

* the GUI thread only reads the widgets and the layers' *references* (no array copies, no
  statistics, no file reading or writing);
* everything a worker needs is captured on the GUI thread before it starts (plain values and
  :class:`~napari_medfm.io.types.MedicalImage` views); workers never touch Qt;
* results come back through the worker's signals (``on_result`` runs on the GUI thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from ..errors import MedfmError
from ..io.types import MedicalImage
from ..progress import Progress


def image_from_layer(layer: Any, *, what: str = "this model", volume: bool = False,
                     allow_multiscale: bool = True) -> MedicalImage:
    """The image behind a napari layer in its source order, without copying its data.

    The one layer -> :class:`MedicalImage` conversion of the docks
    (:meth:`MedicalImage.from_layer`: geometry from the layer's transform, display transpose
    undone). ``data`` stays the layer's own array (a view), so this is cheap on the GUI thread;
    the task materialises it in its worker. ``volume`` refuses anything but a 3D grey volume;
    ``allow_multiscale=False`` refuses whole-slide pyramids.
    """
    multiscale = bool(getattr(layer, "multiscale", False))
    if multiscale and (volume or not allow_multiscale):
        raise MedfmError(f"{layer.name}: multiscale (whole-slide) layers are not supported by "
                         f"{what}")
    img = MedicalImage.from_layer(layer)
    if volume and (img.geometry.ndim != 3 or img.rgb):
        raise MedfmError(f"{layer.name}: {what} needs a 3D volume layer")
    return img


def _warm_layer_imports() -> None:
    """Import, in the worker, what napari imports lazily the first time a layer is added.

    napari imports pandas on the first ``add_labels``/``add_points`` (layer features): on the
    GUI thread that import stalls the viewer for ~0.4 s; in a worker it mostly runs while the
    GUI thread keeps the interpreter (pure-Python module code switches threads every 5 ms).
    """
    import contextlib
    import importlib

    with contextlib.suppress(ImportError):  # napari needs pandas; nothing to warm without it
        importlib.import_module("pandas")


def start_task(
    gen_factory: Callable[[], Generator[Progress, None, Any]],
    *,
    on_result: Callable[[Any], None],
    on_error: Callable[[BaseException], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_aborted: Callable[[], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    description: str = "medfm",
    progress: bool = True,
) -> Any:
    """Run a task generator in a napari generator worker and return the started worker.

    The worker yields once per :class:`Progress` event, so ``worker.quit()`` (the cancel
    button, or napari's task manager) stops it at the next window/slice/file. ``on_result``
    receives the generator's return value in the GUI thread; nothing is added to the viewer
    before that, so a cancelled run leaves no half-made layer.
    """
    from napari.qt.threading import create_worker

    from . import block_triton_in_gui

    block_triton_in_gui()  # this is a napari GUI process about to run torch work

    def _run():
        _warm_layer_imports()
        gen = gen_factory()
        try:
            return (yield from gen)
        finally:
            gen.close()

    # errors the widget reports itself must not also pop up as napari notifications
    # ``progress=False``: no napari activity bar (a dock with its own bar and frequent events:
    # each napari progress update repaints the main window)
    worker = create_worker(_run, _start_thread=False,
                           _progress={"desc": description} if progress else False,
                           _ignore_errors=on_error is not None)
    if on_progress is not None:
        worker.yielded.connect(on_progress)

    def _on_yield(p: Progress) -> None:
        pbar = getattr(worker, "pbar", None)
        if pbar is not None and p.total:
            pbar.total = p.total
            pbar.n = p.step
            pbar.set_description(f"{description}: {p.message}" if p.message else description)
            pbar.refresh()

    worker.yielded.connect(_on_yield)
    worker.returned.connect(on_result)
    if on_error is not None:
        worker.errored.connect(on_error)
    if on_aborted is not None:
        worker.aborted.connect(on_aborted)
    if on_finished is not None:  # connected before start: a worker that fails at once still
        worker.finished.connect(on_finished)  # reaches it (a later connect could miss it)
    _track(worker)
    worker.start()
    return worker


def _track(worker: Any) -> None:
    """Record the outcome in the worker thread itself (so :func:`wait_for` cannot miss it)."""
    from qtpy.QtCore import Qt

    direct = Qt.ConnectionType.DirectConnection
    worker.medfm_outcome = {}
    worker.medfm_done = threading.Event()
    worker.returned.connect(lambda r: worker.medfm_outcome.setdefault("result", r), direct)
    worker.errored.connect(lambda e: worker.medfm_outcome.setdefault("error", e), direct)
    worker.finished.connect(worker.medfm_done.set, direct)


def wait_for(worker: Any, timeout: float | None = None) -> Any:
    """Keep the event loop running until ``worker`` ends; return its result or raise its error.

    For programmatic calls that want a value (``dock.save_nifti(path)`` in scripts and
    tests): the GUI keeps repainting and answering while the worker runs, and the worker's
    ``on_result`` slot has run when this returns.
    """
    from qtpy.QtCore import QEventLoop
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = None if timeout is None else time.monotonic() + timeout
    while not worker.medfm_done.is_set():
        if end is not None and time.monotonic() > end:
            raise TimeoutError("the task did not finish in time")
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        worker.medfm_done.wait(0.002)
    for _ in range(3):  # deliver the queued returned/errored/finished slots
        app.processEvents()
    if "error" in worker.medfm_outcome:
        raise worker.medfm_outcome["error"]
    return worker.medfm_outcome.get("result")


def format_error(exc: BaseException) -> str:
    """One-line user message; out-of-memory errors get advice."""
    msg = str(exc) or type(exc).__name__
    low = msg.lower()
    if "out of memory" in low or isinstance(exc, MemoryError):
        return (f"Out of memory: {msg.splitlines()[0]}. Try a smaller window/batch size, "
                "half precision, or run on the CPU.")
    return msg.splitlines()[0] if msg else type(exc).__name__


def refill_combo(combo: Any, names: Any, keep: str | None = None) -> None:
    """Refill a combo box with ``names``, keeping the current (or ``keep``) choice if still there."""
    current = combo.currentText() if keep is None else keep
    combo.clear()
    for name in names:
        combo.addItem(str(name))
    idx = combo.findText(current)
    if idx >= 0:
        combo.setCurrentIndex(idx)


def layer_named(layers: Any, name: str) -> Any | None:
    """The first layer of ``layers`` called ``name`` (``None`` if none)."""
    return next((lyr for lyr in layers if lyr.name == name), None)


def hbox(*items: Any) -> Any:
    """A ``QHBoxLayout`` holding ``items`` in order: widgets, or ``(widget, stretch)`` pairs."""
    from qtpy.QtWidgets import QHBoxLayout

    row = QHBoxLayout()
    for item in items:
        if isinstance(item, tuple):
            row.addWidget(*item)
        else:
            row.addWidget(item)
    return row
