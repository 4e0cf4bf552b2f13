"""Benchmark: our DICOM series reader vs SimpleITK's ImageSeriesReader (same run, same files).

Generates a 512x512xN CT series (default N=400) in a temporary folder from a real uncompressed
slice of the corpus (``ct/dcmqi_ct3slice/01.dcm``), re-writing positions, instance numbers and
UIDs, then reads it with both readers (alternating, best of ``--repeat``) and reports time and
peak memory (RSS growth measured in a fresh subprocess per reader, plus tracemalloc peak for
ours). Targets: time <= 1.2x SimpleITK, peak memory <= 1.5x the volume size.

    python benchmarks/bench_dicom_series.py [--slices 400] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import corpus_dir  # noqa: E402


def make_series(src: Path, out_dir: Path, n: int) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = ds.pixel_array.astype(np.int16)
    z0 = float(ds.ImagePositionPatient[2])
    for k in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k  # instance numbers run against z: sorting must use positions
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], f"{z0 + k:.2f}"]
        ds.SliceLocation = f"{z0 + k:.2f}"
        arr = base + rng.integers(0, 3, size=base.shape, dtype=np.int16)
        ds.PixelData = arr.tobytes()
        ds.save_as(out_dir / f"IM{k:05d}", enforce_file_format=True)


_CHILD = r"""
import json, os, sys, time, resource, tracemalloc
import numpy as np
which, folder = sys.argv[1], sys.argv[2]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if which == "ours":
    from napari_medfm.io import dicom
    import pydicom, SimpleITK  # import cost outside the timing, like the sitk branch
else:
    import SimpleITK as sitk
base = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
trace = os.environ.get("BENCH_TRACE") == "1"
if trace:
    tracemalloc.start()
t = time.perf_counter()
if which == "ours":
    img = dicom.read(folder)[0]
    arr = img.data
else:
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(folder))
    im = r.Execute()
    arr = sitk.GetArrayViewFromImage(im)
dt = time.perf_counter() - t
tm = tracemalloc.get_traced_memory()[1] if trace else 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"time": dt, "rss_growth": peak - max(base, peak_before), "tracemalloc_peak": tm,
                  "nbytes": int(arr.nbytes), "dtype": str(arr.dtype), "shape": list(arr.shape)}))
"""


def run_child(which: str, folder: Path, trace: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_TRACE="1" if trace else "0")
    res = subprocess.run([sys.executable, "-c", _CHILD, which, str(folder)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="reuse/keep the generated series here")
    args = ap.parse_args()

    src = corpus_dir() / "ct" / "dcmqi_ct3slice" / "01.dcm"
    if not src.exists():
        sys.exit(f"corpus slice missing: {src}")
    tmp = None
    if args.keep is not None:
        folder = args.keep
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.iterdir())) != args.slices:
            make_series(src, folder, args.slices)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_dicom_")
        folder = Path(tmp.name)
        t = time.perf_counter()
        make_series(src, folder, args.slices)
        print(f"generated {args.slices} slices in {time.perf_counter() - t:.1f} s")

    # warm the page cache once so both readers see the same conditions
    for f in folder.iterdir():
        f.read_bytes()
    ours, sitk_ = [], []
    for _ in range(args.repeat):
        ours.append(run_child("ours", folder))
        sitk_.append(run_child("sitk", folder))
    traced = run_child("ours", folder, trace=True)
    best_o = min(ours, key=lambda r: r["time"])
    best_s = min(sitk_, key=lambda r: r["time"])
    vol = best_o["nbytes"]
    print(f"volume: {best_o['shape']} {best_o['dtype']} = {vol / 2**20:.1f} MiB "
          f"(SimpleITK: {best_s['dtype']}, {best_s['nbytes'] / 2**20:.1f} MiB)")
    print(f"time   ours {best_o['time']:.3f} s | SimpleITK {best_s['time']:.3f} s | "
          f"ratio {best_o['time'] / best_s['time']:.2f}x (target <= 1.2x)")
    print(f"peak RSS growth  ours {best_o['rss_growth'] / 2**20:.1f} MiB "
          f"({best_o['rss_growth'] / vol:.2f}x volume) | SimpleITK {best_s['rss_growth'] / 2**20:.1f} MiB "
          f"({best_s['rss_growth'] / best_s['nbytes']:.2f}x its volume) (target ours <= 1.5x)")
    print(f"tracemalloc peak ours {traced['tracemalloc_peak'] / 2**20:.1f} MiB "
          f"({traced['tracemalloc_peak'] / vol:.2f}x volume)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
