#!/usr/bin/env python3
"""One tier of a frontend -> backend -> store chain for the kspan trace-context tests.

A ThreadingHTTPServer (one thread per connection, so a request's outgoing call is made by the
thread that read it) on 127.0.0.1 (port 0 unless --port), printing ``PORT <n>`` once listening.

GET /chain/<anything>: if --downstream URL is given, calls GET <URL>/chain/<anything> (a new
connection per call, forwarding no headers unless --forward-traceparent), then answers 200 with
the downstream body appended; without --downstream answers 200 "store".
"""

import argparse
import http.client
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        body = self.server.name.encode()
        if self.server.downstream:
            parts = urlsplit(self.server.downstream)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            headers = {}
            if self.server.forward_traceparent and self.headers.get("traceparent"):
                headers["traceparent"] = self.headers["traceparent"]
            conn.request("GET", self.path, headers=headers)
            reply = conn.getresponse()
            body += b" > " + reply.read()
            conn.close()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="tier")
    parser.add_argument("--downstream")
    parser.add_argument("--forward-traceparent", action="store_true")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.name = args.name
    server.downstream = args.downstream
    server.forward_traceparent = args.forward_traceparent
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
