#!/usr/bin/env python3
"""Tiny HTTP/1.x server used by the kspan end-to-end tests.

Binds 127.0.0.1 (port 0 unless --port is given) and prints ``PORT <n>`` on
stdout, flushed, once the socket is listening. Keep-alive (HTTP/1.1) by
default; ``--http10`` switches to HTTP/1.0 (one request per connection).
One thread per connection; the listen backlog takes 1024 connections at once.
``--nofile N`` raises the open-file limit to N first (1,000 connections held
open need more than the usual 1024). ``--tls CERT KEY`` serves HTTPS (Python's
``ssl``: Debian's libssl.so.3) with that certificate and key.

Routes (every response carries Content-Length):
  GET  /ok           200 "ok\\n"
  GET  /users/<id>   200 JSON {"id": "<id>", "name": "user-<id>"}
  GET  /missing      404
  GET  /fail         500
  POST /upload       reads exactly Content-Length body bytes, 200 {"received": N}
  GET  /private/...  200 "private\\n" with "Set-Cookie: t=SECRET5" (privacy tests: a secret only
                     the response carries)
  anything else      404 (GET /upload: 405)

Request logging is silenced so stderr only ever shows real errors.
"""

import argparse
import json
import resource
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kspan-e2e/1"

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def _send(self, code, body, content_type="text/plain", extra_headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(code)
        for name, value in extra_headers:
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _path(self):
        return urlsplit(self.path).path

    def do_GET(self):
        path = self._path()
        if path == "/ok":
            self._send(200, "ok\n")
        elif path.startswith("/users/") and len(path) > len("/users/") and "/" not in path[len("/users/"):]:
            uid = path[len("/users/"):]
            self._send(200, json.dumps({"id": uid, "name": "user-" + uid}) + "\n", "application/json")
        elif path.startswith("/private/"):
            self._send(200, "private\n", extra_headers=[("Set-Cookie", "t=SECRET5")])
        elif path == "/missing":
            self._send(404, "not found\n")
        elif path == "/fail":
            self._send(500, "internal error\n")
        elif path == "/upload":
            self._send(405, "method not allowed\n")
        else:
            self._send(404, "not found\n")

    def do_POST(self):
        path = self._path()
        if path != "/upload":
            # Drain the body so a keep-alive connection stays in sync.
            self._read_body()
            self._send(404, "not found\n")
            return
        received = self._read_body()
        self._send(200, json.dumps({"received": received}), "application/json")

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        return length - remaining


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of connections would wait for SYN retries.
    request_queue_size = 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--http10", action="store_true", help="speak HTTP/1.0 (no keep-alive)")
    parser.add_argument("--nofile", type=int, default=0, help="raise RLIMIT_NOFILE to this")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS")
    args = parser.parse_args()

    if args.nofile:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < args.nofile:
            sys.exit("--nofile %d: the hard limit is %d" % (args.nofile, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, args.nofile), hard))

    if args.http10:
        Handler.protocol_version = "HTTP/1.0"

    server = Server(("127.0.0.1", args.port), Handler)
    if args.tls:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls[0], args.tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stdout.write("PORT %d\n" % server.server_address[1])
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
