"""Split long documents into overlapping, token-bounded passages.

The encoder truncates at its max sequence length, so anything past it would be invisible to
dense retrieval; splitting keeps every part of a long text searchable. Passages are cut on
the tokenizer's character offsets so each one is an exact substring of its parent: the reader
can then map answer spans back to the original text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from qaserve_client.schema import DocumentIn, Scalar

Meta = dict[str, Scalar | list[Scalar] | None]


class OffsetTokenizer(Protocol):
    """Any Hugging Face fast tokenizer (it returns character offsets)."""

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Passage:
    doc_id: str
    number: int
    text: str
    offset: int  # character offset of `text` in the parent document
    meta: Meta = field(default_factory=dict)


@dataclass(frozen=True)
class SplitDocument:
    """A document ready to store: its passages, in order, and the parent text they came from."""

    id: str
    text: str
    meta: Meta
    passages: list[Passage]


def document_id(text: str, meta: Meta | None = None) -> str:
    """A stable id for documents sent without one, so re-sending them is idempotent too."""
    blob = json.dumps({"text": text, "meta": meta or {}}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _is_word_break(prev_end: int, next_start: int) -> bool:
    # A cut between two tokens is clean when white space separates them (not "do|n't").
    return next_start > prev_end


def split_spans(
    text: str, offsets: list[tuple[int, int]], max_tokens: int, overlap: int
) -> list[tuple[int, int]]:
    """(start, end) character spans of windows of at most `max_tokens` tokens.

    Windows overlap by about `overlap` tokens and end at a word break when one exists in the
    window's second half, so a passage rarely stops inside a word.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    overlap = max(0, min(overlap, max_tokens - 1))
    n = len(offsets)
    if n <= max_tokens:
        return [(0, len(text))]

    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + max_tokens, n)  # token index, exclusive
        if end < n:
            cut = end
            floor = start + max(1, max_tokens // 2)
            while cut > floor and not _is_word_break(offsets[cut - 1][1], offsets[cut][0]):
                cut -= 1
            if cut > floor:
                end = cut
        first = 0 if not spans else offsets[start][0]
        last = len(text) if end >= n else offsets[end - 1][1]
        spans.append((first, last))
        if end >= n:
            return spans
        nxt = max(end - overlap, start + 1)
        # Start the next window on a word start too, stepping back a few tokens at most.
        back = nxt
        while back > max(start + 1, nxt - 8) and not _is_word_break(
            offsets[back - 1][1], offsets[back][0]
        ):
            back -= 1
        start = back if _is_word_break(offsets[back - 1][1], offsets[back][0]) else nxt


class PassageSplitter:
    """Token-bounded splitter counting tokens with the embedder's own tokenizer."""

    def __init__(self, tokenizer: OffsetTokenizer, max_tokens: int = 200, overlap: int = 32):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap

    def spans(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        return split_spans(text, offsets, self.max_tokens, self.overlap)

    def split(self, doc: DocumentIn) -> SplitDocument:
        doc_id = doc.id or document_id(doc.text, doc.meta)
        meta = dict(doc.meta)
        passages = [
            Passage(doc_id=doc_id, number=i, text=doc.text[a:b], offset=a, meta=meta)
            for i, (a, b) in enumerate(self.spans(doc.text))
        ]
        return SplitDocument(id=doc_id, text=doc.text, meta=meta, passages=passages)
