"""Merlin image-tower forward: our inference path vs a plain eager fp32 run of the same network.

    python benchmarks/bench_merlin_forward.py                      # CPU, batch 1, 224x224x160
    python benchmarks/bench_merlin_forward.py --threads 2 --repeats 3
    python benchmarks/bench_merlin_forward.py --device cuda --precision bf16 --batch 1 8

Full-size network (ResNet-152 I3D, 122.0 M) with random weights and randomised batch-norm
statistics (or ``--weights`` = the released CLIP checkpoint). In one process, for each batch
size: warm-up, then ``--repeats`` interleaved runs of

* ``eager``: the plain network, fp32, ``torch.inference_mode`` (what Merlin's own code does);
* ``ours``:  what ``MerlinModel`` runs - the fused twin (BN folded, channel repeat folded into
  conv1, 1x1x1 convs as GEMMs, oneDNN conv+ReLU, in-place residuals) on the CPU; the
  BN-folded twin under bf16/fp16 autocast on a GPU.

Prints per-run wall times, medians, the paired time ratio ours/eager, on the CPU also the
process CPU time of each run (less sensitive to other programs competing for the cores), and
the max abs difference of the outputs. Peak memory: on the CPU each path also runs alone in a fresh subprocess holding
only its own weights, reporting peak RSS (``ru_maxrss``); on a GPU,
``torch.cuda.max_memory_allocated``.

Targets (CPU, batch 1): time ratio <= 0.8, our peak RSS <= 2.0 GB. Reference anchor from the
spec: Merlin's own encoder, CPU 2 threads, fp32: 26.0 s, 2.36 GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from napari_medfm.models.merlin.network import (  # noqa: E402
    FULL_CONFIG,
    IMAGE_PREFIX,
    I3DResNet,
    fuse_for_inference,
)


def build(weights: str | None, seed: int = 0) -> I3DResNet:
    torch.manual_seed(seed)
    net = I3DResNet(FULL_CONFIG)
    if weights:
        from napari_medfm.runtime.safe_load import extract_prefix, load_state_dict, load_strict

        load_strict(net, extract_prefix(load_state_dict(weights), IMAGE_PREFIX), what=weights)
    else:
        from napari_medfm.models.merlin.testing import randomize_batchnorm

        randomize_batchnorm(net, seed)
    return net.eval()


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS reflects what is alive."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def make_runner(which: str, net: I3DResNet, device: torch.device, precision: str):
    from napari_medfm.runtime.device import autocast_context, precision_dtype

    if which == "eager":
        model = net.to(device)

        def run(x):
            with torch.inference_mode():
                return model(x)
        return run
    dtype = precision_dtype(device, precision)
    cpu_fp32 = device.type == "cpu" and dtype == torch.float32
    fused = fuse_for_inference(net, cpu=cpu_fp32).to(device)

    def run(x):
        with torch.inference_mode(), autocast_context(device, precision):
            return fused(x)
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(args: argparse.Namespace) -> None:
    """One path alone: build, (fuse and drop the eager copy), one forward; print JSON."""
    device = torch.device(args.device)
    net = build(args.weights)
    run = make_runner(args.child, net, device, args.precision)
    if args.child != "eager":
        del net
    gc.collect()
    _trim()
    before = rss_gb()
    x = torch.rand(args.batch[0], 1, *args.size, device=device)
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # RSS sampled every 5 ms during the forward
        while not done.is_set():
            peak[0] = max(peak[0], rss_gb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run(x)
    sync(device)
    dt = time.perf_counter() - t0
    done.set()
    th.join()
    print(json.dumps({"path": args.child, "rss_before_gb": round(before, 3),
                      "forward_peak_rss_gb": round(peak[0], 3),
                      "process_peak_rss_gb": round(peak_rss_gb(), 3), "time_s": round(dt, 2)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="for 'ours': auto, fp32, bf16, fp16")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--size", type=int, nargs=3, default=[224, 224, 160], metavar=("H", "W", "D"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--weights", default=None, help="released CLIP checkpoint (optional)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-path RSS subprocesses")
    p.add_argument("--child", choices=("eager", "ours"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"input {tuple(args.size)}, precision(ours) {args.precision}")
    net = build(args.weights)
    runners = {"eager": make_runner("eager", net, device, "fp32"),
               "ours": make_runner("ours", net, device, args.precision)}
    for b in args.batch:
        x = torch.rand(b, 1, *args.size, device=device)
        outs = {}
        for name, run in runners.items():  # warm-up (+ outputs for the comparison)
            outs[name] = run(x)
            sync(device)
        diff = max(float((outs["eager"][k].float() - outs["ours"][k].float()).abs().max())
                   for k in ("image_embedding", "phenotype_logits", "contrastive_embedding"))
        del outs
        times: dict[str, list[float]] = {"eager": [], "ours": []}
        cpu: dict[str, list[float]] = {"eager": [], "ours": []}
        for _ in range(args.repeats):
            for name, run in runners.items():
                c0, t0 = time.process_time(), time.perf_counter()
                run(x)
                sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        me, mo = statistics.median(times["eager"]), statistics.median(times["ours"])
        paired = statistics.median(o / e for o, e in zip(times["ours"], times["eager"],
                                                            strict=True))
        print(f"batch {b}: wall time eager {[round(t, 2) for t in times['eager']]} s "
              f"(median {me:.2f}), ours {[round(t, 2) for t in times['ours']]} s "
              f"(median {mo:.2f}); ratio ours/eager: medians {mo / me:.3f}, paired "
              f"{paired:.3f}; max |diff| {diff:.2e}")
        if device.type == "cpu":
            ce, co = statistics.median(cpu["eager"]), statistics.median(cpu["ours"])
            print(f"batch {b}: CPU time (all threads; robust to other load on the machine) "
                  f"eager {[round(t, 1) for t in cpu['eager']]} s, ours "
                  f"{[round(t, 1) for t in cpu['ours']]} s; ratio of medians {co / ce:.3f}")
        if device.type == "cuda":
            for name, run in runners.items():
                torch.cuda.reset_peak_memory_stats(device)
                run(x)
                sync(device)
                print(f"  {name}: peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f}"
                      " GB")
    if device.type == "cpu" and not args.no_rss:
        for which in ("eager", "ours"):
            cmd = [sys.executable, __file__, "--child", which, "--device", "cpu",
                   "--precision", args.precision, "--batch", str(args.batch[0]),
                   "--size", *map(str, args.size)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.weights:
                cmd += ["--weights", args.weights]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"alone in a fresh process, batch {args.batch[0]}: {which}: peak RSS during "
                  f"the forward {res['forward_peak_rss_gb']:.2f} GB (before it "
                  f"{res['rss_before_gb']:.2f} GB; process peak incl. building/fusing "
                  f"{res['process_peak_rss_gb']:.2f} GB), one forward {res['time_s']:.2f} s")


if __name__ == "__main__":
    main()
