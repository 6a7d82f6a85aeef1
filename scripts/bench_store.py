"""Measure the document stores and the embedder on this machine.

    python scripts/bench_store.py [--n 5000] [--queries 200] [--passages 256]

Stores: EdgeStore vs qdrant-client local mode (in memory, and on a path that is reopened), via
the DocumentStore API (so upsert includes building payloads and BM25 vectors), on `n` random
unit vectors of 384 dims with short random texts. Embedder: all-MiniLM-L6-v2 passages/s at 1
and 2 threads on review-sized texts (~120 tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from qaserve.config import EngineConfig
from qaserve.deployments.passages import Passage, SplitDocument
from qaserve.deployments.store import DocumentStore, EdgeStore, make_store

DIM = 384
VOCAB = (
    "battery screen keyboard price quality fast slow cheap great poor sound light heavy "
    "bright dim warm cold friendly staff room clean dirty noisy quiet tasty bland fresh"
)
WORDS = VOCAB.split()


def corpus(n: int, rng: np.random.Generator) -> tuple[list[SplitDocument], list[np.ndarray]]:
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=30)) + f" code{i}"
        meta = {"item_id": f"item{i % 100}"}
        docs.append(SplitDocument(f"d{i}", text, meta, [Passage(f"d{i}", 0, text, 0, meta)]))
    return docs, [vecs[i : i + 1] for i in range(n)]


def median_ms(store: DocumentStore, queries: np.ndarray, **kw: object) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        store.search(vector=q, text="battery quality", top_k=5, **kw)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_store(name: str, cfg: EngineConfig, n: int, n_queries: int) -> None:
    rng = np.random.default_rng(0)
    docs, vecs = corpus(n, rng)
    queries = rng.normal(size=(n_queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    store = make_store(cfg, "bench", DIM, threads=1)
    t = time.perf_counter()
    store.upsert(docs, vecs)
    upsert_s = time.perf_counter() - t
    row = {"upsert_s": upsert_s, "query_ms": median_ms(store, queries)}
    if isinstance(store, EdgeStore):
        t = time.perf_counter()
        store.optimize()
        row["optimize_s"] = time.perf_counter() - t
        row["query_ms_optimized"] = median_ms(store, queries)
    row["filtered_ms"] = median_ms(store, queries, filters={"item_id": "item7"})
    row["hybrid_ms"] = median_ms(store, queries, mode="hybrid")
    store.close()

    if cfg.store.url != ":memory:":
        t = time.perf_counter()
        again = make_store(cfg, "bench", DIM, threads=1)
        assert again.count() == n
        row["reopen_s"] = time.perf_counter() - t
        again.close()
    print(f"{name:>22}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


def bench_embedder(n_passages: int) -> None:
    from qaserve.deployments.retriever import Embedder
    from qaserve.threads import bound_threads

    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, size=110)) + "." for _ in range(n_passages)]
    embedder = Embedder(threads=1)
    embedder.embed(texts[:32])  # warm up
    for threads in (1, 2):
        bound_threads(threads)
        t = time.perf_counter()
        embedder.embed(texts)
        rate = n_passages / (time.perf_counter() - t)
        print(f"{'MiniLM ' + str(threads) + ' thread(s)':>22}: {rate:.1f} passages/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--passages", type=int, default=256)
    ap.add_argument("--skip-embedder", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        edge = EngineConfig(data_dir=root / "data")
        memory = EngineConfig(data_dir=root / "data", store={"url": ":memory:"})
        local = EngineConfig(data_dir=root / "data", store={"url": f"path:{root / 'qdrant'}"})
        bench_store("qdrant-edge", edge, args.n, args.queries)
        bench_store("qdrant-client :memory:", memory, args.n, args.queries)
        bench_store("qdrant-client path:", local, args.n, args.queries)
    if not args.skip_embedder:
        bench_embedder(args.passages)


if __name__ == "__main__":
    main()
