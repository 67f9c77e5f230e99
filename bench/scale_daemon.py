#!/usr/bin/env python3
"""The daemon phase of bench/scale.sh (issue 23): one `flynode run` with a routing file
of N nodes, all but itself silent (their endpoints lead to a veth peer nobody answers
on), in a network namespace this script is given. For each N it measures:

- ready: from the start of `flynode run` until its control socket answers `status`;
- change: a one-node change to the routing file (a new node added, SIGHUP) until the
  daemon logs it applied, and the daemon's own account of it from that line (read_ms:
  reading and validating the file, without the state lock; apply_ms: applying it,
  under the lock);
- status idle: the quickest of three `flynode status --json` calls at idle (process
  start, the daemon's snapshot of every peer, JSON both ways);
- status during reload: the slowest of the `flynode status` calls made, one after
  the other, while a second one-node change is read and applied;
- idle CPU: the daemon's CPU time over an idle window, as % of one core;
- to silent peers: packets the daemon's veth sent in that window, per second;
- RSS after the window (VmRSS).

usage: scale_daemon.py FLYNODE NETNS DIR IDLE_SECONDS N [N ...]
Prints one JSON object per N on stdout.
"""
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

IFACE = "v0"
BLACKHOLE = "198.18.30.2:51999"


def node_entry(i: int, key: str, endpoint: str, mesh: str) -> str:
    return (
        f'[[node]]\nid = "node-{i}"\nregion = "r{i % 16}"\npublic_key = "{key}"\n'
        f'endpoint = "{endpoint}"\nmesh_address = "{mesh}"\n\n'
    )


def routing(n: int, own_key: str) -> str:
    parts = [node_entry(0, own_key, "198.18.30.1:51820", "fd00:f1::1")]
    for i in range(1, n):
        key = base64.b64encode(hashlib.sha256(b"silent %d" % i).digest()).decode()
        parts.append(node_entry(i, key, BLACKHOLE, f"fd00:f1::{i + 1:x}"))
    return "".join(parts)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tx_packets(ns: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{IFACE}/statistics/tx_packets"],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout)


def status(flynode: str, sock: str) -> tuple[float, dict | None]:
    t = time.monotonic()
    out = subprocess.run(
        [flynode, "status", "--json", "--socket", sock], capture_output=True, text=True
    )
    took = time.monotonic() - t
    return took, (json.loads(out.stdout) if out.returncode == 0 else None)


def one(flynode: str, ns: str, base: str, idle: float, n: int) -> dict:
    d = os.path.join(base, f"n{n}")
    os.makedirs(d)
    subprocess.run([flynode, "keys", "generate", "--key-dir", f"{d}/keys"],
                   check=True, capture_output=True)
    own = subprocess.run([flynode, "keys", "pubkey", f"{d}/keys/private.key"],
                         check=True, capture_output=True, text=True).stdout.strip()
    with open(f"{d}/routing.toml", "w") as f:
        f.write(routing(n, own))
    with open(f"{d}/flynode.toml", "w") as f:
        f.write(
            f'node_id = "node-0"\nregion = "r0"\nmesh_address = "fd00:f1::1"\n'
            f'key_dir = "{d}/keys"\ncontrol_socket = "{d}/control.sock"\n'
            f'[xdp]\ninterface = "{IFACE}"\nmode = "generic"\n'
            f'[source]\nfile = "{d}/routing.toml"\n[metrics]\nenabled = false\n'
        )
    sock = f"{d}/control.sock"
    log = open(f"{d}/daemon.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, flynode, "run", "--config", f"{d}/flynode.toml"],
        stdout=log, stderr=log,
    )
    try:
        ready = None
        while time.monotonic() - t0 < 120:
            if proc.poll() is not None:
                raise SystemExit(f"flynode run exited ({proc.returncode}); see {d}/daemon.log")
            if os.path.exists(sock) and status(flynode, sock)[1] is not None:
                ready = time.monotonic() - t0
                break
            time.sleep(0.02)
        if ready is None:
            raise SystemExit(f"not ready after 120 s; see {d}/daemon.log")
        # The first minute of the target is the start's own work; then idle.
        time.sleep(2)
        cpu0, tx0, w0 = cpu_seconds(proc.pid), tx_packets(ns), time.monotonic()
        time.sleep(idle)
        cpu1, tx1, w1 = cpu_seconds(proc.pid), tx_packets(ns), time.monotonic()
        rss = rss_mib(proc.pid)
        status_idle = min(status(flynode, sock)[0] for _ in range(3))
        def add_node(i: int) -> None:
            with open(f"{d}/routing.toml", "a") as f:
                key = base64.b64encode(hashlib.sha256(b"added %d" % i).digest()).decode()
                f.write(node_entry(i, key, BLACKHOLE, f"fd00:f1::{i + 1:x}"))

        def reloaded(nodes: int):
            for line in open(f"{d}/daemon.log"):
                if "routing map reloaded" in line and f"nodes={nodes} " in line:
                    fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                    return int(fields["read_ms"]), int(fields["apply_ms"])
            return None

        # A one-node change, timed by the daemon's log line (nothing else running).
        add_node(n)
        t1 = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        change = timing = None
        while time.monotonic() - t1 < 60:
            timing = reloaded(n + 1)
            if timing is not None:
                change = time.monotonic() - t1
                break
            time.sleep(0.005)
        read_ms, apply_ms = timing or (None, None)
        # Another, with status asked again and again while it is read and applied.
        add_node(n + 1)
        t2 = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        slowest = 0.0
        while time.monotonic() - t2 < 60:
            took, s = status(flynode, sock)
            slowest = max(slowest, took)
            if s is not None and s["routing"]["nodes"] == n + 2:
                break
        return {
            "nodes": n,
            "ready_s": round(ready, 3),
            "change_s": None if change is None else round(change, 3),
            "read_ms": read_ms,
            "apply_ms": apply_ms,
            "status_idle_s": round(status_idle, 3),
            "status_during_reload_s": round(slowest, 3),
            "idle_cpu_pct": round(100 * (cpu1 - cpu0) / (w1 - w0), 2),
            "to_silent_pkt_s": round((tx1 - tx0) / (w1 - w0), 2),
            "rss_mib": round(rss, 1),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> None:
    flynode, ns, base, idle = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    for n in sys.argv[5:]:
        print(json.dumps(one(flynode, ns, base, idle, int(n))), flush=True)


if __name__ == "__main__":
    main()
