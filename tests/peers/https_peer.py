"""An HTTPS server for Meshgate's upstream-TLS tests (Python's ssl module,
an implementation independent of rustls).

    https_peer.py server PORT NAME
        Serves HTTPS on 127.0.0.1:PORT with NAME.crt and NAME.key from the
        working directory. Every GET gets 200, `x-served-by: NAME` and the
        JSON {"path", "sni", "tls"}: the request path, the server name the
        client asked for, and the TLS version.
"""
import http.server
import json
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps(
            {
                "path": self.path,
                "sni": getattr(self.connection, "sni", None),
                "tls": self.connection.version(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", self.server.name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def serve(port, name):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{name}.crt", f"{name}.key")

    def remember_sni(sock, server_name, _ctx):
        sock.sni = server_name

    ctx.sni_callback = remember_sni
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.name = name
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    print("serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[2]), sys.argv[3])
