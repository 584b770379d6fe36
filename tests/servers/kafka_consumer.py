#!/usr/bin/env python3
"""Kafka consumer for kspan's end-to-end tests (confluent-kafka, i.e. librdkafka).

Usage: kafka_consumer.py BOOTSTRAP TOPIC GROUP COUNT [--client-id ID] [--debug protocol]

Prints ``READY`` (flushed) and blocks until a line arrives on stdin, so that the test can start
kspan with this process selected before any traffic: the client (and its connections) is only
created after that line. Then subscribes to TOPIC in consumer group GROUP
(auto.offset.reset=earliest) and polls until it has COUNT messages, printing one line per
message and then the offsets:

  MESSAGE <partition> <offset> <value> [traceparent=<value>]
  DONE <offset> <offset> ...

Closes the consumer cleanly (commits, leaves the group) before exiting 0. Exits 1 if COUNT
messages did not come within the deadline, or on a consumer error.
"""

import argparse
import sys
import time

from confluent_kafka import Consumer, KafkaError

# Longest the whole run may take (group join included).
DEADLINE_S = 25


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("group")
    ap.add_argument("count", type=int)
    ap.add_argument("--client-id", default=None)
    ap.add_argument("--debug", default=None, help="librdkafka debug contexts (stderr)")
    args = ap.parse_args()

    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.readline()

    conf = {
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
    }
    if args.client_id is not None:
        conf["client.id"] = args.client_id
    if args.debug:
        conf["debug"] = args.debug
    consumer = Consumer(conf)
    consumer.subscribe([args.topic])

    offsets = []
    deadline = time.monotonic() + DEADLINE_S
    status = 0
    while len(offsets) < args.count:
        left = deadline - time.monotonic()
        if left <= 0:
            sys.stderr.write(
                "got %d of %d messages within %d s\n" % (len(offsets), args.count, DEADLINE_S)
            )
            status = 1
            break
        msg = consumer.poll(min(left, 1.0))
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                continue
            sys.stderr.write("consumer error: %s\n" % msg.error())
            status = 1
            break
        offsets.append(msg.offset())
        line = "MESSAGE %d %d %s" % (msg.partition(), msg.offset(), msg.value().decode())
        for key, value in msg.headers() or []:
            if key == "traceparent":
                line += " traceparent=%s" % value.decode()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    consumer.close()
    if status == 0:
        sys.stdout.write("DONE %s\n" % " ".join(str(o) for o in offsets))
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
