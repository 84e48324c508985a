#!/usr/bin/env python3
"""Startup and idle-memory bench for platform-agent (driven by run.sh).

Measures, in one run:
  * exec -> READY=1 (sd_notify) for the daemon on the repo's embedded-defaults
    config (config/local.toml): cold (fresh state dir every run) and warm
    (state dir reused), alternating with the peer, node_exporter
    (exec -> its TCP port accepting), and SIGTERM -> exit 0 for ours;
  * VmRSS after 60 s idle, ours and node_exporter side by side (concurrently).

Prints plain lines; exits non-zero only if something failed to run. A missed
target is reported as MISSED, not as a failure.
"""

import argparse
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

STARTUP_TARGET_MS = 100.0
RSS_TARGET_MIB = 12.0
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """Something failed to run (as opposed to a missed target)."""


def log(line=""):
    print(line, flush=True)


def p95(values):
    """Nearest-rank 95th percentile (with 20 samples: the 19th smallest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return ordered[rank - 1]


def verdict(ok):
    return "PASS" if ok else "MISSED"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loopback/wildcard listen addresses in the copied config get a free port each,
# so that the bench neither collides with another agent on this machine (other
# people's tests use the fixed ports of config/local.toml) nor with itself.
ADDR_RE = re.compile(r'"(?:127\.0\.0\.1|localhost|0\.0\.0\.0|\[::1\]|\[::\]):(\d+)"')


def write_config(source_text, home):
    """Lay out HOME/config/local.toml so that the repo config's relative paths
    ("../.local/...") resolve inside HOME, exactly as they do in the repo."""
    conf_dir = os.path.join(home, "config")
    os.makedirs(conf_dir, exist_ok=True)
    ports = {}

    def repl(match):
        key = match.group(0)
        if key not in ports:
            ports[key] = free_port()
        return '"127.0.0.1:%d"' % ports[key]

    path = os.path.join(conf_dir, "local.toml")
    with open(path, "w") as f:
        f.write(ADDR_RE.sub(repl, source_text))
    return path


class NotifySocket:
    """Our own $NOTIFY_SOCKET: AF_UNIX, SOCK_DGRAM, fresh per daemon start."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def wait_ready(self, proc, timeout):
        """Returns time.monotonic() at the arrival of the datagram with READY=1,
        and every datagram seen up to then."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("no READY=1 within %.0f s (got %r)" % (timeout, seen))
            # Short timeouts so an early exit of the daemon is noticed.
            self.sock.settimeout(min(remaining, 0.05))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if proc.poll() is not None:
                    raise BenchError("daemon exited with %s before READY=1 (got %r)" % (proc.returncode, seen))
                continue
            now = time.monotonic()
            text = data.decode("utf-8", "replace")
            seen.append(text)
            if "READY=1" in text.split("\n"):
                return now, seen

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Bench:
    def __init__(self, args):
        self.bin = args.bin
        self.exporter = args.node_exporter
        self.runs = args.runs
        self.idle = args.idle
        self.settle = args.settle_ms / 1000.0
        with open(args.config) as f:
            self.config_text = f.read()
        self.top = tempfile.mkdtemp(prefix="pa-bench-")
        self.keep = args.keep
        self.started = []  # Popen objects we own, for cleanup
        self.cpu_to_ready = []  # CPU ms each start of ours used up to READY

    # -- process handling -------------------------------------------------

    def spawn(self, argv, log_path, env=None):
        logf = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
                start_new_session=True,
            )
        finally:
            logf.close()
        self.started.append(proc)
        return proc

    def tail(self, path, lines=15):
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join("    | " + l for l in text.splitlines()[-lines:])

    def kill_all(self):
        for proc in self.started:
            if proc.poll() is None:
                try:
                    # start_new_session: the child leads its own group; this
                    # ends it and anything it spawned, nothing else.
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    def stop(self, proc, what, log_path, want_zero=True):
        """SIGTERM and reap; returns (ms from the signal to the exit, CPU ms
        user+sys the process used over its whole life)."""
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = t0 + STOP_TIMEOUT_S
        while True:
            # wait4 rather than Popen.wait: it also gives the child's rusage.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                raise BenchError("%s did not exit within %.0f s of SIGTERM; its threads (name state wchan): %s\n%s"
                                 % (what, STOP_TIMEOUT_S, thread_states(proc.pid), self.tail(log_path)))
            time.sleep(0.0005)
        ms = (time.monotonic() - t0) * 1000.0
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        if want_zero and rc != 0:
            raise BenchError("%s exited %s after SIGTERM (want 0)\n%s" % (what, rc, self.tail(log_path)))
        return ms, (usage.ru_utime + usage.ru_stime) * 1000.0

    # -- our daemon ---------------------------------------------------------

    def start_agent(self, home, tag):
        """Starts the daemon in HOME; returns (proc, ms exec->READY, log)."""
        config = os.path.join(home, "config", "local.toml")
        if not os.path.exists(config):
            write_config(self.config_text, home)
        notify = NotifySocket(os.path.join(home, "notify-%s.sock" % tag))
        log_path = os.path.join(home, "agent-%s.log" % tag)
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = notify.path
        # Not under systemd: make sure nothing inherited says otherwise.
        for var in ("JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(var, None)
        logf = open(log_path, "ab")
        try:
            # The clock starts immediately before the fork/exec.
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [self.bin, "run", "--config", config],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            finally:
                logf.close()
            self.started.append(proc)
            try:
                t_ready, _ = notify.wait_ready(proc, READY_TIMEOUT_S)
            except BenchError as err:
                raise BenchError("platform-agent (%s): %s\n%s" % (tag, err, self.tail(log_path)))
            cpu_ms = cpu_so_far_ms(proc.pid)
        finally:
            notify.close()
        self.cpu_to_ready.append(cpu_ms)
        return proc, (t_ready - t0) * 1000.0, log_path

    def agent_once(self, home, tag):
        proc, ready_ms, log_path = self.start_agent(home, tag)
        if self.settle > 0:
            time.sleep(self.settle)
        stop_ms, cpu_ms = self.stop(proc, "platform-agent (%s)" % tag, log_path)
        return ready_ms, stop_ms, cpu_ms

    # -- the peer -------------------------------------------------------------

    def start_exporter(self, home, tag):
        """Starts node_exporter on a free loopback port; returns (proc, ms
        exec->port accepting, log). Polls connect() every 0.5 ms."""
        port = free_port()
        log_path = os.path.join(home, "node-exporter-%s.log" % tag)
        argv = [
            self.exporter,
            "--no-collector.systemd",
            "--web.listen-address=127.0.0.1:%d" % port,
        ]
        t0 = time.monotonic()
        proc = self.spawn(argv, log_path)
        deadline = t0 + READY_TIMEOUT_S
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.connect(("127.0.0.1", port))
                    t_up = time.monotonic()
                    break
                except (ConnectionRefusedError, OSError):
                    pass
            if proc.poll() is not None:
                raise BenchError("node_exporter exited with %s before listening\n%s" % (proc.returncode, self.tail(log_path)))
            if time.monotonic() > deadline:
                raise BenchError("node_exporter not listening on %d within %.0f s\n%s" % (port, READY_TIMEOUT_S, self.tail(log_path)))
            time.sleep(0.0005)
        return proc, (t_up - t0) * 1000.0, log_path

    def exporter_once(self, home, tag):
        proc, up_ms, log_path = self.start_exporter(home, tag)
        # node_exporter dies of SIGTERM (no handler); its exit code is not ours to judge.
        _, cpu_ms = self.stop(proc, "node_exporter", log_path, want_zero=False)
        return up_ms, cpu_ms

    # -- measurements -----------------------------------------------------------

    def startup(self):
        log("== startup: exec -> READY=1, %d runs each, alternating cold / warm / peer" % self.runs)
        warm_home = os.path.join(self.top, "warm")
        peer_home = os.path.join(self.top, "peer")
        os.makedirs(peer_home)
        # Unmeasured: pages the binaries in and creates the warm state dir.
        self.agent_once(os.path.join(self.top, "prime"), "prime")
        self.agent_once(warm_home, "prime")
        self.exporter_once(peer_home, "prime")

        self.cpu_to_ready.clear()
        cold, warm, peer, stops = [], [], [], []
        cpu = {"cold": [], "warm": [], "peer": []}
        for i in range(self.runs):
            ready, stop, used = self.agent_once(os.path.join(self.top, "cold-%02d" % i), "cold")
            cold.append(ready)
            stops.append(stop)
            cpu["cold"].append(used)
            ready, stop, used = self.agent_once(warm_home, "warm-%02d" % i)
            warm.append(ready)
            stops.append(stop)
            cpu["warm"].append(used)
            up, used = self.exporter_once(peer_home, "%02d" % i)
            peer.append(up)
            cpu["peer"].append(used)

        results = {}
        for name, values in (("cold", cold), ("warm", warm)):
            med, high = statistics.median(values), p95(values)
            ok = high <= STARTUP_TARGET_MS
            results[name] = (med, high, ok)
            log("startup %s: median %.1f ms, p95 %.1f ms, min %.1f, max %.1f (target <= %.0f ms): %s"
                % (name, med, high, min(values), max(values), STARTUP_TARGET_MS, verdict(ok)))
        peer_med = statistics.median(peer)
        log("startup peer node_exporter (exec -> port accepting): median %.1f ms, p95 %.1f ms"
            % (peer_med, p95(peer)))
        log("startup ratio ours cold / node_exporter (medians): %.2f" % (results["cold"][0] / peer_med))
        log("stop (SIGTERM -> exit 0), ours: median %.1f ms, p95 %.1f ms, all %d exits 0"
            % (statistics.median(stops), p95(stops), len(stops)))
        # CPU time barely depends on what else the machine is doing, unlike
        # the wall-clock numbers above: compare these across runs and commits.
        log("cpu exec -> READY, ours (all threads, from schedstat): median %.1f ms, p95 %.1f ms"
            % (statistics.median(self.cpu_to_ready), p95(self.cpu_to_ready)))
        log("cpu per start..exit (user+sys), medians: ours cold %.1f ms, ours warm %.1f ms, node_exporter %.1f ms"
            % (statistics.median(cpu["cold"]), statistics.median(cpu["warm"]), statistics.median(cpu["peer"])))
        log("  samples cold ms: " + " ".join("%.1f" % v for v in cold))
        log("  samples warm ms: " + " ".join("%.1f" % v for v in warm))
        return results, peer_med

    def idle_rss(self):
        log("== idle RSS after %d s, ours and node_exporter concurrently" % self.idle)
        home = os.path.join(self.top, "rss")
        agent, _, agent_log = self.start_agent(home, "rss")
        exporter, _, exporter_log = self.start_exporter(home, "rss")
        t_start = time.monotonic()
        # The wait is the measurement: what each keeps resident once idle.
        # Check every few seconds that both are still alive.
        while True:
            left = t_start + self.idle - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 5.0))
            for proc, what, path in ((agent, "platform-agent", agent_log), (exporter, "node_exporter", exporter_log)):
                if proc.poll() is not None:
                    raise BenchError("%s exited with %s during the idle wait\n%s" % (what, proc.returncode, self.tail(path)))
        ours = proc_status(agent.pid)
        peer = proc_status(exporter.pid)
        breakdown = smaps_breakdown(agent.pid)
        self.stop(exporter, "node_exporter", exporter_log, want_zero=False)
        self.stop(agent, "platform-agent (rss)", agent_log)

        ours_mib = kib_to_mib(ours["VmRSS"])
        peer_mib = kib_to_mib(peer["VmRSS"])
        ok = ours_mib <= RSS_TARGET_MIB
        log("idle RSS ours: %.1f MiB (target <= %.0f MiB): %s" % (ours_mib, RSS_TARGET_MIB, verdict(ok)))
        log("idle RSS node_exporter: %.1f MiB" % peer_mib)
        log("idle RSS ratio ours / node_exporter: %.2f" % (ours_mib / peer_mib))
        for what, st in (("ours", ours), ("node_exporter", peer)):
            log("  %s: VmHWM %.1f MiB, RssAnon %.1f MiB, RssFile %.1f MiB, threads %s"
                % (what, kib_to_mib(st["VmHWM"]), kib_to_mib(st["RssAnon"]), kib_to_mib(st["RssFile"]), st["Threads"]))
        log("  ours, largest resident mappings: " + ", ".join("%s %.1f MiB" % (k, kib_to_mib(v)) for k, v in breakdown))
        return ours_mib, peer_mib, ok

    def cleanup(self):
        self.kill_all()
        if self.keep:
            log("kept %s" % self.top)
        else:
            shutil.rmtree(self.top, ignore_errors=True)


def cpu_so_far_ms(pid):
    """CPU time the live threads of PID have run, in ms (schedstat: ns
    precision, unlike the 10 ms ticks of /proc/PID/stat). Threads that have
    already exited are not counted; before READY ours keep theirs alive."""
    total = 0
    task_dir = "/proc/%d/task" % pid
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return float("nan")
    for tid in tids:
        try:
            with open("%s/%s/schedstat" % (task_dir, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e6


def thread_states(pid):
    out = []
    try:
        for tid in sorted(os.listdir("/proc/%d/task" % pid), key=int):
            base = "/proc/%d/task/%s" % (pid, tid)
            try:
                with open(base + "/comm") as f:
                    comm = f.read().strip()
                with open(base + "/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(base + "/wchan") as f:
                    wchan = f.read().strip() or "-"
            except OSError:
                continue
            out.append("%s %s %s" % (comm, state, wchan))
    except OSError:
        return "(gone)"
    return "; ".join(out) + " (state R = running: a busy loop if it stays so)"


def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            value = value.strip()
            if value.endswith(" kB"):
                out[key] = int(value[:-3])
            else:
                out[key] = value
    return out


def smaps_breakdown(pid, top=6):
    """Resident kB per kind of mapping: the binary, each library, [heap],
    [stack], and anonymous (thread stacks, malloc arenas, mmap'd buffers)."""
    totals = {}
    current = None
    try:
        with open("/proc/%d/smaps" % pid) as f:
            for line in f:
                fields = line.split()
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    name = fields[5] if len(fields) > 5 else "[anon]"
                    current = os.path.basename(name) if name.startswith("/") else name
                elif fields and fields[0] == "Rss:" and current is not None:
                    totals[current] = totals.get(current, 0) + int(fields[1])
    except OSError:
        return []
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def kib_to_mib(kib):
    return kib / 1024.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--config", required=True, help="config to copy (config/local.toml)")
    parser.add_argument("--node-exporter", required=True)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--idle", type=int, default=60)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--settle-ms", type=int, default=0,
                        help="wait this long between READY and SIGTERM (default 0: at once)")
    args = parser.parse_args()
    if args.runs < 20:
        parser.error("--runs must be at least 20")

    bench = Bench(args)
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        log("platform-agent startup bench, %s, %d CPUs, loadavg %s" % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(), load))
        log("binary %s, config %s (copied per run, listen ports rewritten to free loopback ports)" % (args.bin, args.config))
        st = os.stat(args.bin)
        log("binary size %.1f MiB, built %s" % (st.st_size / 2**20, time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))))
        if args.settle_ms:
            log("NOTE: SIGTERM is sent %d ms after READY (BENCH_SETTLE_MS), not at once" % args.settle_ms)
        results, _ = bench.startup()
        ours_mib, peer_mib, rss_ok = bench.idle_rss()
    except BenchError as err:
        log("ERROR: %s" % err)
        return 1
    finally:
        bench.cleanup()

    missed = [name for name, ok in (("startup cold", results["cold"][2]), ("startup warm", results["warm"][2]), ("idle RSS", rss_ok)) if not ok]
    log("== summary")
    log("summary: startup cold median %.1f ms p95 %.1f ms %s; startup warm median %.1f ms p95 %.1f ms %s; "
        "idle RSS %.1f MiB %s (node_exporter %.1f MiB, ratio %.2f)"
        % (results["cold"][0], results["cold"][1], verdict(results["cold"][2]),
           results["warm"][0], results["warm"][1], verdict(results["warm"][2]),
           ours_mib, verdict(rss_ok), peer_mib, ours_mib / peer_mib))
    if missed:
        log("summary: MISSED targets: %s" % ", ".join(missed))
    else:
        log("summary: all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
