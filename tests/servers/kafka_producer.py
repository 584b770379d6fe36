#!/usr/bin/env python3
"""Kafka producer for kspan's end-to-end tests (confluent-kafka, i.e. librdkafka).

Usage: kafka_producer.py BOOTSTRAP TOPIC COUNT [--traceparent INDEX=VALUE]...
                         [--one-request] [--garbage-first] [--client-id ID]
                         [--debug protocol]

Prints ``READY`` (flushed) and blocks until a line arrives on stdin, so that the test can start
kspan with this process selected before any traffic: the client (and its connections) is only
created after that line. Then produces COUNT messages to partition 0 of TOPIC, values
``message-0`` .. ``message-{COUNT-1}``, no key. Message INDEX of a --traceparent carries the
header ``traceparent: VALUE``. With --garbage-first, before the client is created,
two connections to the broker each send bytes it cannot parse and wait for the broker to
reset (or close) them: text that is no Kafka at all, then a Produce request header whose body is
cut short and garbage. linger.ms=0, acks=all, and flush() after each
produce(): every message is exactly one Produce request, acknowledged before the next is sent.

With --one-request, the COUNT messages go in ONE Produce request instead (one record batch):
batch.num.messages=COUNT sends the batch as soon as the last one is queued (linger.ms=10000 only
keeps librdkafka from sending an incomplete one), then flush().

Prints one line per message as its delivery is reported, then ``DONE`` with the offsets:

  DELIVERED <index> <partition> <offset>
  DONE <offset> <offset> ...

Exits 0 only if every delivery succeeded (1 otherwise, with the errors on stderr).
"""

import argparse
import socket
import struct
import sys

from confluent_kafka import Producer

# Longest a single message may take to be delivered.
DELIVERY_TIMEOUT_S = 20


def send_garbage(bootstrap):
    """Sends what a Kafka broker cannot parse, each on its own connection, and waits for the
    broker to drop the connection."""
    host, port = bootstrap.rsplit(":", 1)
    client_id = b"garbage"
    malformed_produce = (
        # Size, ApiKey 0 (Produce), ApiVersion 7, CorrelationId 1, ClientId, then a body of
        # five bytes where Produce v7 needs far more.
        struct.pack(">ihhih", 10 + len(client_id) + 5, 0, 7, 1, len(client_id))
        + client_id
        + b"\xde\xad\xbe\xef\x00"
    )
    for payload in [b"hello, this is no kafka\r\n" * 4, malformed_produce]:
        with socket.create_connection((host, int(port)), timeout=DELIVERY_TIMEOUT_S) as sock:
            sock.sendall(payload)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("count", type=int)
    ap.add_argument("--traceparent", action="append", default=[], metavar="INDEX=VALUE")
    ap.add_argument("--one-request", action="store_true")
    ap.add_argument("--garbage-first", action="store_true")
    ap.add_argument("--client-id", default=None)
    ap.add_argument("--debug", default=None, help="librdkafka debug contexts (stderr)")
    args = ap.parse_args()
    traceparents = {}
    for spec in args.traceparent:
        index, _, value = spec.partition("=")
        traceparents[int(index)] = value

    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.readline()

    if args.garbage_first:
        send_garbage(args.bootstrap)

    conf = {
        "bootstrap.servers": args.bootstrap,
        "linger.ms": 0,
        "acks": "all",
        "enable.idempotence": False,
        "message.timeout.ms": DELIVERY_TIMEOUT_S * 1000,
    }
    if args.one_request:
        conf["linger.ms"] = 10000
        conf["batch.num.messages"] = args.count
    if args.client_id is not None:
        conf["client.id"] = args.client_id
    if args.debug:
        conf["debug"] = args.debug
    producer = Producer(conf)

    errors = []
    offsets = []

    def delivered(index):
        def callback(err, msg):
            if err is not None:
                errors.append("message %d: %s" % (index, err))
                return
            offsets.append(msg.offset())
            sys.stdout.write("DELIVERED %d %d %d\n" % (index, msg.partition(), msg.offset()))
            sys.stdout.flush()

        return callback

    for i in range(args.count):
        headers = [("traceparent", traceparents[i].encode())] if i in traceparents else None
        producer.produce(
            args.topic,
            value=("message-%d" % i).encode(),
            partition=0,
            headers=headers,
            on_delivery=delivered(i),
        )
        if args.one_request and i + 1 < args.count:
            continue
        left = producer.flush(DELIVERY_TIMEOUT_S)
        if left:
            errors.append("%d message(s) not delivered within %d s" % (left, DELIVERY_TIMEOUT_S))
            break
        if errors:
            break

    if errors or len(offsets) != args.count:
        sys.stderr.write("delivery failed:\n  %s\n" % "\n  ".join(errors or ["(no report)"]))
        return 1
    sys.stdout.write("DONE %s\n" % " ".join(str(o) for o in offsets))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
