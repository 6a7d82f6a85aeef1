"""Server-sent events, both ways: `encode` for the server, `SSEDecoder` for the SDK.

Only the parts of the WHATWG event-stream format the v1 API uses: `event:` and `data:`
lines, a blank line ends an event, `:` starts a comment (keep-alives). Lines end only at
CR, LF or CRLF; httpx's iter_lines also splits at U+2028, NEL and the like, which generated
text may contain, so the decoder splits lines itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Inside JSON strings these may stand unescaped; a line splitter that treats them as line
# ends (str.splitlines, httpx) would cut an event in two.
_UNICODE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
_BREAKS_RE = re.compile("[\u2028\u2029\x85]")
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str


def encode(event: str, data: str) -> bytes:
    """One event; `data` is JSON (on one line, as pydantic's model_dump_json writes it)."""
    data = _BREAKS_RE.sub(lambda m: _UNICODE_BREAKS[m.group()], data)
    lines = "".join(f"data: {line}\n" for line in _LINE_END.split(data))
    return f"event: {event}\n{lines}\n".encode()


class SSEDecoder:
    """Feed it text as it arrives; it returns the events each chunk completes."""

    def __init__(self) -> None:
        self._pending = ""
        self._event = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[ServerSentEvent]:
        text, hold = self._pending + text, ""
        if text.endswith("\r"):  # maybe half of a CRLF: wait for the next chunk
            text, hold = text[:-1], "\r"
        lines = _LINE_END.split(text)
        self._pending = lines.pop() + hold  # the unfinished last line
        events = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None  # as browsers do: an event without data is not dispatched
            sse = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return sse
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
