"""Where the SDK finds the daemon and its token, and the errors for a wrong token or no daemon."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from sealgate import SealgateConnectionError, SealgateError, SecretStore, UnauthorizedError
from sealgate import _config
from support.daemon import free_port

pytestmark = pytest.mark.anyio


def test_defaults_are_the_clis(monkeypatch, tmp_path):
    monkeypatch.delenv("SEALGATE_ADMIN_URL", raising=False)
    monkeypatch.delenv("SEALGATE_ADMIN_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin.token").write_text("file-token\n")
    cfg = _config.resolve()
    assert (cfg.api_url, cfg.api_key) == ("http://127.0.0.1:7070", "file-token")
    assert "file-token" not in repr(cfg)


def test_environment_then_keywords_win(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no data/admin.token here
    monkeypatch.setenv("SEALGATE_ADMIN_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("SEALGATE_ADMIN_TOKEN", "env-token")
    cfg = _config.resolve()
    assert (cfg.api_url, cfg.api_key) == ("http://127.0.0.1:1", "env-token")
    cfg = _config.resolve(api_url="http://127.0.0.1:2", api_key="kw-token")
    assert (cfg.api_url, cfg.api_key) == ("http://127.0.0.1:2", "kw-token")


def test_no_token_anywhere_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("SEALGATE_ADMIN_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SealgateError) as e:
        _config.resolve()
    assert e.value.code == "missing_token"
    assert "admin.token" in e.value.message


async def test_token_file_in_cwd_reaches_the_daemon(daemon, monkeypatch):
    """The daemon runs with data_dir = "data" in its directory: from there, no token is needed."""
    monkeypatch.delenv("SEALGATE_ADMIN_TOKEN", raising=False)
    monkeypatch.chdir(daemon.dir)
    assert isinstance(await SecretStore.list(), list)


async def test_keywords_reach_the_daemon(daemon, monkeypatch):
    monkeypatch.setenv("SEALGATE_ADMIN_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SEALGATE_ADMIN_TOKEN", "wrong")
    store = await SecretStore.create(
        f"kw-{secrets.token_hex(4)}", api_url=daemon.url, api_key=daemon.token
    )
    assert await SecretStore.get(store["id"], api_url=daemon.url, api_key=daemon.token) == store


async def test_wrong_token_is_unauthorized(daemon):
    with pytest.raises(UnauthorizedError) as e:
        await SecretStore.list(api_key="not-the-token")
    assert (e.value.code, e.value.status) == ("unauthorized", 401)
    assert "not-the-token" not in str(e.value)


async def test_the_proxy_port_given_as_the_admin_api_is_named(daemon):
    """Both listeners are in the start-up summary; the proxy's own 407 advice concerns
    sandboxes' proxy URLs, so the SDK says which listener it reached."""
    import re

    text = (daemon.dir / "proxy.toml").read_text()
    port = re.search(r'\[proxy\]\nlisten = "127\.0\.0\.1:(\d+)"', text).group(1)
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SealgateError) as e:
        await SecretStore.list(api_url=url, api_key=daemon.token)
    assert (e.value.code, e.value.status) == ("proxy_auth_required", 407)
    assert f"{url} is sealgate's proxy listener, not its admin API" in e.value.message


async def test_no_daemon_is_a_connection_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SealgateConnectionError) as e:
        await SecretStore.list(api_url=url, api_key="t")
    assert e.value.code == "connection_failed"
    assert url in e.value.message and e.value.status is None
    assert e.value.__cause__ is None
    import httpx

    assert isinstance(e.value, httpx.TransportError), "an httpx.HTTPError, as opencomputer's"
    assert str(e.value.request.url) == f"{url}/v1/stores"
    import copy
    import pickle

    again = pickle.loads(pickle.dumps(e.value))  # multiprocessing workers pass errors on
    assert (type(again), again.code, again.message) == (type(e.value), e.value.code, e.value.message)
    assert copy.copy(e.value).request.url == e.value.request.url


async def test_connection_error_never_holds_the_value():
    value = "sk-unsent-" + secrets.token_hex(8)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SealgateConnectionError) as e:
        await SecretStore.set_secret("s", "K", value, api_url=url, api_key="t")
    assert value not in f"{e.value} {e.value!r} {e.value.args}"
    assert e.value.__cause__ is None and e.value.__context__ is None


async def test_a_token_read_with_its_line_break_works_and_a_broken_one_is_never_repeated(daemon):
    """The daemon's token file ends in a line break and ``open(...).read()`` keeps it: the SDK
    strips it. A token with a line break or control character inside cannot travel in a
    header; httpx's refusal quoted the whole ``Bearer`` header in the exception (outside pass)."""
    raw = (daemon.dir / "data" / "admin.token").read_text()
    assert raw.endswith("\n")
    assert isinstance(await SecretStore.list(api_key=raw), list)
    token = raw.strip()
    for broken in (token[:8] + "\n" + token[8:], token + "\x00x", token[:4] + "é" + token[4:]):
        with pytest.raises(SealgateError) as e:
            await SecretStore.list(api_key=broken)
        assert e.value.code == "invalid_token"
        text = f"{e.value} {e.value!r} {e.value.args}"
        assert token[:8] not in text and token[8:] not in text
        assert e.value.__cause__ is None and e.value.__context__ is None
    with pytest.raises(SealgateError) as e:
        _config.resolve(api_key=" \n")
    assert e.value.code == "missing_token"
