"""Recall and speed of the approximate indexes (faiss IVF-Flat, HNSW-Flat) against exact search.

Synthetic clustered embeddings, like a gallery of many classes: ``--clusters`` centres drawn from N(0, I_D),
every vector ``centre + noise * N(0, I_D)``, L2-normalised; ``--n`` gallery vectors and ``--queries``
held-out queries from the same clusters. Euclidean distance, k = 10.

For each kind: build time (IVF: k-means training + adding; HNSW: graph construction), then for each search
setting (IVF ``nprobe``, HNSW ``ef_search``) the search time of all queries and recall@10, the fraction of
each query's exact 10 nearest neighbours found (dmlgen.deploy.approximate_recall). ``exact`` is dmlgen's
blocked torch kNN on the same queries. Also the leave-one-out gallery recall that ``dmlgen index`` stores
at build time, for the default settings.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/index_recall.py [--n 100000] [--dim 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from dmlgen.deploy.index import EmbeddingIndex, approximate_recall, default_nlist, default_nprobe


def make_data(n: int, queries: int, dim: int, clusters: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) gallery and (queries, dim) held-out queries, unit vectors around shared cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(clusters, size=n + queries)
    x = centres[labels] + noise * rng.standard_normal((n + queries, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n].astype(np.float32), x[n:].astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="gallery size (default: 100000)")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out queries (default: 1000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--noise", type=float, default=1.0, help="noise std per coordinate (centres: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 32, 64, 0, 256],
                        help="IVF settings (0: dmlgen's default, nlist / 8)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    gallery, queries = make_data(args.n, args.queries, args.dim, args.clusters, args.noise, args.seed)
    print(f"{args.n} x {args.dim} gallery, {args.queries} held-out queries, {args.clusters} clusters, "
          f"noise {args.noise}; euclidean, recall@10; {threads} thread(s), {platform.processor() or platform.machine()}")
    rows: list[dict] = []

    exact = EmbeddingIndex.build(gallery, "exact")
    start = time.perf_counter()
    exact.search(queries, 10)
    rows.append({"kind": "exact", "setting": "-", "build_s": 0.0, "search_s": time.perf_counter() - start,
                 "recall@10": 1.0})

    start = time.perf_counter()
    ivf = EmbeddingIndex.build(gallery, "ivf")
    ivf_build = time.perf_counter() - start
    nlist = ivf.params["nlist"]
    for nprobe in args.nprobe:
        nprobe = nprobe or default_nprobe(nlist)
        r = approximate_recall(ivf, queries, k=10, nprobe=nprobe)
        rows.append({"kind": f"ivf (nlist {nlist})", "setting": f"nprobe {nprobe}", "build_s": ivf_build,
                     "search_s": r["approx_seconds"], "recall@10": r["recall"]})

    start = time.perf_counter()
    hnsw = EmbeddingIndex.build(gallery, "hnsw")
    hnsw_build = time.perf_counter() - start
    for ef in args.ef_search:
        r = approximate_recall(hnsw, queries, k=10, ef_search=ef)
        rows.append({"kind": f"hnsw (M {hnsw.params['hnsw_m']}, efC {hnsw.params['ef_construction']})",
                     "setting": f"ef_search {ef}", "build_s": hnsw_build, "search_s": r["approx_seconds"],
                     "recall@10": r["recall"]})

    stored = {kind: approximate_recall(index, k=10, num_queries=1000, seed=0)["recall"]
              for kind, index in (("ivf", ivf), ("hnsw", hnsw))}

    print(f"\n| index | search setting | build (s) | search {args.queries} queries (s) | recall@10 |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['kind']} | {row['setting']} | {row['build_s']:.1f} | {row['search_s']:.3f} | "
              f"{row['recall@10']:.4f} |")
    print(f"\nleave-one-out gallery recall@10 stored by dmlgen index (defaults: nprobe {default_nprobe(nlist)} of "
          f"nlist {default_nlist(args.n)}, ef_search {hnsw.params['ef_search']}): "
          f"ivf {stored['ivf']:.4f}, hnsw {stored['hnsw']:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": vars(args), "threads": threads, "rows": rows, "stored_recall": stored}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
