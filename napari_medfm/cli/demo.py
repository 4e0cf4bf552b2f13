"""``medfm demo``: a napari window with a sample case and every dock widget of the plugin.

The sample is the cached public CT when it was downloaded before, else the offline CT
phantom with its organ labels (no network unless ``--sample`` names a download sample).
``--screenshot PNG`` saves the whole window and exits (docs, tests); ``--quit-after S``
closes the window after S seconds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLUGIN = "napari-medfm"
SAMPLE_CHOICES = ("auto", "phantom", "ct", "cxr", "fundus", "pathology")


def plugin_dock_widgets() -> list[tuple[str, str]]:
    """``(display_name, python_name)`` of every dock widget in the plugin manifest (npe2)."""
    import npe2

    pm = npe2.PluginManager.instance()
    try:
        manifest = pm.get_manifest(PLUGIN)
    except KeyError:
        pm.discover()
        manifest = pm.get_manifest(PLUGIN)
    commands = {c.id: c.python_name for c in manifest.contributions.commands or []}
    return [(w.display_name, commands.get(w.command, "")) for w in manifest.contributions.widgets or []]


def dock_all_widgets(viewer: Any, *, tabify: bool = True) -> tuple[list[str], list[str]]:
    """Dock every plugin widget; ones whose module cannot be imported are skipped with a warning.

    With ``tabify`` (the default) all MedFM docks share one tabbed dock area (see
    :func:`tabify_docks`), so the canvas keeps most of the window however many docks the
    manifest lists. Returns ``(docked, skipped)`` display names.
    """
    import importlib

    docked: list[str] = []
    skipped: list[str] = []
    docks: list[Any] = []
    for name, python_name in plugin_dock_widgets():
        module = python_name.partition(":")[0]
        try:
            importlib.import_module(module)
            dock, _widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        except Exception as exc:  # one broken/unfinished widget must not stop the demo
            log.warning("dock widget %r not available (%s: %s); continuing without it",
                        name, type(exc).__name__, exc)
            skipped.append(name)
        else:
            docked.append(name)
            docks.append(dock)
    if tabify:
        tabify_docks(docks)
    return docked, skipped


def tabify_docks(docks: list[Any], width: int = 360) -> None:
    """Stack QDockWidgets as tabs of one dock area (the first one shown), ``width`` px wide."""
    if len(docks) < 1:
        return
    main = docks[0].parentWidget()
    if main is None or not hasattr(main, "tabifyDockWidget"):
        return
    for dock in docks[1:]:
        main.tabifyDockWidget(docks[0], dock)
    docks[0].show()
    docks[0].raise_()
    try:
        from qtpy.QtCore import Qt

        main.resizeDocks([docks[0]], [width], Qt.Orientation.Horizontal)
        from qtpy.QtWidgets import QTabBar

        # tabs named by the dock alone: with napari's " (napari-medfm)" suffix six tabs elide
        # to "R..." for both Review and Report
        for dock in docks:
            title = dock.windowTitle()
            if title.endswith(")") and " (" in title:
                dock.setWindowTitle(title[:title.rindex(" (")])
        for bar in main.findChildren(QTabBar):  # whole names, scroll arrows when they overflow
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)
    except Exception:  # noqa: BLE001 - cosmetic
        log.debug("could not resize the MedFM dock area", exc_info=True)


def require_display(command: str = "demo") -> None:
    """Fail cleanly (instead of a Qt abort) when there is no screen to open a window on."""
    import os
    import sys

    if (sys.platform.startswith("linux")
            and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
            and not os.environ.get("QT_QPA_PLATFORM")):
        from ..errors import MedfmError

        raise MedfmError(
            "no display found ($DISPLAY is not set): napari needs a screen. On a headless "
            f"machine run `xvfb-run -a medfm {command} ...`"
            + (" or `medfm open PATH --info` for a text summary." if command == "open" else "."))


def choose_sample(sample: str) -> str:
    """``auto`` -> ``ct`` when the public CT is already cached, else ``phantom``."""
    if sample != "auto":
        return sample
    from ..sample_data import is_cached

    return "ct" if is_cached("ct") else "phantom"


def add_images(viewer: Any, images: list[Any], window: str | None = None) -> list[Any]:
    """Add already-read :class:`MedicalImage` s to ``viewer``; returns the new layers."""
    from .._napari.reader import layer_tuple

    layers = []
    for img in images:
        data, kwargs, kind = layer_tuple(img)
        add = viewer.add_labels if kind == "labels" else viewer.add_image
        added = add(data, **kwargs)
        layers.extend(added if isinstance(added, list) else [added])
    if window:
        apply_window_to_images(layers, window)
    grey = [lyr for lyr in layers if type(lyr).__name__ == "Image"]
    if grey:
        viewer.layers.selection.active = grey[0]
    viewer.reset_view()
    return layers


def load_demo_case(viewer: Any, sample: str = "auto", window: str | None = None) -> list[Any]:
    """Add the sample's layers to ``viewer`` (all read before any is added); returns the layers."""
    from ..sample_data import load_sample

    return add_images(viewer, load_sample(choose_sample(sample)), window)


def apply_window_to_images(layers: list[Any], window: str) -> None:
    """Apply a window preset (``lung``, ``header``, ...) to every grey image layer."""
    from ..windowing import apply_window, resolve_window

    for lyr in layers:
        if type(lyr).__name__ == "Image" and not getattr(lyr, "rgb", False):
            c, w = resolve_window(window, lyr)
            apply_window(lyr, c, w)


def finish(viewer: Any, screenshot: str | None, quit_after: float | None) -> int:
    """Save a screenshot and close, or run the event loop (optionally closing after a delay)."""
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    if screenshot:
        out = Path(screenshot)
        out.parent.mkdir(parents=True, exist_ok=True)
        app = QApplication.instance()
        for _ in range(5):  # let docks and the canvas lay out and draw
            app.processEvents()
        viewer.screenshot(str(out), canvas_only=False, flash=False)
        viewer.close()
        print(f"screenshot saved: {out}")
        return 0
    if quit_after is not None:
        QTimer.singleShot(int(max(quit_after, 0.0) * 1000), viewer.close)
    napari.run()
    return 0


def show_viewer(title: str, setup: Any, args: argparse.Namespace) -> int:
    """Open a napari window, fill it with ``setup(viewer)`` and run it (see :func:`finish`).

    A failing ``setup`` closes the window again, so no empty viewer is left behind. This is the
    GUI process of ``medfm demo``/``medfm open``: Triton is blocked here, before anything can
    import torch (see :func:`napari_medfm.widgets.block_triton_in_gui`).
    """
    from ..widgets import block_triton_in_gui

    block_triton_in_gui()
    import napari

    viewer = napari.Viewer(title=title, show=True)
    try:
        setup(viewer)
    except BaseException:
        viewer.close()
        raise
    return finish(viewer, args.screenshot, args.quit_after)


def _roomy(viewer: Any, size: tuple[int, int] = (1440, 900)) -> None:
    """Give the demo window room for the canvas (never larger than the screen)."""
    try:
        from qtpy.QtWidgets import QApplication

        screen = QApplication.primaryScreen()
        avail = screen.availableGeometry() if screen is not None else None
        w, h = size
        if avail is not None:
            w, h = min(w, avail.width()), min(h, avail.height())
        viewer.window.resize(w, h)
    except Exception:  # noqa: BLE001 - cosmetic
        log.debug("could not resize the demo window", exc_info=True)


def run(args: argparse.Namespace) -> int:
    from ..windowing import preset_names

    if args.window and args.window not in preset_names():
        from ..errors import MedfmError

        raise MedfmError(f"unknown window preset {args.window!r}; choose one of "
                         f"{', '.join(preset_names())}")
    require_display("demo")
    key = choose_sample(args.sample)
    # load first: a failed download must not leave an empty window behind
    from ..sample_data import load_sample

    images = load_sample(key)

    def setup(viewer: Any) -> None:
        _roomy(viewer)
        add_images(viewer, images, args.window)
        if not args.no_widgets:
            docked, skipped = dock_all_widgets(viewer)
            print(f"docked widgets: {', '.join(docked) or 'none'}"
                  + (f"; not available yet: {', '.join(skipped)}" if skipped else ""))

    return show_viewer(f"napari-medfm demo ({key})", setup, args)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="open napari with a sample case and all MedFM dock widgets",
        description="Open napari with a sample case (cached CT if downloaded, else the offline "
                    "CT phantom with organ labels) and every MedFM dock widget.",
    )
    p.add_argument("--sample", choices=SAMPLE_CHOICES, default="auto",
                   help="case to show; ct/cxr/fundus/pathology download once (checksummed) "
                        "when not cached (default: auto = cached CT, else phantom)")
    p.add_argument("--window", metavar="PRESET",
                   help="window preset for grey images: soft_tissue, lung, bone, brain, liver, "
                        "mediastinum, header, auto")
    p.add_argument("--screenshot", metavar="PNG", help="save a PNG of the window and exit")
    p.add_argument("--quit-after", type=float, metavar="SECONDS",
                   help="close the window after SECONDS")
    p.add_argument("--no-widgets", action="store_true", help="do not dock the MedFM widgets")
    p.set_defaults(func=run)
