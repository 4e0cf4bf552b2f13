"""Merlin trainer, tiny preset on CPU: samples/s with 1 and 2 processes (gloo), and what a
checkpoint costs.

    python benchmarks/bench_train_merlin.py [--steps 12] [--threads 1]

Manifest: the corpus' real CTs (NIfTI and DICOM series) with IU X-ray report texts as
stand-ins and a few phecodes. Four runs of ``trainers/merlin.py --preset tiny`` (global batch
2), each a fresh process:

1. world 1, no checkpoints;  2.-3. world 2 (``torch.distributed.run``, 1 sample per rank), no
   checkpoints, with the default global batch norm and again with ``model.image.batchnorm=local``
   (no per-layer all-reduce): samples/s from the median step time in ``metrics.csv`` (the first 2 steps
   dropped), scaling efficiency = rate(2) / (2 x rate(1));
4. world 1 with a DCP checkpoint after every step: cost of one checkpoint = (wall time of run
   4 - wall time of run 1) / number of checkpoints, against the median step time, and the size
   of one step folder.

On a shared 2-core machine the 2-process rate is bounded by the cores (expect efficiency well
below 1); on a cluster the same script measures the real scaling.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, corpus_dir, iu_report_texts  # noqa: E402

CTS = ("ct/totalseg_nifti/example_ct.nii.gz", "ct/totalseg_nifti/example_ct_sm.nii.gz",
       "ct/totalseg_dicom_series", "ct/dcmqi_ct3slice")
CODES = ("250.21;427.21", "", "585.3", "272.11;31.1")


def _manifest(folder: Path) -> Path:
    real = corpus_dir()
    reports = iu_report_texts(("FINDINGS", "IMPRESSION"))
    missing = [c for c in CTS if not (real / c).exists()]
    if missing or len(reports) < len(CTS):
        sys.exit(f"real CTs / reports missing under {real}: {missing} (set $MEDFM_TEST_DATA)")
    m = folder / "manifest.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "report", "phecodes", "split"])
        for ct, rep, codes in zip(CTS, reports, CODES, strict=False):
            w.writerow([real / ct, rep, codes, "train"])
    return m


def _run(manifest: Path, out: Path, world: int, steps: int, save_every: int,
         threads: int, *extra: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads))
    launch = ([sys.executable] if world == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}"])
    cmd = [*launch, str(ROOT / "trainers" / "merlin.py"), "--data", str(manifest), "--out",
           str(out), "--preset", "tiny", "--max-steps", str(steps), "--save-every",
           str(save_every), "--seed", "0", "--set", "train.progress=false",
           "--set", "train.export=false", "--set", "train.keep_last=1", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return wall


def _step_time(out: Path) -> float:
    with open(out / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("time_s")]
    rows = rows[2:] or rows
    return statistics.median(float(r["time_s"]) for r in rows)


def _folder_mb(out: Path) -> float:
    steps = sorted(p for p in out.rglob("step-*") if p.is_dir())
    if not steps:
        return float("nan")
    return sum(f.stat().st_size for f in steps[-1].rglob("*") if f.is_file()) / 2 ** 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    batch = 2  # the tiny preset's global batch
    with tempfile.TemporaryDirectory(prefix="bench_train_merlin_") as tmp:
        work = Path(tmp)
        m = _manifest(work)
        # runs 1 and 3 differ only in --save-every: start-up, CT preprocessing and the
        # tokenizer training cancel out of the wall-time difference
        wall1 = _run(m, work / "w1", 1, args.steps, 0, args.threads)
        rate1 = batch / _step_time(work / "w1")
        _run(m, work / "w2", 2, args.steps, 0, args.threads)
        rate2 = batch / _step_time(work / "w2")
        _run(m, work / "w2l", 2, args.steps, 0, args.threads,
             "--set", "model.image.batchnorm=local")
        rate2l = batch / _step_time(work / "w2l")
        wall_ck = _run(m, work / "ck", 1, args.steps, 1, args.threads)
        step_s = _step_time(work / "ck")
        ckpt_s = max(0.0, wall_ck - wall1) / args.steps
        size = _folder_mb(work / "ck")
    print(f"tiny preset, global batch {batch}, {args.steps} steps, {args.threads} thread(s) per "
          f"process: 1 process {rate1:.2f} samples/s; 2 gloo processes {rate2:.2f} samples/s; "
          f"2/1 {rate2 / rate1:.2f}x (scaling efficiency {rate2 / (2 * rate1):.0%}); with "
          f"model.image.batchnorm=local {rate2l:.2f} samples/s ({rate2l / rate1:.2f}x)")
    print(f"checkpoint (DCP step folder, {size:.1f} MiB): {ckpt_s:.3f} s each against a "
          f"{step_s:.3f} s step ({ckpt_s / step_s:.2f} steps' time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
