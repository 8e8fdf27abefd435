"""The SDK's exceptions: one base type carrying the admin API's error ``code``, ``message`` and
HTTP ``status``, with a subclass per condition callers branch on.

Invariant: no exception built here ever holds a request body, so a secret value passed to
``SecretStore.set_secret`` can never surface in a message, a ``repr`` or a traceback. The
daemon's own messages name secrets, never their values (DESIGN §5).
"""

from __future__ import annotations

from typing import Optional

import httpx


class SealgateError(Exception):
    """A failed sealgate call.

    ``code`` is the API's machine code (``not_found``, ``conflict``, ``invalid_request``, …, or
    ``connection_failed`` when the daemon could not be reached), ``message`` its human text and
    ``status`` the HTTP status (None when no answer arrived).
    """

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        # Not super(): an error answer is also an ``httpx.HTTPStatusError``, whose __init__
        # takes other arguments (``SealgateHTTPError`` sets its request and response).
        Exception.__init__(self, code, message, status)
        self.code = code
        self.message = message
        self.status = status
        self._init_args: tuple = (code, message, status)

    def __reduce__(self):
        # Rebuilt from the strings it was made of (pickle, copy, multiprocessing): the default
        # passed ``args`` to subclasses whose ``__init__`` takes other ones (review).
        return (type(self), self._init_args)

    def __str__(self) -> str:
        prefix = f"{self.status} " if self.status is not None else ""
        return f"{prefix}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, status={self.status!r})"


def _request(method: str, url: str) -> httpx.Request:
    """The request an error names: method and URL only. Never its headers (the admin token)
    nor its body (a secret value)."""
    return httpx.Request(method, url)


class SealgateHTTPError(SealgateError, httpx.HTTPStatusError):
    """An error answer of the admin API. Also an ``httpx.HTTPStatusError``, as the
    opencomputer SDK's ``raise_for_status()`` raises, so ported ``except
    httpx.HTTPStatusError as e: e.response.status_code`` handlers keep working: ``request``
    holds only the method and URL, ``response`` the status and the API's error object. Input
    the SDK refuses before sending anything has ``status`` None and a ``response`` of 400."""

    def __init__(
        self,
        code: str,
        message: str,
        status: Optional[int] = None,
        method: str = "GET",
        url: str = "http://sealgate.invalid/",
    ) -> None:
        SealgateError.__init__(self, code, message, status)
        self._init_args = (code, message, status, method, url)
        # Input refused before sending has no status: its response says 400, as the daemon's
        # would (ported `e.response.status_code` handlers crashed on None: re-check).
        self._request = _request(method, url)
        error = {"error": {"code": code, "message": message}}
        self.response = httpx.Response(status or 400, json=error, request=self._request)

    @property
    def request(self) -> httpx.Request:  # type: ignore[override]
        """The request answered (method and URL only)."""
        return self._request

    @request.setter
    def request(self, request: httpx.Request) -> None:
        self._request = request


class InvalidInputError(SealgateHTTPError):
    """400: the request was refused as invalid (bad name, pattern, value, …)."""


class UnauthorizedError(SealgateHTTPError):
    """401: missing or wrong admin token."""


class NotFoundError(SealgateHTTPError):
    """404: no such store, secret, sandbox or route."""


class ConflictError(SealgateHTTPError):
    """409: a name is taken, or the operation conflicts with the sandbox's state."""


class SealgateConnectionError(SealgateError, httpx.TransportError):
    """The admin API could not be reached (refused, timed out, or not speaking HTTP). Also an
    ``httpx.TransportError`` (so an ``httpx.HTTPError``), as opencomputer code expects of a
    call that got no answer; its ``request`` holds only the method and URL."""

    def __init__(
        self,
        code: str,
        message: str,
        method: str = "GET",
        url: str = "http://sealgate.invalid/",
    ) -> None:
        SealgateError.__init__(self, code, message, None)
        self._init_args = (code, message, method, url)
        self.request = _request(method, url)


_BY_STATUS = {
    400: InvalidInputError,
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
}


def gone(error: NotFoundError) -> bool:
    """True if ``error`` is the daemon saying the store, secret or sandbox is not there (code
    ``not_found``), not a 404 for a route it does not have or from another server — which is
    what a wrong ``api_url`` gets, and must not pass for "already deleted"."""
    return error.code == "not_found"


def from_status(
    status: int, code: str, message: str, method: str = "GET", url: str = "http://sealgate.invalid/"
) -> SealgateHTTPError:
    """The exception for an error answer with ``status`` to ``method url``."""
    return _BY_STATUS.get(status, SealgateHTTPError)(code, message, status, method, url)
