#!/usr/bin/env python3
"""Writes the seed corpora (corpus/<target>/seed-*) from the parsers' unit-test fixtures.

Run from agent/fuzz: python3 seeds.py. Connection targets take the script format of
kspan::fuzzing::Script: records [flags u8][len u16 LE][bytes], flags bit 0 = the traced process
wrote the bytes, bit 1 = the kernel's capture applies.
"""
import os
import struct

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def script(syscalls):
    out = b""
    for egress, data in syscalls:
        out += bytes([(1 if egress else 0) | 2]) + struct.pack("<H", len(data)) + data
    return out


def conversation(path):
    """C/S hex lines of a recorded fixture: [(client_wrote, bytes)]."""
    lines = []
    for line in open(path):
        if line[:2] in ("C ", "S "):
            lines.append((line[0] == "C", bytes.fromhex(line[2:].strip())))
    return lines


def as_role(lines, client):
    # The client writes C lines; the server writes S lines.
    return [(c == client, data) for c, data in lines]


def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# HTTP/1: hand-written conversations (the http1 tests build theirs inline).
get = b"GET /items/42?x=1 HTTP/1.1\r\nHost: shop:8080\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
post = b"POST /orders HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
write("http1", "server_keepalive", script([(False, get), (True, ok), (False, post), (True, chunked)]))
write("http1", "client_split", script([(True, get[:10]), (True, get[10:]), (False, ok[:20]), (False, ok[20:])]))
write("http1", "pipelined", script([(False, get + get), (True, ok + ok)]))
write("http1", "h2c_upgrade", script([
    (True, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
    (False, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
    (False, bytes.fromhex("000000040000000000")),
]))
write("http1", "head_304_close", script([
    (False, b"HEAD / HTTP/1.0\r\n\r\n"), (True, b"HTTP/1.0 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
    (False, b"GET /b3 HTTP/1.1\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n"),
    (True, b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbody until close"),
]))

# HTTP/2 and gRPC over HTTP/2: grpcio recorded.
grpcio = conversation(os.path.join(SRC, "protocols/http2/fixtures/grpcio_unary.txt"))
write("http2", "grpcio_client", script(as_role(grpcio, client=True)))
write("http2", "grpcio_server", script(as_role(grpcio, client=False)))
write("http2", "grpcio_client_first_calls", script(as_role(grpcio[:8], client=True)))


def fields(*fs):
    return b"".join(bytes([len(f)]) + f for f in fs)


tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
write("grpc", "client_ok", bytes([0]) + fields(b"/shop.Shop/GetItem", b"0", b"", b"traceparent", tp, b"item"))
write("grpc", "server_internal_split", bytes([1]) + fields(b"/shop.Shop/Fail", b"13", b"boom", b"", b"", b"") + bytes([0, 5, 40]))
write("grpc", "trailers_only", bytes([2]) + fields(b"/a.B/C", b"5", b"not found", b"grpc-timeout", b"10S", b""))
write("grpc", "reset", bytes([4 | 1]) + fields(b"/a.B/C", b"", b"", b"b3", b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1", b"x" * 40))

# Kafka: librdkafka and kcat recorded.
kdir = os.path.join(SRC, "protocols/kafka/fixtures")
for name in ["kcat_produce", "kcat_fetch", "confluent_produce", "confluent_fetch", "gzip_produce", "zstd_produce"]:
    write("kafka", name + "_client", script(as_role(conversation(os.path.join(kdir, name + ".txt")), client=True)))
write("kafka", "kcat_produce_broker", script(as_role(conversation(os.path.join(kdir, "kcat_produce.txt")), client=False)))

# Trace context: header lines.
write("tracecontext", "w3c", b"traceparent: " + tp + b"\ntracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\n")
write("tracecontext", "b3_single", b"b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90\n")
write("tracecontext", "b3_multi", b"x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124\nx-b3-spanid: a2fb4a1d1a96d312\nx-b3-sampled: 1\nx-b3-parentspanid: 0020000000000001\n")
write("tracecontext", "invalid_traceparent_then_b3", b"traceparent: ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\nb3: 1\n")

# BTF: the hand-made blob of probes/btf.rs's tests (struct outer with anonymous members).
strings = b"\0int\0outer\0a\0b\0c\0d\0long\0"
s = lambda n: strings.index(b"\0" + n + b"\0") + 1
INT, STRUCT, UNION = 1, 4, 5
types = [
    [s(b"int"), INT << 24, 4, 32],
    [s(b"long"), INT << 24, 8, 64],
    [0, (STRUCT << 24) | 2, 8, s(b"b"), 1, 0, s(b"c"), 1, 32],
    [0, (UNION << 24) | 2, 8, 0, 3, 0, s(b"d"), 2, 0],
    [s(b"outer"), (STRUCT << 24) | 2, 16, s(b"a"), 1, 0, 0, 4, 64],
]
tbytes = b"".join(struct.pack("<%dI" % len(t), *t) for t in types)
btf = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(tbytes), len(tbytes), len(strings)) + tbytes + strings
write("btf", "anonymous_members", btf)

# tracefs: the formats of two kernels, and one format alone.
tdir = os.path.join(SRC, "probes/tracefs/fixtures")
for kernel in ["5.10", "6.12"]:
    write("tracefs", kernel, open(os.path.join(tdir, kernel + ".txt"), "rb").read())
one = open(os.path.join(tdir, "6.12.txt"), "rb").read().split(b"\n### ")[1]
write("tracefs", "one_format", b"### " + one)

# Ring events: [kind, pid, tid, fd, conn_id, start, end, full_len, copied_len, direction, tail_len, pad]
def header(kind, full_len=0, copied=0, direction=0, tail=0):
    return struct.pack("<IIIiQQQQIIII", kind, 7, 8, 3, 1, 100, 200, full_len, copied, direction, tail, 0)


write("ring_event", "data", header(1, 40, len(get[:32]), 1) + get[:32])
write("ring_event", "data_tail", header(1, 5000, 16, 0, 6) + b"HTTP/1.1 200 OKhello!"[:16])
write("ring_event", "connect", header(2) + struct.pack("<HHHH", 2, 40000, 8080, 0) + bytes(32))
write("ring_event", "exec", header(5) + b"curl".ljust(16, b"\0"))
write("ring_event", "close", header(4))
