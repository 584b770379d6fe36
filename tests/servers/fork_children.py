"""A process that forks children holding a connection each, then has them killed: for the tests
of kspan's kernel maps and agent state over processes that come and go.

`fork_children.py THREADS CHILDREN`, driven line by line on stdin:
- `go`: listens on 127.0.0.1 (a backlog for every child; it never accepts), starts THREADS
  threads (alive until the end), forks CHILDREN children that each connect to the listener and
  sleep, prints `children <pid> <pid> ...`;
- `kill`: kills (SIGKILL: their sockets are never closed by a syscall) and reaps the children,
  prints `killed`;
- `end` (or stdin closed): the threads end, the process exits.
"""

import os
import signal
import socket
import sys
import threading


def main():
    threads_wanted, children_wanted = int(sys.argv[1]), int(sys.argv[2])
    sys.stdin.readline()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(max(128, children_wanted))
    port = listener.getsockname()[1]
    done = threading.Event()
    threads = [threading.Thread(target=done.wait) for _ in range(threads_wanted)]
    for t in threads:
        t.start()
    children = []
    for _ in range(children_wanted):
        pid = os.fork()
        if pid == 0:
            s = socket.create_connection(("127.0.0.1", port))
            signal.pause()
            os._exit(0)
        children.append(pid)
    print("children " + " ".join(map(str, children)), flush=True)
    sys.stdin.readline()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    print("killed", flush=True)
    sys.stdin.readline()
    done.set()


if __name__ == "__main__":
    main()
