"""MerMED-FM trainer throughput (tiny preset, CPU) and probe-head training time.

    python benchmarks/bench_train_mermed.py                 # both figures
    python benchmarks/bench_train_mermed.py --steps 20 --skip-probe

1. ``medfm train mermed --preset tiny`` on a synthetic manifest (2 modalities, 128x128 PNGs):
   samples/s of 1 process (global batch 8) against 2 gloo processes (4 each, same global
   batch), from the median step time in each run's ``metrics.csv`` (data loading + forward +
   backward + optimizer + EMA + queue push; start-up, the first 2 steps and the export excluded).
   Ratio = 2 processes / 1 process.
2. Probe head on cached features: seconds to train a linear and an MLP head per 1000 images
   (768-d features, 3 labels, 300 full-batch epochs), the encoder excluded (features come from
   the cache in real runs). Baseline: scikit-learn ``LogisticRegression`` (lbfgs) per label.

Run it on a quiet machine: both figures are CPU-bound.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _manifest(d: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,modality"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(d / f"c{i}.png")
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(d / f"f{i}.png")
        rows += [f"c{i}.png,CXR", f"f{i}.png,fundus"]
    (d / "m.csv").write_text("\n".join(rows) + "\n")
    return d / "m.csv"


def _train(manifest: Path, out: Path, world: int, batch: int, steps: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "napari_medfm.cli", "train", "mermed", "--data", str(manifest),
           "--out", str(out), "--preset", "tiny", "--batch-size", str(batch), "--max-steps",
           str(steps), "--memory-size", "64", "--save-every", str(10 ** 6), "--threads",
           str(threads), "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        e = dict(env)
        if world > 1:
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err[-2000:])
    sys.path.insert(0, str(ROOT))
    from trainers.engine.metrics import read_metrics

    rows = read_metrics(out / "metrics.csv")
    times = [float(r["time_s"]) for r in rows[2:]]  # steady state: first 2 steps dropped
    return batch * world / float(np.median(times))


def _probe(n: int = 1000, dim: int = 768, labels: int = 3) -> dict[str, float]:
    import torch
    from sklearn.linear_model import LogisticRegression

    sys.path.insert(0, str(ROOT))
    from napari_medfm.tasks.probe import fit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim, labels))
    y = (x @ w + rng.normal(size=(n, labels)) > 0).astype(np.float32)
    fit_probe(x[:50], y[:50], epochs=2)  # warm-up (lazy imports, allocator)
    out = {}
    for head in ("linear", "mlp"):
        t = time.perf_counter()
        fit_probe(x, y, head=head, epochs=300)
        out[head] = (time.perf_counter() - t) * 1000 / n
    t = time.perf_counter()
    for j in range(labels):
        LogisticRegression(max_iter=300).fit(x, y[:, j])
    out["sklearn_logreg"] = (time.perf_counter() - t) * 1000 / n
    out["threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--images", type=int, default=16, help="per modality")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1: one core per process, no oversubscription)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-probe", action="store_true")
    args = ap.parse_args(argv)
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            m = _manifest(d, args.images)
            one = _train(m, d / "one", 1, 8, args.steps, threads=args.threads)
            two = _train(m, d / "two", 2, 4, args.steps, threads=args.threads)
        print(f"tiny preset, global batch 8, {args.steps} steps, {args.threads} thread(s) per "
              f"process: 1 process {one:.1f} samples/s; 2 gloo processes {two:.1f} samples/s; "
              f"ratio {two / one:.2f}x")
    if not args.skip_probe:
        r = _probe()
        print(f"probe head, 1000 cached 768-d features, 3 labels, 300 epochs: linear "
              f"{r['linear']:.2f} s, MLP {r['mlp']:.2f} s per 1000 images; sklearn "
              f"LogisticRegression (baseline) {r['sklearn_logreg']:.2f} s; torch threads "
              f"{r['threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
