"""Where the daemon is and how to authenticate: keyword arguments first, then
``SEALGATE_ADMIN_URL`` / ``SEALGATE_ADMIN_TOKEN``, then the defaults the ``sealgate`` CLI uses
without ``--config`` (``http://127.0.0.1:7070`` and the token file ``data/admin.token`` relative to
the current directory, the daemon's default ``data_dir``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import SealgateError

DEFAULT_URL = "http://127.0.0.1:7070"
DEFAULT_TOKEN_FILE = Path("data") / "admin.token"


@dataclass(frozen=True)
class Config:
    """A resolved daemon address and token. The token never appears in ``repr``."""

    api_url: str
    api_key: str = field(repr=False)


def resolve(api_url: Optional[str] = None, api_key: Optional[str] = None) -> Config:
    """Resolves the configuration for one call.

    Raises ``SealgateError`` (code ``missing_token``) when no token is given, set or readable.
    """
    url = api_url or os.environ.get("SEALGATE_ADMIN_URL") or DEFAULT_URL
    key = api_key or os.environ.get("SEALGATE_ADMIN_TOKEN") or _token_from_file()
    return Config(api_url=url.rstrip("/"), api_key=_sendable(key))


def _sendable(key: str) -> str:
    """``key`` without surrounding whitespace (the daemon's token file ends in a line break, and
    ``open(...).read()`` keeps it), refused if what is left cannot travel in a header. The
    message never repeats the key: httpx's own refusal quoted the whole ``Bearer`` header."""
    if not isinstance(key, str):
        raise TypeError(f"api_key must be a str, got {type(key).__name__}")
    key = key.strip()
    if not key:
        raise SealgateError("missing_token", "the admin token given is empty (or only whitespace)")
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise SealgateError(
            "invalid_token",
            f"the admin token ({len(key)} characters, not repeated) holds a character a header "
            "cannot carry (a space, line break or other control character, or a non-ASCII "
            "character inside it)",
        )
    return key


def _token_from_file() -> str:
    try:
        token = DEFAULT_TOKEN_FILE.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SealgateError(
            "missing_token",
            f"no api_key given, SEALGATE_ADMIN_TOKEN unset, and cannot read "
            f"{DEFAULT_TOKEN_FILE.resolve()}: {e.strerror}",
        ) from None
    if not token:
        raise SealgateError("missing_token", f"{DEFAULT_TOKEN_FILE.resolve()} is empty")
    return token
