"""A real OTLP trace receiver for Meshgate's end-to-end tests: what arrives
is decoded with the official protobuf definitions (PyPI opentelemetry-proto)
and written as one JSON line per span to spans.jsonl in the working
directory.

    otlp_receiver.py server PORT http   OTLP/HTTP: POST /v1/traces,
                                        application/x-protobuf
    otlp_receiver.py server PORT grpc   OTLP/gRPC: TraceService/Export

A line: {"protocol", "service", "trace_id", "span_id", "parent", "name",
"kind", "status", "attributes": {...}, "events": [{"name", "attributes"}]}
(ids in lower-case hex; "parent" empty for a root span).
"""
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def record(req, protocol):
    lines = []
    for rs in req.resource_spans:
        service = attrs(rs.resource.attributes).get("service.name")
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "protocol": protocol,
                    "service": service,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "status": s.status.code,
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "attributes": attrs(s.attributes),
                    "events": [{"name": e.name, "attributes": attrs(e.attributes)} for e in s.events],
                }))
    with LOCK, open("spans.jsonl", "a") as f:
        for line in lines:
            f.write(line + "\n")


class Http(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(400)
            self.end_headers()
            return
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        record(req, "http")
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class Grpc(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        record(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    if len(sys.argv) < 4 or sys.argv[1] != "server":
        sys.exit(__doc__)
    port, protocol = int(sys.argv[2]), sys.argv[3]
    if protocol == "http":
        ThreadingHTTPServer(("127.0.0.1", port), Http).serve_forever()
    else:
        import grpc
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Grpc(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()


if __name__ == "__main__":
    main()
