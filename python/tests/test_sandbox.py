"""``Sandbox`` lifecycle through the SDK: create (by store name or id), connect, list, kill,
``async with``, and a proxy-only (``isolation="none"``) sandbox used through its proxy env."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import secrets
import subprocess

import pytest

from conftest import remember_secret
from sealgate import ConflictError, InvalidInputError, NotFoundError, Sandbox, SecretStore

pytestmark = pytest.mark.anyio

SEALED = re.compile(r"^osb_sealed_[0-9a-f]{32}$")


async def make_store(allow=("api.example.test",)):
    store = await SecretStore.create(f"sbx-{secrets.token_hex(4)}", egress_allowlist=list(allow))
    value = remember_secret("sk-sbx-" + secrets.token_hex(12))
    await SecretStore.set_secret(store["id"], "API_KEY", value, allowed_hosts=["api.example.test"])
    return store, value


async def test_create_by_name_and_id_connect_list_kill(daemon):
    store, value = await make_store()
    by_name = await Sandbox.create(secret_store=store["name"], timeout=600, isolation="none")
    by_id = await Sandbox.create(store["id"], isolation="none")
    for sbx in (by_name, by_id):
        assert sbx.id.startswith("sbx_")
        assert sbx.secret_store_id == store["id"]
        assert SEALED.match(sbx.env["API_KEY"])
        assert value not in repr(sbx.info) and value not in repr(sbx)
    assert by_name.env["API_KEY"] != by_id.env["API_KEY"]  # one token per sandbox
    expires = dt.datetime.fromisoformat(by_name.expires_at.replace("Z", "+00:00"))
    left = (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 590 < left <= 601

    again = await Sandbox.connect(by_name.id)
    assert (again.id, again.env) == (by_name.id, by_name.env)
    # opencomputer's names: sandbox_id, connect(id, api_key, api_url), is_running()
    assert by_name.sandbox_id == by_name.id
    cfg = by_name._cfg
    assert (await Sandbox.connect(by_name.id, cfg.api_key, cfg.api_url)).id == by_name.id
    assert await again.is_running() is True
    ids = {s["id"] for s in await Sandbox.list()}
    assert {by_name.id, by_id.id} <= ids

    assert await by_name.kill() is True
    assert await again.is_running() is False
    assert await by_name.kill() is False  # already ended: harmless
    with pytest.raises(NotFoundError) as e:
        await Sandbox.connect(by_name.id)
    assert e.value.code == "not_found"
    with pytest.raises(NotFoundError):
        await again.refresh()
    await by_id.kill()


async def test_opencomputer_quick_start_shape_runs(daemon):
    """``Sandbox.create(template="base", …)`` and ``await sandbox.close()`` after ``kill()``,
    as the opencomputer quick start writes them; and a kill sent to a wrong ``api_url`` fails
    instead of passing for "already ended"."""
    store, _ = await make_store()
    sbx = await Sandbox.create(template="base", secret_store=store["name"], isolation="none")
    wrong = Sandbox(sbx.info, dataclasses.replace(sbx._cfg, api_url=sbx._cfg.api_url + "/v1"))
    with pytest.raises(NotFoundError) as e:
        await wrong.kill()
    assert e.value.code == "no_such_route"
    assert (await Sandbox.connect(sbx.id)).id == sbx.id, "still running"
    assert await sbx.kill() is True
    assert await sbx.close() is None


async def test_kill_can_delete_a_single_use_store(daemon):
    """``kill(delete_secret_store=True)``, as in the opencomputer SDK."""
    store = await SecretStore.create(f"single-{secrets.token_hex(4)}", ["api.example.test"])
    sbx = await Sandbox.create(secret_store=store["id"], timeout=60, isolation="none")
    assert await sbx.kill(delete_secret_store=True) is True
    with pytest.raises(NotFoundError):
        await SecretStore.get(store["id"])
    assert await sbx.kill(delete_secret_store=True) is False


async def test_async_with_kills_on_exit_even_on_error(daemon):
    store, _ = await make_store()
    with pytest.raises(RuntimeError):
        async with await Sandbox.create(store["name"], isolation="none") as sbx:
            assert (await Sandbox.connect(sbx.id)).id == sbx.id
            raise RuntimeError("boom")
    with pytest.raises(NotFoundError):
        await Sandbox.connect(sbx.id)


async def test_unknown_store_and_bad_input(daemon):
    with pytest.raises(NotFoundError) as e:
        await Sandbox.create(secret_store=f"no-such-store-{secrets.token_hex(4)}", isolation="none")
    assert (e.value.code, e.value.status) == ("not_found", 404)
    with pytest.raises(NotFoundError):
        await Sandbox.connect("sbx_000000000000000000000000")
    store, _ = await make_store()
    with pytest.raises(InvalidInputError) as e:
        await Sandbox.create(store["name"], timeout=10**9, isolation="none")
    assert e.value.code == "invalid_request"


async def test_a_float_timeout_is_whole_seconds_rounded_up(daemon):
    store, _ = await make_store()
    for timeout, want in [(600.0, 600), (2.5, 3)]:
        async with await Sandbox.create(store["name"], timeout=timeout, isolation="none") as sbx:
            info = await Sandbox.connect(sbx.id)
            left = dt.datetime.fromisoformat(info.info["expires_at"].replace("Z", "+00:00")) - dt.datetime.now(dt.timezone.utc)
            assert want - 60 < left.total_seconds() <= want, (timeout, left)


async def test_commands_need_netns_isolation(daemon):
    store, _ = await make_store()
    async with await Sandbox.create(store["name"], isolation="none") as sbx:
        with pytest.raises(ConflictError) as e:
            await sbx.commands.run("true")
        assert e.value.status == 409 and e.value.code == "not_isolated"


async def test_proxy_only_sandbox_unseals_through_its_proxy_env(daemon, origin):
    """isolation="none": the caller wires the proxy env up itself (here: curl)."""
    store, value = await make_store()
    async with await Sandbox.create(store["name"], isolation="none") as sbx:
        env = {"PATH": "/usr/bin:/bin", **sbx.info["proxy_env"], **sbx.env}
        before = len(origin.snapshot())
        out = subprocess.run(
            ["curl", "-s", "--max-time", "20", "https://api.example.test/v1/echo",
             "-H", f"x-api-key: {sbx.env['API_KEY']}"],
            env=env, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        got = origin.snapshot()[before:]
        assert [r.headers["x-api-key"] for r in got] == [value]
        echoed = json.loads(out.stdout)
        assert echoed["headers"]["x-api-key"] == sbx.env["API_KEY"]  # scrubbed on the way back
        assert value not in out.stdout
