#!/usr/bin/env python3
"""Keep-alive HTTP client used by the kspan end-to-end tests.

Usage: keepalive_client.py [--tls CAFILE] [--late-import [--libssl PATH]] [--pause-after K]
                           PORT N [PREFIX]

Prints ``READY`` (flushed) and blocks until a line arrives on stdin, so the
test can start kspan with this process's pid selected before any traffic.
Then sends N GET requests (PREFIX1 .. PREFIXN, PREFIX defaults to /users/) over ONE connection to
127.0.0.1:PORT, reading each response fully, and prints

  LOCAL_PORT <local port of the connection>
  DONE <status> <status> ...

Exits 0 on success; exits non-zero (with a message on stderr) if the
connection was re-established or a response could not be read.

--tls CAFILE: HTTPS, the server's certificate verified against CAFILE (Python's
``ssl``: Debian's libssl.so.3).
--late-import: ``http.client`` (and with it ``ssl``, which loads libssl with
dlopen) is imported only after the first stdin line; then ``LOADED`` is
printed and a second line awaited before the requests.
--libssl PATH: with --late-import, the libssl loaded is this file (a private copy,
as an application bundling its own OpenSSL): loaded with dlopen first, its soname
then serves ``ssl``'s own dependency.
--pause-after K: after the K-th response, prints ``PAUSED`` (flushed) and waits for a line on
stdin before the next request, on the same connection.
"""

import sys


def main():
    args = sys.argv[1:]
    cafile = None
    late = False
    libssl = None
    pause_after = None
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--tls" and args:
            cafile = args.pop(0)
        elif flag == "--late-import":
            late = True
        elif flag == "--libssl" and args:
            libssl = args.pop(0)
        elif flag == "--pause-after" and args:
            pause_after = int(args.pop(0))
        else:
            sys.stderr.write("unknown flag %s\n" % flag)
            return 2
    if len(args) not in (2, 3):
        sys.stderr.write(
            "usage: keepalive_client.py [--tls CAFILE] [--late-import [--libssl PATH]]"
            " [--pause-after K] PORT N [PREFIX]\n"
        )
        return 2
    port = int(args[0])
    n = int(args[1])
    prefix = args[2] if len(args) == 3 else "/users/"

    if not late:
        import http.client  # noqa: F401
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.readline()
    if late:
        if libssl is not None:
            import ctypes

            ctypes.CDLL(libssl, mode=ctypes.RTLD_GLOBAL)
        import http.client  # noqa: F401
        import ssl  # noqa: F401

        sys.stdout.write("LOADED\n")
        sys.stdout.flush()
        sys.stdin.readline()
    import http.client

    if cafile is not None:
        import ssl

        context = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    else:
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
        if i == pause_after:
            sys.stdout.write("PAUSED\n")
            sys.stdout.flush()
            sys.stdin.readline()
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
