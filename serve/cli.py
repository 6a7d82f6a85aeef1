"""`qaserve` command line: ingest, ask, documents, models, and the model-building commands.

Each command works in-process on the embedded store under --data-dir / QASERVE_DATA_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qaserve.errors import BadRequest, QAServeError

if TYPE_CHECKING:
    from qaserve.runtime.local import Engine
    from qaserve_client.client import Client
    from qaserve_client.schema import QueryResponse

SAMPLE_QUESTIONS: list[tuple[str, dict[str, Any]]] = [
    ("How is the sound quality?", {}),
    ("How long does the battery last?", {}),
    ("Is it comfortable to wear?", {}),
]


def parse_filters(items: list[str] | None) -> dict[str, Any] | None:
    """`key=value` (a string) or `key:=JSON` (a typed scalar or list); a repeated key = any-of."""
    if not items:
        return None
    filters: dict[str, Any] = {}
    for item in items:
        if ":=" in item:
            key, raw = item.split(":=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise BadRequest(
                    f"--filter {item!r}: {raw!r} is not JSON", field="filters"
                ) from None
        elif "=" in item:
            key, value = item.split("=", 1)
        else:
            raise BadRequest(f"--filter {item!r}: expected key=value or key:=JSON", field="filters")
        key = key.strip()
        if not key:
            raise BadRequest(f"--filter {item!r}: empty key", field="filters")
        scalars = value if isinstance(value, list) else [value]
        if not scalars or any(isinstance(v, dict | list) or v is None for v in scalars):
            raise BadRequest(
                f"--filter {item!r}: a filter value must be a scalar or a list of scalars",
                field="filters",
            )
        if key in filters:
            prev = filters[key] if isinstance(filters[key], list) else [filters[key]]
            filters[key] = prev + scalars
        else:
            filters[key] = value
    return filters


def _engine(args: argparse.Namespace) -> Engine:
    from qaserve.config import EngineConfig
    from qaserve.runtime.local import Engine

    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if getattr(args, "reader", None):
        overrides["reader.model"] = args.reader
    if getattr(args, "store_url", None):
        overrides["store.url"] = args.store_url
    return Engine(EngineConfig.load(args.config, **overrides))


def _client(args: argparse.Namespace) -> Client | None:
    """The SDK client when --url (or $QASERVE_URL) names a running server, else None."""
    url = getattr(args, "url", None)
    if not url:
        return None
    from qaserve_client.client import Client

    return Client(url, api_key=getattr(args, "api_key", None), timeout=args.timeout)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_ingest(args: argparse.Namespace) -> int:
    from qaserve.loaders import load_documents

    docs = load_documents(
        args.path,
        fmt=args.format,
        text_field=args.text_field,
        id_field=args.id_field,
        meta_fields=args.meta_field,
    )
    print(f"read {len(docs)} documents from {args.path}", file=sys.stderr)
    client = _client(args)
    if client is not None:
        with client:
            done, passages = 0, 0
            for i in range(0, len(docs), args.batch_size):
                result = client.ingest(docs[i : i + args.batch_size], collection=args.collection)
                done, passages = done + len(result.ids), passages + result.passages
                print(f"\ringested {done}/{len(docs)} documents", end="", file=sys.stderr)
            print(file=sys.stderr)
        print(f"ingested {done} documents as {passages} passages at {args.url}")
        return 0
    engine = _engine(args)
    try:
        result = engine.ingest(docs, collection=args.collection, progress=not args.quiet)
        total = engine.retriever.count(collection=args.collection)
    finally:
        engine.close()
    print(
        f"ingested {len(result.ids)} documents as {result.passages} passages "
        f"({total} documents in the store)"
    )
    return 0


def _show_answer(resp: QueryResponse) -> None:
    a = resp.answer
    shown = a.text if a.text else "(no answer found in the documents)"
    print(f"\nAnswer: {shown}\n  source={a.source} score={a.score:.3f}", end="")
    print(f" document={a.document_id}" if a.document_id else "")
    if resp.answers:
        print("\nReader spans:")
        for s in resp.answers:
            print(
                f"  {s.score:.3f}  {s.answer!r}  "
                f"(document {s.document_id}, chars {s.start}-{s.end})"
            )
    if resp.generated is not None:
        print(f"\nGenerated (RAG-Token): {resp.generated.text!r}")
    print("\nEvidence (retrieved):")
    for d in resp.documents:
        text = " ".join(d.text.split())
        text = text[:160] + ("..." if len(text) > 160 else "")
        print(f"  {d.score:.3f}  [{d.id}#{d.passage}] {text}")
    print("\nTimings (ms): " + ", ".join(f"{k}={v:.0f}" for k, v in resp.timings_ms.items()))


def cmd_ask(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from qaserve_client.schema import QueryRequest

    try:
        request = QueryRequest(
            question=args.question,
            top_k_retriever=args.top_k_retriever,
            top_k_reader=args.top_k_reader,
            filters=parse_filters(args.filter),
            collection=args.collection,
            mode=args.mode,
            retrieval=args.retrieval,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{field}: {first['msg']}", field=field) from None
    client = _client(args)
    if client is not None:
        with client:
            resp = client.query(**request.model_dump(exclude={"stream"}, exclude_unset=True))
    else:
        engine = _engine(args)
        try:
            resp = engine.query(request)
        finally:
            engine.close()
    if args.json:
        print(resp.model_dump_json(indent=2))
    else:
        _show_answer(resp)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is not None:
        with client:
            _print(client.get_document(args.id, collection=args.collection).model_dump())
        return 0
    engine = _engine(args)
    try:
        _print(engine.get_document(args.id, collection=args.collection).model_dump())
    finally:
        engine.close()
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is not None:
        with client:
            client.delete_document(args.id, collection=args.collection)
        print(f"deleted {args.id}")
        return 0
    engine = _engine(args)
    try:
        engine.delete_document(args.id, collection=args.collection)
    finally:
        engine.close()
    print(f"deleted {args.id}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is not None:
        with client:
            _print([m.model_dump() for m in client.models()])
        return 0
    engine = _engine(args)
    try:
        _print([m.model_dump() for m in engine.models()])
    finally:
        engine.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Ingest the shipped sample corpus (idempotent) and answer a few questions with it."""
    from qaserve.loaders import sample_documents
    from qaserve_client.schema import QueryRequest

    engine = _engine(args)
    try:
        docs = sample_documents()
        result = engine.ingest(docs, collection=args.collection, progress=False)
        print(f"sample corpus: {len(result.ids)} reviews, {result.passages} passages")
        questions = [(q, {}) for q in args.question] if args.question else SAMPLE_QUESTIONS
        for question, filters in questions:
            print("\n" + "=" * 78 + f"\nQ: {question}")
            resp = engine.query(
                QueryRequest(
                    question=question,
                    filters=filters or None,
                    collection=args.collection,
                    mode=args.mode,
                )
            )
            _show_answer(resp)
    finally:
        engine.close()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="store folder (default: $QASERVE_DATA_DIR or ~/.local/share/qaserve)",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="engine config YAML (default: $QASERVE_CONFIG)"
    )
    p.add_argument("--collection", default=None, help="collection name (default: documents)")
    p.add_argument(
        "--store-url", default=None, help="Qdrant server URL instead of the embedded store"
    )
    p.add_argument(
        "--url",
        default=os.environ.get("QASERVE_URL"),
        help="talk to a running qaserve server (default: $QASERVE_URL; unset = in-process)",
    )
    p.add_argument("--api-key", default=os.environ.get("QASERVE_API_KEY"))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request with --url")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qaserve", description=__doc__)
    parser.add_argument("--version", action="version", version="qaserve 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="add documents from a jsonl, csv or txt file (or a folder)")
    _common(p)
    p.add_argument("path", type=Path)
    p.add_argument("--format", choices=["auto", "jsonl", "csv", "txt", "subjqa"], default="auto")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument(
        "--meta-field",
        action="append",
        default=None,
        help="metadata field to keep (repeatable; default: all scalar fields)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=64, help="documents per request with --url")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ask", help="answer a question over the ingested documents")
    _common(p)
    p.add_argument("question")
    p.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="metadata filter; repeat a key for any-of; KEY:=JSON for typed values",
    )
    p.add_argument("--mode", choices=["extractive", "generative", "ensemble"], default="ensemble")
    p.add_argument(
        "--retrieval",
        choices=["dense", "sparse", "hybrid"],
        default=None,
        help="default: the server's configured mode",
    )
    p.add_argument("--top-k-retriever", type=int, default=5)
    p.add_argument("--top-k-reader", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's")
    p.add_argument("--num-beams", type=int, default=None, help="default: the config's")
    p.add_argument(
        "--reader",
        default=None,
        help="reader model (dir with model.onnx, checkpoint dir or hub id)",
    )
    p.add_argument("--json", action="store_true", help="print the POST /v1/query answer as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("get", help="print a stored document")
    _common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", help="delete a stored document")
    _common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("models", help="each stage's model, format, size and device")
    _common(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="ingest the shipped sample reviews and answer sample questions")
    _common(p)
    p.add_argument("question", nargs="*", help="questions to ask instead of the samples")
    p.add_argument("--mode", choices=["extractive", "generative", "ensemble"], default="ensemble")
    p.set_defaults(func=cmd_demo)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[Any], None]]:
    """Commands that live beside the code they drive (training, evaluation, benchmarks)."""
    found = []
    for module in (
        "qaserve.runtime.server",
        "qaserve.offline.autoscale",
        "qaserve.offline.train_reader",
        "qaserve.offline.distill_reader",
        "qaserve.offline.prune_reader",
        "qaserve.offline.train_retriever",
        "qaserve.offline.train_generator",
        "qaserve.offline.export_generator",
        "qaserve.offline.fit_ensemble",
        "qaserve.offline.calibrate_reader",
        "qaserve.offline.evaluate",
        "qaserve.offline.bench",
        "qaserve.offline.drills",
        "qaserve.runtime.cluster",
        "qaserve.loadtests.run",
    ):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as exc:
            if exc.name != module:
                raise
            continue
        found.append(mod.register)
    return found


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QAServeError as exc:
        print(f"qaserve: error: {exc.message}", file=sys.stderr)
        return 2 if exc.status < 500 else 1
    except Exception as exc:
        from pydantic import ValidationError

        from qaserve.config import describe_invalid
        from qaserve_client.errors import QAServeConnectionError, QAServeHTTPError

        if isinstance(exc, ValidationError):  # a bad config: its field, never its value
            print(f"qaserve: error: invalid {exc.title}: {describe_invalid(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, QAServeHTTPError):
            print(f"qaserve: error: {exc.status} {exc.type}: {exc.message}", file=sys.stderr)
            return 2 if exc.status < 500 else 1
        if isinstance(exc, QAServeConnectionError):
            print(f"qaserve: error: cannot reach the server: {exc}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("qaserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
