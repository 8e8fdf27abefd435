# Interop origin for Hypercorn (its own h11/h2 stacks): every request is recorded as one JSON
# line in $INTEROP_LOG (what this origin received); /echo answers the same as JSON, /trailers
# sends HTTP trailers where the server supports them, /sse streams events.
import asyncio
import hashlib
import json
import os

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
