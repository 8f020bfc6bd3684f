"""Exact cosine nearest neighbours on this CPU: cifarlab's torch search against scikit-learn's and faiss's.

    python benchmarks/nearest.py                      # 10k queries x 50k base x 256-d, k = 5 and 50
    python benchmarks/nearest.py --n_query 1000 --n_base 5000 --dim 64 --k 3

Times ``cifarlab.audit.nearest_neighbours`` (the data audit's near-duplicate search: test features against training
features), scikit-learn's ``NearestNeighbors(metric="cosine", algorithm="brute")`` and, when ``faiss-cpu`` is
installed, faiss's ``IndexFlatIP`` on unit vectors, from the same raw arrays to the same answer: indices and cosine
similarities of features centred on the base's mean. The features are random, non-negative like ReLU activations
(so centring matters, as in the audit). Each method runs ``--repeats`` times and the fastest counts, since other
work on the machine only ever slows a run down. Agreement is the share of queries whose k neighbours are the same
set as cifarlab's (near-ties at the k-th place can swap under different rounding), and the largest difference in
similarity.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import numpy as np
import torch
from peer import cpu_line

from cifarlab.audit import nearest_neighbours


def centred_unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows of ``x`` minus ``mean``, scaled to length 1 (float32), as cifarlab's search compares them."""
    x = x.astype(np.float32) - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def with_sklearn(query: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    mean = base.mean(0, keepdims=True, dtype=np.float64).astype(np.float32)
    search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(base - mean)
    distance, index = search.kneighbors(query - mean)
    return index.astype(np.int64), (1 - distance).astype(np.float32)  # cosine distance is 1 - similarity


def with_faiss(query: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    mean = base.mean(0, keepdims=True, dtype=np.float64).astype(np.float32)
    index = faiss.IndexFlatIP(base.shape[1])  # inner product of unit vectors: their cosine
    index.add(centred_unit(base, mean))
    similarity, found = index.search(centred_unit(query, mean), k)
    return found.astype(np.int64), similarity


def methods() -> dict:
    """The searches to time, by name; faiss only where it is installed (it is not a cifarlab dependency)."""
    found = {"cifarlab (torch)": nearest_neighbours, "scikit-learn": with_sklearn}
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("faiss: not installed (pip install faiss-cpu to compare it)")
    else:
        found["faiss IndexFlatIP"] = with_faiss
    return found


def agreement(index: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows whose neighbours are the same set as the reference's."""
    return float(np.mean([set(a) == set(b) for a, b in zip(index, reference)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_query", type=int, default=10_000, help="queries (the audit: the test set)")
    parser.add_argument("--n_base", type=int, default=50_000, help="rows searched (the audit: the training set)")
    parser.add_argument("--dim", type=int, default=256, help="feature size (the audit: the network's last layer)")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 50], help="neighbours per query")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    print(cpu_line().split("; all flags")[0], f"| torch {torch.__version__}, {torch.get_num_threads()} threads",
          f"| {datetime.date.today()} | load average {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(opts.seed)
    features = np.maximum(rng.standard_normal((opts.n_query + opts.n_base, opts.dim), dtype=np.float32), 0)
    query, base = features[:opts.n_query], features[opts.n_query:]
    print(f"{opts.n_query} queries x {opts.n_base} base x {opts.dim}-d float32, best of {opts.repeats}")
    print("| method | k | seconds | same neighbours as cifarlab | max similarity gap |")
    print("|---|---|---|---|---|")
    searches = methods()
    for k in opts.k:
        reference = None
        for name, search in searches.items():
            best = float("inf")
            for _ in range(opts.repeats):
                start = time.perf_counter()
                index, similarity = search(query, base, k)
                best = min(best, time.perf_counter() - start)
            assert index.shape == similarity.shape == (opts.n_query, k), (name, index.shape)
            if reference is None:
                reference = index, similarity
            same = agreement(index, reference[0])
            gap = float(np.abs(similarity - reference[1]).max())
            print(f"| {name} | {k} | {best:.2f} | {same:.2%} | {gap:.1e} |", flush=True)


if __name__ == "__main__":
    main()
