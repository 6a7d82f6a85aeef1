"""The plain baseline: the QA server a user would write without qaserve, to measure against.

One FastAPI process under uvicorn, the same models the obvious way: sentence-transformers and
qdrant-client's local mode for retrieval (one point per review), the reader checkpoint in
torch fp32 (transformers 5 has no question-answering pipeline any more, so its windowing and
span search are written out as its docs and course do), and `generate()` over the
concatenated documents. It speaks the same HTTP API (the shared schema) for the routes the
load profiles use, so the same Locust profile runs against both.

    python -m qaserve.loadtests.baseline --reader runs/reader-ckpt2 --port 8100
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from qaserve.config import GeneratorConfig, ReaderConfig, packaged_embedder, packaged_generator
from qaserve_client.schema import (
    Answer,
    FinalAnswer,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    IngestRequest,
    IngestResponse,
    QueryRequest,
    QueryResponse,
    ReadDocument,
    ReadRequest,
    ReadResponse,
    RetrievedDocument,
    RetrieveRequest,
    RetrieveResponse,
)

COLLECTION = "documents"


# What the wire leaves unset means the server's configured value: the engine's defaults here.
MAX_ANSWER_LEN = int(ReaderConfig.model_fields["max_answer_len"].default)
MAX_NEW_TOKENS = int(GeneratorConfig.model_fields["max_new_tokens"].default)


class Baseline:
    def __init__(self, reader: str, embedder: str, generator: str, threads: int = 2) -> None:
        from pathlib import Path

        from qdrant_client import QdrantClient, models
        from sentence_transformers import SentenceTransformer
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForQuestionAnswering,
            AutoTokenizer,
        )

        torch.set_num_threads(threads)
        self.encoder = SentenceTransformer(embedder, device="cpu")
        self.qdrant = QdrantClient(":memory:")
        dim = getattr(self.encoder, "get_embedding_dimension", None) or (
            self.encoder.get_sentence_embedding_dimension
        )
        dim = dim()
        self.qdrant.create_collection(
            COLLECTION, vectors_config=models.VectorParams(size=dim, distance="Cosine")
        )
        self.qa_tokenizer = AutoTokenizer.from_pretrained(reader)
        self.qa_model = AutoModelForQuestionAnswering.from_pretrained(reader).eval()
        gen = Path(generator)
        load: dict[str, Any] = {}
        if gen.is_file():  # a GGUF file: from_pretrained(folder, gguf_file=name)
            load["gguf_file"], generator = gen.name, str(gen.parent)
        self.gen_tokenizer = AutoTokenizer.from_pretrained(generator, **load)
        self.gen_model = AutoModelForCausalLM.from_pretrained(
            generator, dtype=torch.float32, **load
        ).eval()
        self.lock = threading.Lock()  # qdrant-client's local mode is not thread-safe

    # retrieval ---------------------------------------------------------------------------
    def ingest(self, req: IngestRequest) -> IngestResponse:
        from qdrant_client import models

        docs = req.documents
        ids = [d.id or uuid.uuid4().hex for d in docs]
        vectors = self.encoder.encode([d.text for d in docs])
        points = [
            models.PointStruct(
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, i)),
                vector=v.tolist(),
                payload={"doc_id": i, "text": d.text, **d.meta},
            )
            for i, d, v in zip(ids, docs, vectors, strict=True)
        ]
        with self.lock:
            self.qdrant.upsert(COLLECTION, points)
        return IngestResponse(ids=ids, passages=len(points))

    def retrieve(self, req: RetrieveRequest) -> RetrieveResponse:
        from qdrant_client import models

        vector = self.encoder.encode(req.query).tolist()
        flt = None
        if req.filters:
            flt = models.Filter(
                must=[
                    models.FieldCondition(key=k, match=models.MatchValue(value=v))
                    for k, v in req.filters.items()
                ]
            )
        with self.lock:
            hits = self.qdrant.query_points(
                COLLECTION, query=vector, query_filter=flt, limit=req.top_k
            ).points
        docs = []
        for h in hits:
            payload = dict(h.payload or {})
            doc_id, text = payload.pop("doc_id"), payload.pop("text")
            docs.append(RetrievedDocument(id=doc_id, text=text, score=h.score, meta=payload))
        return RetrieveResponse(documents=docs)

    # reading: overlapping windows, best span per window, null score from [CLS] ------------
    def read(self, req: ReadRequest) -> ReadResponse:
        max_len = req.max_answer_len or MAX_ANSWER_LEN
        answers: list[Answer] = []
        null = -np.inf
        for doc in req.documents:
            enc = self.qa_tokenizer(
                req.question,
                doc.text,
                truncation="only_second",
                max_length=384,
                stride=128,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                padding=True,
                return_tensors="pt",
            )
            offsets = enc.pop("offset_mapping").tolist()
            enc.pop("overflow_to_sample_mapping", None)
            with torch.inference_mode():
                out = self.qa_model(**enc)
            for w in range(len(offsets)):
                start = out.start_logits[w].softmax(-1).numpy()
                end = out.end_logits[w].softmax(-1).numpy()
                seq = enc.sequence_ids(w)
                null = max(null, float(start[0] * end[0]))
                for s in np.argsort(start)[-20:][::-1]:
                    for e in np.argsort(end)[-20:][::-1]:
                        if seq[s] != 1 or seq[e] != 1 or e < s or e - s + 1 > max_len:
                            continue
                        a, b = offsets[w][s][0], offsets[w][e][1]
                        answers.append(
                            Answer(
                                answer=doc.text[a:b],
                                score=float(start[s] * end[e]),
                                start=a,
                                end=b,
                                document_id=doc.id,
                            )
                        )
        answers.sort(key=lambda a: -a.score)
        seen, best = set(), []
        for a in answers:
            if (a.document_id, a.start, a.end) not in seen:
                seen.add((a.document_id, a.start, a.end))
                best.append(a)
        best = best[: req.top_k]
        if req.handle_impossible_answer and (not best or null > best[0].score):
            empty = Answer(answer="", score=float(null), start=0, end=0)
            best = [empty, *best[: req.top_k - 1]]
        return ReadResponse(answers=best, no_answer_score=float(null))

    # generation: the documents concatenated into one prompt --------------------------------
    def _prompt(self, req: GenerateRequest) -> dict[str, Any]:
        context = "\n\n".join(d.text for d in req.documents)
        messages = [
            {
                "role": "user",
                "content": f"Answer from the reviews.\n\n{context}\n\nQuestion: {req.question}",
            }
        ]
        ids = self.gen_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return dict(cast("Mapping[str, Any]", ids))  # return_dict=True: a BatchEncoding

    def generate(self, req: GenerateRequest) -> GenerateResponse:
        inputs = self._prompt(req)
        with torch.inference_mode():
            out = self.gen_model.generate(
                **inputs, max_new_tokens=req.max_new_tokens or MAX_NEW_TOKENS, do_sample=False
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        tokens = [
            GeneratedToken(id=t, text=self.gen_tokenizer.decode([t]), logprob=0.0) for t in new
        ]
        return GenerateResponse(
            text=self.gen_tokenizer.decode(new, skip_special_tokens=True),
            tokens=tokens,
            document_weights=[1.0 / len(req.documents)] * len(req.documents),
        )

    def stream(self, req: GenerateRequest) -> Iterator[str]:
        """SSE as qaserve sends it: `token` per piece of text, `generated`, `done`."""
        from transformers import TextIteratorStreamer

        inputs = self._prompt(req)
        streamer = TextIteratorStreamer(
            self.gen_tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        kwargs = dict(
            **inputs, max_new_tokens=req.max_new_tokens or MAX_NEW_TOKENS, do_sample=False
        )

        def run() -> None:
            with torch.inference_mode():
                self.gen_model.generate(**kwargs, streamer=streamer)

        threading.Thread(target=run, daemon=True).start()
        pieces = []
        for piece in streamer:
            if not piece:
                continue
            pieces.append(piece)
            token = GeneratedToken(id=0, text=piece, logprob=0.0)
            yield f"event: token\ndata: {token.model_dump_json()}\n\n"
        done = GenerateResponse(text="".join(pieces), tokens=[], document_weights=[])
        yield f"event: generated\ndata: {done.model_dump_json()}\n\nevent: done\ndata: {{}}\n\n"

    def query(self, req: QueryRequest) -> QueryResponse:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        docs = self.retrieve(
            RetrieveRequest(query=req.question, top_k=req.top_k_retriever, filters=req.filters)
        ).documents
        timings["retriever"] = (time.perf_counter() - t0) * 1000
        read_docs = [ReadDocument(id=d.id, text=d.text, score=d.score) for d in docs]
        answers: list[Answer] = []
        generated = None
        answer = FinalAnswer(text="", source="none", score=0.0)
        if read_docs and req.mode in ("extractive", "ensemble"):
            t = time.perf_counter()
            answers = self.read(
                ReadRequest(
                    question=req.question,
                    documents=read_docs,
                    top_k=req.top_k_reader,
                    handle_impossible_answer=True,
                )
            ).answers
            timings["reader"] = (time.perf_counter() - t) * 1000
            if answers and answers[0].answer:
                a = answers[0]
                answer = FinalAnswer(
                    text=a.answer, source="reader", score=a.score, document_id=a.document_id,
                    start=a.start, end=a.end,
                )  # fmt: skip
        if read_docs and req.mode in ("generative", "ensemble"):  # ensemble: both, in turn
            t = time.perf_counter()
            generated = self.generate(
                GenerateRequest(
                    question=req.question, documents=read_docs, max_new_tokens=req.max_new_tokens
                )
            )
            timings["generator"] = (time.perf_counter() - t) * 1000
            if not answer.text:
                answer = FinalAnswer(text=generated.text, source="generator", score=0.0)
        timings["total"] = (time.perf_counter() - t0) * 1000
        return QueryResponse(
            answer=answer, answers=answers, generated=generated, documents=docs, timings_ms=timings
        )


def build_app(baseline: Baseline) -> FastAPI:
    """Plain `def` routes: FastAPI runs them in its thread pool, as most such apps do."""
    app = FastAPI(title="baseline QA server")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True, "stages": {}}

    @app.post("/v1/documents")
    def documents(body: IngestRequest) -> IngestResponse:
        return baseline.ingest(body)

    @app.post("/v1/retrieve")
    def retrieve(body: RetrieveRequest) -> RetrieveResponse:
        return baseline.retrieve(body)

    @app.post("/v1/read")
    def read(body: ReadRequest) -> ReadResponse:
        return baseline.read(body)

    @app.post("/v1/generate", response_model=None)
    def generate(body: GenerateRequest) -> GenerateResponse | StreamingResponse:
        if body.stream:
            return StreamingResponse(baseline.stream(body), media_type="text/event-stream")
        return baseline.generate(body)

    @app.post("/v1/query", response_model=None)
    def query(body: QueryRequest) -> QueryResponse | JSONResponse:
        if body.stream:
            return JSONResponse({"error": "the baseline does not stream queries"}, 400)
        return baseline.query(body)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reader", required=True, help="reader checkpoint (torch) dir or hub id")
    p.add_argument("--embedder", default=packaged_embedder())
    p.add_argument("--generator", default=packaged_generator())
    p.add_argument("--threads", type=int, default=2, help="torch threads (the CPU budget)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    app = build_app(Baseline(args.reader, args.embedder, args.generator, args.threads))
    print(json.dumps({"loaded_s": round(time.perf_counter() - t0, 1)}), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
