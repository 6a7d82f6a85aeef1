"""A whole engine on tiny random models, for the tests that serve it (API, SDK, Ray graph).

The reader and generator builders are the ones tests/test_reader.py and tests/test_generator.py
use (random tiny BERT over the MiniLM vocabulary; tiny Llama over a BPE tokenizer trained
offline); only the retriever's encoder is the real packaged MiniLM, so retrieval and filters
behave as in production while reading and generating stay millisecond-cheap.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from qaserve.config import EngineConfig, GeneratorConfig, ReaderConfig, packaged_embedder

GENERATOR_SEED = 2  # with this seed the tiny LM's first greedy tokens are not EOS


def tiny_reader_dir(dest: Path, cache_dir: Path) -> Path:
    """A random extractive-QA BERT exported to a self-contained int8 ONNX reader folder."""
    from qaserve.deployments.onnx_export import write_reader_folder

    checkpoint = tiny_qa_checkpoint(dest / "checkpoint")
    return write_reader_folder(checkpoint, dest / "onnx", "int8", cache_dir=cache_dir)


def tiny_qa_checkpoint(dest: Path, seed: int = 0) -> Path:
    """A tiny random BERT QA checkpoint (2 layers, FFN 64) with the MiniLM tokenizer, its QA
    head scaled so the start/end distributions are peaked, like a trained reader's."""
    from test_reader import _save, random_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(packaged_embedder())
    return _save(random_model(tokenizer, seed), tokenizer, dest)


def tiny_causal_lm_dir(dest: Path) -> Path:
    """A random two-layer Llama with a chat template, saved with its tokenizer."""
    import torch
    from test_generator import _tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    pad, eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    torch.manual_seed(GENERATOR_SEED)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def tiny_engine_config(root: Path) -> EngineConfig:
    """Tiny reader and generator, the packaged MiniLM embedder, an embedded store under root."""
    reader = tiny_reader_dir(root / "reader", root / "cache")
    generator = tiny_causal_lm_dir(root / "generator")
    return EngineConfig(
        data_dir=root / "data",
        cache_dir=root / "cache",
        threads=1,
        reader=ReaderConfig(model=str(reader), precision="int8", optimize=False),
        generator=GeneratorConfig(model=str(generator), max_new_tokens=8, max_doc_tokens=64),
    )


class FaultyBackend:
    """A real backend with scripted faults: the next calls of an operation raise, sleep, or
    wait for an event. Stands in for an overloaded or failing graph in error-path tests."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.faults: dict[str, list[Any]] = defaultdict(list)
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def inject(self, op: str, *faults: Any) -> None:
        """Faults for the next calls of `op`: an exception (raised), a number (seconds of
        sleep), a threading.Event (waited for) or None (no fault this call).
        "query_events.next" fires after each event of a query stream."""
        self.faults[op].extend(faults)

    async def _fault(self, op: str) -> None:
        self.calls[op] += 1
        if not self.faults[op]:
            return
        fault = self.faults[op].pop(0)
        if fault is None:
            return
        if isinstance(fault, int | float):
            await asyncio.sleep(fault)
        elif isinstance(fault, threading.Event):
            await asyncio.to_thread(fault.wait, 30)
        else:
            raise fault

    async def ingest(self, request: Any, *args: Any) -> Any:
        await self._fault("ingest")
        return await self.inner.ingest(request, *args)

    async def retrieve(self, request: Any) -> Any:
        await self._fault("retrieve")
        return await self.inner.retrieve(request)

    async def models(self) -> Any:
        await self._fault("models")
        return await self.inner.models()

    async def query_events(self, request: Any) -> AsyncIterator[Any]:
        await self._fault("query_events")
        async with aclosing(self.inner.query_events(request)) as events:
            async for event in events:
                yield event
                await self._fault("query_events.next")
