#!/usr/bin/env python3
"""WAL archiving bench for platform-agent (driven by run.sh).

In one run, against one local S3 server (s3s-fs) reached by both tools
through the same TLS front (stunnel, certificate from a throwaway CA):
  * latency from `select pg_switch_wal()` to the acknowledged archive
    (PostgreSQL renames pg_wal/archive_status/<segment>.ready to .done only
    after archive_command exited 0), median and p99, of
    `pgbackrest archive-push %p` (the peer) and
    `platform-agent wal-push %p %f` (ours), alternating round by round;
  * sustained segments archived per minute through a backlog of .ready
    segments built with archiving paused (pg_stat_archiver.archived_count
    delta over the time the backlog takes), alternating window by window.

Two PostgreSQL 15 clusters, one per tool, identical but for
archive_command. Prints plain lines; exits non-zero only if something failed
to run. A missed target is reported as MISSED, not as a failure.
"""

import argparse
import ctypes
import ctypes.util
import math
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

TARGET_LATENCY_RATIO = 0.5  # ours / peer, median and p99: at most
TARGET_THROUGHPUT_RATIO = 1.5  # ours / peer, segments per minute: at least
BUCKET = "bench"
REGION = "us-east-1"
STANZA = "bench"


class BenchError(Exception):
    """Something failed to run (as opposed to a missed target)."""


def log(line=""):
    print(line, flush=True)


def verdict(ok):
    return "PASS" if ok else "MISSED"


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise BenchError(f"{cmd!r} failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return res.stdout


def wait_for(what, deadline_s, probe, step=0.02):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(step)
    raise BenchError(f"timed out after {deadline_s} s waiting for {what}")


def tail(path, chars=3000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError as err:
        return f"({path}: {err})"


def percentile(values, p):
    """Nearest rank: with 50 values, p99 is the largest."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def chown_postgres(*paths):
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam("postgres")
    for path in paths:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


# --- inotify on pg_wal/archive_status ----------------------------------------

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
EVENT = struct.Struct("iIII")


class StatusWatcher:
    """Timestamps every file that appears in archive_status (`<seg>.ready`
    created by the backend that finished the segment, `<seg>.done` renamed
    into place by the archiver once archive_command exited 0).

    A thread blocks on the inotify descriptor and reads time.monotonic() as
    each event arrives, so the times do not depend on what the main thread
    is doing (waiting for psql, say)."""

    def __init__(self, directory):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise BenchError(f"inotify_init1: errno {ctypes.get_errno()}")
        if libc.inotify_add_watch(self.fd, directory.encode(), IN_CREATE | IN_MOVED_TO) < 0:
            raise BenchError(f"inotify_add_watch {directory}: errno {ctypes.get_errno()}")
        self.dir = directory
        self.seen = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self.stopping:
            if not poller.poll(200):
                continue
            now = time.monotonic()
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            names = []
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, length = EVENT.unpack_from(data, offset)
                offset += EVENT.size
                names.append(data[offset:offset + length].rstrip(b"\0").decode())
                offset += length
            with self.cond:
                for name in names:
                    self.seen.setdefault(name, now)
                self.cond.notify_all()

    def wait(self, name, deadline_s):
        end = time.monotonic() + deadline_s
        with self.cond:
            while name not in self.seen:
                left = end - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{name} did not appear in {self.dir} within {deadline_s} s")
                self.cond.wait(min(left, 0.5))
            return self.seen[name]

    def close(self):
        self.stopping = True
        self.thread.join()
        os.close(self.fd)


# --- servers -----------------------------------------------------------------


class Tls:
    """A throwaway CA and a server certificate for localhost (and 127.0.0.1)
    signed by it."""

    def __init__(self, root):
        d = os.path.join(root, "tls")
        os.makedirs(d)
        self.ca = os.path.join(d, "ca.pem")
        self.cert = os.path.join(d, "server.pem")
        self.key = os.path.join(d, "server.key")
        ca_key = os.path.join(d, "ca.key")
        csr = os.path.join(d, "server.csr")
        ext = os.path.join(d, "server.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                    "basicConstraints = CA:FALSE\n"
                    "keyUsage = digitalSignature, keyEncipherment\n"
                    "extendedKeyUsage = serverAuth\n")
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", ca_key, "-out", self.ca, "-days", "2", "-subj", "/CN=platform-agent bench CA"])
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", self.key, "-out", csr, "-subj", "/CN=localhost"])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", self.cert, "-days", "2", "-extfile", ext])
        for path in (d, self.ca):
            os.chmod(path, 0o755 if path == d else 0o644)


class S3:
    """s3s-fs on plain HTTP, fronted by stunnel (TLS terminated, bytes passed
    through unchanged, so SigV4's signed Host header still matches)."""

    def __init__(self, binary, stunnel, tls, root):
        self.port = free_port()
        self.tls_port = free_port()
        self.data = os.path.join(root, "s3data")
        os.makedirs(self.data)
        self.access = "AK" + secrets.token_hex(8).upper()
        self.secret = secrets.token_hex(16)
        self.log_path = os.path.join(root, "s3s-fs.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", str(self.port), "--access-key", self.access,
             "--secret-key", self.secret, self.data],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("s3s-fs", 30, lambda: self._alive(self.proc, self.log_path) and port_accepts(self.port))
        self.endpoint = f"http://127.0.0.1:{self.port}"

        conf = os.path.join(root, "stunnel.conf")
        self.stunnel_log = os.path.join(root, "stunnel.log")
        with open(conf, "w") as f:
            f.write(f"""foreground = yes
pid =
output = {self.stunnel_log}
debug = 4
[s3]
accept = 127.0.0.1:{self.tls_port}
connect = 127.0.0.1:{self.port}
cert = {tls.cert}
key = {tls.key}
TIMEOUTclose = 0
""")
        self.stunnel = subprocess.Popen([stunnel, conf], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for("stunnel", 30, lambda: self._alive(self.stunnel, self.stunnel_log) and port_accepts(self.tls_port))
        # pgBackRest matches the host against DNS names only (not IP SANs), so
        # both tools address the front as localhost.
        self.tls_endpoint = f"https://localhost:{self.tls_port}"

    @staticmethod
    def _alive(proc, log_path):
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited ({proc.returncode}):\n{tail(log_path)}")
        return True

    def create_bucket(self, name, ca):
        # Through the TLS front, to prove it before either tool uses it.
        digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256("")
        out = run(["curl", "-sS", "--noproxy", "*", "--resolve", f"localhost:{self.tls_port}:127.0.0.1", "--cacert", ca, "-X", "PUT",
                   "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{self.access}:{self.secret}",
                   "-H", f"x-amz-content-sha256: {digest}", "-w", "%{http_code}", "-o", "/dev/null",
                   f"{self.tls_endpoint}/{name}"])
        if not out.strip().startswith("2"):
            raise BenchError(f"CreateBucket {name} through stunnel answered HTTP {out.strip()}")

    def objects(self, prefix):
        """(count, bytes) of the objects stored below bucket/prefix."""
        count = size = 0
        for base, _dirs, files in os.walk(os.path.join(self.data, BUCKET, prefix)):
            for name in files:
                count += 1
                size += os.path.getsize(os.path.join(base, name))
        return count, size

    def stop(self):
        for proc in (self.stunnel, self.proc):
            proc.kill()
            proc.wait()
        self.log.close()


class Psql:
    """One long-lived psql session, so a query costs a round trip rather
    than a process start."""

    MARK = "__pa_bench_end__"

    def __init__(self, pg):
        self.err_path = os.path.join(pg.root, f"psql-{id(self)}.err")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            pg.client("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "postgres"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)

    def query(self, sql):
        self.proc.stdin.write(sql.rstrip().rstrip(";") + ";\n\\echo " + self.MARK + "\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"psql ended on {sql!r}:\n{tail(self.err_path)}")
            line = line.rstrip("\n")
            if line == self.MARK:
                return "\n".join(lines)
            lines.append(line)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.err.close()


class Postgres:
    def __init__(self, pg_bin, root, name, segsize_mb):
        self.bin = pg_bin
        self.name = name
        self.root = os.path.join(root, name)
        self.data = os.path.join(self.root, "pgdata")
        self.sock = os.path.join(self.root, "pgsock")
        self.log_path = os.path.join(self.root, "postgres.log")
        self.port = free_port()
        self.segsize = segsize_mb * 1024 * 1024
        os.makedirs(self.sock)
        os.chmod(self.root, 0o755)
        os.chmod(self.sock, 0o777)
        chown_postgres(self.root, self.sock)
        self.server("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                    "--no-sync", "--no-instructions", f"--wal-segsize={segsize_mb}")
        self.status_dir = os.path.join(self.data, "pg_wal", "archive_status")
        self.session = None
        self.failed_base = 0

    def server(self, tool, *args):
        return run(as_postgres([os.path.join(self.bin, tool), *args]), cwd=self.root)

    def start(self, archive_command):
        conf = {
            "port": str(self.port),
            "listen_addresses": "",
            "unix_socket_directories": self.sock,
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": archive_command,
            "archive_timeout": "0",
            "max_wal_senders": "0",
            # The writer's commits need not wait for the disk; archiving is
            # what is measured, and the archiver reads whole segments.
            "synchronous_commit": "off",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "30min",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\n# bench/wal\n")
            for key, value in conf.items():
                f.write("{} = '{}'\n".format(key, value.replace("'", "''")))
        self.server("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "120", "start")
        self.session = Psql(self)
        self.session.query("create table lat (id bigserial primary key, at timestamptz default now(), v text)")
        self.session.query("create table tp (id bigint, v text)")
        self.session.query("create table src as select g as id, md5(random()::text) || md5(random()::text) || "
                           "md5(random()::text) || md5(random()::text) as v "
                           f"from generate_series(1, {max(20000, self.segsize // 250 + 1)}) g")

    def client(self, tool, *args):
        return [os.path.join(self.bin, tool), "-h", self.sock, "-p", str(self.port), "-U", "postgres", *args]

    def archiver(self):
        """(archived_count, failed_count, last_archived_wal, last_failed_wal)."""
        row = self.session.query("select archived_count, failed_count, coalesce(last_archived_wal, ''), "
                                 "coalesce(last_failed_wal, '') from pg_stat_archiver")
        archived, failed, last, last_failed = row.split("|")
        return int(archived), int(failed), last, last_failed

    def ready(self):
        return sum(1 for n in os.listdir(self.status_dir) if n.endswith(".ready"))

    def stop(self):
        if self.session:
            self.session.close()
        try:
            self.server("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        except BenchError as err:
            log(f"warning: {err}")


# --- the two tools -----------------------------------------------------------


class PgBackRest:
    label = "pgBackRest archive-push"
    short = "pgbackrest"

    def __init__(self, binary, root, s3, tls, zstd_level):
        self.bin = binary
        self.dir = os.path.join(root, "pgbackrest")
        for sub in ("", "log", "lock", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
            chown_postgres(os.path.join(self.dir, sub))
        self.conf = os.path.join(self.dir, "pgbackrest.conf")
        self.s3 = s3
        self.tls = tls
        self.zstd_level = zstd_level

    def archive_command(self, pg):
        with open(self.conf, "w") as f:
            f.write(f"""[global]
repo1-type=s3
repo1-path=/pgbackrest
repo1-s3-bucket={BUCKET}
repo1-s3-endpoint=localhost
repo1-storage-port={self.s3.tls_port}
repo1-s3-region={REGION}
repo1-s3-key={self.s3.access}
repo1-s3-key-secret={self.s3.secret}
repo1-s3-uri-style=path
repo1-storage-ca-file={self.tls.ca}
repo1-storage-verify-tls=y
compress-type=zst
compress-level={self.zstd_level}
archive-async=n
log-level-console=warn
log-level-stderr=warn
log-level-file=off
log-path={self.dir}/log
lock-path={self.dir}/lock
spool-path={self.dir}/spool

[{STANZA}]
pg1-path={pg.data}
pg1-port={pg.port}
pg1-socket-path={pg.sock}
pg1-user=postgres
""")
        os.chmod(self.conf, 0o600)
        chown_postgres(self.conf)
        return f"{self.bin} --config={self.conf} --stanza={STANZA} archive-push %p"

    def prepare(self):
        pass

    def start(self, pg):
        run(as_postgres([self.bin, f"--config={self.conf}", f"--stanza={STANZA}", "stanza-create"]), cwd=self.dir)
        # `check` pushes a segment through archive_command and waits for it:
        # proves the whole path (PostgreSQL -> archive-push -> TLS -> S3).
        run(as_postgres([self.bin, f"--config={self.conf}", f"--stanza={STANZA}", "check"]), cwd=self.dir)

    def describe(self):
        return f"pgBackRest {run([self.bin, 'version']).split()[-1]}, zst level {self.zstd_level}, sync archive-push"

    def stored(self):
        return self.s3.objects("pgbackrest/archive")

    def stop(self):
        pass


class Agent:
    label = "platform-agent wal-push"
    short = "ours"

    def __init__(self, binary, root, s3, tls, zstd_level, wal_extra):
        self.dir = os.path.join(root, "agent")
        os.makedirs(os.path.join(self.dir, "config.d"))
        os.chmod(self.dir, 0o755)
        # A copy the postgres user can run, and that a rebuild cannot swap
        # mid-run.
        self.bin = os.path.join(self.dir, "platform-agent")
        shutil.copy2(binary, self.bin)
        os.chmod(self.bin, 0o755)
        self.socket = os.path.join(self.dir, "control.sock")
        self.s3 = s3
        self.tls = tls
        self.zstd_level = zstd_level
        self.wal_extra = wal_extra
        self.proc = None

    def archive_command(self, pg):
        for fname, value in (("s3-key", self.s3.access), ("s3-secret", self.s3.secret)):
            path = os.path.join(self.dir, fname)
            with open(path, "w") as f:
                f.write(value)
            os.chmod(path, 0o600)
        wal = {"enabled": "true", "mode": '"sync"', "compression": '"zstd"',
               "compression_level": str(self.zstd_level)}
        for item in self.wal_extra.split(";"):
            if item.strip():
                key, _, value = item.partition("=")
                wal[key.strip()] = value.strip()
        wal_keys = "".join(f"{key} = {value}\n" for key, value in wal.items())
        self.wal_desc = ", ".join(f"{key} = {value}" for key, value in wal.items() if key != "enabled")
        config = f"""
[agent]
state_dir = "../state"
shutdown_timeout = "30s"
[control]
socket = "../control.sock"
# archive_command runs as postgres: the socket (0660) gets its group.
group = "{'postgres' if os.geteuid() == 0 else ''}"
[metrics]
enabled = false
# Stopping the bench's agent need not run the node's shutdown plan (its
# global sync(2) among others).
[shutdown]
on_agent_stop = "leave-running"
[object_store]
backend = "s3"
[object_store.s3]
endpoint = "{self.s3.tls_endpoint}"
bucket = "{BUCKET}"
prefix = "agent"
access_key_id_file = "../s3-key"
secret_access_key_file = "../s3-secret"
[wal]
{wal_keys}"""
        self.conf_dir = os.path.join(self.dir, "config.d")
        with open(os.path.join(self.conf_dir, "50-bench.toml"), "w") as f:
            f.write(config)
        for path in (self.conf_dir, os.path.join(self.conf_dir, "50-bench.toml")):
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
        # wal-push reads the same configuration (not the secrets) and asks
        # the daemon on the control socket.
        return f"{self.bin} --config {self.conf_dir} --socket {self.socket} wal-push %p %f"

    def prepare(self):
        """Starts the daemon before PostgreSQL, whose first archive_command
        would otherwise find no socket."""
        self.log_path = os.path.join(self.dir, "agent.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        # rustls-native-certs reads the trust store from SSL_CERT_FILE when it
        # is set: the bench CA, for the same TLS front pgBackRest goes through.
        env["SSL_CERT_FILE"] = self.tls.ca
        self.proc = subprocess.Popen([self.bin, "run", "--config", self.conf_dir], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

        def up():
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited ({self.proc.returncode}):\n{tail(self.log_path)}")
            res = subprocess.run([self.bin, "status", "--socket", self.socket], capture_output=True)
            return res.returncode == 0
        wait_for("the agent's control socket", 60, up, step=0.05)

    def start(self, pg):
        # One segment end to end as postgres would push it, to fail early and
        # clearly (socket permissions, TLS trust, config).
        pg.session.query("insert into lat(v) values ('check')")
        segment = pg.session.query("select pg_walfile_name(pg_switch_wal())").strip()

        def archived():
            _count, failed, last, last_failed = pg.archiver()
            if failed:
                raise BenchError(f"wal-push failed on {last_failed}; postgres log:\n{tail(pg.log_path)}\n"
                                 f"agent log:\n{tail(self.log_path)}")
            return last >= segment
        wait_for("the first segment archived by wal-push", 60, archived, step=0.05)

    def describe(self):
        out = run([self.bin, "--version"]).strip()
        return f"{out}, [wal] {self.wal_desc}, S3 over the TLS front (SSL_CERT_FILE = bench CA)"

    def stored(self):
        return self.s3.objects("agent")

    def stop(self):
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --- measurements ------------------------------------------------------------


def latency_round(pg, watcher, deadline_s=120):
    """One round: a little data, pg_switch_wal(), wait for <segment>.done.
    Returns (segment, switch->.done, switch->.ready, .ready->.done) in ms."""
    pg.session.query("insert into lat(v) values (repeat('x', 100))")
    t0 = time.monotonic()
    segment = pg.session.query("select pg_walfile_name(pg_switch_wal())").strip()
    done = watcher.wait(segment + ".done", deadline_s)
    ready = watcher.seen.get(segment + ".ready", t0)
    # The archiver renames .ready to .done first and then reports to
    # pg_stat_archiver, so the statistics may lag the rename a little.
    def archived():
        _count, failed, last, last_failed = pg.archiver()
        if failed > pg.failed_base:
            raise BenchError(f"{pg.name}: archive_command failed on {last_failed}:\n{tail(pg.log_path)}")
        return last >= segment
    wait_for(f"{pg.name}: pg_stat_archiver to report {segment}", 10, archived, step=0.005)
    return segment, (done - t0) * 1000, (ready - t0) * 1000, (done - ready) * 1000


def drain(pg, deadline_s=600):
    start = time.monotonic()
    wait_for(f"{pg.name}: the archive backlog to drain", deadline_s, lambda: pg.ready() == 0, step=0.05)
    return time.monotonic() - start


def set_conf(pg, sql):
    """ALTER SYSTEM ...; reload; then wait until this session sees it (the
    archiver reloads on the same SIGHUP, which also sets its latch)."""
    pg.session.query(sql)
    pg.session.query("select pg_reload_conf()")
    time.sleep(0.2)


def throughput_window(pg, segments, batch_rows):
    """Builds a backlog of `segments` full segments with archiving paused
    (archive_command = '': PostgreSQL keeps them as .ready), then restores
    the tool's archive_command and times the archiver through the whole
    backlog. Returns (segments per minute, segments archived, seconds,
    WAL bytes)."""
    drain(pg)
    # 128 random hex characters a row, copied from a table filled once:
    # about 2.6:1 for zstd, and cheap for the writer.
    insert = f"insert into tp select id, v from src where id <= {batch_rows}"
    # Filling is untimed, so fsync and zero-filling new segments are off
    # while it runs; both are back on before the clock starts.
    set_conf(pg, "alter system set archive_command = ''")
    pg.session.query("alter system set fsync = off")
    set_conf(pg, "alter system set wal_init_zero = off")
    lsn0 = pg.session.query("select pg_current_wal_lsn()")
    batches = 0
    fill_deadline = time.monotonic() + 600
    while pg.ready() < segments:
        if time.monotonic() > fill_deadline:
            raise BenchError(f"{pg.name}: could not build a backlog of {segments} segments in 600 s")
        pg.session.query(insert)
        batches += 1
        if batches % 50 == 0:
            pg.session.query("truncate tp")
    wal = int(pg.session.query(f"select pg_current_wal_lsn() - '{lsn0}'::pg_lsn"))
    backlog = pg.ready()
    c0, f0, _l, _lf = pg.archiver()
    pg.session.query("alter system reset fsync")
    pg.session.query("alter system reset wal_init_zero")
    pg.session.query("alter system reset archive_command")
    t0 = time.monotonic()
    pg.session.query("select pg_reload_conf()")
    wait_for(f"{pg.name}: the backlog of {backlog} segments to be archived", 1800, lambda: pg.ready() == 0,
             step=0.002)
    t1 = time.monotonic()
    c1, f1, _l, last_failed = wait_for(f"{pg.name}: pg_stat_archiver to catch up", 10,
                                       lambda: (lambda a: a if a[0] - c0 >= backlog else None)(pg.archiver()),
                                       step=0.005)
    if f1 != f0:
        raise BenchError(f"{pg.name}: {f1 - f0} archive_command failures during the window "
                         f"(last {last_failed}):\n{tail(pg.log_path)}")
    archived = c1 - c0
    return archived / (t1 - t0) * 60, archived, t1 - t0, wal


def timed_runs(cmd, n, cwd):
    """Median wall time in ms of `cmd` run n times as the postgres user
    (setuid in the child, no PAM session: only the command is timed)."""
    kw = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    times = []
    for i in range(n + 2):  # two unmeasured runs first (page cache)
        start = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, **kw)
        took = (time.monotonic() - start) * 1000
        if res.returncode != 0:
            raise BenchError(f"{cmd!r} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        if i >= 2:
            times.append(took)
    return statistics.median(times)


def breakdown(peer, agent, pg, n=20):
    """Per-call costs outside PostgreSQL's archiver: exec alone, ours' socket
    round trip, and ours' wal-push of a copy of a real segment under a name
    on an unused timeline (so it is a fresh upload). Lines to print."""
    lines = []
    exec_peer = timed_runs([peer.bin, "version"], n, peer.dir)
    exec_ours = timed_runs([agent.bin, "--version"], n, agent.dir)
    status = timed_runs([agent.bin, "--config", agent.conf_dir, "--socket", agent.socket, "status"], n, agent.dir)
    # A real, full segment's bytes (the throughput phase wrote them).
    wal_dir = os.path.join(pg.data, "pg_wal")
    segments = sorted(f for f in os.listdir(wal_dir) if len(f) == 24 and f.startswith("00000001"))
    if not segments:
        raise BenchError(f"no segment in {wal_dir} to copy")
    with open(os.path.join(wal_dir, segments[0]), "rb") as f:
        content = f.read()
    scratch = os.path.join(agent.dir, "breakdown")
    os.makedirs(scratch)
    chown_postgres(scratch)
    push_times = []
    kw = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    for i in range(n):
        name = f"0000007F{0:08X}{i + 1:08X}"
        path = os.path.join(scratch, name)
        with open(path, "wb") as f:
            f.write(content)
        chown_postgres(path)
        start = time.monotonic()
        res = subprocess.run([agent.bin, "--config", agent.conf_dir, "--socket", agent.socket, "wal-push", path,
                              name], capture_output=True, text=True, cwd=scratch, **kw)
        push_times.append((time.monotonic() - start) * 1000)
        if res.returncode != 0:
            raise BenchError(f"wal-push {name} failed ({res.returncode}): {res.stderr[-2000:]}")
    push = statistics.median(push_times)
    lines.append(f"  exec only: `pgbackrest version` {exec_peer:.1f} ms, `platform-agent --version` "
                 f"{exec_ours:.1f} ms (median of {n})")
    lines.append(f"  ours, `platform-agent status` (exec, config, socket round trip): {status:.1f} ms")
    lines.append(f"  ours, `wal-push` of a {len(content) / 2**20:.0f} MiB segment copy, run directly: {push:.1f} ms "
                 f"(so the daemon's part, after the client's exec and round trip, is about {push - status:.1f} ms)")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", help="platform-agent binary; without it only pgBackRest is measured")
    parser.add_argument("--pg-bin", required=True)
    parser.add_argument("--s3s-fs", required=True)
    parser.add_argument("--pgbackrest", required=True)
    parser.add_argument("--stunnel", required=True)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--segments", type=int, default=500, help="backlog per throughput window")
    parser.add_argument("--windows", type=int, default=2, help="alternating throughput windows per tool")
    parser.add_argument("--segsize", type=int, default=1, help="wal_segment_size in MiB (initdb)")
    parser.add_argument("--zstd-level", type=int, default=1)
    parser.add_argument("--wal-extra", default="", help="extra [wal] keys, ';'-separated")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or args.windows < 1 or args.segments < 10:
        raise BenchError("rounds and windows must be positive, segments at least 10")

    log(f"bench/wal: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"loadavg {loadavg()}")
    root = tempfile.mkdtemp(prefix="pa-bench-wal-", dir=os.environ.get("BENCH_DIR") or None)
    os.chmod(root, 0o755)
    cleanup = []
    try:
        tls = Tls(root)
        s3 = S3(args.s3s_fs, args.stunnel, tls, root)
        cleanup.append(s3.stop)
        s3.create_bucket(BUCKET, tls.ca)
        log(f"S3: s3s-fs {s3.endpoint}, TLS front (stunnel) {s3.tls_endpoint}; both tools use the TLS front")

        tools = [PgBackRest(args.pgbackrest, root, s3, tls, args.zstd_level)]
        if args.bin:
            tools.append(Agent(args.bin, root, s3, tls, args.zstd_level, args.wal_extra))
        clusters = {}
        for tool in tools:
            pg = Postgres(args.pg_bin, root, tool.short, args.segsize)
            # Cleanup runs in reverse: PostgreSQL stops before its tool.
            cleanup.append(tool.stop)
            command = tool.archive_command(pg)
            tool.prepare()
            pg.start(command)
            cleanup.append(pg.stop)
            tool.start(pg)
            pg.failed_base = pg.archiver()[1]
            clusters[tool.short] = (pg, StatusWatcher(pg.status_dir))
            log(f"  {tool.label}: {tool.describe()}")
        log(f"PostgreSQL clusters: wal_segment_size {args.segsize} MiB, archive_mode on, one per tool")

        # Warm-up: page cache, TLS session setup paths, first connections.
        for tool in tools:
            pg, watcher = clusters[tool.short]
            for _ in range(3):
                latency_round(pg, watcher)

        log(f"\nlatency, pg_switch_wal() -> <segment>.done, {args.rounds} rounds each, alternating:")
        lat = {tool.short: [] for tool in tools}
        for i in range(args.rounds):
            order = tools if i % 2 == 0 else list(reversed(tools))
            for tool in order:
                pg, watcher = clusters[tool.short]
                lat[tool.short].append(latency_round(pg, watcher))
                time.sleep(0.05)
        load_latency = loadavg()
        summary = {}
        for tool in tools:
            rows = lat[tool.short]
            total = [r[1] for r in rows]
            to_ready = [r[2] for r in rows]
            archiving = [r[3] for r in rows]
            summary[tool.short] = (statistics.median(total), percentile(total, 99), statistics.median(archiving))
            log(f"  {tool.label:26} median {statistics.median(total):7.1f} ms   p99 {percentile(total, 99):7.1f} ms"
                f"   (switch -> .ready median {statistics.median(to_ready):.1f} ms, .ready -> .done median "
                f"{statistics.median(archiving):.1f} ms; fastest {min(total):.1f}, slowest "
                f"{', '.join(f'{t:.1f}' for t in sorted(total)[-3:])})")
        log(f"  loadavg {load_latency}")

        log(f"\nthroughput, a backlog of {args.segments} segments archived as fast as each tool goes, "
            f"{args.windows} windows per tool, alternating:")
        batch_rows = max(500, args.segsize * 1024 * 1024 // 250)
        tp = {tool.short: [] for tool in tools}
        for _w in range(args.windows):
            for tool in tools:
                pg, _watcher = clusters[tool.short]
                res = throughput_window(pg, args.segments, batch_rows)
                tp[tool.short].append(res)
                log(f"  {tool.label:26} {res[0]:7.1f} segments/min ({res[1]} in {res[2]:.1f} s, "
                    f"{res[3] / 2**20:.0f} MiB WAL)")
        rates = {}
        for tool in tools:
            rows = tp[tool.short]
            segs = sum(r[1] for r in rows)
            secs = sum(r[2] for r in rows)
            rates[tool.short] = segs / secs * 60
            count, size = tool.stored()
            log(f"  {tool.label:26} {rates[tool.short]:7.1f} segments/min over {secs:.0f} s "
                f"({rates[tool.short] * args.segsize / 60:.1f} MiB/s of WAL; {count} objects, "
                f"{size / 2**20:.0f} MiB stored in all)")
        load_tp = loadavg()
        log(f"  loadavg {load_tp}")

        if "ours" in clusters:
            log("\nper-call breakdown, outside PostgreSQL's archiver:")
            try:
                for line in breakdown(tools[0], tools[1], clusters["ours"][0]):
                    log(line)
            except BenchError as err:
                log(f"  (breakdown not measured: {err})")

        log("\nresult:")
        peer_med, peer_p99, peer_arch = summary["pgbackrest"]
        log(f"  pgBackRest archive-push: latency median {peer_med:.1f} ms, p99 {peer_p99:.1f} ms; "
            f"{rates['pgbackrest']:.1f} segments/min")
        if "ours" in summary:
            med, p99, arch = summary["ours"]
            r_med, r_p99 = med / peer_med, p99 / peer_p99
            r_tp = rates["ours"] / rates["pgbackrest"]
            log(f"  platform-agent wal-push: latency median {med:.1f} ms, p99 {p99:.1f} ms; "
                f"{rates['ours']:.1f} segments/min")
            log(f"  latency ours/pgBackRest: median {r_med:.3f}, p99 {r_p99:.3f}   target <= "
                f"{TARGET_LATENCY_RATIO}: median {verdict(r_med <= TARGET_LATENCY_RATIO)}, "
                f"p99 {verdict(r_p99 <= TARGET_LATENCY_RATIO)}")
            log(f"  (the archive_command part alone, .ready -> .done median: ours/pgBackRest {arch / peer_arch:.2f})")
            log(f"  throughput ours/pgBackRest: {r_tp:.3f}   target >= {TARGET_THROUGHPUT_RATIO}: "
                f"{verdict(r_tp >= TARGET_THROUGHPUT_RATIO)}")
        else:
            log("  platform-agent: not measured (no binary with wal-push); targets not evaluated")
        log(f"  loadavg at the end {loadavg()} (latency phase {load_latency}, throughput phase {load_tp})")
        for _pg, watcher in clusters.values():
            watcher.close()
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception as err:  # noqa: BLE001 - cleanup must go on
                log(f"warning: cleanup: {err}")
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)
