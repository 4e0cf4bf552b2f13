"""Benchmark: opening whole-slide images lazily vs decoding the full level (same run, same files).

For every slide of the corpus (``pathology/wsi/*``, or the paths given) it measures, best of
``--repeat`` fresh opens:

* ``open``   - :func:`napari_medfm.io.wsi.read` (header, tile index, one probe tile);
* ``first screen`` - with a display (``$DISPLAY`` set, e.g. under ``xvfb-run``): open, then
  ``load`` = add the multiscale layer to a real napari viewer (which fetches the data of the
  first screen) and ``render`` = draw one frame (``viewer.screenshot``); without a display:
  open + read the whole lowest-resolution level + one 1024x1024 tile at full resolution (what a
  viewer needs for the overview and the first zoom-in);
* ``baseline`` - decoding the full-resolution level into memory as a non-lazy reader would
  (``tifffile.imread(path, level=0)`` for TIFF slides, ``pydicom`` ``pixel_array`` of all frames
  for DICOM WSI), and with a display also showing that numpy array in the same viewer;
* ``viewer.open`` (with a display) - the path a user takes: ``viewer.open(path,
  plugin="napari-medfm")`` (npe2 reader lookup, our reader, napari's "Opening Files" progress,
  the layer and its first screen, ``NAPARI_ASYNC=0``), then one rendered frame; its control is
  ``viewer.open`` of a PNG holding the slide's overview level (same napari path and display
  size, trivial data): ``open / control`` near 1 means the slide costs no more than napari's own
  fixed cost of opening any image.

The ratio ``baseline / ours`` is printed per slide (higher = lazy opening pays off more;
it grows with slide size: the corpus slides are small crops, real slides are 100x larger while
the first screen stays the same).

    python benchmarks/bench_wsi_open.py [--repeat 3] [--json out.json] [paths...]
    xvfb-run -a python benchmarks/bench_wsi_open.py          # real napari rendering
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _common import corpus_dir  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _baseline(path: Path) -> np.ndarray:
    """The full-resolution level decoded into memory, as a non-lazy reader would."""
    if path.suffix.lower() in (".dcm", ""):
        import pydicom

        ds = pydicom.dcmread(str(path))
        frames = ds.pixel_array  # decode every frame, then assemble the tiled matrix
        th, tw = int(ds.Rows), int(ds.Columns)
        rows, cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
        n_cols = -(-cols // tw)
        out = np.empty((-(-rows // th) * th, n_cols * tw) + frames.shape[3:], frames.dtype)
        for k, f in enumerate(frames[: out.shape[0] // th * n_cols]):
            r, c = divmod(k, n_cols)
            out[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = f
        return out[:rows, :cols]
    import tifffile

    return tifffile.imread(str(path), series=0, level=0)


def _headless_first_screen(path: Path) -> None:
    from napari_medfm.io import wsi

    (img,) = wsi.read(path)
    np.asarray(img.data[-1])
    h, w = img.data[0].shape[:2]
    y, x = max(0, h // 2 - 512), max(0, w // 2 - 512)
    np.asarray(img.data[0][y : y + 1024, x : x + 1024])


class _Viewer:
    """A real napari viewer; times opening, loading the first screen's data and rendering."""

    def __init__(self):
        import napari

        self.viewer = napari.Viewer(show=True)
        self.viewer.window._qt_window.resize(1200, 900)

    def _show(self, data, kwargs) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.viewer.add_image(data, **kwargs)  # NAPARI_ASYNC=0: slices + loads the data here
        self.viewer.reset_view()
        t1 = time.perf_counter()
        self.viewer.screenshot(canvas_only=True)  # forces a real render of the frame
        return t1 - t0, time.perf_counter() - t1

    def ours(self, path: Path) -> tuple[float, float, float]:
        from napari_medfm.io import wsi

        self.viewer.layers.clear()
        t0 = time.perf_counter()
        (img,) = wsi.read(path)
        t_open = time.perf_counter() - t0
        data, kwargs, _ = img.layer_data()
        return (t_open, *self._show(data, kwargs))

    def baseline(self, path: Path) -> tuple[float, float, float]:
        self.viewer.layers.clear()
        t0 = time.perf_counter()
        full = _baseline(path)
        t_open = time.perf_counter() - t0
        return (t_open, *self._show(full, {"rgb": True}))

    def napari_open(self, path: Path) -> tuple[float, float, int, float]:
        """(viewer.open wall s, render s, displayed level, viewer.open CPU s of this process)
        through the plugin's reader; CPU time (all threads) is robust to a loaded machine."""
        self.viewer.layers.clear()
        c0 = time.process_time()
        t0 = time.perf_counter()
        (layer,) = self.viewer.open(str(path), plugin="napari-medfm")
        t1 = time.perf_counter()
        c1 = time.process_time()
        self.viewer.screenshot(canvas_only=True)
        t2 = time.perf_counter()
        level = int(getattr(layer, "data_level", 0))
        self.viewer.layers.clear()
        return t1 - t0, t2 - t1, level, c1 - c0

    def close(self) -> None:
        self.viewer.close()


def _overview_png(path: Path, folder: Path) -> Path:
    """A PNG of the slide's smallest level (the control for ``viewer.open``)."""
    from PIL import Image

    from napari_medfm.io import wsi

    (img,) = wsi.read(path)
    arr = np.asarray(img.data[-1])
    out = folder / f"{path.stem}_overview.png"
    Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).save(out)
    return out


def _napari_open_rows(viewer: _Viewer, paths: list[Path], repeat: int) -> list[dict]:
    import statistics as st
    import tempfile

    print(f"\nviewer.open(path, plugin='napari-medfm') + one render; best and median of "
          f"{repeat}; control = viewer.open of a PNG of the overview level\n")
    header = (f"{'slide':34s} {'open best':>9s} {'median':>7s} {'cpu':>6s} {'render':>7s} "
              f"{'level':>5s} | {'control':>7s} {'median':>7s} {'cpu':>6s} {'open/control':>12s}")
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in paths:
            png = _overview_png(p, Path(tmp))
            viewer.napari_open(p)  # warm this layer type
            viewer.napari_open(png)
            ours, ctrl = [], []
            for _ in range(repeat):  # interleaved: the same machine load for both
                ours.append(viewer.napari_open(p))
                ctrl.append(viewer.napari_open(png))
            o_best = min(r[0] for r in ours)
            o_med = st.median(r[0] for r in ours)
            c_best = min(r[0] for r in ctrl)
            c_med = st.median(r[0] for r in ctrl)
            rend = min(r[1] for r in ours)
            o_cpu = st.median(r[3] for r in ours)
            c_cpu = st.median(r[3] for r in ctrl)
            row = {"slide": p.name, "mode": "viewer.open", "open_best_s": o_best,
                   "open_median_s": o_med, "open_cpu_median_s": o_cpu, "render_s": rend,
                   "level_shown": ours[0][2], "control_best_s": c_best,
                   "control_median_s": c_med, "control_cpu_median_s": c_cpu,
                   "ratio_open_control": o_med / c_med}
            rows.append(row)
            print(f"{p.name[:34]:34s} {1e3 * o_best:7.0f}ms {1e3 * o_med:5.0f}ms "
                  f"{1e3 * o_cpu:4.0f}ms {1e3 * rend:5.0f}ms {ours[0][2]:5d} | "
                  f"{1e3 * c_best:5.0f}ms {1e3 * c_med:5.0f}ms {1e3 * c_cpu:4.0f}ms "
                  f"{o_med / c_med:12.2f}")
    return rows


def _best_parts(fn, repeat: int) -> tuple[float, ...]:
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=sum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--napari-open-only", action="store_true",
                    help="with a display: only the viewer.open table")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("NAPARI_ASYNC", "0")

    from napari_medfm.io import wsi
    paths = args.paths or sorted((corpus_dir() / "pathology" / "wsi").glob("*"))
    paths = [p for p in paths if wsi.can_read(p)]
    if not paths:
        print("no whole-slide images found (set $MEDFM_TEST_DATA)", file=sys.stderr)
        return 1

    # warm imports (dask, zarr, tifffile, highdicom, pydicom) outside the timings
    for p in paths:
        wsi.read(p)
    viewer = _Viewer() if os.environ.get("DISPLAY") else None
    rows = []
    if viewer is not None:
        print("real napari viewer; open = read, load = add_image (first screen's data), render = "
              f"viewer.screenshot; best of {args.repeat}; baseline = full level 0 decoded into a "
              "numpy layer\n")
        header = (f"{'slide':34s} {'level0':>11s} {'open':>7s} {'load':>7s} {'render':>7s} "
                  f"{'total':>7s} | {'base decode':>11s} {'load':>7s} {'render':>7s} "
                  f"{'total':>7s} {'ratio':>6s}")
    else:
        print("no $DISPLAY: first screen = open + lowest level + one 1024^2 full-res tile; "
              f"best of {args.repeat}; baseline = full level 0 decode\n")
        header = (f"{'slide':34s} {'level0':>11s} {'open':>7s} {'first':>7s} "
                  f"{'baseline':>9s} {'ratio':>6s}")
    if viewer is not None and args.napari_open_only:
        paths_open: list[Path] = paths
        paths = []
    else:
        paths_open = paths
        print(header)
        print("-" * len(header))
    try:
        for p in paths:
            (img,) = wsi.read(p)
            h, w = img.data[0].shape[:2]
            name, size = p.name[:34], f"{h}x{w}"
            if viewer is not None:
                viewer.ours(p)  # warm the GL pipeline for this layer type
                ours = _best_parts(lambda p=p: viewer.ours(p), args.repeat)
                base = _best_parts(lambda p=p: viewer.baseline(p), args.repeat)
                ratio = sum(base) / sum(ours)
                rows.append({"slide": p.name, "shape": [h, w], "mode": "napari",
                             "ours_open_load_render_s": ours,
                             "baseline_decode_load_render_s": base, "ratio": ratio})
                ms = [f"{1e3 * t:6.0f}ms" for t in (*ours, sum(ours))]
                bs = [f"{1e3 * t:6.0f}ms" for t in base]
                print(f"{name:34s} {size:>11s} {' '.join(ms)} | {bs[0]:>11s} {bs[1]} {bs[2]} "
                      f"{1e3 * sum(base):6.0f}ms {ratio:6.2f}")
            else:
                t_open = _best(lambda p=p: wsi.read(p), args.repeat)
                t_first = _best(lambda p=p: _headless_first_screen(p), args.repeat)
                t_base = _best(lambda p=p: _baseline(p), args.repeat)
                ratio = t_base / t_first
                rows.append({"slide": p.name, "shape": [h, w], "mode": "headless",
                             "open_s": t_open, "first_screen_s": t_first,
                             "baseline_s": t_base, "ratio": ratio})
                print(f"{name:34s} {size:>11s} {t_open * 1e3:5.0f}ms {t_first * 1e3:5.0f}ms "
                      f"{t_base * 1e3:7.0f}ms {ratio:6.2f}")
        if viewer is not None:
            rows += _napari_open_rows(viewer, paths_open, max(args.repeat, 5))
    finally:
        if viewer is not None:
            viewer.close()
    lazy = [r["ratio"] for r in rows if "ratio" in r]
    if lazy:
        print(f"\nmedian ratio baseline/ours (higher = lazy wins): {statistics.median(lazy):.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
