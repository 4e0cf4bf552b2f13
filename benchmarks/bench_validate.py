"""Segmentation agreement metrics for a 117-label 512x512x300 pair: ours vs MONAI label by label.

    python benchmarks/bench_validate.py                       # baseline on every 6th label
    python benchmarks/bench_validate.py --baseline-labels 117 # the full baseline (slow)
    python benchmarks/bench_validate.py --shape 300 512 512 --labels 117 --device-note "..."

The pair is synthetic but shaped like a TotalSegmentator output: 117 ellipsoids of radii 3-60
voxels (seeded) on a 0.8 x 0.8 x 1.5 mm grid, painted in order (later ones overwrite); the
prediction is the same ellipsoids with perturbed centres and radii.

*ours*: :func:`napari_medfm.tasks.validate.segmentation_metrics` (one ``find_objects`` pass
per map, each structure cropped to its box + 2 voxels, MONAI's edge/surface-distance
functions called once per structure for HD95 and ASD, MONAI's Dice). *baseline*: the plain way,
``compute_dice`` + ``compute_hausdorff_distance(percentile=95, spacing=)`` +
``compute_average_surface_distance(symmetric=True, spacing=)`` on full-size one-hot masks,
one label at a time (:func:`monai_metrics_label_by_label`). The baseline runs on a subset of
labels (``--baseline-labels``, spread over the size range) and is reported per label and
extrapolated to all labels; ours is timed on all labels and on the same subset. The values of
both are compared on the subset (max abs difference).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ellipsoids(shape, n, seed, jitter=None):
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, dtype=np.uint8)
    z, y, x = shape
    specs = []
    for v in range(1, n + 1):
        r = rng.uniform(3, 60) if v % 4 == 0 else rng.uniform(3, 25)
        radii = np.array([r * rng.uniform(0.5, 1.0), r * rng.uniform(0.7, 1.3),
                          r * rng.uniform(0.7, 1.3)])
        c = np.array([rng.uniform(radii[0] + 2, z - radii[0] - 2),
                      rng.uniform(radii[1] + 2, y - radii[1] - 2),
                      rng.uniform(radii[2] + 2, x - radii[2] - 2)])
        specs.append((v, c, radii))
    jr = np.random.default_rng(seed + 1)
    for v, c, radii in specs:
        if jitter:
            c = c + jr.normal(0, jitter, 3)
            radii = radii * jr.uniform(0.85, 1.15, 3)
        lo = np.maximum(np.floor(c - radii).astype(int), 0)
        hi = np.minimum(np.ceil(c + radii).astype(int) + 1, shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        m = (((zz - c[0]) / radii[0]) ** 2 + ((yy - c[1]) / radii[1]) ** 2
             + ((xx - c[2]) / radii[2]) ** 2) <= 1.0
        arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][m] = v
    return arr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--labels", type=int, default=117)
    ap.add_argument("--baseline-labels", type=int, default=20,
                    help="labels the baseline is run on (spread over the range; default 20)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    args = ap.parse_args(argv)

    import torch

    from napari_medfm.progress import drain
    from napari_medfm.tasks.validate import monai_metrics_label_by_label, segmentation_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    shape = tuple(args.shape)
    spacing = (1.5, 0.8, 0.8)  # z, y, x mm
    t = time.perf_counter()
    ref = ellipsoids(shape, args.labels, seed=0)
    pred = ellipsoids(shape, args.labels, seed=0, jitter=1.5)
    present = sorted(set(np.unique(ref).tolist()) & set(np.unique(pred).tolist()) - {0})
    print(f"pair {shape} uint8, {len(present)} labels present on both sides "
          f"(built in {time.perf_counter() - t:.1f} s); torch threads {torch.get_num_threads()}")

    # warm-up (imports, first-call costs) on a tiny pair, for both paths
    small = (ref[:40, :64, :64].copy(), pred[:40, :64, :64].copy())
    drain(segmentation_metrics(small[1], small[0], spacing))
    vals = [v for v in np.unique(small[0]) if v][:1]
    if vals:
        monai_metrics_label_by_label(small[1], small[0], spacing, vals)

    from napari_medfm.tasks.validate import Structure

    t = time.perf_counter()
    rows = drain(segmentation_metrics(pred, ref, spacing))
    ours_all = time.perf_counter() - t
    k = min(args.baseline_labels, len(present))
    idx = np.linspace(0, len(present) - 1, k).round().astype(int)
    subset = [present[i] for i in sorted(set(idx.tolist()))]
    t = time.perf_counter()
    sub_rows = drain(segmentation_metrics(pred, ref, spacing,
                                          [Structure(str(v), (v,), (v,)) for v in subset]))
    ours_sub = time.perf_counter() - t
    t = time.perf_counter()
    base = monai_metrics_label_by_label(pred, ref, spacing, subset)
    base_sub = time.perf_counter() - t
    diffs = []
    for a, b in zip(sub_rows, base, strict=True):
        for key in ("dice", "hd95_mm", "asd_mm"):
            if a[key] is not None and np.isfinite(b[key]):
                diffs.append(abs(a[key] - b[key]))
    per_base = base_sub / len(subset)
    print(f"ours, all {len(rows)} structures:          {ours_all:8.2f} s  "
          f"({ours_all / max(len(rows), 1) * 1000:.0f} ms/structure)")
    print(f"ours, subset of {len(subset)}:                {ours_sub:8.2f} s")
    print(f"MONAI label by label, subset of {len(subset)}: {base_sub:8.2f} s  "
          f"({per_base:.2f} s/label; x{len(present)} labels = {per_base * len(present):.0f} s "
          "extrapolated)")
    print(f"speed-up on the same labels: {base_sub / ours_sub:.1f}x; all labels vs "
          f"extrapolated baseline: {per_base * len(present) / ours_all:.1f}x")
    print(f"max |ours - MONAI| over {len(diffs)} values: {max(diffs) if diffs else 0:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
