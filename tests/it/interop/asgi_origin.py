# Interop origin for Hypercorn (its own h11/h2 stacks): every request is recorded as one JSON
# line in $INTEROP_LOG (what this origin received); /echo answers the same as JSON, /trailers
# sends HTTP trailers where the server supports them, /sse streams events, /reflect gives the
# request URL back the ways frameworks do.
import asyncio
import base64
import hashlib
import html
import json
import os
from urllib.parse import parse_qsl, urlencode
from xml.sax import saxutils

LOG = os.environ["INTEROP_LOG"]


def headers_of(scope):
    out = {}
    for k, v in scope["headers"]:
        out.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
    return out


async def read_body(receive):
    h, n = hashlib.sha256(), 0
    while True:
        msg = await receive()
        chunk = msg.get("body", b"")
        h.update(chunk)
        n += len(chunk)
        if not msg.get("more_body"):
            return n, h.hexdigest()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    n, sha = await read_body(receive)
    seen = {
        "method": scope["method"],
        "path": scope["path"],
        "version": scope["http_version"],
        "headers": headers_of(scope),
        "bytes": n,
        "sha256": sha,
    }
    with open(LOG, "a") as f:
        f.write(json.dumps(seen) + "\n")
    path = scope["path"]
    if path == "/echo":
        body = json.dumps(seen).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/reflect":
        # What a stock framework does with the request URL it got (sealgate percent-encoded a
        # query value into it), through the standard library's own encoders: Django's
        # redirect_to_login (urlencode({"next": full path}, safe="/")), a form encoder, a
        # session cookie holding the URL (base64 of JSON), and text escapers.
        qs = scope["query_string"].decode("latin-1")
        full = path + "?" + qs
        value = dict(parse_qsl(qs)).get("sig", "")
        nxt = urlencode({"next": full}, safe="/")
        session = base64.urlsafe_b64encode(json.dumps({"next": full}).encode()).decode()
        body = json.dumps({
            "next": nxt,
            "form": urlencode({"sig": value}),
            "text": html.escape(value, quote=False),
            "xml": saxutils.escape(value, {'"': "&quot;", "'": "&apos;"}),
            "session": session,
        }).encode()
        await send({"type": "http.response.start", "status": 302,
                    "headers": [(b"location", ("/login/?" + nxt).encode()),
                                (b"set-cookie", ("session=" + session).encode()),
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif path == "/trailers":
        trailers = "http.response.trailers" in scope.get("extensions", {})
        await send({"type": "http.response.start", "status": 200, "trailers": trailers,
                    "headers": [(b"content-type", b"text/plain"), (b"trailer", b"x-checksum")]})
        await send({"type": "http.response.body", "body": b"with trailers"})
        if trailers:
            await send({"type": "http.response.trailers",
                        "headers": [(b"x-checksum", b"sha-interop-1")], "more_trailers": False})
    elif path == "/sse":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(1, 6):
            await send({"type": "http.response.body", "body": f"data: event-{i}\n\n".encode(),
                        "more_body": i < 5})
            if i < 5:
                await asyncio.sleep(0.3)
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})
