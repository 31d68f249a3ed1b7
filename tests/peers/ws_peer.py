"""A real WebSocket server and client (the `websockets` package) for
Meshgate's end-to-end tests.

    ws_peer.py server PORT NAME
        Echo server on 127.0.0.1:PORT: answers each text message m with
        "NAME:m".

    ws_peer.py client URL MSG...
        Connects, sends each MSG, reads one answer per message, closes, and
        prints one JSON line: {"ok": true, "replies": [...]} or
        {"ok": false, "error": "..."}.
"""
import asyncio
import json
import sys


def serve(port, name):
    from websockets.asyncio.server import serve as ws_serve

    async def echo(ws):
        async for m in ws:
            await ws.send(f"{name}:{m}")

    async def main():
        async with ws_serve(echo, "127.0.0.1", port):
            print("serving", flush=True)
            await asyncio.get_running_loop().create_future()

    asyncio.run(main())


def client(url, msgs):
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=10, close_timeout=5) as ws:
            replies = []
            for m in msgs:
                ws.send(m)
                replies.append(ws.recv(timeout=10))
        return {"ok": True, "replies": replies}
    except Exception as e:  # the test reads the error
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        print(json.dumps(client(sys.argv[2], sys.argv[3:])))
