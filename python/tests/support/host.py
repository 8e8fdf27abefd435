"""What a sandbox may leave on the host, read with the real tools (``ip netns``, ``ip link``,
``iptables-save``, ``ip6tables-save``, ``ps``); a tool that fails fails the test.

Other sealgate daemons (other test suites) may create and remove their own namespaces while this
suite runs, so a change on the host is attributed to a sandbox by the names the daemon derives
from it (DESIGN: slot → ``sealgate-XXXX`` namespace and ``sgXXXXh`` veth in 198.18.0.0/15,
``SG-<id hex>`` chains): ``leftovers`` lists everything still carrying one of our sandboxes'
names, and ``foreign_changes`` every change that carries no sealgate name at all (which no
sealgate could have made, so it is reported too).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Set

POOL = ipaddress.IPv4Network("198.18.0.0/15")
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def run(argv: List[str]) -> str:
    """stdout of ``argv``; raises (failing the test) if it cannot run or exits non-zero."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


@dataclass(frozen=True)
class HostState:
    netns: FrozenSet[str]
    links: FrozenSet[str]
    rules: FrozenSet[str]

    def lines(self) -> Set[str]:
        return (
            {f"netns {n}" for n in self.netns}
            | {f"link {l}" for l in self.links}
            | {f"rule {r}" for r in self.rules}
        )


def _iptables(program: str) -> Set[str]:
    lines = set()
    for line in run([program]).splitlines():
        if line.startswith("#"):
            continue
        lines.add(f"{program}: {_COUNTERS.sub('[0:0]', line)}")
    return lines


def snapshot() -> HostState:
    netns = {l.split()[0] for l in run(["ip", "netns", "list"]).splitlines() if l.strip()}
    links = set()
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        links.add(name)
    rules = _iptables("iptables-save") | _iptables("ip6tables-save")
    return HostState(frozenset(netns), frozenset(links), frozenset(rules))


@dataclass(frozen=True)
class Names:
    """The host-side names of one isolated sandbox."""

    sandbox_id: str
    netns: str
    host_if: str
    chain: str
    host_ip: str
    ns_ip: str

    def patterns(self) -> List[str]:
        return [self.netns, self.host_if, self.chain, self.sandbox_id, self.host_ip, self.ns_ip]


def names(info: Dict) -> Names:
    """The host-side names of an isolated sandbox: its API record's ``netns`` object when the
    daemon reports one, checked against what the address plan derives from its ``source_ip``
    (the namespace side of its /30 slot in 198.18.0.0/15; chains are ``SG-`` + the id's hex)."""
    ns_ip = ipaddress.IPv4Address(info["source_ip"])
    offset = int(ns_ip) - int(POOL.network_address)
    assert 0 <= offset < POOL.num_addresses and offset % 4 == 2, f"source_ip {ns_ip} outside the pool"
    slot = offset // 4
    derived = Names(
        sandbox_id=info["id"],
        netns=f"sealgate-{slot:04x}",
        host_if=f"sg{slot:04x}h",
        chain="SG-" + info["id"].removeprefix("sbx_"),
        host_ip=str(ns_ip - 1),
        ns_ip=str(ns_ip),
    )
    reported = info.get("netns")
    if reported:
        assert (reported["name"], reported["interface"], reported["address"], reported["gateway"]) == (
            derived.netns, derived.host_if, derived.ns_ip, derived.host_ip,
        ), reported
    return derived


def _mentions(line: str, pattern: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(pattern)}(?![\w-]|\.\d)", line) is not None


def leftovers(state: HostState, sandboxes: Iterable[Names]) -> List[str]:
    """Every namespace, link or rule line naming one of ``sandboxes``."""
    pats = [p for n in sandboxes for p in n.patterns()]
    return sorted(l for l in state.lines() if any(_mentions(l, p) for p in pats))


_SEALGATE_NAME = re.compile(r"sealgate-[0-9a-f]{4}|sg[0-9a-f]{4}h|SG-[0-9a-f]{24}|198\.1[89]\.\d+\.\d+")


def foreign_changes(before: HostState, after: HostState) -> List[str]:
    """Changes between the snapshots that carry no sealgate name (made by something else)."""
    changed = before.lines() ^ after.lines()
    return sorted(l for l in changed if not _SEALGATE_NAME.search(l))


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    args: str


def processes() -> Dict[int, Proc]:
    """Every process, from ``ps``."""
    procs = {}
    for line in run(["ps", "-e", "-o", "pid=,ppid=,args="]).splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            pid, ppid = int(parts[0]), int(parts[1])
            procs[pid] = Proc(pid, ppid, parts[2] if len(parts) > 2 else "")
    return procs


def descendants(root: int, procs: Optional[Dict[int, Proc]] = None) -> Dict[int, Proc]:
    """The processes below ``root`` (its children, their children, …)."""
    procs = processes() if procs is None else procs
    children: Dict[int, List[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid]
        todo.extend(children.get(pid, []))
    return out


def netns_pids(netns: str) -> Set[int]:
    return {int(p) for p in run(["ip", "netns", "pids", netns]).split()}
