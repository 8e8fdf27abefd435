"""The SDK's exceptions: one base type carrying the admin API's error ``code``, ``message`` and
HTTP ``status``, with a subclass per condition callers branch on.

Invariant: no exception built here ever holds a request body, so a secret value passed to
``SecretStore.set_secret`` can never surface in a message, a ``repr`` or a traceback. The
daemon's own messages name secrets, never their values (DESIGN §5).
"""

from __future__ import annotations

from typing import Optional


class SealgateError(Exception):
    """A failed sealgate call.

    ``code`` is the API's machine code (``not_found``, ``conflict``, ``invalid_request``, …, or
    ``connection_failed`` when the daemon could not be reached), ``message`` its human text and
    ``status`` the HTTP status (None when no answer arrived).
    """

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(code, message, status)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        prefix = f"{self.status} " if self.status is not None else ""
        return f"{prefix}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, status={self.status!r})"


class InvalidInputError(SealgateError):
    """400: the request was refused as invalid (bad name, pattern, value, …)."""


class UnauthorizedError(SealgateError):
    """401: missing or wrong admin token."""


class NotFoundError(SealgateError):
    """404: no such store, secret, sandbox or route."""


class ConflictError(SealgateError):
    """409: a name is taken, or the operation conflicts with the sandbox's state."""


class SealgateConnectionError(SealgateError):
    """The admin API could not be reached (refused, timed out, or not speaking HTTP)."""


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


def from_status(status: int, code: str, message: str) -> SealgateError:
    """The exception for an error answer with ``status``."""
    return _BY_STATUS.get(status, SealgateError)(code, message, status)
