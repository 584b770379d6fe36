#!/usr/bin/env python3
"""Kafka broker for kspan's end-to-end tests: librdkafka's mock cluster, one broker.

Usage: kafka_broker.py [--produce-errors CODE[,CODE...]] TOPIC...

Starts a mock cluster of one broker on 127.0.0.1 (an ephemeral port) inside this process and
creates each TOPIC with ONE partition (replication factor 1), so that every message of a test
lands in partition 0 at offsets 0, 1, 2, ... in the order produced. Consumer groups rebalance at
once (the mock's default group.initial.rebalance.delay.ms of 3 s is set to 0). With
--produce-errors, the next Produce requests (one per CODE, in order, whichever client sends them)
are answered with that Kafka error code for each of their partitions. Then prints

  BROKER 127.0.0.1:<port>

(flushed) and serves until stdin closes, SIGTERM or SIGINT; exits 0.

The mock cluster is created through librdkafka's C API (rd_kafka_mock_cluster_new and
rd_kafka_mock_topic_create, loaded with ctypes from the librdkafka that confluent-kafka ships):
confluent-kafka's Python API can only start a mock cluster through `test.mock.num.brokers`, whose
topics are created on first use with four partitions, and the mock broker does not implement
CreateTopics. This process is no Kafka client of its broker: it makes no connection, it only
listens and serves the producers and consumers, which are other processes connecting over
loopback TCP.
"""

import argparse
import ctypes
import glob
import os
import signal
import sys
import threading

import confluent_kafka


def load_librdkafka():
    """The librdkafka shared library confluent-kafka's extension module is linked against."""
    pkg = os.path.dirname(confluent_kafka.__file__)
    site = os.path.dirname(pkg)
    candidates = sorted(glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka*.so*")))
    if not candidates:
        # A confluent-kafka built against the system's librdkafka.
        candidates = ["librdkafka.so.1"]
    lib = ctypes.CDLL(candidates[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
    lib.rd_kafka_mock_topic_create.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.rd_kafka_conf_set.restype = ctypes.c_int
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms.restype = None
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_push_request_errors_array.restype = None
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int16,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.rd_kafka_err2str.restype = ctypes.c_char_p
    lib.rd_kafka_err2str.argtypes = [ctypes.c_int]
    return lib


# Kafka API key of Produce.
PRODUCE = 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--produce-errors", default="", help="comma-separated Kafka error codes")
    ap.add_argument("topics", nargs="+")
    args = ap.parse_args()
    topics = args.topics
    produce_errors = [int(c) for c in args.produce_errors.split(",") if c.strip()]

    lib = load_librdkafka()
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    # Quiet: no warning about the missing bootstrap.servers.
    if lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr)) != 0:
        sys.stderr.write("rd_kafka_conf_set failed: %s\n" % errstr.value.decode())
        return 1
    # A producer handle that only hosts the mock cluster (no bootstrap.servers: it never
    # connects anywhere).
    rk = lib.rd_kafka_new(0, conf, errstr, len(errstr))
    if not rk:
        sys.stderr.write("rd_kafka_new failed: %s\n" % errstr.value.decode())
        return 1
    mcluster = lib.rd_kafka_mock_cluster_new(rk, 1)
    if not mcluster:
        sys.stderr.write("rd_kafka_mock_cluster_new failed\n")
        return 1
    for topic in topics:
        err = lib.rd_kafka_mock_topic_create(mcluster, topic.encode(), 1, 1)
        if err != 0:
            sys.stderr.write(
                "rd_kafka_mock_topic_create(%s) failed: %s\n"
                % (topic, lib.rd_kafka_err2str(err).decode())
            )
            return 1
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms(mcluster, 0)
    if produce_errors:
        codes = (ctypes.c_int * len(produce_errors))(*produce_errors)
        lib.rd_kafka_mock_push_request_errors_array(mcluster, PRODUCE, len(produce_errors), codes)
    bootstraps = lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    sys.stdout.write("BROKER %s\n" % bootstraps)
    sys.stdout.flush()
    while not stop.wait(0.2):
        pass
    # No rd_kafka_mock_cluster_destroy / rd_kafka_destroy: the process exits, taking the mock
    # cluster's threads and sockets with it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
