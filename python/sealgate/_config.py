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
    return Config(api_url=url.rstrip("/"), api_key=key)


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
