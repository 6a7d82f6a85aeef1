"""Benchmark the RAG-Token generator on the packaged SmolLM2-135M-Instruct GGUF.

Reports load time, then time to first token and decode speed for k=1 and k=5 documents
(greedy, a fixed number of new tokens, median of several runs). EOS is disabled while
timing so that every run decodes exactly --new-tokens tokens; tokens/s counts those tokens
over the whole call (prefill included), decode tokens/s counts the tokens after the first.

    HF_HUB_OFFLINE=1 python scripts/bench_generator.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qaserve.config import GeneratorConfig
from qaserve.deployments.generator import RagTokenGenerator
from qaserve_client.schema import ReadDocument

QUESTION = "How long does the battery last?"
# Review-sized passages (about 60-90 tokens each), as the retriever would return them.
DOCUMENTS = [
    "I bought these headphones for my commute. The battery lasts about 12 hours on a single "
    "charge, and a quick 10 minute charge gives another two hours. The noise cancelling is "
    "decent on the train but struggles with wind. The ear cushions get warm after an hour.",
    "Sound quality is warm with a bit too much bass for my taste, but the app's equaliser "
    "fixes that. Pairing with my laptop and phone at the same time works well. The case is "
    "bulky, so they do not fit in a jacket pocket. Calls sound clear to the other side.",
    "After six months the left hinge started creaking. Customer service replaced them "
    "without questions, which I appreciated. The touch controls are too sensitive: adjusting "
    "them on my head often pauses the music. Otherwise the build feels solid and premium.",
    "Battery life is the best part. I charge them once a week with about two hours of use a "
    "day. Standby drain is very low. The USB-C port is a welcome change from my old pair, "
    "and the included cable is long enough to use them while charging.",
    "They are comfortable for people with glasses, which is rare. The clamping force is "
    "gentle and the headband padding is thick. I wore them on a ten hour flight and only "
    "took them off to sleep. The microphone picks up too much background noise outdoors.",
]


def _time_call(gen: RagTokenGenerator, docs: list[ReadDocument], new_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    count = 0
    for _ in gen.stream(QUESTION, docs, max_new_tokens=new_tokens):
        count += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    assert first is not None
    return {"total_s": total, "first_token_s": first, "tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file, a local dir or a hub id")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ks", default="1,5")
    args = parser.parse_args()

    cfg = GeneratorConfig() if args.model is None else GeneratorConfig(model=args.model)
    start = time.perf_counter()
    gen = RagTokenGenerator(cfg, threads=args.threads)
    load_s = time.perf_counter() - start
    info = gen.info()

    # A sample answer with EOS on, so the numbers come with what the model says.
    docs5 = [ReadDocument(id=f"d{i}", text=t, score=None) for i, t in enumerate(DOCUMENTS)]
    sample = gen.generate(QUESTION, docs5, max_new_tokens=args.new_tokens)

    eos, gen.eos_token_ids = gen.eos_token_ids, {-1}  # decode exactly --new-tokens tokens
    results = {}
    try:
        gen.generate(QUESTION, docs5[:1], max_new_tokens=2)  # warm-up
        for k in (int(x) for x in args.ks.split(",")):
            docs = docs5[:k] if k <= len(docs5) else (docs5 * k)[:k]
            prompt_tokens = [len(ids) for ids in gen.encode(QUESTION, docs)]
            runs = [_time_call(gen, docs, args.new_tokens) for _ in range(args.runs)]
            total = statistics.median(r["total_s"] for r in runs)
            first = statistics.median(r["first_token_s"] for r in runs)
            n = runs[0]["tokens"]
            results[f"k={k}"] = {
                "prompt_tokens_per_doc": round(statistics.mean(prompt_tokens), 1),
                "first_token_ms": round(first * 1e3, 1),
                "total_s": round(total, 3),
                "tokens_per_s": round(n / total, 2),
                "decode_tokens_per_s": round((n - 1) / (total - first), 2),
            }
    finally:
        gen.eos_token_ids = eos

    report = {
        "model": info.model,
        "format": info.format,
        "threads": gen.threads,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "load_s": round(load_s, 2),
        "sample_answer_k5": sample.text,
        **results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
