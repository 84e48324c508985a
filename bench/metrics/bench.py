#!/usr/bin/env python3
"""Scrape bench for platform-agent's /metrics (driven by run.sh).

Three exporters run side by side on loopback: ours, node_exporter with its
default collectors (less systemd) and node_exporter with only the collectors
the agent implements. Each is scraped N times per request kind, round-robin,
over one kept-alive connection each (as Prometheus does):

  * "prometheus": the headers Prometheus 2.x sends (OpenMetrics preferred,
    gzip accepted);
  * "plain": no Accept headers (text format, uncompressed), as curl.

Latency is client-side, from sending the request to the last body byte.
CPU per scrape is the exporter's utime+stime (all threads, /proc/PID/stat)
over the series divided by N. Targets (issue 4): ours <= 0.2x node_exporter's
latency and <= 0.5x its CPU per scrape.
"""

import argparse
import http.client
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LATENCY_TARGET = 0.2
CPU_TARGET = 0.5
WARMUP = 30
COLLECTORS = [
    "cpu", "diskstats", "filefd", "filesystem", "loadavg", "meminfo", "netdev",
    "pressure", "stat", "textfile", "time", "uname", "vmstat",
]
KINDS = {
    "prometheus": {
        "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "Accept-Encoding": "gzip",
    },
    "plain": {},
}
TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def log(line=""):
    print(line, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p99(values):
    ordered = sorted(values)
    return ordered[max(1, math.ceil(0.99 * len(ordered))) - 1]


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class Target:
    def __init__(self, name, argv, port, log_path):
        self.name = name
        self.port = port
        self.log_path = log_path
        logf = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     start_new_session=True)
        logf.close()
        self.conn = None
        self.latencies = {kind: [] for kind in KINDS}
        self.cpu = {kind: 0.0 for kind in KINDS}
        self.size = {kind: 0 for kind in KINDS}

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError("%s exited with %s:\n%s" % (self.name, self.proc.returncode, tail(self.log_path)))
            try:
                status, _ = self.scrape({})
                if status == 200:
                    return
            except OSError:
                self.conn = None
            time.sleep(0.05)
        raise BenchError("%s did not answer within %.0f s:\n%s" % (self.name, timeout, tail(self.log_path)))

    def scrape(self, headers):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.conn.request("GET", "/metrics", headers=headers)
        response = self.conn.getresponse()
        body = response.read()
        return response.status, body

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def tail(path, lines=15):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join("    | " + l for l in text.splitlines()[-lines:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--node-exporter", required=True)
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.scrapes < 500:
        raise BenchError("--scrapes must be at least 500 (p99 needs the samples)")

    top = tempfile.mkdtemp(prefix="pa-bench-metrics-")
    textfile_dir = os.path.join(top, "textfile")
    os.makedirs(textfile_dir)
    with open(os.path.join(textfile_dir, "site.prom"), "w") as f:
        f.write("# HELP site_info A textfile metric.\n# TYPE site_info gauge\nsite_info{site=\"bench\"} 1\n")
    port = free_port()
    config = os.path.join(top, "agent.toml")
    with open(config, "w") as f:
        f.write('[agent]\nstate_dir = "state"\n[control]\nsocket = "control.sock"\ngroup = ""\n'
                '[object_store.local]\npath = "objects"\n'
                '[metrics]\nlisten = "127.0.0.1:%d"\ntextfile_dir = "textfile"\n' % port)
    targets = []
    try:
        targets.append(Target("platform-agent", [args.bin, "run", "--config", config], port,
                              os.path.join(top, "agent.log")))
        ne_port = free_port()
        targets.append(Target("node_exporter (defaults)", [
            args.node_exporter, "--web.listen-address=127.0.0.1:%d" % ne_port, "--no-collector.systemd",
            "--collector.textfile.directory=" + textfile_dir], ne_port, os.path.join(top, "ne-defaults.log")))
        same_port = free_port()
        targets.append(Target("node_exporter (same collectors)", [
            args.node_exporter, "--web.listen-address=127.0.0.1:%d" % same_port, "--collector.disable-defaults",
            "--collector.textfile.directory=" + textfile_dir] + ["--collector." + c for c in COLLECTORS],
            same_port, os.path.join(top, "ne-same.log")))
        for target in targets:
            target.wait_ready()
        version = subprocess.run([args.node_exporter, "--version"], capture_output=True, text=True)
        log("peer: %s" % (version.stdout or version.stderr).splitlines()[0])
        log("scrapes: %d per exporter and request kind, round-robin, after %d warm-up each" % (args.scrapes, WARMUP))

        for kind, headers in KINDS.items():
            for _ in range(WARMUP):
                for target in targets:
                    target.scrape(headers)
            before = {t.name: cpu_seconds(t.proc.pid) for t in targets}
            for _ in range(args.scrapes):
                for target in targets:
                    t0 = time.perf_counter()
                    status, body = target.scrape(headers)
                    target.latencies[kind].append(time.perf_counter() - t0)
                    if status != 200:
                        raise BenchError("%s answered %d" % (target.name, status))
                    target.size[kind] = len(body)
            for target in targets:
                target.cpu[kind] = (cpu_seconds(target.proc.pid) - before[target.name]) / args.scrapes

        ours = targets[0]
        ok = True
        for kind in KINDS:
            log()
            log("== %s requests (%s)" % (kind, ", ".join("%s: %s" % kv for kv in KINDS[kind].items()) or "no Accept headers"))
            log("%-32s %10s %10s %14s %10s" % ("exporter", "median ms", "p99 ms", "CPU ms/scrape", "bytes"))
            for target in targets:
                lat = target.latencies[kind]
                log("%-32s %10.3f %10.3f %14.3f %10d" % (
                    target.name, statistics.median(lat) * 1e3, p99(lat) * 1e3, target.cpu[kind] * 1e3,
                    target.size[kind]))
            for peer in targets[1:]:
                med = statistics.median(ours.latencies[kind]) / statistics.median(peer.latencies[kind])
                tail99 = p99(ours.latencies[kind]) / p99(peer.latencies[kind])
                cpu = ours.cpu[kind] / peer.cpu[kind] if peer.cpu[kind] > 0 else float("nan")
                lat_ok = med <= LATENCY_TARGET and tail99 <= LATENCY_TARGET
                cpu_ok = cpu <= CPU_TARGET
                ok = ok and lat_ok and cpu_ok
                log("ours / %-25s latency median %.3fx, p99 %.3fx (target <= %.1fx: %s); CPU %.3fx (target <= %.1fx: %s)" % (
                    peer.name, med, tail99, LATENCY_TARGET, "PASS" if lat_ok else "MISSED",
                    cpu, CPU_TARGET, "PASS" if cpu_ok else "MISSED"))
        log()
        log("RSS after the run: " + ", ".join("%s %.1f MiB" % (t.name, rss_mib(t.proc.pid)) for t in targets))
        log("overall: %s" % ("PASS" if ok else "MISSED"))
    finally:
        for target in targets:
            target.stop()
        if args.keep:
            log("kept %s" % top)
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as err:
        print("ERROR: %s" % err, file=sys.stderr)
        sys.exit(1)
