"""Benchmark: our sliding-window generator vs MONAI's ``sliding_window_inference``.

Same small 3D UNet, same input (default 512 x 512 x 300, float32), same windows (96^3, overlap
0.25, gaussian blending, 4 windows per batch), output stitched on the CPU. Each measurement runs
in a fresh child process (so peak memory is clean), alternating the two methods, ``--repeat``
times; the parent prints medians and the ratios ours / MONAI.

Memory: peak RSS of the child minus its RSS just before the input was allocated, divided by
(input bytes + output bytes): 1.0 means nothing beyond the input and the stitched output.

    python benchmarks/bench_sliding_window.py                  # full size, CPU
    python benchmarks/bench_sliding_window.py --size 256 256 96 --repeat 1   # quick
    python benchmarks/bench_sliding_window.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def _child(method: str, size: list[int], roi: int, bs: int, threads: int, device: str) -> dict:
    import resource
    import time

    import psutil
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from napari_medfm.progress import drain
    from napari_medfm.tasks.sliding_window import sliding_window_gen

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = UNet(3, 1, 2, (4, 8), (2,), num_res_units=0).eval().to(device)
    # warm-up (kernels, allocator) on one window
    with torch.no_grad():
        net(torch.zeros(1, 1, roi, roi, roi, device=device))
    proc = psutil.Process()
    base = proc.memory_info().rss
    x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(1))
    roi_size = (roi, roi, roi)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if method == "monai":
        with torch.no_grad():
            out = sliding_window_inference(x, roi_size, bs, net, overlap=0.25, mode="gaussian",
                                           sw_device=device, device="cpu")
    else:
        n = [0]
        out = drain(sliding_window_gen(x, net, roi_size, bs, 0.25, mode="gaussian",
                                       sw_device=device, device="cpu"),
                    lambda p: n.__setitem__(0, n[0] + 1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    io_bytes = x.numel() * x.element_size() + out.numel() * out.element_size()
    res = {"method": method, "seconds": dt, "peak_extra_bytes": peak - base,
           "io_bytes": io_bytes, "mem_ratio": (peak - base) / io_bytes,
           "checksum": float(out.double().sum())}
    if device.startswith("cuda"):
        res["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.size, args.roi, args.sw_batch_size,
                                args.threads, args.device)))
        return 0
    runs: dict[str, list[dict]] = {"ours": [], "monai": []}
    for i in range(args.repeat):
        order = ("monai", "ours") if i % 2 == 0 else ("ours", "monai")
        for m in order:
            cmd = [sys.executable, __file__, "--child", m, "--size", *map(str, args.size),
                   "--roi", str(args.roi), "--sw-batch-size", str(args.sw_batch_size),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[m].append(r)
            print(f"run {i} {m:>5}: {r['seconds']:.2f} s, peak +{r['peak_extra_bytes'] / 2**20:.0f}"
                  f" MiB = {r['mem_ratio']:.2f} x (input+output)", flush=True)
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    mem = {m: statistics.median(r["mem_ratio"] for r in rs) for m, rs in runs.items()}
    same = abs(runs["ours"][0]["checksum"] - runs["monai"][0]["checksum"]) <= 1e-6 * max(
        1.0, abs(runs["monai"][0]["checksum"]))
    io = runs["ours"][0]["io_bytes"] / 2**20
    print(f"\nvolume {tuple(args.size)}, roi {args.roi}^3, overlap 0.25, batch "
          f"{args.sw_batch_size}, device {args.device}, {args.threads} threads; input+output "
          f"{io:.0f} MiB")
    paired = [o["seconds"] / m["seconds"] for o, m in zip(runs["ours"], runs["monai"], strict=True)]
    print(f"time   ours {med['ours']:.2f} s  MONAI {med['monai']:.2f} s  ratio of medians "
          f"{med['ours'] / med['monai']:.3f}, median of paired ratios "
          f"{statistics.median(paired):.3f} (target <= 1.05)")
    print(f"memory ours {mem['ours']:.2f} x  MONAI {mem['monai']:.2f} x (input+output)  "
          f"(target ours <= 1.5)")
    print(f"same output as MONAI: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
