#!/usr/bin/python3
"""A stand-in for K3s in platform-agent's system tests.

Behaves like K3s where the agent depends on it, with the standard library only
(python3-minimal):

  server     the k3s.service main process (Type=notify). Reads data-dir and
             default-local-storage-path from /etc/rancher/k3s/config.yaml and
             config.yaml.d/*.yaml (the agent writes a drop-in there), keeps a
             "datastore" file open under data-dir, starts a containerd shim,
             serves its "API" on --listen, and sends READY=1 only once its own
             GET /readyz answers 200. Exits on SIGTERM, as K3s does; with
             KillMode=process systemd then leaves the shim behind.
  shim       forked by the server into a session of its own, renames itself
             containerd-shim-runc-v2 (the kernel keeps 15 bytes:
             "containerd-shim", what the agent's k3s.shim_prefixes match),
             ignores SIGTERM, forks one container and waits for it.
  container  ignores SIGTERM, writes held.dat (the output of `seq 10000`)
             into a volume under default-local-storage-path, fsyncs it, and
             keeps it open with its working directory there.

The shim and the container are forked, not started as new interpreters: a
Python start-up costs seconds under emulation, and what the agent looks at
(name, cgroup, parentage, signal disposition, open files) is the same.

Process IDs go to /run/k3s-standin/{server,shim,container}.pid for the tests.
"""

import glob
import os
import signal
import socket
import sys
import threading
import time

RUN_DIR = "/run/k3s-standin"
CONFIG = "/etc/rancher/k3s/config.yaml"
DEFAULT_DATA_DIR = "/var/lib/rancher/k3s"
HELD_LINES = 10000


def log(message):
    print(f"k3s-standin[{os.getpid()}] {message}", file=sys.stderr, flush=True)


def write_pid(name):
    os.makedirs(RUN_DIR, exist_ok=True)
    path = os.path.join(RUN_DIR, f"{name}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(path + ".tmp", path)


def set_comm(name):
    # The process name ps and /proc/PID/comm show (cut to 15 bytes).
    with open("/proc/self/comm", "w") as f:
        f.write(name)


def read_config():
    """K3s's config file, then its drop-ins in name order; flat keys only."""
    values = {}
    for path in [CONFIG] + sorted(glob.glob(CONFIG + ".d/*.yaml")):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            line = line.split("#", 1)[0].rstrip()
            if not line or line.startswith((" ", "-")) or ":" not in line:
                continue
            key, value = line.split(":", 1)
            values[key.strip()] = value.strip().strip('"').strip("'")
    data_dir = values.get("data-dir") or DEFAULT_DATA_DIR
    storage = values.get("default-local-storage-path") or os.path.join(data_dir, "storage")
    return data_dir, storage


def notify(message):
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


class Api:
    """GET /readyz: 503 until ready, then 200 "ok"; anything else 404."""

    def __init__(self, listen):
        host, port = listen.rsplit(":", 1)
        self.ready = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(16)
        self.address = (host, int(port))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    parts = request.split(b"\r\n", 1)[0].split()
                    path = parts[1].decode() if len(parts) >= 2 else ""
                    if path.split("?")[0] == "/readyz":
                        status, body = ("200 OK", b"ok") if self.ready else ("503 Service Unavailable", b"starting")
                    else:
                        status, body = "404 Not Found", b"not found"
                    conn.sendall(
                        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                    )
                except OSError:
                    pass

    def readyz(self):
        """Status code of our own GET /readyz, as a client would see it."""
        with socket.create_connection(self.address, timeout=5) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: k3s\r\nConnection: close\r\n\r\n")
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return int(reply.split(b" ", 2)[1])


def server(args):
    listen = "127.0.0.1:6443"
    api_delay = 1.0
    i = 0
    while i < len(args):
        if args[i] == "--listen":
            listen = args[i + 1]
            i += 1
        elif args[i] == "--api-delay":
            api_delay = float(args[i + 1])
            i += 1
        i += 1
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    data_dir, storage = read_config()
    log(f"data-dir {data_dir}, default-local-storage-path {storage}")
    # A restarted K3s has new shims: the old PID files must not answer for them.
    for name in ("shim", "container"):
        try:
            os.unlink(os.path.join(RUN_DIR, f"{name}.pid"))
        except FileNotFoundError:
            pass
    write_pid("server")
    volume = os.path.join(storage, "pvc-standin")
    os.makedirs(volume, exist_ok=True)
    # Forked before any thread or file of the server exists. setsid: a shim
    # leaves K3s's session, as containerd's do.
    shim_pid = os.fork()
    if shim_pid == 0:
        os.setsid()
        try:
            shim([volume])
        finally:
            os._exit(0)
    # The datastore K3s keeps open while it runs (kine's SQLite database).
    db_dir = os.path.join(data_dir, "server", "db")
    os.makedirs(db_dir, exist_ok=True)
    datastore = open(os.path.join(db_dir, "state.db"), "ab")
    api = Api(listen)
    log(f"API listening on {listen}, not ready yet")
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(RUN_DIR, "container.pid")):
        if os.waitpid(shim_pid, os.WNOHANG) != (0, 0) or time.monotonic() > deadline:
            log("the container did not start")
            sys.exit(1)
        time.sleep(0.05)
    # The API comes up a moment after the process (etcd or kine first).
    stopping.wait(api_delay)
    api.ready = True
    status = api.readyz()
    if status != 200:
        log(f"own GET /readyz answered {status}")
        sys.exit(1)
    log("GET /readyz answers 200; sending READY=1")
    notify("READY=1\nSTATUS=API answering /readyz")
    while not stopping.wait(3600):
        pass
    log("SIGTERM: stopping (the shim and its container stay, as with KillMode=process)")
    notify("STOPPING=1")
    api.ready = False
    api.sock.close()
    datastore.close()
    sys.exit(0)


def shim(args):
    volume = args[0]
    set_comm("containerd-shim-runc-v2")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_pid("shim")
    container_pid = os.fork()
    if container_pid == 0:
        try:
            container([volume])
        finally:
            os._exit(0)
    log(f"containerd-shim: container pid {container_pid}, ignoring SIGTERM")
    _, status = os.waitpid(container_pid, 0)
    log(f"containerd-shim: container exited with status {status}")


def container(args):
    volume = args[0]
    set_comm("standin-app")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.chdir(volume)
    held = open(os.path.join(volume, "held.dat"), "w")
    held.write("".join(f"{n}\n" for n in range(1, HELD_LINES + 1)))
    held.flush()
    os.fsync(held.fileno())
    write_pid("container")
    log(f"container: holding {held.name} open, ignoring SIGTERM")
    while True:
        signal.pause()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "server":
        print(f"usage: {sys.argv[0]} server [--listen HOST:PORT] [--api-delay SECONDS]", file=sys.stderr)
        sys.exit(2)
    server(sys.argv[2:])
