"""A pre-forking HTTP/1.1 server, the shape of gunicorn, nginx or Apache prefork.

Listens on 127.0.0.1 (a free port), prints `PORT <n>`, then waits for `fork N` on stdin: forks N
workers that accept on the shared socket and answer every request with 200, and prints
`WORKERS <pid> <pid> ...` once all are running. The parent never accepts. The workers exit when
the parent does (SIGTERM from the test, or stdin closed).
"""

import os
import signal
import socket
import sys


def worker(listener):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            if not request:
                continue
            path = request.split(b" ", 2)[1]
            body = b'{"worker": %d, "path": "%s"}' % (os.getpid(), path)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(f"PORT {listener.getsockname()[1]}", flush=True)

    command = sys.stdin.readline().split()
    if len(command) != 2 or command[0] != "fork":
        sys.exit(f"expected `fork N` on stdin, got {command!r}")
    workers = []
    for _ in range(int(command[1])):
        # Each worker tells the parent it runs (so the test starts only once all do).
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os.write(ready_w, b"1")
            os.close(ready_w)
            worker(listener)
            os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        workers.append(pid)
    print("WORKERS " + " ".join(map(str, workers)), flush=True)

    def stop(*_):
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        for pid in workers:
            os.waitpid(pid, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    sys.stdin.read()  # until the test closes stdin or kills us
    stop()


if __name__ == "__main__":
    main()
