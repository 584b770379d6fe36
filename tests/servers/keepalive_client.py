#!/usr/bin/env python3
"""Keep-alive HTTP client used by the kspan end-to-end tests.

Usage: keepalive_client.py PORT N [PREFIX]

Prints ``READY`` (flushed) and blocks until a line arrives on stdin, so the
test can start kspan with this process's pid selected before any traffic.
Then sends N GET requests (PREFIX1 .. PREFIXN, PREFIX defaults to /users/) over ONE connection to
127.0.0.1:PORT, reading each response fully, and prints

  LOCAL_PORT <local port of the connection>
  DONE <status> <status> ...

Exits 0 on success; exits non-zero (with a message on stderr) if the
connection was re-established or a response could not be read.
"""

import http.client
import sys


def main():
    if len(sys.argv) not in (3, 4):
        sys.stderr.write("usage: keepalive_client.py PORT N [PREFIX]\n")
        return 2
    port = int(sys.argv[1])
    n = int(sys.argv[2])
    prefix = sys.argv[3] if len(sys.argv) == 4 else "/users/"

    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.readline()

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    sock = None
    local_port = None
    for i in range(1, n + 1):
        conn.request("GET", "%s%d" % (prefix, i))
        if sock is None:
            sock = conn.sock
            local_port = sock.getsockname()[1]
        elif conn.sock is not sock:
            sys.stderr.write("connection was re-established before request %d\n" % i)
            return 1
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
        if resp.will_close:
            if i != n:
                sys.stderr.write("server closed the connection after request %d\n" % i)
                return 1
    conn.close()

    sys.stdout.write("LOCAL_PORT %d\n" % local_port)
    sys.stdout.write("DONE %s\n" % " ".join(str(s) for s in statuses))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
