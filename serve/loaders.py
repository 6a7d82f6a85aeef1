"""Read documents to ingest from jsonl, csv or txt files (or a folder of them).

Everything is read and validated before anything is written, so a bad file fails the whole
ingest with a message naming the file and line, and the store is left as it was.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from qaserve.errors import BadRequest
from qaserve_client.schema import DocumentIn

FORMATS = ("auto", "jsonl", "csv", "txt", "subjqa")
SUBJQA_COLUMNS = {"q_review_id", "review", "review_id", "item_id", "human_ans_spans"}
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "txt"}


def _doc(
    record: dict,
    where: str,
    text_field: str,
    id_field: str | None,
    meta_fields: Sequence[str] | None,
) -> DocumentIn:
    if text_field not in record:
        raise BadRequest(f"{where}: no {text_field!r} field (use --text-field)", field=text_field)
    if meta_fields is None:
        meta = {k: v for k, v in record.items() if k not in (text_field, id_field)}
        meta = {
            k: v for k, v in meta.items() if isinstance(v, str | int | float | bool) or v is None
        }
    else:
        missing = [m for m in meta_fields if m not in record]
        if missing:
            raise BadRequest(f"{where}: missing metadata field(s) {missing}", field=missing[0])
        meta = {m: record[m] for m in meta_fields}
    doc_id = record.get(id_field) if id_field else None
    try:
        return DocumentIn(
            id=str(doc_id) if doc_id not in (None, "") else None,
            text=str(record[text_field] or ""),
            meta=meta,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {field}: {first['msg']}", field=field) from None


SAMPLE_CORPUS = Path(__file__).resolve().parent / "assets" / "sample" / "reviews.jsonl"


def sample_documents() -> list[DocumentIn]:
    """The shipped sample reviews (`make serve` / `qaserve demo` ingest them)."""
    return load_documents(SAMPLE_CORPUS, meta_fields=["item_id", "domain"])


def detect_format(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BadRequest(
            f"{path}: unknown file type {path.suffix!r} (expected .jsonl, .csv or .txt)"
        )
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if set(header) >= SUBJQA_COLUMNS:
            return "subjqa"
    return fmt


def load_documents(
    path: str | Path,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    id_field: str | None = "id",
    meta_fields: Sequence[str] | None = None,
) -> list[DocumentIn]:
    """All documents in a file or folder. Within a file, a repeated id keeps its last text."""
    path = Path(path)
    if not path.exists():
        raise BadRequest(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise BadRequest(f"{path}: no .jsonl, .csv or .txt files inside")
        docs: list[DocumentIn] = []
        for file in files:
            docs += load_documents(
                file, fmt=fmt, text_field=text_field, id_field=id_field, meta_fields=meta_fields
            )
        return docs
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        if fmt == "subjqa":
            from qaserve.subjqa import load_subjqa, unique_reviews

            return unique_reviews(load_subjqa(path))
        if fmt == "txt":
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise BadRequest(f"{path}: the file is empty")
            return [DocumentIn(id=path.stem, text=text, meta={"source": path.name})]
        if fmt == "jsonl":
            return _dedupe(_jsonl(path, text_field, id_field, meta_fields))
        if fmt == "csv":
            csv.field_size_limit(sys.maxsize)
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            return _dedupe(
                [
                    _doc(r, f"{path}:{i + 2}", text_field, id_field, meta_fields)
                    for i, r in enumerate(rows)
                ]
            )
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read: {exc.strerror or exc}") from None
    raise BadRequest(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _jsonl(
    path: Path, text_field: str, id_field: str | None, meta_fields: Sequence[str] | None
) -> list[DocumentIn]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BadRequest(f"{path}:{lineno}: expected a JSON object per line")
            docs.append(_doc(record, f"{path}:{lineno}", text_field, id_field, meta_fields))
    if not docs:
        raise BadRequest(f"{path}: no documents in the file")
    return docs


def _dedupe(docs: list[DocumentIn]) -> list[DocumentIn]:
    by_id: dict[str, DocumentIn] = {}
    anonymous: list[DocumentIn] = []
    for d in docs:
        if d.id is None:
            anonymous.append(d)
        else:
            by_id[d.id] = d
    return list(by_id.values()) + anonymous
