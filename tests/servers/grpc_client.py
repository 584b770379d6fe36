#!/usr/bin/env python3
"""gRPC test client for kspan's end-to-end tests (grpcio, no generated code).

Usage: grpc_client.py --port P --calls SPEC[,SPEC...] [--calls ...] [--traceparent V] [--wait]
                      [--tls-ca CERT]

Calls `acc.Shop` of grpc_server.py on 127.0.0.1:P, in the order given, all on ONE channel (one
HTTP/2 connection), with raw bytes as messages. SPEC is one of

  unary:ok        GetItem(b"ok"), expects OK
  unary:internal  GetItem(b"internal"), expects INTERNAL
  unary:notfound  GetItem(b"notfound"), expects NOT_FOUND
  unary:slow      GetItem(b"slow") (0.2 s handler), expects OK
  unary:big       GetItem(b"big"): a 256 KiB reply, expects OK
  unary:deadline  GetItem(b"sleep") (2 s handler) with a 0.3 s deadline, expects DEADLINE_EXCEEDED
  server_stream   ListItems(b"list"), expects OK and 3 messages
  client_stream   PutItems of 3 messages, expects OK and b"3"
  bidi            Chat with 3 messages, expects OK and their 3 echoes
  concurrent:N    N GetItem(b"ok") calls in flight at once (futures), each expects OK

--traceparent V adds the metadata `traceparent: V` to every call. --wait prints `READY` (flushed)
and waits for a line on stdin before connecting, so a test can select this process in kspan
before any traffic.

Prints one line per call, in the order the calls were made:

  CALL <index> <spec> <STATUS_NAME> <elapsed_ms>

then `DONE <n>` (n calls). Exits 0 when every call got the status (and the messages) it expects,
1 otherwise (details on stderr).
"""

import argparse
import sys
import time

import grpc

SERVICE = "acc.Shop"
UNARY_REQUESTS = {
    "ok": (b"ok", None, grpc.StatusCode.OK),
    "internal": (b"internal", None, grpc.StatusCode.INTERNAL),
    "notfound": (b"notfound", None, grpc.StatusCode.NOT_FOUND),
    "slow": (b"slow", None, grpc.StatusCode.OK),
    "big": (b"big", None, grpc.StatusCode.OK),
    "deadline": (b"sleep", 0.3, grpc.StatusCode.DEADLINE_EXCEEDED),
}
# Size of the `big` reply (grpc_server.py's BIG_BYTES).
BIG_BYTES = 256 * 1024
# Deadline of every call but `unary:deadline` (seconds): a hung server fails the run.
CALL_TIMEOUT = 30.0


def parse_calls(values):
    calls = []
    for value in values:
        for spec in value.split(","):
            spec = spec.strip()
            if not spec:
                continue
            kind, _, arg = spec.partition(":")
            if kind == "unary" and arg in UNARY_REQUESTS:
                calls.append(spec)
            elif kind in ("server_stream", "client_stream", "bidi") and not arg:
                calls.append(spec)
            elif kind == "concurrent" and arg.isdigit() and int(arg) > 0:
                calls.append(spec)
            else:
                raise SystemExit("grpc_client.py: unknown call spec %r" % spec)
    if not calls:
        raise SystemExit("grpc_client.py: no calls given (--calls)")
    return calls


class Client:
    def __init__(self, channel, metadata):
        self.metadata = metadata
        self.get_item = channel.unary_unary("/%s/GetItem" % SERVICE)
        self.list_items = channel.unary_stream("/%s/ListItems" % SERVICE)
        self.put_items = channel.stream_unary("/%s/PutItems" % SERVICE)
        self.chat = channel.stream_stream("/%s/Chat" % SERVICE)
        self.results = []  # (spec, status name, elapsed ms)
        self.failures = []

    def record(self, spec, code, expected, started, problem=None):
        elapsed_ms = (time.monotonic() - started) * 1000.0
        index = len(self.results)
        self.results.append((spec, code.name, elapsed_ms))
        print("CALL %d %s %s %.1f" % (index, spec, code.name, elapsed_ms), flush=True)
        if code != expected:
            self.failures.append(
                "call %d (%s): status %s, expected %s" % (index, spec, code.name, expected.name)
            )
        elif problem:
            self.failures.append("call %d (%s): %s" % (index, spec, problem))

    def unary(self, spec, request, timeout, expected):
        started = time.monotonic()
        try:
            reply = self.get_item(
                request, timeout=timeout or CALL_TIMEOUT, metadata=self.metadata
            )
            want = b"x" * BIG_BYTES if request == b"big" else b"item"
            problem = None if reply == want else "reply of %d bytes, expected %d" % (
                len(reply),
                len(want),
            )
            self.record(spec, grpc.StatusCode.OK, expected, started, problem)
        except grpc.RpcError as e:
            self.record(spec, e.code(), expected, started)

    def server_stream(self, spec):
        started = time.monotonic()
        try:
            replies = list(
                self.list_items(b"list", timeout=CALL_TIMEOUT, metadata=self.metadata)
            )
            want = [b"item-0", b"item-1", b"item-2"]
            problem = None if replies == want else "replies %r, expected %r" % (replies, want)
            self.record(spec, grpc.StatusCode.OK, grpc.StatusCode.OK, started, problem)
        except grpc.RpcError as e:
            self.record(spec, e.code(), grpc.StatusCode.OK, started)

    def client_stream(self, spec):
        started = time.monotonic()
        try:
            reply = self.put_items(
                iter([b"a", b"b", b"c"]), timeout=CALL_TIMEOUT, metadata=self.metadata
            )
            problem = None if reply == b"3" else "reply %r, expected b'3'" % reply
            self.record(spec, grpc.StatusCode.OK, grpc.StatusCode.OK, started, problem)
        except grpc.RpcError as e:
            self.record(spec, e.code(), grpc.StatusCode.OK, started)

    def bidi(self, spec):
        started = time.monotonic()
        sent = [b"hello", b"kspan", b"bye"]
        try:
            replies = list(
                self.chat(iter(sent), timeout=CALL_TIMEOUT, metadata=self.metadata)
            )
            problem = None if replies == sent else "echoes %r, expected %r" % (replies, sent)
            self.record(spec, grpc.StatusCode.OK, grpc.StatusCode.OK, started, problem)
        except grpc.RpcError as e:
            self.record(spec, e.code(), grpc.StatusCode.OK, started)

    def concurrent(self, spec, n):
        started = time.monotonic()
        pending = [
            self.get_item.future(b"ok", timeout=CALL_TIMEOUT, metadata=self.metadata)
            for _ in range(n)
        ]
        for future in pending:
            try:
                reply = future.result()
                problem = None if reply == b"item" else "reply %r, expected b'item'" % reply
                self.record(spec, grpc.StatusCode.OK, grpc.StatusCode.OK, started, problem)
            except grpc.RpcError as e:
                self.record(spec, e.code(), grpc.StatusCode.OK, started)

    def run(self, spec):
        kind, _, arg = spec.partition(":")
        if kind == "unary":
            request, timeout, expected = UNARY_REQUESTS[arg]
            self.unary(spec, request, timeout, expected)
        elif kind == "server_stream":
            self.server_stream(spec)
        elif kind == "client_stream":
            self.client_stream(spec)
        elif kind == "bidi":
            self.bidi(spec)
        elif kind == "concurrent":
            self.concurrent(spec, int(arg))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--calls", action="append", required=True)
    parser.add_argument("--traceparent")
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--tls-ca", metavar="CERT", help="TLS, trusting this PEM certificate")
    args = parser.parse_args()
    calls = parse_calls(args.calls)
    metadata = (("traceparent", args.traceparent),) if args.traceparent else None

    if args.wait:
        print("READY", flush=True)
        sys.stdin.readline()

    options = [
        # Exactly the calls asked for, straight to the server.
        ("grpc.enable_retries", 0),
        ("grpc.enable_http_proxy", 0),
        # One connection of our own, not shared through the global subchannel pool.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    target = "127.0.0.1:%d" % args.port
    if args.tls_ca:
        with open(args.tls_ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        except grpc.FutureTimeoutError:
            print("cannot connect to 127.0.0.1:%d" % args.port, file=sys.stderr)
            return 1
        client = Client(channel, metadata)
        for spec in calls:
            client.run(spec)
    print("DONE %d" % len(client.results), flush=True)
    for failure in client.failures:
        print(failure, file=sys.stderr)
    return 1 if client.failures else 0


if __name__ == "__main__":
    sys.exit(main())
