#!/usr/bin/env python3
"""Load client for the kspan sampling tests.

Usage: load_client.py PORT N PREFIX

Sends N GET requests PREFIX1 .. PREFIXN to 127.0.0.1:PORT one after the other, each on a new
connection (no trace-context header), reads each response fully and prints

  DONE <status> <status> ...

Exits 0 when every request got a response, non-zero (with a message on stderr) otherwise.
"""

import http.client
import sys


def main():
    if len(sys.argv) != 4:
        sys.stderr.write("usage: load_client.py PORT N PREFIX\n")
        return 2
    port = int(sys.argv[1])
    n = int(sys.argv[2])
    prefix = sys.argv[3]
    statuses = []
    for i in range(1, n + 1):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "%s%d" % (prefix, i))
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        except OSError as e:
            sys.stderr.write("request %d failed: %s\n" % (i, e))
            return 1
        finally:
            conn.close()
    sys.stdout.write("DONE %s\n" % " ".join(str(s) for s in statuses))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
