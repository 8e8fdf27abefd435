# Interop origin for gRPC (grpcio, the C-core implementation: its own h2 and HPACK): raw-bytes
# methods of the service `interop.Echo`, no generated code. Every call is recorded as one JSON
# line in $INTEROP_LOG (what this origin received: method, metadata, body). TLS with the test
# CA's leaf in $CERT/$KEY on 127.0.0.1:$PORT.
#   Unary   answers {"auth", "body"} and echoes `authorization` in a trailing metadata field
#   Stream  answers three messages, each carrying `authorization`, 200 ms apart
#   Gzip    answers as Unary, asking for its answer to be gzip-compressed
#   Deny    ends with PERMISSION_DENIED, `authorization` in its status message (a Trailers-Only
#           answer: status and message in the one HEADERS frame, no DATA)
import json
import os
import threading
import time
from concurrent import futures

import grpc

LOG = os.environ["INTEROP_LOG"]
LOCK = threading.Lock()


def record(method, request, context):
    md = {}
    for k, v in context.invocation_metadata():
        md.setdefault(k, []).append(v if isinstance(v, str) else v.decode("latin-1"))
    seen = {"method": method, "metadata": md, "body": request.decode("latin-1")}
    with LOCK, open(LOG, "a") as f:
        f.write(json.dumps(seen) + "\n")
    return (md.get("authorization") or [""])[0]


def unary(request, context, method="Unary", pad=""):
    auth = record(method, request, context)
    context.set_trailing_metadata((("x-echo-auth", auth),))
    return json.dumps({"auth": auth, "body": request.decode("latin-1"), "pad": pad}).encode()


def stream(request, context):
    auth = record("Stream", request, context)
    for i in range(3):
        yield json.dumps({"n": i, "auth": auth}).encode()
        time.sleep(0.2)


def gzip(request, context):
    # C-core sends a message uncompressed when gzip would not shrink it: pad it well past that.
    context.set_compression(grpc.Compression.Gzip)
    return unary(request, context, "Gzip", pad="x" * 4096)


def deny(request, context):
    auth = record("Deny", request, context)
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "key refused: " + auth)


def main():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Gzip": grpc.unary_unary_rpc_method_handler(gzip),
        "Deny": grpc.unary_unary_rpc_method_handler(deny),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("interop.Echo", handlers),))
    with open(os.environ["KEY"], "rb") as k, open(os.environ["CERT"], "rb") as c:
        creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
    server.add_secure_port("127.0.0.1:" + os.environ["PORT"], creds)
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
