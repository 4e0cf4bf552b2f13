"""Report generation speed: time to first token, tokens/s, streaming vs plain generate, KV cache.

    python benchmarks/bench_report_generate.py                    # RadFM, tiny config, CPU
    python benchmarks/bench_report_generate.py --model radfm --threads 2 --repeats 5
    python benchmarks/bench_report_generate.py --model radfm --size full --device cuda   # 13B bf16
    python benchmarks/bench_report_generate.py --model radfm --size full --device cuda --quantize 4bit

RadFM half (this file): a RadFM model folder with random weights written through the model
folder contract (``--size tiny``: a small config with the released key layout; ``full``: the
released 13B shape, GPU only, random weights built directly on the device) and a SentencePiece
tokenizer trained on the IU X-ray report texts of the test corpus (synthetic sentences when the
corpus is absent). eos is disabled so every run produces exactly N tokens. In one process,
interleaved, ``--repeats`` times:

* ``plain``: ``model.generate(image, prompt, max_new_tokens=N)`` (decode once at the end);
* ``stream``: ``"".join(model.stream([image], prompt, max_new_tokens=N))`` (decode per token),
  recording the time to the first piece (TTFT);
* ``kv@32`` / ``kv@256``: ``generate_ids`` for 32 and 256 new tokens: tokens/s of the decode
  phase (minus the prefill) - linear cost means the two rates are close;
* ``nocache@32`` / ``nocache@256``: the same greedy ids by re-running the whole sequence each
  step (what a loop without KV cache costs; quadratic), as the contrast.

Targets: stream / plain <= 1.05 (median of paired runs, ABBA order); kv tokens/s at 256 >=
0.7 x at 32. On a loaded machine the paired ratio is noisy, so the script also replays the work
streaming adds (per-token decode and slicing) alone on the same ids: ``stream_bound`` = 1 +
that time / the fastest plain run, a load-robust upper bound of the ratio.

The Merlin report generator's half (helper "report") plugs in through ``HALVES``: a module
``benchmarks/_bench_merlin_report.py`` exposing ``run(args) -> dict`` is picked up when present.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import corpus_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_CONFIG = {  # tiny, but large enough that the decoder dominates a step
    "vision": {"dim": 96, "depth": 2, "heads": 4, "dim_head": 24, "mlp_dim": 192,
               "image_size": 64, "frames": 64, "patch_size": 32, "frame_patch_size": 4},
    "perceiver": {"depth": 2, "heads": 4, "dim_head": 24, "num_latents": 32, "ff_mult": 2},
    "llm": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024},
}


def _texts() -> list[str]:
    from napari_medfm.models.merlin_report.testing import report_corpus

    folder = corpus_dir() / "cxr" / "reports_iu_xray"
    texts = report_corpus(folder) if folder.is_dir() else []
    if not texts:
        texts = [f"The heart size is normal. No pleural effusion number {i}." for i in range(50)]
    return texts


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _image(size: int):
    from napari_medfm.geometry import Geometry
    from napari_medfm.io.types import MedicalImage

    rng = np.random.default_rng(0)
    return MedicalImage(data=(rng.random((size, size)) * 255).astype(np.uint8),
                        geometry=Geometry.identity(2), modality="DX", kind="image2d")


def _build_radfm(args, work: Path):
    import napari_medfm
    from napari_medfm.models.radfm.testing import train_tokenizer, write_model_folder

    tok = train_tokenizer(_texts(), work / "tok.model", vocab_size=400)
    import sentencepiece as spm

    V = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    if args.size == "tiny":
        cfg = json.loads(json.dumps(BENCH_CONFIG))
        cfg["llm"]["vocab_size"] = V
        folder = write_model_folder(work / "radfm", cfg, tokenizer=tok)
        model = napari_medfm.load_model("radfm", weights=folder, device=args.device,
                                        precision=args.precision)
    else:
        model = _full_random(args, tok)
    model.cfg.llm["eos_token_id"] = -1  # never stop early: exactly N tokens per run
    return model


def _full_random(args, tok: Path):
    """Released 13B shape with random bf16 weights made on the GPU (no 50 GB download)."""
    from napari_medfm.models.radfm.model import RadFMModel, estimate_memory_bytes
    from napari_medfm.models.radfm.network import RadFMConfig, RadFMNetwork
    from napari_medfm.runtime.registry import get_spec

    dev = torch.device(args.device)
    cfg = RadFMConfig()
    with torch.device("meta"):
        net = RadFMNetwork(cfg)
    net = net.to_empty(device=dev).to(torch.bfloat16)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.tie()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(dev):
        net.lang_model.model.rotary_emb = LlamaRotaryEmbedding(config=net.lang_model.config)
    net.eval().requires_grad_(False)
    if args.quantize:
        from napari_medfm.models.radfm.model import _quantize_llm

        _quantize_llm(net, args.quantize, dev, torch.bfloat16)
    return RadFMModel(get_spec("radfm"), net, cfg, device=dev, dtype=torch.bfloat16, files=[],
                      tokenizer_path=tok, options={"random": True, "quantize": args.quantize},
                      estimate=estimate_memory_bytes(cfg, quantize=args.quantize))


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def run_radfm(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_radfm_"))
    model = _build_radfm(args, work)
    img = _image(512 if args.size == "full" else 96)
    prompt = "Please write the findings of this chest radiograph."
    n = args.new_tokens
    # warm-up
    model.generate(img, prompt, max_new_tokens=4)
    print(f"built {args.size} RadFM ({model.memory_estimate.get('parameters')} parameters)",
          file=sys.stderr, flush=True)
    plain, stream, ttft, ratio = [], [], [], []

    def run_plain() -> tuple[float, str]:
        _sync(args.device)
        t0 = time.perf_counter()
        text = model.generate(img, prompt, max_new_tokens=n)
        _sync(args.device)
        return time.perf_counter() - t0, text

    def run_stream() -> tuple[float, float, str]:
        _sync(args.device)
        t0 = time.perf_counter()
        first = None
        pieces = []
        for piece in model.stream([img], prompt, max_new_tokens=n):
            if first is None:
                first = time.perf_counter()
            pieces.append(piece)
        _sync(args.device)
        t1 = time.perf_counter()
        return t1 - t0, (first or t1) - t0, "".join(pieces).strip()

    for r in range(args.repeats):  # ABBA order: neither path always runs first
        if r % 2 == 0:
            tp, text_a = run_plain()
            ts, tf, text_b = run_stream()
        else:
            ts, tf, text_b = run_stream()
            tp, text_a = run_plain()
        assert text_a == text_b
        plain.append(tp)
        stream.append(ts)
        ttft.append(tf)
        ratio.append(ts / tp)
    # the work streaming adds, replayed alone on the same ids (robust to machine load): the
    # per-token decode + slicing of stream(); its share of a plain run bounds the ratio
    sp = model.tokenizer
    gen_ids = model.generate_ids(model.preprocess([img])[0][None, None],
                                 [model.prompt_ids(prompt + ".", 1)], max_new_tokens=n)[0].tolist()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        out, emitted = [], ""
        for tok in gen_ids:
            out.append(tok)
            text = sp.decode(out)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                emitted = text
    extra = (time.perf_counter() - t0) / reps
    print(f"plain/stream done: {_median(ratio):.3f}", file=sys.stderr, flush=True)
    if args.only == "stream":
        return {"model": "radfm", "plain_s": _median(plain), "stream_s": _median(stream),
                "ttft_s": _median(ttft), "stream_over_plain": _median(ratio),
                "stream_decode_s": extra, "stream_bound": 1 + extra / min(plain),
                "tokens_per_s_plain": n / _median(plain)}
    vx = model.preprocess([img])[0][None, None]
    ids = [model.prompt_ids(prompt, 1)]

    def decode_time(k: int, cache: bool) -> float:
        """Seconds for tokens 2..k (the prefill and first token excluded)."""
        _sync(args.device)
        if cache:
            gen = model.iter_ids(vx, ids, k)
            next(gen)  # prefill + first token
            _sync(args.device)
            t1 = time.perf_counter()
            for _ in gen:
                pass
        else:
            seq = list(ids[0])
            seq.append(int(model.logits(vx, [seq])[0, -1].argmax()))
            _sync(args.device)
            t1 = time.perf_counter()
            for _ in range(k - 1):
                seq.append(int(model.logits(vx, [seq])[0, -1].argmax()))
        _sync(args.device)
        return time.perf_counter() - t1

    kv = {32: [], 256: []}
    for _ in range(args.repeats):  # interleaved, so load changes hit both lengths alike
        for k in (32, 256):
            kv[k].append((k - 1) / decode_time(k, True))
    kv32, kv256 = _median(kv[32]), _median(kv[256])
    print(f"kv: {kv32:.1f} {kv256:.1f} tok/s", file=sys.stderr, flush=True)
    nc = {32: [], 256: []}
    for _ in range(max(1, args.repeats // 3)):
        for k in (32, 256):
            nc[k].append((k - 1) / decode_time(k, False))
    nc32, nc256 = _median(nc[32]), _median(nc[256])
    res = {
        "model": "radfm", "size": args.size, "device": args.device,
        "precision": str(model.dtype).replace("torch.", ""), "quantize": args.quantize,
        "threads": torch.get_num_threads(), "new_tokens": n,
        "parameters": model.memory_estimate.get("parameters"),
        "plain_s": _median(plain), "stream_s": _median(stream), "ttft_s": _median(ttft),
        "tokens_per_s_plain": n / _median(plain), "tokens_per_s_stream": n / _median(stream),
        "stream_over_plain": _median(ratio), "stream_decode_s": extra,
        "stream_bound": 1 + extra / min(plain),
        "kv_tokens_per_s@32": kv32, "kv_tokens_per_s@256": kv256, "kv_256_over_32": kv256 / kv32,
        "nocache_tokens_per_s@32": nc32, "nocache_tokens_per_s@256": nc256,
        "nocache_256_over_32": nc256 / nc32,
    }
    if torch.device(args.device).type == "cuda":
        res["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


HALVES = {"radfm": run_radfm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="radfm", help="radfm, merlin-report or all")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--quantize", choices=("8bit", "4bit"), default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=("all", "stream"), default="all",
                   help="stream: only the streaming vs plain comparison")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    halves = dict(HALVES)
    try:  # the Merlin report generator's half, when present
        sys.path.insert(0, str(Path(__file__).parent))
        halves["merlin-report"] = importlib.import_module("_bench_merlin_report").run
    except ImportError:
        pass
    names = list(halves) if args.model == "all" else [args.model]
    for name in names:
        if name not in halves:
            p.error(f"no benchmark half for {name!r} here (have: {', '.join(halves)})")
        res = halves[name](args)
        if args.json:
            print(json.dumps(res))
        else:
            for k, v in res.items():
                print(f"{name:>13} {k:<26} {v:.4g}" if isinstance(v, float) else
                      f"{name:>13} {k:<26} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
