"""20 isolated sandboxes created, used and killed concurrently through the SDK leave the host as
it was; sandbox creation latency is measured and reported (target: under 300 ms)."""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import time
from pathlib import Path

import pytest

from conftest import remember_secret
from sealgate import Sandbox, SecretStore
from support import host

pytestmark = pytest.mark.anyio

COUNT = 20
TARGET_SECS = 0.300
REPORT = Path(__file__).resolve().parents[2] / "target" / "python-sdk-create-latency.txt"


def p99(samples):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, -(-99 * len(ordered) // 100) - 1)]


def report(line: str) -> None:
    print(line)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with open(REPORT, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {os.uname().nodename} {line}\n")


async def timed_create(store_name: str):
    started = time.perf_counter()
    sbx = await Sandbox.create(secret_store=store_name, timeout=300)
    return sbx, time.perf_counter() - started


async def store() -> str:
    s = await SecretStore.create(f"many-{secrets.token_hex(4)}", egress_allowlist=["api.example.test"])
    await SecretStore.set_secret(s["id"], "API_KEY", remember_secret("sk-many-" + secrets.token_hex(12)),
                                 allowed_hosts=["api.example.test"])
    return s["name"]


async def test_twenty_concurrent_sandboxes_leave_the_host_as_it_was(daemon, capsys):
    name = await store()
    before = host.snapshot()
    daemon_children_before = set(host.descendants(daemon.pid))

    made = await asyncio.gather(*(timed_create(name) for _ in range(COUNT)), return_exceptions=True)
    sandboxes = [m[0] for m in made if not isinstance(m, BaseException)]
    try:
        errors = [m for m in made if isinstance(m, BaseException)]
        assert not errors, errors
        all_names = [host.names(s.info) for s in sandboxes]
        assert len({n.netns for n in all_names}) == COUNT
        alive = host.snapshot()
        for n in all_names:
            assert n.netns in alive.netns and n.host_if in alive.links
        results = await asyncio.gather(*(s.commands.run("echo $API_KEY") for s in sandboxes))
        assert [r.stdout for r in results] == [s.env["API_KEY"] + "\n" for s in sandboxes]
    finally:
        killed = await asyncio.gather(*(s.kill() for s in sandboxes))
    assert killed == [True] * COUNT

    after = host.snapshot()
    assert host.leftovers(after, all_names) == []
    assert host.foreign_changes(before, after) == []
    assert set(host.descendants(daemon.pid)) <= daemon_children_before

    latencies = [m[1] for m in made]
    with capsys.disabled():
        report(
            f"concurrent x{COUNT}: create median {statistics.median(latencies) * 1000:.0f} ms, "
            f"p99 {p99(latencies) * 1000:.0f} ms"
        )


async def test_creating_one_sandbox_takes_under_300ms(daemon, capsys):
    name = await store()
    latencies = []
    for _ in range(COUNT):
        sbx, took = await timed_create(name)
        latencies.append(took)
        await sbx.kill()
    median, tail = statistics.median(latencies), p99(latencies)
    with capsys.disabled():
        report(f"sequential x{COUNT}: create median {median * 1000:.0f} ms, p99 {tail * 1000:.0f} ms")
    assert median < TARGET_SECS, f"median {median * 1000:.0f} ms"
