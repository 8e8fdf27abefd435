"""``sandbox.commands.run`` in daemon-owned isolated (``netns``) sandboxes: results, limits,
streaming, confinement, and that ``kill()`` leaves nothing behind on the host."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from conftest import remember_secret
from sealgate import Sandbox, SecretStore
from support import host

pytestmark = pytest.mark.anyio

OUTPUT_CAP = 1024 * 1024  # [sandbox] output cap per stream, shipped default


async def isolated(**kw) -> Sandbox:
    store = await SecretStore.create(f"cmd-{secrets.token_hex(4)}", egress_allowlist=["api.example.test"])
    value = remember_secret("sk-cmd-" + secrets.token_hex(12))
    await SecretStore.set_secret(store["id"], "API_KEY", value, allowed_hosts=["api.example.test"])
    return await Sandbox.create(store["name"], timeout=300, **kw)


async def test_exit_code_and_stderr_come_back(daemon):
    async with await isolated() as sbx:
        r = await sbx.commands.run("echo out; echo err >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
        assert (r.timed_out, r.truncated, r.oom_killed) == (False, False, False)
        r = await sbx.commands.run("true", timeout=None)  # the daemon's default timeout
        assert (r.stdout, r.stderr, r.exit_code) == ("", "", 0)
        assert r.duration_ms is not None and r.duration_ms >= 0
        # opencomputer's names: sandbox.exec and command=
        r = await sbx.exec.run(command="echo oc")
        assert (r.stdout, r.exit_code) == ("oc\n", 0)
        with pytest.raises(TypeError):
            await sbx.commands.run("true", command="true")


async def test_command_past_its_timeout_is_killed(daemon):
    async with await isolated() as sbx:
        started = time.monotonic()
        r = await sbx.commands.run("echo begun; sleep 30; echo never", timeout=2)
        took = time.monotonic() - started
        assert r.timed_out is True
        assert r.exit_code != 0
        assert "never" not in r.stdout
        assert 1.5 < took < 10, took
        # A fraction is kept (it went up to the next whole second): 0.2 s, not 1 s, leaving
        # 0.75 s for the call itself on a loaded machine.
        started = time.monotonic()
        r = await sbx.commands.run("sleep 30", timeout=0.2)
        took = time.monotonic() - started
        assert r.timed_out is True
        assert took < 0.95, took


async def test_env_cwd_stdin_and_sandbox_envs(daemon):
    async with await isolated(envs={"MODE": "test", "GREETING": "hi there"}) as sbx:
        assert sbx.envs == {"MODE": "test", "GREETING": "hi there"}
        assert sbx.env["MODE"] == "test" and sbx.env["API_KEY"].startswith("osb_sealed_")
        assert (await Sandbox.connect(sbx.id)).env == sbx.env
        r = await sbx.commands.run('echo "$MODE/$GREETING/$EXTRA"', env={"EXTRA": "x"})
        assert r.stdout == "test/hi there/x\n", r.stderr
        r = await sbx.commands.run("pwd", cwd="/tmp")
        assert r.stdout == "/tmp\n", r.stderr
        r = await sbx.commands.run("cat; echo", stdin="from stdin")
        assert r.stdout == "from stdin\n", r.stderr
        r = await sbx.commands.run("echo $API_KEY")
        assert r.stdout == sbx.env["API_KEY"] + "\n"


async def test_unprivileged_without_proxy_variables(daemon):
    async with await isolated() as sbx:
        r = await sbx.commands.run("id -u; env")
        uid, _, env = r.stdout.partition("\n")
        assert r.exit_code == 0 and uid != "0", r.stdout
        names = {line.split("=", 1)[0].lower() for line in env.splitlines()}
        assert not names & {"http_proxy", "https_proxy", "all_proxy"}, names
        assert "ssl_cert_file" in names


async def test_host_filesystem_is_read_only(daemon, tmp_path):
    async with await isolated() as sbx:
        r = await sbx.commands.run("echo x > /etc/x")
        assert r.exit_code != 0 and r.stderr, r
        assert not Path("/etc/x").exists()
        r = await sbx.commands.run("echo ok > ./here && cat ./here && echo t > /tmp/t && cat /tmp/t")
        assert (r.exit_code, r.stdout) == (0, "ok\nt\n"), r.stderr


async def test_another_sandboxs_workdir_is_out_of_reach(daemon):
    marker = f"marker-{secrets.token_hex(6)}"
    async with await isolated() as a, await isolated() as b:
        r = await a.commands.run(f"echo private > {marker} && pwd")
        assert r.exit_code == 0, r.stderr
        a_dir = r.stdout.strip()
        # the same path inside b is b's own directory: a's file is not there
        r = await b.commands.run(f"ls -a {a_dir}")
        assert marker not in r.stdout
        # a's directory on the host (the API's `workdir`, and wherever else the marker shows
        # up) is not readable from b
        assert a.info.get("workdir"), "the API reports no workdir for an isolated sandbox"
        roots = sorted({str(daemon.dir), str(Path(a.info["workdir"]).parent)})
        found = sorted(set(host.run(["find", *roots, "-xdev", "-name", marker]).split()))
        assert str(Path(a.info["workdir"]) / marker) in found, (a.info["workdir"], found)
        for path in found:
            host_dir = str(Path(path).parent)
            r = await b.commands.run(f"ls {host_dir}")
            assert r.exit_code != 0 and marker not in r.stdout, (host_dir, r)
            r = await b.commands.run(f"cat {path}")
            assert r.exit_code != 0 and "private" not in r.stdout, (path, r)


async def test_output_over_the_cap_is_truncated(daemon):
    async with await isolated() as sbx:
        r = await sbx.commands.run(f"head -c {OUTPUT_CAP + 4096} /dev/zero | tr '\\0' a")
        assert r.truncated is True
        assert 0 < len(r.stdout) <= OUTPUT_CAP
        assert set(r.stdout) == {"a"}


async def test_streaming_calls_back_per_chunk(daemon):
    seen: list = []

    def on_out(text):
        seen.append(("out", time.monotonic(), text))

    async def on_err(text):  # async callbacks are awaited
        seen.append(("err", time.monotonic(), text))

    async with await isolated() as sbx:
        r = await sbx.commands.run(
            "for i in 1 2 3; do echo $i; sleep 0.3; done; echo e >&2; exit 4",
            on_stdout=on_out, on_stderr=on_err,
        )
        done = time.monotonic()
        assert (r.stdout, r.stderr, r.exit_code, r.timed_out) == ("1\n2\n3\n", "e\n", 4, False)
        assert "".join(t for k, _, t in seen if k == "out") == "1\n2\n3\n"
        assert "".join(t for k, _, t in seen if k == "err") == "e\n"
        first = min(t for k, t, _ in seen if k == "out")
        assert done - first > 0.5, "stdout was not streamed: it all arrived at the end"

        r = await sbx.commands.run("echo a; sleep 30", timeout=2, on_stdout=lambda t: None)
        assert (r.stdout, r.timed_out) == ("a\n", True)


async def test_kill_leaves_no_namespace_veth_rule_or_process(daemon):
    before = host.processes()
    daemon_children_before = set(host.descendants(daemon.pid, before))
    sleeper = f"sleep {900000 + secrets.randbelow(99999)}"
    sbx = await isolated()
    names = host.names(sbx.info)
    r = await sbx.commands.run(f"({sleeper} >/dev/null 2>&1 &) ; echo started")
    assert r.stdout == "started\n", r.stderr

    alive = host.snapshot()
    assert names.netns in alive.netns
    assert names.host_if in alive.links
    assert any(names.chain in line for line in alive.rules), "no rule chain for the sandbox"
    ns_pids = host.netns_pids(names.netns)

    assert await sbx.kill() is True
    after = host.snapshot()
    assert host.leftovers(after, [names]) == []
    procs = host.processes()
    assert not ns_pids & set(procs), {p: procs[p].args for p in ns_pids & set(procs)}
    assert not [p for p in procs.values() if sleeper in p.args or sbx.id in p.args]
    assert set(host.descendants(daemon.pid, procs)) <= daemon_children_before
