"""RadFM trainer, tiny preset on CPU: training tokens/s with 1 and 2 processes (gloo).

    python benchmarks/bench_train_radfm.py [--steps 12] [--threads 1]

Builds a manifest from the real corpus (CXR, fundus and CT images with IU X-ray report texts;
synthetic images when it is absent), then runs ``trainers/radfm.py --preset tiny`` as a fresh
process (world 1) and under ``torch.distributed.run --nproc_per_node 2`` at the same global
batch, and reads ``metrics.csv``: tokens per optimizer step (all ranks) / step time, median over
the steps after the first two. Prints both rates and the ratio 2-proc / 1-proc (on a 2-core
machine with other load, expect ~1x or less: gloo all-reduce plus shared cores).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, corpus_dir, iu_report_texts  # noqa: E402


def _manifest(folder: Path) -> Path:
    real = corpus_dir()
    reports = iu_report_texts(("FINDINGS",))
    images = [real / "cxr/nih_chestxray14/00000001_000.png", real / "cxr/tbx11k/h0001.png",
              real / "cxr/tbx11k/tb0005.png", real / "fundus/skimage_retina.jpg"]
    ct = real / "ct/totalseg_nifti/example_ct_sm.nii.gz"
    if not reports or not all(p.exists() for p in [*images, ct]):
        sys.exit(f"real corpus not found under {real} (set $MEDFM_TEST_DATA)")
    rows = [{"images": str(p), "question": "Please write the findings of this image.",
             "answer": reports[i % len(reports)]} for i, p in enumerate(images * 2)]
    rows += [{"images": str(ct), "question": "Describe this CT scan.", "answer": reports[1]}] * 2
    m = folder / "manifest.csv"
    with open(m, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["images", "question", "answer"])
        w.writeheader()
        w.writerows(rows)
    return m


def _rate(out: Path, world: int) -> tuple[float, float]:
    with open(out / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("tokens")]
    rows = rows[2:] or rows
    rates = [float(r["tokens"]) * world / float(r["time_s"]) for r in rows]
    return statistics.median(rates), statistics.median(float(r["time_s"]) for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train_radfm_"))
    m = _manifest(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    common = ["--data", str(m), "--preset", "tiny", "--max-steps", str(args.steps),
              "--set", "train.save_every=0", "--set", "train.export=false"]
    res = {}
    for world in (1, 2):
        out = work / f"w{world}"
        launch = ([sys.executable] if world == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}"])
        r = subprocess.run([*launch, str(ROOT / "trainers" / "radfm.py"), *common,
                            "--out", str(out)], env=env, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        res[world] = _rate(out, world)
        print(f"{world} process(es): {res[world][0]:.1f} tokens/s, {res[world][1]:.3f} s/step")
    print(f"2 / 1 processes: {res[2][0] / res[1][0]:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
