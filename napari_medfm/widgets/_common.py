"""Helpers shared by the dock widgets: running task generators in napari workers."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from ..progress import Progress


def start_task(
    gen_factory: Callable[[], Generator[Progress, None, Any]],
    *,
    on_result: Callable[[Any], None],
    on_error: Callable[[BaseException], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_aborted: Callable[[], None] | None = None,
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

    def _run():
        gen = gen_factory()
        try:
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    return stop.value
                yield p
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
    worker.start()
    return worker


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
