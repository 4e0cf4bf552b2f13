"""Benchmark: does a MedFM dock stall napari's event loop? (worst / p99 gap of a 10 ms timer)

Opens a real napari viewer (run it under a display: ``xvfb-run -a python
benchmarks/bench_gui_latency.py``), adds a CT, docks every MedFM widget listed in the plugin
manifest and drives each one while a ``QTimer`` fires every 10 ms on the GUI thread. Every gap
between two timer shots longer than the interval is time the GUI thread spent doing something
else: it cannot repaint, scroll or answer the cancel button. Printed per dock and per case:
the worst gap, the 99th percentile and the mean gap (target: worst < 50 ms).

Each dock is driven ``--repeat`` times (default 2): the first pass is *cold* (its worker imports
torch, SimpleITK, highdicom ...: a C extension's initialisation holds the GIL, which no
threading can hide), the later ones *warm* (what the dock itself costs the GUI thread).

Cases: a real CT of the corpus (the 20-slice 512x512 DICOM series; ``--ct PATH`` for another
file) and a synthetic 512x512x300 int16 volume (``--synthetic-shape``, ``--no-synthetic``).

Baseline: napari's own ``add_labels`` of a Labels volume of the case's shape (cold and warm),
timed the same way: the floor for a dock whose result is a Labels layer (on a software-GL
display it costs 100-500 ms of GUI thread by itself).

Drivers: Segmentation (hu-basic run, then Save NIfTI / CSV / DICOM-SEG when enabled), Window
(every preset), Findings (Run; without Merlin weights the worker fails fast, which still measures
what the dock does on the GUI thread before the worker starts), Similar cases (Search against
an empty index folder: same), and any other dock with a ``run()`` method (generic: call it,
wait for the thread pool). A run still going after ``--timeout`` seconds is cancelled.

The corpus is ``$MEDFM_TEST_DATA`` or ``../shared/data/real`` beside the checkout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.modules.setdefault("triton", None)  # type: ignore[arg-type]  # Triton + Mesa GL segfault

from _common import corpus_dir  # noqa: E402

PLUGIN = "napari-medfm"


class GapRecorder:
    """A 10 ms QTimer on the GUI thread; records the time between consecutive shots."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self._last: float | None = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        self.gaps.clear()
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> dict[str, float]:
        self._tick()
        self.timer.stop()
        g = np.asarray(self.gaps or [0.0]) * 1000.0
        return {"worst_ms": float(g.max()), "p99_ms": float(np.percentile(g, 99)),
                "mean_ms": float(g.mean()), "n": int(g.size)}


def pump(app: Any, seconds: float) -> None:
    """Run the event loop for ``seconds`` (small sleeps so the timer, not a busy loop, rules)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)


def wait_idle(app: Any, timeout: float, cancel: Any = None, settle: float = 0.5) -> bool:
    """Pump events until no worker thread is running (then ``settle`` s more for result slots)."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    end = time.perf_counter() + timeout
    pump(app, 0.05)
    while pool.activeThreadCount() > 0:
        if time.perf_counter() > end:
            if cancel is not None:
                cancel()
            pump(app, 1.0)
            return False
        pump(app, 0.02)
    pump(app, settle)
    while pool.activeThreadCount() > 0 and time.perf_counter() < end + 30:  # a save started
        pump(app, 0.02)
    pump(app, 0.2)
    return True


# ----------------------------------------------------------------------------- drivers
def drive_segmentation(w: Any, app: Any, timeout: float, tmp: Path) -> str:
    idx = w.model_combo.findData("hu-basic")
    w.model_combo.setCurrentIndex(idx)
    w.run()
    done = wait_idle(app, timeout, getattr(w, "cancel", None))
    if not done or getattr(w, "result", None) is None:
        return "run (cancelled after timeout)" if not done else f"run ({w.status.text()[:60]})"
    steps = ["run"]
    for name, call in (("nifti", lambda: w.save_nifti(tmp / "seg.nii.gz")),
                       ("csv", lambda: w.save_csv(tmp / "seg.csv")),
                       ("dicom-seg", lambda: w.save_dicom_seg(tmp / "seg.dcm"))):
        if name == "dicom-seg" and not w.save_seg_button.isEnabled():
            continue
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - report, keep measuring
            steps.append(f"{name} failed: {exc}")
            continue
        wait_idle(app, timeout)
        steps.append(name)
    return " + ".join(steps)


def drive_window(w: Any, app: Any, timeout: float, tmp: Path) -> str:
    keys = [w.preset_combo.itemData(i) for i in range(w.preset_combo.count())]
    for k in keys:
        w.apply_preset(k)
        pump(app, 0.05)
    return f"{len(keys)} presets"


def drive_similar(w: Any, app: Any, timeout: float, tmp: Path) -> str:
    empty = tmp / "no_index"
    empty.mkdir(exist_ok=True)
    w.index_edit.setText(str(empty))
    w.search()
    wait_idle(app, timeout, getattr(w, "cancel", None))
    return f"search ({w.status.text()[:60]})"


def drive_generic(w: Any, app: Any, timeout: float, tmp: Path) -> str:
    run = getattr(w, "run", None)
    if not callable(run):
        pump(app, 0.3)
        return "idle (no run())"
    run()
    wait_idle(app, timeout, getattr(w, "cancel", None))
    status = getattr(w, "status", None)
    return f"run ({status.text()[:60]})" if status is not None else "run"


DRIVERS = {"SegmentWidget": drive_segmentation, "WindowWidget": drive_window,
           "SimilarCasesWidget": drive_similar}


def plugin_docks() -> list[tuple[str, str]]:
    from napari_medfm.cli.demo import plugin_dock_widgets

    return plugin_dock_widgets()


def add_case(viewer: Any, case: str, ct: Path | None, shape: tuple[int, int, int]) -> Any:
    from napari_medfm._napari.reader import layer_tuple
    from napari_medfm.geometry import Geometry
    from napari_medfm.io import read
    from napari_medfm.io.types import MedicalImage

    if case == "real":
        img = next(im for im in read(ct) if im.kind == "volume")
    else:
        rng = np.random.default_rng(0)
        z, y, x = shape
        vol = np.full(shape, -1000, np.int16)
        zz, yy, xx = np.ogrid[:z, :y, :x]
        body = ((yy - y / 2) / (0.4 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 < 1
        vol[np.broadcast_to(body, shape)] = 40
        vol += rng.integers(-20, 20, size=shape, dtype=np.int16)
        img = MedicalImage(vol, Geometry((0.8, 0.8, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
                           modality="CT", kind="volume", name="synthetic",
                           metadata={"units": "HU"})
    data, kwargs, _ = layer_tuple(img)
    return viewer.add_image(data, **kwargs)


def baseline_add_labels(viewer: Any, app: Any, image_layer: Any, rep: int) -> None:
    """The baseline: what napari itself costs the GUI thread to show a Labels layer of the
    image's shape (8 random labels, built before the timer counts), then removing it."""
    labels = np.random.default_rng(rep).integers(0, 8, np.shape(image_layer.data),
                                                 dtype=np.uint8)
    pump(app, 0.3)
    layer = viewer.add_labels(labels, name="baseline labels", scale=image_layer.scale,
                              translate=image_layer.translate)
    pump(app, 0.5)
    viewer.layers.remove(layer)
    pump(app, 0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, default=None,
                    help="real CT (default: the corpus' ct/totalseg_dicom_series)")
    ap.add_argument("--synthetic-shape", type=int, nargs=3, default=(300, 512, 512),
                    metavar=("Z", "Y", "X"))
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--docks", nargs="*", help="display names to drive (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per dock run")
    ap.add_argument("--repeat", type=int, default=2,
                    help="drive each dock this many times: pass 1 is cold (the worker's first "
                         "imports of torch/SimpleITK/highdicom hold the GIL for their C "
                         "initialisation), later passes are warm (default 2)")
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    cases = []
    if not args.no_real:
        ct = args.ct or corpus_dir() / "ct" / "totalseg_dicom_series"
        if not ct.exists():
            print(f"real CT not found: {ct} (set $MEDFM_TEST_DATA or pass --ct)")
        else:
            cases.append(("real", ct))
    if not args.no_synthetic:
        cases.append(("synthetic", None))

    rows = []
    baselines: list[tuple[str, dict[str, float], str]] = []
    with tempfile.TemporaryDirectory() as td:
        for case, ct in cases:
            viewer = napari.Viewer(show=True)
            app = QApplication.instance()
            image_layer = add_case(viewer, case, ct, tuple(args.synthetic_shape))
            pump(app, 1.0)
            for rep in range(1, args.repeat + 1):  # baseline: napari's own add_labels
                rec = GapRecorder()
                rec.start()
                t0 = time.perf_counter()
                baseline_add_labels(viewer, app, image_layer, rep)
                wall = time.perf_counter() - t0
                stats = rec.stop()
                label = "cold" if rep == 1 else "warm"
                baselines.append((case, stats, label))
                print(f"{case:9s} {'[napari add_labels]':22s} {label} worst "
                      f"{stats['worst_ms']:8.1f} ms  p99 {stats['p99_ms']:7.1f} ms  "
                      f"mean {stats['mean_ms']:6.1f} ms  ({wall:.1f} s: baseline)", flush=True)
            for display, _python_name in plugin_docks():
                if args.docks and display not in args.docks:
                    continue
                try:
                    dock, w = viewer.window.add_plugin_dock_widget(PLUGIN, display)
                except Exception as exc:  # noqa: BLE001 - unfinished docks are skipped
                    print(f"{case:9s} {display:22s} skipped ({type(exc).__name__}: {exc})")
                    continue
                pump(app, 0.5)
                driver = DRIVERS.get(type(w).__name__, drive_generic)
                for rep in range(1, args.repeat + 1):
                    tmp = Path(td) / f"{case}_{type(w).__name__}_{rep}"
                    tmp.mkdir()
                    rec = GapRecorder()
                    rec.start()
                    t0 = time.perf_counter()
                    what = driver(w, app, args.timeout, tmp)
                    wall = time.perf_counter() - t0
                    stats = rec.stop()
                    label = "cold" if rep == 1 else "warm"
                    rows.append((case, display, stats, wall, what, label))
                    print(f"{case:9s} {display:22s} {label} worst {stats['worst_ms']:8.1f} ms  "
                          f"p99 {stats['p99_ms']:7.1f} ms  mean {stats['mean_ms']:6.1f} ms  "
                          f"({wall:.1f} s: {what})", flush=True)
                    pump(app, 0.3)
                viewer.window.remove_dock_widget(dock)
                pump(app, 0.2)
            viewer.close()
            pump(app, 0.5)
    for label in ("cold", "warm"):
        sel = [r[2]["worst_ms"] for r in rows if r[5] == label]
        if sel:
            worst = max(sel)
            print(f"{label}: worst gap {worst:.1f} ms (target < 50 ms): "
                  f"{'met' if worst < 50 else 'NOT met'}")
        base = [b[1]["worst_ms"] for b in baselines if b[2] == label]
        if base:
            print(f"{label}: napari's own add_labels of the same volume, worst gap "
                  f"{max(base):.1f} ms (the floor for any dock that shows a Labels layer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
