#!/usr/bin/env python3
"""PostgreSQL backup bench for platform-agent (driven by run.sh).

In one run, on a pgbench database of at least 1 GB, against one local S3
server (s3s-fs):
  * wall time of `platform-agent backup now` (pg_dump custom format ->
    zstd -> S3 multipart -> read-back SHA-256 check), alternating with
  * the shell pipeline `pg_dump | gzip | aws s3 cp -` to the same S3, and
  * the bare dump `pg_dump > /dev/null`;
  * the agent's peak RSS (VmHWM) over a backup of that database and over a
    backup of one four times larger, each in a fresh daemon.

Prints plain lines; exits non-zero only if something failed to run. A missed
target is reported as MISSED, not as a failure.
"""

import argparse
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_VS_PIPELINE = 0.5
TARGET_VS_BARE = 1.25
TARGET_RSS_MIB = 64.0
BUCKET = "bench"


class BenchError(Exception):
    """Something failed to run (as opposed to a missed target)."""


def log(line=""):
    print(line, flush=True)


def verdict(ok):
    return "PASS" if ok else "MISSED"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise BenchError(f"{cmd!r} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout


def timed(cmd, **kw):
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    took = time.monotonic() - start
    if res.returncode != 0:
        raise BenchError(f"{cmd!r} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return took, res.stdout


def wait_for(what, deadline_s, probe):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {what}")


def proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def kib(value):
    return int(value.split()[0])


class Postgres:
    def __init__(self, pg_bin, root):
        self.bin = pg_bin
        self.root = root
        self.data = os.path.join(root, "pgdata")
        self.sock = os.path.join(root, "pgsock")
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        os.makedirs(self.sock)
        os.chmod(root, 0o755)
        os.chmod(self.sock, 0o777)
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            for path in (root, self.sock):
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def server(self, tool, *args):
        cmd = [os.path.join(self.bin, tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return run(cmd, cwd=self.root)

    def start(self):
        self.server("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--locale=C", "--no-sync", "--no-instructions")
        conf = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.sock,
            # Loading speed only; the dump does not depend on these.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "max_wal_size": "8GB",
            "checkpoint_timeout": "30min",
            "shared_buffers": "256MB",
            "maintenance_work_mem": "256MB",
            "logging_collector": "off",
        }
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = '{value}'\n")
        self.server("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "postgres.log"), "-w", "-t", "120", "start")

    def stop(self):
        try:
            self.server("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        except BenchError as err:
            log(f"warning: {err}")

    def client(self, tool, *args):
        return [os.path.join(self.bin, tool), "-h", self.sock, "-p", str(self.port), "-U", "postgres", *args]

    def psql(self, database, sql):
        return run(self.client("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql)).strip()

    def load(self, database, scale):
        self.psql("postgres", f"DROP DATABASE IF EXISTS {database}")
        self.psql("postgres", f"CREATE DATABASE {database}")
        start = time.monotonic()
        run(self.client("pgbench", "-i", "-q", "-s", str(scale), "-I", "dtGvp", database))
        size = int(self.psql(database, f"SELECT pg_database_size('{database}')"))
        log(f"  pgbench -i -s {scale} into {database}: {size / 2**30:.2f} GiB in {time.monotonic() - start:.0f} s")
        return size


class S3:
    def __init__(self, binary, root):
        self.port = free_port()
        self.data = os.path.join(root, "s3data")
        os.makedirs(self.data)
        self.access = "AK" + secrets.token_hex(8).upper()
        self.secret = secrets.token_hex(16)
        self.log = open(os.path.join(root, "s3s-fs.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", str(self.port), "--access-key", self.access,
             "--secret-key", self.secret, self.data],
            stdout=self.log, stderr=subprocess.STDOUT)

        def accepts():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False
        wait_for("s3s-fs", 30, accepts)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def aws_env(self):
        env = dict(os.environ)
        env.update({
            "AWS_ACCESS_KEY_ID": self.access,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1",
        })
        return env

    def aws(self, *args):
        return ["aws", "--endpoint-url", self.endpoint, *args]

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Agent:
    def __init__(self, binary, root, pg, s3, name):
        self.bin = binary
        self.dir = os.path.join(root, name)
        conf_dir = os.path.join(self.dir, "config.d")
        os.makedirs(conf_dir)
        for fname, value in (("s3-key", s3.access), ("s3-secret", s3.secret)):
            with open(os.path.join(self.dir, fname), "w") as f:
                f.write(value)
        self.socket = os.path.join(self.dir, "control.sock")
        config = f"""
[agent]
state_dir = "../state"
shutdown_timeout = "60s"
[control]
socket = "../control.sock"
group = ""
[metrics]
enabled = false
[object_store]
backend = "s3"
[object_store.s3]
endpoint = "{s3.endpoint}"
bucket = "{BUCKET}"
prefix = "agent"
access_key_id_file = "../s3-key"
secret_access_key_file = "../s3-secret"
[backup]
scratch_dir = "../scratch"
[[backup.jobs]]
name = "pg"
kind = "postgres"
retries = 0
keep_last = 2
keep_daily = 0
keep_weekly = 0
keep_monthly = 0
min_verified = 1
[backup.jobs.postgres]
host = "{pg.sock}"
port = {pg.port}
user = "postgres"
databases = ["bench"]
bin_dir = "{pg.bin}"
# The peer pipeline dumps the one database only.
globals = false
"""
        with open(os.path.join(conf_dir, "50-bench.toml"), "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen([self.bin, "run", "--config", conf_dir], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        wait_for("the agent's socket", 30, lambda: self.cli_ok("status"))

    def cli_ok(self, *args):
        if self.proc.poll() is not None:
            raise BenchError(f"the agent exited ({self.proc.returncode}); see {self.dir}/agent.log")
        res = subprocess.run([self.bin, *args, "--socket", self.socket], capture_output=True, text=True)
        return res.returncode == 0

    def backup_now(self):
        took, out = timed([self.bin, "backup", "now", "pg", "--json", "--socket", self.socket])
        rows = json.loads(out)
        if not rows or rows[0]["state"] != "verified":
            raise BenchError(f"backup did not verify: {out}")
        return took, rows[0]

    def memory(self):
        status = proc_status(self.proc.pid)
        return kib(status["VmHWM"]) / 1024, kib(status["VmRSS"]) / 1024, int(status["Threads"])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--pg-bin", required=True)
    parser.add_argument("--s3s-fs", required=True)
    parser.add_argument("--scale", type=int, default=70, help="pgbench scale of the 1 GB database")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large-factor", type=int, default=4)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="pa-bench-backup-", dir=os.environ.get("BENCH_DIR") or None)
    pg = Postgres(args.pg_bin, root)
    s3 = None
    agent = None
    try:
        log(f"bench directory {root}")
        pg.start()
        size = pg.load("bench", args.scale)
        if size < 2**30:
            raise BenchError(f"the database is {size / 2**30:.2f} GiB; raise --scale to reach 1 GiB")
        s3 = S3(args.s3s_fs, root)
        env = s3.aws_env()
        run(s3.aws("s3api", "create-bucket", "--bucket", BUCKET), env=env)

        bare_cmd = pg.client("pg_dump", "-d", "bench")
        pipeline = (
            f"set -o pipefail; {' '.join(bare_cmd)} | gzip | "
            f"aws --endpoint-url {s3.endpoint} s3 cp - s3://{BUCKET}/pipeline/bench.sql.gz"
        )
        agent = Agent(args.bin, root, pg, s3, "agent-1g")
        idle_hwm, idle_rss, _ = agent.memory()

        log("warm-up: one unmeasured bare dump (page cache)")
        subprocess.run(bare_cmd, stdout=subprocess.DEVNULL, check=True)

        times = {"ours": [], "pipeline": [], "bare": []}
        stored = 0
        pipeline_bytes = 0
        for r in range(1, args.rounds + 1):
            took, _ = timed(["bash", "-c", f"{' '.join(bare_cmd)} > /dev/null"])
            times["bare"].append(took)
            took, _ = timed(["bash", "-c", pipeline], env=env)
            times["pipeline"].append(took)
            out = run(s3.aws("s3api", "head-object", "--bucket", BUCKET, "--key", "pipeline/bench.sql.gz"), env=env)
            pipeline_bytes = json.loads(out)["ContentLength"]
            took, row = agent.backup_now()
            times["ours"].append(took)
            stored = row["bytes"]
            log(f"  round {r}: bare {times['bare'][-1]:.1f} s, pipeline {times['pipeline'][-1]:.1f} s, "
                f"ours {took:.1f} s ({row['raw_bytes'] / 2**20:.0f} MiB dumped, {stored / 2**20:.0f} MiB stored)")
        hwm_1g, rss_1g, threads = agent.memory()
        agent.stop()
        agent = None

        log(f"large database: {args.large_factor}x the scale")
        large = pg.load("bench", args.scale * args.large_factor)
        run(s3.aws("s3", "rm", "--recursive", f"s3://{BUCKET}/agent/"), env=env)
        agent = Agent(args.bin, root, pg, s3, "agent-large")
        took_large, row_large = agent.backup_now()
        hwm_large, rss_large, _ = agent.memory()
        agent.stop()
        agent = None

        med = {k: statistics.median(v) for k, v in times.items()}
        vs_pipeline = med["ours"] / med["pipeline"]
        vs_bare = med["ours"] / med["bare"]
        peak = max(hwm_1g, hwm_large)
        log()
        log(f"database {size / 2**30:.2f} GiB (pgbench scale {args.scale}), {args.rounds} rounds, medians:")
        log(f"  pg_dump > /dev/null                     {med['bare']:7.1f} s")
        log(f"  pg_dump | gzip | aws s3 cp -            {med['pipeline']:7.1f} s   ({pipeline_bytes / 2**20:.0f} MiB stored)")
        log(f"  platform-agent backup now (zstd, S3,    {med['ours']:7.1f} s   ({stored / 2**20:.0f} MiB stored)")
        log("    read back and SHA-256 checked)")
        log(f"  ours / shell pipeline   {vs_pipeline:5.2f}   target <= {TARGET_VS_PIPELINE}   {verdict(vs_pipeline <= TARGET_VS_PIPELINE)}")
        log(f"  ours / bare pg_dump     {vs_bare:5.2f}   target <= {TARGET_VS_BARE}   {verdict(vs_bare <= TARGET_VS_BARE)}")
        log("agent memory (VmHWM = peak RSS over the daemon's life, fresh daemon per size):")
        log(f"  idle before the first backup            {idle_rss:6.1f} MiB (peak {idle_hwm:.1f})")
        log(f"  {size / 2**30:5.2f} GiB database                      {hwm_1g:6.1f} MiB peak ({threads} threads)")
        log(f"  {large / 2**30:5.2f} GiB database ({args.large_factor}x)                 {hwm_large:6.1f} MiB peak "
            f"({took_large:.0f} s, {row_large['raw_bytes'] / 2**30:.2f} GiB dumped)")
        log(f"  peak <= {TARGET_RSS_MIB:.0f} MiB and flat ({hwm_large / hwm_1g:.2f}x for {args.large_factor}x the data)   "
            f"{verdict(peak <= TARGET_RSS_MIB)}")
        load = open("/proc/loadavg").read().split()[:3]
        log(f"loadavg during the bench: {' '.join(load)} on {os.cpu_count()} CPUs")
        return 0
    finally:
        if agent is not None:
            agent.stop()
        if s3 is not None:
            s3.stop()
        pg.stop()
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)
