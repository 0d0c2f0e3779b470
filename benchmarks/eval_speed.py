"""Evaluation speed and memory: dmlgen vs pytorch-metric-learning vs the bare matrix product.

SOP-like synthetic embeddings (N = 60,000, about 11,000 classes of 2-12 images, unit vectors around
class centres). Every measurement runs in its own fresh process, so each one's peak resident memory
(ru_maxrss, the whole process including the ~0.55 GB of `import torch`) is its own:

  dmlgen         P@1 + R-Precision + MAP@R + Recall@{1,2,4,8}, exact torch kNN (leave-one-out)
  dmlgen-faiss   the same metrics with faiss as the kNN backend
  pml            AccuracyCalculator(k="max_bin_count"): precision_at_1, r_precision, MAP@R
  matmul         the bare N x N x D product (blocks of 1024 queries into one reused buffer): the floor
  nmi-dmlgen     k-means (faiss, 20 iterations, k = number of classes) + NMI, dmlgen
  nmi-pml        the same through AccuracyCalculator(include=("NMI",))

Run:  .venv/bin/python benchmarks/eval_speed.py [--dims 128 512] [--repeats 1] [--json out.json]
Prints one table per D with seconds, peak RSS and ratios; checks that the metric values agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

N = 60_000
SEED = 0


def make_data(n: int, dim: int, seed: int):  # type: ignore[no-untyped-def]
    """(N, D) float32 unit vectors and (N,) int64 labels with SOP-like class sizes (2..12, mean ~5.3)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = []
    total = 0
    while total < n:
        size = int(min(12, 2 + rng.poisson(3.3)))
        size = min(size, n - total) if n - total >= 2 else size
        sizes.append(size)
        total += size
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    rng.shuffle(labels)
    centres = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    # noise grows with sqrt(D) so that every D is as hard as D = 128 (else D = 512 is perfectly separable)
    noise = 1.2 * np.sqrt(dim / 128.0)
    x = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB on Linux


def child(task: str, dim: int) -> dict:
    """Run one measurement in this (fresh) process and return its timings."""
    import torch

    x_np, y_np = make_data(N, dim, SEED)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    rss_before = _peak_rss_gb()
    values: dict[str, float] = {}
    start = time.perf_counter()
    if task in ("dmlgen", "dmlgen-faiss"):
        from dmlgen.evaluation.evaluate import evaluate_embeddings

        values = evaluate_embeddings(x, y, metrics=["recall", "precision@1", "r_precision", "map@r"],
                                     ks=(1, 2, 4, 8), backend="faiss" if task == "dmlgen-faiss" else "torch")
    elif task == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                  k="max_bin_count")
        got = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
        values = {"precision@1": got["precision_at_1"], "r_precision": got["r_precision"],
                  "map@r": got["mean_average_precision_at_r"]}
    elif task == "matmul":
        block = 1024
        out = torch.empty(block, N)
        xt = x.T.contiguous()
        for s in range(0, N, block):
            q = x[s:s + block]
            torch.mm(q, xt, out=out[:len(q)])
        values = {"checksum": float(out[0, 0])}
    elif task == "nmi-dmlgen":
        from dmlgen.evaluation.clustering import clustering_scores

        values = clustering_scores(x, y, iterations=20, seed=1234, backend="faiss", scores=("nmi",))
    elif task == "nmi-pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("NMI",))
        values = {"nmi": calc.get_accuracy(x, y, x, y, ref_includes_query=True)["NMI"]}
    else:
        raise SystemExit(f"unknown task {task}")
    seconds = time.perf_counter() - start
    return {"task": task, "dim": dim, "seconds": seconds, "peak_rss_gb": _peak_rss_gb(),
            "rss_before_gb": rss_before, "values": {k: float(v) for k, v in values.items()},
            "threads": torch.get_num_threads()}


def run_child(task: str, dim: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", task, "--dims", str(dim)],
                          capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{task} (D={dim}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


TASKS = ("matmul", "dmlgen", "dmlgen-faiss", "pml", "nmi-dmlgen", "nmi-pml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=1, help="runs per task; the median is reported")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--json", help="write all raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dims[0])))
        return

    import platform

    print(f"N = {N}, python {platform.python_version()}, {os.cpu_count()} CPUs; each task in a fresh process")
    everything = []
    for dim in args.dims:
        runs: dict[str, list[dict]] = {t: [] for t in args.tasks}
        for _ in range(args.repeats):
            for task in args.tasks:  # interleaved, so drift in machine load hits every task alike
                runs[task].append(run_child(task, dim))
        med = {t: statistics.median(r["seconds"] for r in rs) for t, rs in runs.items()}
        peak = {t: max(r["peak_rss_gb"] for r in rs) for t, rs in runs.items()}
        first = {t: rs[0] for t, rs in runs.items()}
        print(f"\nD = {dim} ({first[args.tasks[0]]['threads']} torch threads)")
        print(f"{'task':<14}{'seconds':>9}{'peak RSS GB':>13}{'vs matmul':>11}{'vs pml':>8}")
        for t in args.tasks:
            vs_mm = f"{med[t] / med['matmul']:.2f}x" if "matmul" in med and not t.startswith("nmi") else ""
            ref = "nmi-pml" if t.startswith("nmi") else "pml"
            vs_pml = f"{med[t] / med[ref]:.2f}x" if ref in med else ""
            print(f"{t:<14}{med[t]:>9.1f}{peak[t]:>13.2f}{vs_mm:>11}{vs_pml:>8}")
        for a, b in (("dmlgen", "pml"), ("dmlgen-faiss", "pml"), ("nmi-dmlgen", "nmi-pml")):
            if a in first and b in first:
                va, vb = first[a]["values"], first[b]["values"]
                shared = sorted(set(va) & set(vb))
                diff = max(abs(va[k] - vb[k]) for k in shared)
                print(f"max |{a} - {b}| over {', '.join(shared)}: {diff:.2e}  "
                      + "  ".join(f"{k}={va[k]:.6f}" for k in shared))
        everything.append({"dim": dim, "runs": runs})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(everything, fh, indent=1)


if __name__ == "__main__":
    main()
