"""Every ``SecretStore`` method against the real daemon, including bad input."""

from __future__ import annotations

import secrets

import pytest

from conftest import remember_secret
from sealgate import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SealgateError,
    SecretStore,
)

pytestmark = pytest.mark.anyio


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


async def test_create_get_list_delete(daemon):
    name = unique("crud")
    store = await SecretStore.create(name=name, egress_allowlist=["api.example.test", "*.example.org"])
    assert store["name"] == name
    assert store["egress_allowlist"] == ["api.example.test", "*.example.org"]
    assert set(store) >= {"id", "name", "egress_allowlist", "created_at", "updated_at"}
    assert await SecretStore.get(store["id"]) == store
    assert store in await SecretStore.list()
    assert await SecretStore.delete(store["id"]) is None
    assert all(s["id"] != store["id"] for s in await SecretStore.list())
    with pytest.raises(NotFoundError) as e:
        await SecretStore.get(store["id"])
    assert (e.value.code, e.value.status) == ("not_found", 404)


async def test_create_positional_and_unrestricted(daemon):
    store = await SecretStore.create(unique("positional"))
    assert store["egress_allowlist"] is None
    empty = await SecretStore.create(unique("empty"), [])
    assert empty["egress_allowlist"] == []


async def test_update_is_partial(daemon):
    store = await SecretStore.create(unique("upd"), egress_allowlist=["a.example.test"])
    renamed = unique("renamed")
    after = await SecretStore.update(store["id"], name=renamed)
    assert (after["name"], after["egress_allowlist"]) == (renamed, ["a.example.test"])
    after = await SecretStore.update(store["id"], egress_allowlist=["b.example.test"])
    assert (after["name"], after["egress_allowlist"]) == (renamed, ["b.example.test"])
    # an explicit None is "unrestricted", not "unchanged"
    after = await SecretStore.update(store["id"], egress_allowlist=None)
    assert (after["name"], after["egress_allowlist"]) == (renamed, None)
    after = await SecretStore.update(store["id"])
    assert (after["name"], after["egress_allowlist"]) == (renamed, None)
    assert await SecretStore.get(store["id"]) == after


async def test_update_says_which_secrets_an_allowlist_strands(daemon):
    store = await SecretStore.create(unique("strand"), egress_allowlist=["a.example.test"])
    value = remember_secret("v-" + secrets.token_hex(8))
    await SecretStore.set_secret(store["id"], "UNBOUND", value)
    after = await SecretStore.update(store["id"], egress_allowlist=None)
    assert after["egress_allowlist"] is None, "made all the same"
    assert any("UNBOUND" in w and "never be unsealed" in w for w in after["warnings"])
    # opencomputer's None means "unchanged"; here it opens the store, and the answer says so
    assert any("may reach any public host" in w for w in after["warnings"]), after
    assert "warnings" not in await SecretStore.get(store["id"])


async def test_secrets_set_list_replace_delete(daemon):
    store = await SecretStore.create(unique("sec"), egress_allowlist=["api.example.test"])
    value = remember_secret("sk-store-test-" + secrets.token_hex(8))
    meta = await SecretStore.set_secret(store["id"], "API_KEY", value)
    assert meta["name"] == "API_KEY" and meta["allowed_hosts"] is None, meta
    assert value not in repr(meta) and "value" not in meta
    assert any("unsealed in request bodies" in w for w in meta["warnings"]), meta
    other = await SecretStore.set_secret(
        store["id"], "OTHER", remember_secret("v-" + secrets.token_hex(8)),
        allowed_hosts=["api.example.test"], locations=["header"],
    )
    assert (other["name"], other["locations"], other["warnings"]) == ("OTHER", ["header"], []), other
    listed = {s["name"]: s for s in await SecretStore.list_secrets(store["id"])}
    assert set(listed) == {"API_KEY", "OTHER"}
    assert listed["OTHER"]["allowed_hosts"] == ["api.example.test"]
    assert listed["OTHER"]["locations"] == ["header"]
    assert listed["API_KEY"]["allowed_hosts"] is None
    assert value not in repr(listed)
    assert all("value" not in s for s in listed.values())
    # replace
    await SecretStore.set_secret(store["id"], "API_KEY", value + "2", allowed_hosts=["api.example.test"])
    remember_secret(value + "2")
    listed = {s["name"]: s for s in await SecretStore.list_secrets(store["id"])}
    assert listed["API_KEY"]["allowed_hosts"] == ["api.example.test"]
    assert await SecretStore.delete_secret(store["id"], "OTHER") is None
    assert [s["name"] for s in await SecretStore.list_secrets(store["id"])] == ["API_KEY"]
    # Gone already: not an error, as in the opencomputer SDK.
    assert await SecretStore.delete_secret(store["id"], "OTHER") is None


async def test_unknown_store_is_not_found_everywhere(daemon):
    missing = "00000000-0000-4000-8000-000000000000"
    calls = [
        SecretStore.get(missing),
        SecretStore.update(missing, name=unique("x")),
        SecretStore.delete(missing),
        SecretStore.set_secret(missing, "K", remember_secret("v-" + secrets.token_hex(8))),
        SecretStore.list_secrets(missing),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as e:
            await call
        assert (e.value.code, e.value.status) == ("not_found", 404)
        assert isinstance(e.value, SealgateError)


async def test_errors_are_httpx_status_errors_as_opencomputers_are(daemon):
    """opencomputer's SDK raises ``httpx.HTTPStatusError`` (``raise_for_status``): ported
    handlers reading ``e.response.status_code`` keep working, and what the exception holds
    is the method, the URL and the API's error object, never the token or a value."""
    import httpx

    missing = "00000000-0000-4000-8000-000000000000"
    try:
        await SecretStore.get(missing)
    except httpx.HTTPStatusError as e:
        assert isinstance(e, NotFoundError)
        assert e.response.status_code == 404
        assert e.response.json()["error"]["code"] == "not_found"
        assert (e.request.method, e.request.url.path) == ("GET", f"/v1/stores/{missing}")
        assert "authorization" not in e.request.headers
    else:
        raise AssertionError("no error")
    store = await SecretStore.create(unique("httpx"), egress_allowlist=["api.example.test"])
    bad = remember_secret("sk-httpx-" + secrets.token_hex(8))
    with pytest.raises(httpx.HTTPStatusError) as e:
        await SecretStore.set_secret(store["id"], "K", bad + "\n")
    assert e.value.response.status_code == 400
    assert bad not in e.value.response.text and e.value.request.content == b""


async def test_opencomputer_positional_arguments(daemon):
    """Code written for the opencomputer SDK passes ``api_key`` and ``api_url`` positionally
    after each method's own arguments, ``name=""`` to leave a name, and deletes secrets that
    may be gone: all of it runs unchanged."""
    key, url = daemon.token, daemon.url
    name = unique("oc")
    store = await SecretStore.create(name, ["api.example.test"], key, url)
    sid = store["id"]
    assert await SecretStore.get(sid, key, url) == store
    assert store in await SecretStore.list(key, url)
    value = remember_secret("v-" + secrets.token_hex(8))
    answer = await SecretStore.set_secret(sid, "K", value, ["api.example.test"], key, url)
    assert set(answer["locations"]) == {"header", "body"}
    assert [s["name"] for s in await SecretStore.list_secrets(sid, key, url)] == ["K"]
    updated = await SecretStore.update(sid, "", ["api.example.test", "x.example.test"], key, url)
    assert updated["name"] == name, "an empty name leaves the name"
    updated = await SecretStore.update(sid, None, api_key=key, api_url=url)
    assert updated["name"] == name, "so does None"
    assert updated["egress_allowlist"] == ["api.example.test", "x.example.test"]
    assert await SecretStore.delete_secret(sid, "K", key, url) is None
    assert await SecretStore.delete_secret(sid, "K", key, url) is None
    with pytest.raises(TypeError):
        await SecretStore.set_secret(sid, "K", value, None, key, url, ["header"])
    assert await SecretStore.delete(sid, key, url) is None


async def test_dot_names_and_ids_stay_in_their_segment(daemon):
    """``..`` as a secret name once resolved to the store's own path: delete_secret deleted
    the store. Names and ids are one path segment each, whatever they hold."""
    store = await SecretStore.create(unique("dots"), egress_allowlist=["api.example.test"])
    await SecretStore.set_secret(store["id"], "KEEP", remember_secret("v-" + secrets.token_hex(8)))
    for name in ["..", ".", "../..", "KEEP/..", "KEEP?x", "KEEP#x"]:
        # Refused, or not found (which delete_secret does not raise): never the store's path.
        try:
            await SecretStore.delete_secret(store["id"], name)
        except InvalidInputError:
            pass
        with pytest.raises(InvalidInputError):
            await SecretStore.set_secret(store["id"], name, remember_secret("v-" + secrets.token_hex(8)))
    for store_id in ["..", ".", f"{store['id']}/.."]:
        with pytest.raises(NotFoundError):
            await SecretStore.get(store_id)
    assert (await SecretStore.get(store["id"]))["id"] == store["id"]
    assert [s["name"] for s in await SecretStore.list_secrets(store["id"])] == ["KEEP"]


async def test_empty_name_is_invalid_input(daemon):
    with pytest.raises(InvalidInputError) as e:
        await SecretStore.create(name="")
    assert (e.value.code, e.value.status) == ("invalid_request", 400)
    assert e.value.message


async def test_duplicate_name_is_conflict(daemon):
    name = unique("dup")
    await SecretStore.create(name=name)
    with pytest.raises(ConflictError) as e:
        await SecretStore.create(name=name)
    assert (e.value.code, e.value.status) == ("conflict", 409)
    other = await SecretStore.create(name=unique("dup2"))
    with pytest.raises(ConflictError):
        await SecretStore.update(other["id"], name=name)


async def test_bad_patterns_and_secret_input_are_invalid(daemon):
    with pytest.raises(InvalidInputError):
        await SecretStore.create(unique("bad"), egress_allowlist=["a.*.example.com"])
    store = await SecretStore.create(unique("badsec"), egress_allowlist=["api.example.test"])
    with pytest.raises(InvalidInputError):
        await SecretStore.update(store["id"], egress_allowlist=["*x.example.com"])
    with pytest.raises(InvalidInputError):
        await SecretStore.set_secret(store["id"], "not-an-env-name", remember_secret("v-" + secrets.token_hex(8)))
    with pytest.raises(InvalidInputError):
        await SecretStore.set_secret(store["id"], "K", remember_secret("v-" + secrets.token_hex(8)), locations=["cookie"])


async def test_secret_value_never_in_an_exception(daemon):
    store = await SecretStore.create(unique("noleak"), egress_allowlist=["api.example.test"])
    bad = remember_secret("sk-leak-" + secrets.token_hex(8)) + "\r\n"  # refused: CR/LF in a value
    with pytest.raises(InvalidInputError) as e:
        await SecretStore.set_secret(store["id"], "K", bad)
    raw = bad.strip()
    for text in (str(e.value), repr(e.value), e.value.message, repr(e.value.args)):
        assert raw not in text
    assert e.value.__cause__ is None and e.value.__context__ is None


async def test_single_string_lists_are_refused_client_side(daemon):
    with pytest.raises(TypeError):
        await SecretStore.create(unique("str"), egress_allowlist="api.example.test")


async def test_a_wrong_api_url_is_not_taken_for_already_deleted(daemon):
    """The idempotent deletes swallow only the daemon's own "not there" (``not_found``): a
    wrong ``api_url`` gets a 404 too (no such route), and a revocation sent there must fail
    loudly instead of passing for done."""
    store = await SecretStore.create(unique("wrongurl"), egress_allowlist=["api.example.test"])
    await SecretStore.set_secret(store["id"], "K", remember_secret("v-" + secrets.token_hex(8)))
    wrong = daemon.url.rstrip("/") + "/v1"  # the SDK adds /v1 itself
    with pytest.raises(NotFoundError) as e:
        await SecretStore.delete_secret(store["id"], "K", api_url=wrong)
    assert (e.value.code, e.value.status) == ("no_such_route", 404)
    assert [s["name"] for s in await SecretStore.list_secrets(store["id"])] == ["K"]
    assert await SecretStore.delete_secret(store["id"], "K") is None
    assert await SecretStore.delete_secret(store["id"], "K") is None


async def test_a_value_passed_as_the_name_is_refused_before_it_is_sent(daemon):
    """``set_secret(store, VALUE, NAME)`` by mistake: the value would travel in the URL, which
    HTTP client logs print. It is refused before any request (here: to an address where
    nothing listens) and not repeated in the error."""
    value = remember_secret("sk-swapped-" + secrets.token_hex(12))
    nowhere = "http://127.0.0.1:9"
    for call in (
        SecretStore.set_secret("any-store", value, "K", api_key="t", api_url=nowhere),
        SecretStore.delete_secret("any-store", value, api_key="t", api_url=nowhere),
    ):
        with pytest.raises(InvalidInputError) as e:
            await call
        assert e.value.code == "invalid_request"
        assert value not in str(e.value) and value not in repr(e.value)
        # refused before sending: no status, but a ported `e.response.status_code` works
        assert (e.value.status, e.value.response.status_code) == (None, 400)
        assert value not in e.value.response.text and value not in str(e.value.request.url)


async def raw_put_secret(daemon, store_id: str, name: str, value: str):
    """``PUT /v1/stores/{id}/secrets/{name}`` without the SDK: (status, body text)."""
    import httpx

    async with httpx.AsyncClient() as c:
        r = await c.put(
            f"{daemon.url}/v1/stores/{store_id}/secrets/{name}",
            json={"value": value},
            headers={"Authorization": f"Bearer {daemon.token}"},
        )
    return r.status_code, r.text


async def test_a_credential_shaped_like_a_variable_name_is_refused_as_a_name(daemon):
    """Many credentials are valid variable names (``ghp_…``, ``sk_live_…``, ``AKIA…``): passed
    as the name, such a value would become an environment variable's name in every sandbox,
    and appear in the audit log and ``secret list``. The SDK refuses it before sending, the
    daemon refuses it too (for other clients), and neither repeats it."""
    store = await SecretStore.create(unique("swap"), egress_allowlist=["api.example.test"])
    values = [
        remember_secret("ghp_" + secrets.token_hex(18)),
        remember_secret("sk_live_" + "aB3" * 9),
        remember_secret("AKIA" + "ABCDEFGH2345WXYZ"),
    ]
    nowhere = "http://127.0.0.1:9"  # refused before anything is sent
    for value in values:
        with pytest.raises(InvalidInputError) as e:
            await SecretStore.set_secret(store["id"], value, "K", api_key="t", api_url=nowhere)
        assert "swapped" in str(e.value) and value not in str(e.value)
    # The daemon's own check, for clients without the SDK's.
    status, body = await raw_put_secret(daemon, store["id"], values[0], "GITHUB_TOKEN")
    assert status == 400 and values[0] not in body and "swapped" in body, (status, body)
    assert await SecretStore.list_secrets(store["id"]) == []
    ok = await SecretStore.set_secret(store["id"], "ANTHROPIC_API_KEY", values[0])
    assert ok["name"] == "ANTHROPIC_API_KEY"
    # A token prefix followed by one single-case word is a variable name (npm reads these).
    ok = await SecretStore.set_secret(store["id"], "npm_configuserconfig", values[1])
    assert ok["name"] == "npm_configuserconfig"


async def test_a_body_over_the_limit_is_a_clear_error_not_a_lost_connection(daemon):
    # 8 MiB of patterns: the daemon answers 413 from the head while the client still writes;
    # the rest is read and dropped, so the SDK sees the answer (it raised "cannot reach the
    # sealgate admin API: ReadError" before).
    patterns = [f"h{i}.example.test" for i in range(400_000)]
    with pytest.raises(SealgateError) as e:
        await SecretStore.create(unique("huge"), egress_allowlist=patterns)
    assert e.value.code == "request_too_large", (e.value.code, e.value.message)


async def test_a_value_python_cannot_encode_is_refused_without_repeating_it(daemon):
    """Python decodes a non-UTF-8 byte of an environment variable with ``surrogateescape``:
    httpx's ``UnicodeEncodeError`` held the whole JSON body, value included, in its ``repr``
    (outside pass). The SDK encodes the body itself and names the position only."""
    store = await SecretStore.create(unique("surrogate"), egress_allowlist=["api.example.test"])
    value = remember_secret("sk-latin1-" + secrets.token_hex(8)) + "\udce9tail"
    with pytest.raises(InvalidInputError) as e:
        await SecretStore.set_secret(store["id"], "K", value)
    assert e.value.code == "invalid_request" and "not valid UTF-8" in e.value.message
    for text in (str(e.value), repr(e.value), repr(e.value.args)):
        assert value[:20] not in text
    assert e.value.__cause__ is None and e.value.__context__ is None
    assert await SecretStore.list_secrets(store["id"]) == []


async def test_an_id_python_cannot_encode_is_refused_without_repeating_it(daemon):
    """A value with a non-UTF-8 byte passed where the store id goes (arguments swapped) raised
    a bare UnicodeEncodeError holding it while the URL was built (re-check)."""
    value = "sk-latin1-" + secrets.token_hex(8) + "\udce9"
    with pytest.raises(InvalidInputError) as e:
        await SecretStore.set_secret(value, "K", "v")
    assert value[:20] not in f"{e.value} {e.value!r} {e.value.args}"
    assert e.value.__cause__ is None and e.value.__context__ is None
