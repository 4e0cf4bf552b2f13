"""ViT-B/16 (MerMED-FM backbone) embedding throughput: images/s at batch 32.

    python benchmarks/bench_embed_throughput.py                    # CPU: fp32 eager vs ours
    python benchmarks/bench_embed_throughput.py --device cuda --precision bf16

Baseline: the timm ``VisionTransformer`` called the plain way (``torch.no_grad()``, fp32,
contiguous NCHW). Ours: :class:`napari_medfm.models.mermed.model.ViTEncoder2D.embed_arrays`
(``inference_mode`` + autocast at the requested precision, optional channels_last). Same
weights (random, ViT-B/16 shapes), same inputs, same process; the ratio is ours / baseline.
Preprocessing is excluded (it runs per image on the CPU before batching).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _bench(fn, x, iters: int, sync) -> float:
    fn(x)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync()
    return iters * len(x) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None,
                    help="ours: fp32/bf16/fp16 (default: fp32 and bf16 on CPU, bf16 on GPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_medfm.models.mermed import model as mm
    from napari_medfm.models.mermed.spec import SPECS, VIT_B16
    from napari_medfm.runtime.device import pick_device

    dev = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        ref = mm.build_vit(VIT_B16)
    state = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}
    vit = mm.build_vit(VIT_B16, state).to(dev)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def baseline(_x):
        with torch.no_grad():
            return vit.forward_head(vit.forward_features(xt), pre_logits=True)

    print(f"# torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, iters {args.iters} (machine: {os.cpu_count()} cores, possibly "
          "shared with other jobs)")
    base = _bench(baseline, x, args.iters, sync)
    print(f"baseline fp32 eager (no_grad)          {base:8.2f} images/s  x1.00")
    precisions = [args.precision] if args.precision else (
        ["fp32", "bf16"] if dev.type == "cpu" else ["bf16"])
    ref_emb = baseline(x).float().cpu().numpy()
    for prec in precisions:
        for cl in (False, True):
            enc = mm.ViTEncoder2D(SPECS[0], vit, weights_sha256="-", device=dev, precision=prec)
            enc.channels_last = cl
            ips = _bench(enc.embed_arrays, x, args.iters, sync)
            err = float(np.abs(enc.embed_arrays(x) - ref_emb).max())
            name = f"ours {prec} inference_mode{' +channels_last' if cl else ''}"
            print(f"{name:38s} {ips:8.2f} images/s  x{ips / base:.2f}  (max |diff| {err:.2e})")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
