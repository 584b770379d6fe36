#!/usr/bin/env python3
"""gRPC test server for kspan's end-to-end tests (grpcio, no generated code).

Serves the service `acc.Shop` on 127.0.0.1 with raw bytes as messages (no protobuf):

* `GetItem` (unary): the request selects the behaviour
  - b"ok"       -> b"item"
  - b"internal" -> status INTERNAL
  - b"notfound" -> status NOT_FOUND
  - b"slow"     -> b"item" after 0.2 s
  - b"sleep"    -> b"item" after 2 s (the client's deadline expires first)
  - b"big"      -> 256 KiB of b"x" (DATA frames, then trailers, in one write)
  - anything else -> status INVALID_ARGUMENT
* `ListItems` (server streaming): b"item-0", b"item-1", b"item-2"
* `PutItems` (client streaming): consumes every message, returns their count as ASCII
* `Chat` (bidirectional streaming): echoes each message

Prints `PORT <n>` (flushed) once serving. Exits 0 on SIGTERM or SIGINT.

Usage: grpc_server.py [--port N] [--threads N] [--tls CERT KEY]
"""

import argparse
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "acc.Shop"
# How long `slow` and `sleep` take (seconds).
SLOW_SECS = 0.2
SLEEP_SECS = 2.0
# Size of the `big` reply.
BIG_BYTES = 256 * 1024


def get_item(request, context):
    if request == b"ok":
        return b"item"
    if request == b"internal":
        context.abort(grpc.StatusCode.INTERNAL, "internal failure requested")
    if request == b"notfound":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such item")
    if request == b"slow":
        time.sleep(SLOW_SECS)
        return b"item"
    if request == b"big":
        return b"x" * BIG_BYTES
    if request == b"sleep":
        # Wake up early when the client gives up (deadline: the call is cancelled).
        deadline = time.monotonic() + SLEEP_SECS
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return b"item"
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown request %r" % request[:32])


def list_items(request, context):
    for i in range(3):
        yield b"item-%d" % i


def put_items(request_iterator, context):
    count = sum(1 for _ in request_iterator)
    return str(count).encode()


def chat(request_iterator, context):
    for message in request_iterator:
        yield message


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=128,
        help="handler threads (100 concurrent calls need 100 of them)",
    )
    parser.add_argument(
        "--tls",
        nargs=2,
        metavar=("CERT", "KEY"),
        help="serve TLS (PEM files) instead of cleartext HTTP/2",
    )
    args = parser.parse_args()

    # Messages are bytes: no (de)serializers.
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "GetItem": grpc.unary_unary_rpc_method_handler(get_item),
            "ListItems": grpc.unary_stream_rpc_method_handler(list_items),
            "PutItems": grpc.stream_unary_rpc_method_handler(put_items),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads),
        handlers=(handler,),
        maximum_concurrent_rpcs=None,
    )
    address = "127.0.0.1:%d" % args.port
    if args.tls:
        with open(args.tls[0], "rb") as cert, open(args.tls[1], "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        print("grpc_server.py: cannot bind 127.0.0.1:%d" % args.port, file=sys.stderr)
        sys.exit(1)
    server.start()

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    print("PORT %d" % port, flush=True)
    stop.wait()
    server.stop(grace=0.2).wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
