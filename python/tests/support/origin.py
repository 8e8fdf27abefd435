"""An HTTPS echo origin (Python ``http.server`` + ``ssl``) that records every request it
receives and answers with a JSON echo of its method, path, headers and body — the stand-in for
``api.anthropic.com`` that shows what the proxy forwarded and lets the response scrubber act."""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List

from .pki import Pki


@dataclass
class Received:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes


@dataclass
class Origin:
    port: int
    received: List[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer = None  # type: ignore[assignment]

    def snapshot(self) -> List[Received]:
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(origin: "Origin"):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _echo(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            rec = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            with origin.lock:
                origin.received.append(rec)
            answer = json.dumps(
                {"method": rec.method, "path": rec.path, "headers": rec.headers,
                 "body": body.decode("utf-8", "replace")}
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _echo

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

    return Handler


def start(pki: Pki) -> Origin:
    """Serves on 127.0.0.1, a free port, in a daemon thread."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.leaf_cert), str(pki.leaf_key))
    ctx.set_alpn_protocols(["http/1.1"])
    origin = Origin(port=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(origin))
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    origin.server, origin.port = server, server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return origin
