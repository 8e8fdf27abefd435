"""The one place that talks HTTP to the admin API and turns its answers into values or
``SealgateError``s.

Each call opens its own short-lived ``httpx.AsyncClient`` (sharing one TLS context): the static
``SecretStore`` methods may be awaited from any event loop, and a pooled client is bound to the
loop that created it. On loopback a connection costs well under a millisecond.

Invariant: exceptions raised here are built from the status and the API's JSON error object
only; request bodies (which may hold a secret value) are never copied into them, and transport
exceptions are not chained (``from None``), so nothing reachable from the exception holds the
request.
"""

from __future__ import annotations

import functools
import json as jsonlib
import ssl
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional
from urllib.parse import quote

import httpx

from ._config import Config
from .errors import InvalidInputError, SealgateConnectionError, SealgateError, from_status

#: Seconds an ordinary admin call may take (connect, send, answer).
DEFAULT_TIMEOUT = 30.0


def seg(value: str) -> str:
    """``value`` quoted as one path segment: a ``/``, ``?`` or ``#`` in an id or name cannot
    reach another route, and ``.`` is quoted too, so ``..`` stays a name (which the API
    refuses) instead of a dot segment that httpx would resolve (``/secrets/..`` is the store)."""
    if not isinstance(value, str):
        raise TypeError(f"expected a str id or name, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return quote(value, safe="").replace(".", "%2E")
    # Outside the handler: the UnicodeEncodeError held the whole text (a value passed as an
    # id by mistake), and raised inside it, it would be this error's __context__.
    raise InvalidInputError(
        "invalid_request",
        f"an id or name ({len(value)} characters, not repeated: it could be a value) holds text "
        "that is not valid UTF-8 (a lone surrogate)",
    )


def _headers(cfg: Config, accept: str = "application/json", json_body: bool = False) -> dict:
    headers = {"authorization": f"Bearer {cfg.api_key}", "accept": accept}
    if json_body:
        headers["content-type"] = "application/json"
    return headers


def _encoded(body: Any) -> Optional[bytes]:
    """``body`` as UTF-8 JSON, encoded here rather than by httpx: a string Python decoded with
    ``surrogateescape`` (an environment variable or file name holding a non-UTF-8 byte) cannot
    be encoded, and httpx's ``UnicodeEncodeError`` carried the whole body, value included, in
    its ``repr``. The error raised instead names the position only."""
    if body is None:
        return None
    text = jsonlib.dumps(body, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        at = e.start
    raise InvalidInputError(
        "invalid_request",
        f"the request holds text that is not valid UTF-8 at character {at} of its JSON body (a "
        "lone surrogate: Python decodes a non-UTF-8 byte of an environment variable or file "
        "name that way); its text is not repeated. Pass bytes decoded as the value really is",
    )


@functools.lru_cache(maxsize=None)
def _tls() -> ssl.SSLContext:
    """One TLS context for every client (system trust store, used only for an ``https``
    admin URL): building one per client costs 10–200 ms, more than the call itself."""
    return ssl.create_default_context()


def _client(cfg: Config, timeout: Optional[float]) -> httpx.AsyncClient:
    """A client for one call. ``trust_env=False``: ``HTTP(S)_PROXY`` must never carry the admin
    token elsewhere."""
    return httpx.AsyncClient(base_url=cfg.api_url, timeout=timeout, trust_env=False, verify=_tls())


def _url(cfg: Config, path: str) -> str:
    return cfg.api_url.rstrip("/") + path


def _transport_error(cfg: Config, e: Exception, method: str, path: str) -> SealgateError:
    url = _url(cfg, path)
    if isinstance(e, httpx.TimeoutException):
        return SealgateConnectionError(
            "timeout", f"the sealgate admin API at {cfg.api_url} did not answer in time", method, url
        )
    if isinstance(e, httpx.LocalProtocolError):
        # The client refused to send what it was given; its text quotes the offending header
        # or body (the admin token, a value): never repeated.
        return SealgateConnectionError(
            "invalid_request",
            f"the request to the sealgate admin API at {cfg.api_url} could not be sent: the HTTP "
            f"client refused it ({type(e).__name__}; its text is not repeated, it could hold "
            "the admin token or a value)",
            method,
            url,
        )
    detail = str(e) or type(e).__name__
    return SealgateConnectionError(
        "connection_failed",
        f"cannot reach the sealgate admin API at {cfg.api_url}: {detail}",
        method,
        url,
    )


def _error_from(
    cfg: Config, status: int, body: bytes, reason: str, method: str, path: str
) -> SealgateError:
    """The exception for an error answer: the API's ``{"error": {"code", "message"}}``, or the
    status and reason phrase when the body is not that (never the raw body). The proxy's 407
    means ``api_url`` is sealgate's proxy listener, not its admin API: said so."""
    try:
        err = jsonlib.loads(body)["error"]
        code, message = str(err["code"]), str(err.get("message", ""))
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{status}", reason or "unexpected answer"
    if (status, code) == (407, "proxy_auth_required"):
        message = (
            f"{cfg.api_url} is sealgate's proxy listener, not its admin API (that one listens "
            "on [admin] listen, by default http://127.0.0.1:7070)"
        )
    return from_status(status, code, message, method, _url(cfg, path))


def _decode(resp: httpx.Response) -> Any:
    if resp.status_code == 204 or not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        raise SealgateError(
            "bad_response", "the admin API answered with invalid JSON", resp.status_code
        ) from None


async def call(
    cfg: Config,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
) -> Any:
    """Calls ``method path`` with an optional JSON body and returns the decoded answer (None for
    204). Raises ``SealgateError`` or a subclass."""
    failure: Optional[SealgateError] = None
    content = _encoded(body)
    try:
        async with _client(cfg, timeout) as client:
            headers = _headers(cfg, json_body=content is not None)
            resp = await client.request(method, path, headers=headers, content=content)
    except httpx.HTTPError as e:
        failure = _transport_error(cfg, e, method, path)
    if failure is not None:
        raise failure  # outside the handler: no __context__ reaching the request
    if resp.is_success:
        return _decode(resp)
    raise _error_from(cfg, resp.status_code, resp.content, resp.reason_phrase, method, path)


@asynccontextmanager
async def stream(
    cfg: Config, method: str, path: str, body: Any, *, timeout: Optional[float]
) -> AsyncIterator[httpx.Response]:
    """Like ``call`` with ``Accept: text/event-stream``; yields the open response (status
    already checked) for the caller to read incrementally."""
    failure: Optional[SealgateError] = None
    content = _encoded(body)
    try:
        async with _client(cfg, timeout) as client:
            async with client.stream(
                method,
                path,
                headers=_headers(cfg, "text/event-stream", content is not None),
                content=content,
            ) as resp:
                if not resp.is_success:
                    content = await resp.aread()
                    raise _error_from(
                        cfg, resp.status_code, content, resp.reason_phrase, method, path
                    )
                yield resp
    except SealgateError:
        raise  # an error answer above: already ours (and an httpx.HTTPError too)
    except httpx.HTTPError as e:
        failure = _transport_error(cfg, e, method, path)
    if failure is not None:
        raise failure
