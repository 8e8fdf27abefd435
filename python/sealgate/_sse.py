"""A small incremental parser for ``text/event-stream`` (the WHATWG event-stream format):
lines ending in LF, CR or CRLF; ``event:`` names the event, each ``data:`` line adds one line
to its data (joined with LF), a blank line dispatches it, lines starting with ``:`` are comments.
``id:`` and ``retry:`` are accepted and ignored. Held in memory: one partial line and one event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Tuple


@dataclass(frozen=True)
class Event:
    """One dispatched event; ``event`` defaults to ``"message"``."""

    event: str
    data: str


class Parser:
    """Feeds text chunks in, yields complete events out."""

    def __init__(self) -> None:
        self._buf = ""
        self._event: Optional[str] = None
        self._data: List[str] = []
        self._scan = 0

    def feed(self, text: str) -> List[Event]:
        """The events completed by ``text`` (which may split lines anywhere)."""
        self._buf += text
        out: List[Event] = []
        while True:
            line, found = self._next_line()
            if not found:
                return out
            ev = self._line(line)
            if ev is not None:
                out.append(ev)

    def _next_line(self) -> Tuple[str, bool]:
        """The next complete line, if any. ``_scan`` remembers how far the buffer is known to
        hold no line end, so a long line arriving in many chunks is scanned once."""
        n, r = self._buf.find("\n", self._scan), self._buf.find("\r", self._scan)
        ends = [i for i in (n, r) if i >= 0]
        if not ends:
            self._scan = len(self._buf)
            return "", False
        i = min(ends)
        if i == r and i + 1 == len(self._buf):
            self._scan = i  # wait: this CR may be the first half of a CRLF
            return "", False
        end = i + 2 if self._buf.startswith("\r\n", i) else i + 1
        line, self._buf, self._scan = self._buf[:i], self._buf[end:], 0
        return line, True

    def _line(self, line: str) -> Optional[Event]:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> Optional[Event]:
        if not self._data and self._event is None:
            return None
        ev = Event(self._event or "message", "\n".join(self._data))
        self._event, self._data = None, []
        return ev


async def events(chunks: AsyncIterator[str]) -> AsyncIterator[Event]:
    """The events of a stream of text chunks."""
    parser = Parser()
    async for chunk in chunks:
        for ev in parser.feed(chunk):
            yield ev
