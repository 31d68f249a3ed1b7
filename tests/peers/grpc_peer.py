"""A real gRPC server and client (grpcio, no generated code: messages are raw
bytes) for Meshgate's end-to-end tests.

    grpc_peer.py server PORT [NAME]
        Serves echo.Echo on 127.0.0.1:PORT (over TLS when NAME.crt and
        NAME.key are in the working directory):
          Say   (unary)          b"x" -> b"echo:x"; b"fail" -> NOT_FOUND;
                                 b"sleep:<ms>" waits first
          Count (server stream)  b"n" -> b"0" .. b"n-1", trailer x-trailer: yes
          Chat  (bidi stream)    each m -> b"re:" + m

    grpc_peer.py client TARGET METHOD PAYLOAD [TIMEOUT_S]
        Calls /echo.Echo/METHOD (or METHOD itself when it starts with '/')
        and prints one JSON line: {"ok", "reply", "trailers"} or
        {"ok": false, "code", "details", "trailers"}.
        Over TLS when GRPC_CA_FILE names the PEM of the roots to trust
        (GRPC_SERVER_NAME: the name to ask for by SNI and to verify).
"""
import json
import os
import sys
import time
from concurrent import futures

import grpc


def serve(port, name=None):
    def say(req, ctx):
        if req == b"fail":
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if req.startswith(b"sleep:"):
            time.sleep(int(req[6:]) / 1000)
        return b"echo:" + req

    def count(req, ctx):
        for i in range(int(req)):
            yield str(i).encode()
        ctx.set_trailing_metadata((("x-trailer", "yes"),))

    def chat(requests, ctx):
        for m in requests:
            yield b"re:" + m

    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("echo.Echo", handlers),)
    )
    if name and os.path.exists(f"{name}.crt"):
        with open(f"{name}.key", "rb") as k, open(f"{name}.crt", "rb") as c:
            creds = grpc.ssl_server_credentials(((k.read(), c.read()),))
        server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def channel(target):
    ca = os.environ.get("GRPC_CA_FILE")
    if not ca:
        return grpc.insecure_channel(target)
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    name = os.environ.get("GRPC_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, creds, options=options)


def call(target, method, payload, timeout):
    path = method if method.startswith("/") else f"/echo.Echo/{method}"
    with channel(target) as ch:
        try:
            if method == "Count":
                c = ch.unary_stream(path)(payload.encode(), timeout=timeout)
                reply = [m.decode() for m in c]
                trailers = dict(c.trailing_metadata() or ())
            elif method == "Chat":
                msgs = iter([p.encode() for p in payload.split(",")])
                c = ch.stream_stream(path)(msgs, timeout=timeout)
                reply = [m.decode() for m in c]
                trailers = dict(c.trailing_metadata() or ())
            else:
                r, c = ch.unary_unary(path).with_call(payload.encode(), timeout=timeout)
                reply = [r.decode()]
                trailers = dict(c.trailing_metadata() or ())
            return {"ok": True, "reply": reply, "trailers": trailers}
        except grpc.RpcError as e:
            return {
                "ok": False,
                "code": e.code().name,
                "details": e.details(),
                "trailers": dict(e.trailing_metadata() or ()),
            }


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
        print(json.dumps(call(sys.argv[2], sys.argv[3], sys.argv[4], timeout)))
