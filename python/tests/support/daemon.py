"""The real ``sealgate serve`` binary on free ports with a temp ``data_dir``, an
``[upstream] resolve`` override and the test CA, run from its temp directory so the SDK's
default token file (``data/admin.token`` relative to the cwd) is the daemon's own."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[3]


def binary() -> Path:
    """``SEALGATE_BIN``, else the newer of ``target/debug/sealgate`` and
    ``target/release/sealgate`` under ``CARGO_TARGET_DIR`` (default ``target``)."""
    explicit = os.environ.get("SEALGATE_BIN")
    if explicit:
        return Path(explicit).resolve()
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    built = [p for p in (target / "debug" / "sealgate", target / "release" / "sealgate") if p.exists()]
    if not built:
        raise RuntimeError(f"no sealgate binary under {target}: run `cargo build` or set SEALGATE_BIN")
    return max(built, key=lambda p: p.stat().st_mtime)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    dir: Path
    url: str
    token: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def config(dir: Path, resolve: Dict[str, str], ca_file: Path) -> str:
    admin, proxy = free_port(), free_port()
    table = ", ".join(f'"{k}" = "{v}"' for k, v in resolve.items())
    return f"""
data_dir = "data"
cert_dir = "certs"

[admin]
listen = "127.0.0.1:{admin}"

[proxy]
listen = "127.0.0.1:{proxy}"

[upstream]
resolve = {{ {table} }}
allow_private_cidrs = ["127.0.0.0/8"]
ca_files = ["{ca_file}"]

[log]
level = "info"
""", admin


def start(dir: Path, resolve: Dict[str, str], ca_file: Path) -> Daemon:
    """Starts the daemon in ``dir`` and waits until its admin API answers ``/healthz``."""
    text, admin = config(dir, resolve, ca_file)
    (dir / "proxy.toml").write_text(text)
    log = dir / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEALGATE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(binary()), "--config", "proxy.toml", "serve"],
            cwd=dir, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{admin}"
    _wait_healthy(url, proc, log)
    token = (dir / "data" / "admin.token").read_text().strip()
    return Daemon(dir=dir, url=url, token=token, proc=proc, log=log)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, secs: float = 60) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sealgate exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with opener.open(f"{url}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sealgate did not become healthy in {secs}s:\n{log.read_text(errors='replace')}")


def fake_secret(label: str) -> str:
    """A unique fake secret value (the suite greps the daemon log for every one it made)."""
    return f"sk-test-{label}-{secrets.token_hex(12)}"
