"""Session fixtures: a test PKI, an HTTPS echo origin standing in for ``api.anthropic.com``, and
the real ``sealgate serve`` binary configured to reach it (``[upstream] resolve``,
``allow_private_cidrs``, ``ca_files``). The daemon's address and token are exported as
``SEALGATE_ADMIN_URL`` / ``SEALGATE_ADMIN_TOKEN`` so SDK calls need no keywords, exactly as in the
README example. At the end the daemon is stopped and its log is checked for every fake secret
value the suite used: none may appear.

Async tests run on anyio's pytest plugin (anyio ships with httpx), on asyncio.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest

from support import daemon as daemon_mod
from support import origin as origin_mod
from support import pki as pki_mod

ORIGIN_NAMES = ["api.anthropic.com", "api.example.test"]

#: Every secret value the suite hands to the daemon; none may appear in its log.
SECRET_VALUES: List[str] = []


def remember_secret(value: str) -> str:
    SECRET_VALUES.append(value)
    return value


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A world-traversable temp dir (0755): commands run as ``nobody`` must reach the CA
    certificate files under it (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sealgate-sdk-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def origin(workdir: Path) -> Iterator[origin_mod.Origin]:
    pki_dir = workdir / "pki"
    pki_dir.mkdir()
    pki = pki_mod.make(pki_dir, ORIGIN_NAMES)
    o = origin_mod.start(pki)
    o.ca_cert = pki.ca_cert  # type: ignore[attr-defined]
    yield o
    o.close()


@pytest.fixture(scope="session")
def daemon(workdir: Path, origin: origin_mod.Origin) -> Iterator[daemon_mod.Daemon]:
    run_dir = workdir / "daemon"
    run_dir.mkdir()
    resolve = {name: f"127.0.0.1:{origin.port}" for name in ORIGIN_NAMES}
    d = daemon_mod.start(run_dir, resolve, origin.ca_cert)  # type: ignore[attr-defined]
    saved = {k: os.environ.get(k) for k in ("SEALGATE_ADMIN_URL", "SEALGATE_ADMIN_TOKEN")}
    os.environ["SEALGATE_ADMIN_URL"], os.environ["SEALGATE_ADMIN_TOKEN"] = d.url, d.token
    try:
        yield d
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        code = d.stop()
        log = d.log_text()
        leaked = [v for v in SECRET_VALUES if v in log]
        assert not leaked, f"{len(leaked)} secret value(s) appear in the daemon log"
        assert code == 0, f"sealgate exited with {code} on SIGTERM:\n{log[-4000:]}"
