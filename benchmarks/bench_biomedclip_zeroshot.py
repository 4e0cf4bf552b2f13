"""BiomedCLIP zero-shot time per image on the CPU: a 512 x 512 chest X-ray and a slide region.

    python benchmarks/bench_biomedclip_zeroshot.py                 # CPU, 2 threads
    python benchmarks/bench_biomedclip_zeroshot.py --device cuda --precision bf16 --batch 64

The network has the released architecture (ViT-B/16 image tower, BERT-base text tower, 512-d,
context 256) with random weights, built by open_clip from a local config (no download). Inputs
are corpus files: ``cxr/tbx11k/h0001.png`` (512 x 512) with the 14-finding CXR prompt set, and
a 1024 x 1024 region of ``pathology/wsi/CMU-1-Small-Region.svs`` (read through our slide
reader, the rectangle converted with the slide's geometry) with the 9-class pathology set.

Ours: :meth:`BiomedCLIPModel.findings` (file -> probabilities; text embeddings cached after
the first image). Baseline, same process, same weights: the plain open_clip way - PIL open,
open_clip's transform, ``encode_image``, ``encode_text`` of every phrasing for every image
(no cache). Figures: first image (ours pays the text tower once), then the median of
``--repeats`` images; ratio ours / baseline. ``--batch N`` (GPU) adds images/s of
``encode_image`` at batch N.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import corpus_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="also images/s at this batch size")
    ap.add_argument("--tiny", action="store_true", help="tiny towers (a smoke run)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image

    from napari_medfm import io as mio
    from napari_medfm.models.biomedclip import model as bm
    from napari_medfm.models.biomedclip.testing import tiny_config, write_text_folder
    from napari_medfm.runtime.device import pick_device
    from napari_medfm.runtime.registry import get_spec
    from napari_medfm.tasks.retrieval.query import crop_slide_region

    root = corpus_dir()
    cxr_path = root / "cxr" / "tbx11k" / "h0001.png"
    wsi_path = root / "pathology" / "wsi" / "CMU-1-Small-Region.svs"
    for p in (cxr_path, wsi_path):
        if not p.exists():
            print(f"missing corpus file {p} (set MEDFM_TEST_DATA)", file=sys.stderr)
            return 2
    dev = pick_device(args.device)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        import json

        (folder / "open_clip_config.json").write_text(json.dumps(tiny_config(args.tiny)))
        write_text_folder(folder / "text", args.tiny)
        cfg = bm.read_config(folder)
        torch.manual_seed(0)
        net = bm.build_network(cfg["model_cfg"]).eval()
        tok = bm._load_tokenizer(cfg["model_cfg"]["text_cfg"])
        transform = bm.image_transform(cfg["preprocess_cfg"], 224)
        model = bm.BiomedCLIPModel(get_spec("biomedclip"), net, tok, transform,
                                   folder / "open_clip_config.json", dev, args.precision,
                                   cfg["preprocess_cfg"])
        model._sha256 = "0" * 64

        slide = mio.read(wsi_path)[0]
        h0, w0 = slide.data[0].shape[:2]
        y0, x0 = (h0 - 1024) // 2, (w0 - 1024) // 2
        idx = np.array([[y0, x0], [y0, x0 + 1023], [y0 + 1023, x0 + 1023], [y0 + 1023, x0]], float)
        world = np.array([slide.geometry.index_to_physical(p[::-1])[::-1] for p in idx])
        cases = [("CXR 512x512", cxr_path, "CXR", None),
                 ("slide region 1024x1024", wsi_path, "pathology", world)]

        def ours(path: Path, mod: str, corners):
            img = mio.read(path)[0]
            if corners is not None:
                img = crop_slide_region(img, corners)
            return model.findings(img, modality=mod)

        def baseline(path: Path, mod: str, corners):
            ps = bm.load_prompt_set(None, mod)
            if corners is None:
                pil = Image.open(path).convert("RGB")
            else:
                pil = Image.fromarray(crop_slide_region(mio.read(path)[0], corners).data[..., :3])
            x = transform(pil)[None].to(dev)
            with torch.inference_mode():
                img = net.encode_image(x, normalize=True)[0].double()
                out = {}
                for name, (pos, neg) in ps.findings.items():
                    tp = net.encode_text(tok(pos).to(dev), normalize=True).double()
                    tn = net.encode_text(tok(neg).to(dev), normalize=True).double()
                    z = net.logit_scale.exp().double() * ((tp @ img).mean() - (tn @ img).mean())
                    out[name] = float(torch.sigmoid(z))
            return out

        print(f"device {dev}, precision {args.precision}, threads {args.threads}, "
              f"{'tiny' if args.tiny else 'released'} architecture")
        for label, path, mod, corners in cases:
            model._text_cache.clear()
            t = time.perf_counter()
            rows = ours(path, mod, corners)
            first = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                rows = ours(path, mod, corners)
                times.append(time.perf_counter() - t)
            btimes = []
            for _ in range(max(1, args.repeats)):
                t = time.perf_counter()
                ref = baseline(path, mod, corners)
                btimes.append(time.perf_counter() - t)
            diff = max(abs(r["probability"] - ref[r["finding"]]) for r in rows)
            o, b = float(np.median(times)), float(np.median(btimes))
            print(f"{label:24s} {len(rows):2d} findings: first {first:.3f} s, then {o:.3f} s/image;"
                  f" baseline {b:.3f} s/image; ratio {o / b:.2f}x; max |dp| {diff:.1e}")
        if args.batch:
            x = torch.randn(args.batch, 3, 224, 224, device=dev)
            model.embed_tensors(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                model.embed_tensors(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"encode_image batch {args.batch}: "
                  f"{3 * args.batch / (time.perf_counter() - t):.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
