"""ANN benchmark for the similar-case index: exact IndexFlatIP vs HNSW / IVF on the same data.

    python benchmarks/bench_ann.py                      # 1,000,000 x 512 random, IVF + HNSW
    python benchmarks/bench_ann.py --n 200000 --data clustered --methods hnsw,ivf
    python benchmarks/bench_ann.py --n 1000000 --methods ivf --nprobe 16,64,256

Vectors are float32, L2-normalised (cosine = inner product, as in the index), generated and
added in chunks of 100k. For every method the script prints build time, serialized index
size, single-query latency p50/p99 for k=10 (one query at a time, like a user clicking
"Find similar cases") and recall@10 against exact search (IndexFlatIP on the same data, same
run), plus the latency ratio against exact search.

``--data random``: i.i.d. Gaussian directions - the worst case for any ANN method (no
structure: the 10th neighbour is barely closer than the 1000th). ``--data clustered``: a
mixture of 1,000 Gaussian clusters in a 64-d subspace plus noise, closer to real image
embeddings (low intrinsic dimension).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def make_data(kind: str, n: int, nq: int, dim: int, seed: int = 0, chunk: int = 100_000):
    """(database chunks generator factory, queries) - deterministic for a seed."""
    rng = np.random.default_rng(seed)
    if kind == "clustered":
        basis = np.linalg.qr(rng.standard_normal((dim, 64)))[0].T.astype(np.float32)  # (64, d)
        centres = rng.standard_normal((1000, 64)).astype(np.float32) * 3.0

        def draw(m: int, r: np.random.Generator) -> np.ndarray:
            c = centres[r.integers(0, len(centres), m)]
            z = c + r.standard_normal((m, 64), dtype=np.float32)
            return z @ basis + 0.3 * r.standard_normal((m, dim), dtype=np.float32)
    else:
        def draw(m: int, r: np.random.Generator) -> np.ndarray:
            return r.standard_normal((m, dim), dtype=np.float32)

    def chunks():
        r = np.random.default_rng(seed + 1)
        for s in range(0, n, chunk):
            x = draw(min(chunk, n - s), r)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield x

    q = draw(nq, np.random.default_rng(seed + 2))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return chunks, q


def index_bytes(index) -> int:
    import faiss

    with tempfile.NamedTemporaryFile(suffix=".faiss", delete=False) as f:
        path = f.name
    try:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def latency(index, q: np.ndarray, k: int, n_lat: int) -> tuple[float, float, np.ndarray]:
    """p50/p99 ms of single-query searches over the first ``n_lat`` queries."""
    times = []
    for i in range(min(n_lat, len(q))):
        t = time.perf_counter()
        index.search(q[i:i + 1], k)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), np.asarray(times)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k
                          for a, b in zip(found, truth, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nq", type=int, default=200, help="queries for recall")
    ap.add_argument("--nlat", type=int, default=100, help="queries timed one by one")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--data", choices=("random", "clustered"), default="random")
    ap.add_argument("--methods", default="ivf,hnsw,pqfs",
                    help="comma list of hnsw, ivf, pqfs (4-bit PQ fast-scan of every code + exact "
                         "re-rank of k*k_factor candidates: robust recall even on unstructured data)")
    ap.add_argument("--pq-m", type=int, default=0,
                    help="pqfs sub-quantizers (default dim/2, i.e. 2-d sub-vectors)")
    ap.add_argument("--k-factor", default="20,50,100", help="pqfs re-rank factors")
    ap.add_argument("--M", type=int, default=32, help="HNSW graph degree")
    ap.add_argument("--efc", type=int, default=40, help="HNSW efConstruction")
    ap.add_argument("--ef", default="64,128,256,512", help="HNSW efSearch values")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default sqrt(n))")
    ap.add_argument("--nprobe", default="8,32,128,512", help="IVF nprobe values")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"# faiss {faiss.__version__}, {args.threads} threads, n={args.n:,} dim={args.dim} "
          f"data={args.data} k={args.k} (machine: {os.cpu_count()} cores, possibly shared)")
    chunks, q = make_data(args.data, args.n, args.nq, args.dim)

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    for x in chunks():
        flat.add(x)
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = flat.search(q, args.k)
    gt_time = time.perf_counter() - t0
    p50_ex, p99_ex, _ = latency(flat, q, args.k, max(5, args.nlat // 10))
    size_ex = flat.ntotal * args.dim * 4
    print(f"exact   IndexFlatIP  build {flat_build:7.1f} s  size {size_ex / 1e6:8.1f} MB  "
          f"p50 {p50_ex:8.2f} ms  p99 {p99_ex:8.2f} ms  recall@{args.k} 1.000  "
          f"(batched ground truth {gt_time:.1f} s)")
    rows = []

    def report(name: str, label: str, build_s: float, size: int, index, setter, values):
        for v in values:
            setter(v)
            _, found = index.search(q, args.k)
            rec = recall_at_k(found, truth)
            p50, p99, _ = latency(index, q, args.k, args.nlat)
            rows.append((name, v, build_s, size, p50, p99, rec))
            print(f"{name:7s} {label}={v:<5d}  build {build_s:7.1f} s  size {size / 1e6:8.1f} MB  "
                  f"p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  recall@{args.k} {rec:.3f}  "
                  f"speed-up vs exact x{p50_ex / max(p50, 1e-9):.1f}")
            sys.stdout.flush()

    def train_and_fill(index, n_train: int) -> float:
        """Train ``index`` on the first ``n_train`` vectors, add all of them; build seconds."""
        t0 = time.perf_counter()
        need, parts = min(args.n, n_train), []
        for x in chunks():
            parts.append(x)
            if sum(len(p) for p in parts) >= need:
                break
        index.train(np.concatenate(parts)[:need])
        del parts
        for x in chunks():
            index.add(x)
        return time.perf_counter() - t0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ivf" in methods:
        nlist = args.nlist or int(np.sqrt(args.n))
        quant = faiss.IndexFlatIP(args.dim)
        ivf = faiss.IndexIVFFlat(quant, args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        b = train_and_fill(ivf, max(39 * nlist, 50_000))
        report(f"ivf{nlist}", "nprobe", b, index_bytes(ivf), ivf, lambda v: setattr(ivf, "nprobe", v),
               [int(p) for p in args.nprobe.split(",")])
        del ivf
    if "hnsw" in methods:
        h = faiss.IndexHNSWFlat(args.dim, args.M, faiss.METRIC_INNER_PRODUCT)
        h.hnsw.efConstruction = args.efc
        t0 = time.perf_counter()
        for x in chunks():
            h.add(x)
        b = time.perf_counter() - t0
        report(f"hnsw{args.M}", "ef", b, index_bytes(h), h,
               lambda v: setattr(h.hnsw, "efSearch", v), [int(e) for e in args.ef.split(",")])
    if "pqfs" in methods:
        m = args.pq_m or args.dim // 2
        base = faiss.IndexPQFastScan(args.dim, m, 4, faiss.METRIC_INNER_PRODUCT)
        pq = faiss.IndexRefineFlat(base)
        b = train_and_fill(pq, 65_536)
        report(f"pqfs{m}", "kf", b, index_bytes(pq), pq, lambda v: setattr(pq, "k_factor", v),
               [int(f) for f in args.k_factor.split(",")])
        del pq
    ok = [r for r in rows if r[4] < 5.0 and r[6] >= 0.95]
    print("# targets (p50 < 5 ms and recall@10 >= 0.95): "
          + (", ".join(f"{r[0]} {r[1]}" for r in ok) if ok else "not met by any setting"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
