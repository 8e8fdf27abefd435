"""The event-stream parser over random chunk splits, against a naive whole-text parse."""

from __future__ import annotations

import random

from sealgate._sse import Event, Parser

STREAM = (
    "event: stdout\r\ndata: a\r\ndata: b\r\n\r\n"
    ": comment\n"
    "id: 7\nretry: 10\n"
    "event: stderr\rdata:no-space\r\r"
    "data: plain message\n\n"
    "event: exit\ndata: {\"exit_code\": 0}\n\n"
    "data: incomplete at the end"
)
EXPECTED = [
    Event("stdout", "a\nb"),
    Event("stderr", "no-space"),
    Event("message", "plain message"),
    Event("exit", '{"exit_code": 0}'),
]


def test_whole_stream():
    assert Parser().feed(STREAM) == EXPECTED


def test_every_random_split_gives_the_same_events():
    rng = random.Random(7)
    for _ in range(500):
        parser, events, i = Parser(), [], 0
        while i < len(STREAM):
            j = i + rng.randint(1, 6)
            events += parser.feed(STREAM[i:j])
            i = j
        assert events == EXPECTED


def test_a_long_line_in_many_chunks():
    parser = Parser()
    for _ in range(10_000):
        assert parser.feed("x" * 100) == []
    assert parser.feed("\n\n") == []  # a field named "xxx…" is ignored
    parser = Parser()
    parser.feed("data: ")
    for _ in range(1000):
        parser.feed("y" * 100)
    assert parser.feed("\n\n") == [Event("message", "y" * 100_000)]
