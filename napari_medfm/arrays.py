"""Array helpers that keep big volumes from holding the GIL (and memory) in one piece.

A 512 x 512 x 300 label map is 78 M voxels: one ``np.bincount`` or ``ndimage.sum_labels`` over
it holds the GIL for a tenth of a second or more, long enough to stall napari's event loop
while a worker thread computes statistics. These helpers work in chunks of ``CHUNK`` voxels,
so the GUI thread gets the interpreter back every few milliseconds, and never make a float64
copy of the whole volume.
"""

from __future__ import annotations

import numpy as np

#: Voxels per chunk: ~2 M (a few milliseconds of bincount on one core).
CHUNK = 1 << 21


def label_sums(labels: np.ndarray, n: int | None = None, weights: np.ndarray | None = None,
               *, squares: bool = False, chunk: int = CHUNK) -> np.ndarray:
    """``np.bincount(labels.ravel(), weights, minlength=n)`` computed chunk by chunk.

    ``labels``: a non-negative integer array; ``n``: length of the result (default
    ``labels.max() + 1``); ``weights``: an array of the same size (summed per label as float64;
    ``squares=True`` sums their squares). Without weights the result counts voxels (int64).
    """
    flat = np.asarray(labels).reshape(-1)
    if weights is not None:
        w = np.asarray(weights).reshape(-1)
        if w.size != flat.size:
            raise ValueError(f"labels ({flat.size} values) and weights ({w.size}) differ in size")
    if n is None:
        n = int(flat.max()) + 1 if flat.size else 1
    out = np.zeros(n, dtype=np.float64 if weights is not None else np.int64)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk].astype(np.intp, copy=False)
        if weights is None:
            out += np.bincount(part, minlength=n)[:n]
        else:
            wp = w[i:i + chunk].astype(np.float64)
            out += np.bincount(part, weights=wp * wp if squares else wp, minlength=n)[:n]
    return out


def present_values(labels: np.ndarray) -> list[int]:
    """Sorted non-zero values present in a non-negative integer label map (fast for big maps)."""
    arr = np.asarray(labels)
    if arr.size == 0:
        return []
    mx = int(arr.max())
    if mx < (1 << 20):
        return [int(v) for v in np.flatnonzero(label_sums(arr, mx + 1)) if v != 0]
    return [int(v) for v in np.unique(arr) if v != 0]
