"""Text-to-image query latency on a 100k-case BiomedCLIP index ("find cases like this sentence").

    python benchmarks/bench_text_query.py                 # 100,000 x 512, CPU, 2 threads
    python benchmarks/bench_text_query.py --n 20000 --tiny

Builds a real :class:`~napari_medfm.tasks.retrieval.index.CaseIndex` of ``--n`` cases
(clustered 512-d unit vectors standing in for image embeddings, committed in chunks of 10k,
finalised as the index does: exact flat search up to its threshold, HNSW/PQ above), then times
:func:`~napari_medfm.tasks.retrieval.query.query_text` one sentence at a time with the
released-architecture BiomedCLIP text tower (BERT-base, context 256, random weights, built by
open_clip from a local config): text tower + search, p50/p99 over ``--queries`` sentences
(each new, so the text cache never answers), and the search alone (``query_vector`` on the
same embedding: faiss + the case records). Baseline, same run: the same text embeddings
searched by exact brute force in numpy (``vectors @ q``, argpartition), and the text tower
alone; recall@10 of the index against brute force.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny text tower (smoke run)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_medfm.models.biomedclip import model as bm
    from napari_medfm.models.biomedclip.testing import tiny_config, write_text_folder
    from napari_medfm.runtime.registry import get_spec
    from napari_medfm.tasks.retrieval.index import CaseIndex, CaseRecord
    from napari_medfm.tasks.retrieval.query import query_text

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "bc"
        folder.mkdir()
        cfg_doc = tiny_config(args.tiny)
        cfg_doc["model_cfg"]["embed_dim"] = 512
        (folder / "open_clip_config.json").write_text(json.dumps(cfg_doc))
        write_text_folder(folder / "text", args.tiny)
        cfg = bm.read_config(folder)
        torch.manual_seed(0)
        net = bm.build_network(cfg["model_cfg"]).eval()
        tok = bm._load_tokenizer(cfg["model_cfg"]["text_cfg"])
        model = bm.BiomedCLIPModel(get_spec("biomedclip"), net, tok,
                                   bm.image_transform(cfg["preprocess_cfg"], 224),
                                   folder / "open_clip_config.json", torch.device("cpu"), "fp32")
        model._sha256 = "0" * 64

        rng = np.random.default_rng(0)
        basis = np.linalg.qr(rng.standard_normal((512, 64)))[0].T.astype(np.float32)
        centres = rng.standard_normal((1000, 64)).astype(np.float32) * 3.0
        t = time.perf_counter()
        ix = CaseIndex.create_or_open(Path(d) / "ix", model_id="biomedclip",
                                      weights_sha256=model.weights_sha256, dim=512)
        all_vecs = []
        for s in range(0, args.n, 10_000):
            m = min(10_000, args.n - s)
            z = centres[rng.integers(0, 1000, m)] + rng.standard_normal((m, 64), np.float32)
            v = z @ basis + 0.3 * rng.standard_normal((m, 512), np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            recs = [CaseRecord(case_id=f"case-{s + i}", source_path=f"/data/{s + i}.png",
                               modality="CXR", item_key=f"k{s + i}") for i in range(m)]
            ix.add_chunk(v, recs, model_id="biomedclip", weights_sha256=model.weights_sha256)
            all_vecs.append(v)
        man = ix.finalize()
        ix.load_faiss()
        build_s = time.perf_counter() - t
        db = np.concatenate(all_vecs)
        print(f"index: {args.n} cases, {man['index_type']}, built in {build_s:.1f} s; text tower "
              f"{'tiny' if args.tiny else 'BERT-base'}, {args.threads} threads")

        model.embed_text(["warm-up sentence"])
        from napari_medfm.tasks.retrieval.query import query_vector

        ours, tower, brute, recall, search, exact = [], [], [], [], [], []
        for i in range(args.queries):
            text = f"right pleural effusion number {i} with adjacent atelectasis"
            t = time.perf_counter()
            hits = query_text(ix, model, text, 10, )
            ours.append(time.perf_counter() - t)
            model._text_cache.pop(text, None)
            t = time.perf_counter()
            q = model.embed_text([text])[0]
            tower.append(time.perf_counter() - t)
            t = time.perf_counter()
            query_vector(ix, q, 10)
            search.append(time.perf_counter() - t)
            t = time.perf_counter()
            s = db @ q
            top = np.argpartition(-s, 10)[:10]
            top = top[np.argsort(-s[top])]
            exact.append(time.perf_counter() - t)
            brute.append(exact[-1] + tower[-1])
            got = {int(h.case_id.split("-")[1]) for h in hits}
            recall.append(len(got & set(top.tolist())) / 10)
        ix.close()

    def pct(x, p):
        return 1000 * float(np.percentile(x, p))

    print(f"query_text (tower + search): p50 {pct(ours, 50):.1f} ms, p99 {pct(ours, 99):.1f} ms")
    print(f"text tower alone:            p50 {pct(tower, 50):.1f} ms")
    print(f"baseline tower + brute force: p50 {pct(brute, 50):.1f} ms; ratio ours/baseline "
          f"{np.median(ours) / np.median(brute):.2f}x; recall@10 {np.mean(recall):.3f}")
    print(f"search alone (index.search, records included): p50 {pct(search, 50):.1f} ms, "
          f"p99 {pct(search, 99):.1f} ms; numpy brute force alone p50 {pct(exact, 50):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
