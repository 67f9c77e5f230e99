#!/usr/bin/env python3
"""Turns the raw results of bench/tunnel.sh into the table, the ratios and the verdicts.

usage: report.py RESULTS_DIR [--json FILE] [--strict]

RESULTS_DIR holds meta.json and one directory per variant with: name, status ("ok" or
"skipped: why"), pins.txt, and per run N: ping.N.txt, {tcp,udp1392,udp64}.N.json (iperf3
client JSON, which carries the server's receive totals) with .pre/.post snapshots of
/proc/stat, the tunnel processes' /proc/PID/stat and both hosts' UDP counters.
"""

import argparse
import json
import os
import re
import statistics
import sys

TESTS = {"tcp": None, "udp1392": 1392, "udp64": 64}
TARGET = 3.0  # flynode / boringtun-cli
CLK_TCK = os.sysconf("SC_CLK_TCK")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def iperf_sample(path, payload):
    """One iperf3 run: receiver-side numbers, or None if the run failed."""
    text = read(path)
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if doc.get("error"):
        return None
    end = doc.get("end") or {}
    rx = end.get("sum_received")
    if payload is None:
        if not rx or not rx.get("seconds"):
            return None
        return {
            "gbps": rx["bytes"] * 8 / rx["seconds"] / 1e9,
            "retransmits": (end.get("sum_sent") or {}).get("retransmits"),
        }
    # UDP: sum_received.bytes is what the server got; packets/lost_packets count sequence
    # numbers (lost = sent but never received, as seen by the server).
    if not rx:
        rx = end.get("sum")
        if not rx:
            return None
        rx = dict(rx, bytes=(rx["packets"] - rx["lost_packets"]) * payload)
    secs = rx.get("seconds") or 0
    if secs <= 0:
        return None
    tx = end.get("sum_sent") or {}
    tx_secs = tx.get("seconds") or secs
    return {
        "gbps": rx["bytes"] * 8 / secs / 1e9,
        "mpps": rx["bytes"] / payload / secs / 1e6,
        "loss_pct": rx.get("lost_percent"),
        "offered_mpps": (tx.get("packets") or 0) / tx_secs / 1e6 if tx else None,
    }


def ping_sample(path):
    text = read(path) or ""
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", text)
    return float(m.group(2)) if m else None


def parse_snap(path):
    text = read(path)
    if not text:
        return None
    snap = {"cpu": {}, "proc": {}, "udp": {}}
    udp_lines = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "t":
            snap["t"] = float(parts[1])
        elif re.fullmatch(r"cpu\d+", parts[0]):
            snap["cpu"][parts[0]] = [int(x) for x in parts[1:]]
        elif parts[0] == "proc":
            rest = line[line.rfind(")") + 1 :].split()
            snap["proc"][parts[1]] = int(rest[11]) + int(rest[12])  # utime + stime
        elif parts[0] in ("snmpA", "snmpB"):
            udp_lines.setdefault(parts[0], []).append(parts[2:])
    for host, lines in udp_lines.items():
        if len(lines) == 2:
            snap["udp"][host[-1]] = dict(zip(lines[0], (int(x) for x in lines[1])))
    return snap if "t" in snap else None


def usage_between(pre, post):
    """Per-CPU busy shares and tunnel-process CPU use between two snapshots."""
    if not pre or not post:
        return None
    dt = post["t"] - pre["t"]
    out = {"cpus": {}, "procs": {}, "udp_errors": {}}
    for cpu, b in post["cpu"].items():
        a = pre["cpu"].get(cpu)
        if not a:
            continue
        d = [y - x for x, y in zip(a, b)]
        total = sum(d[:8]) or 1
        user, nice, system, idle, iowait, irq, softirq, steal = (d + [0] * 8)[:8]
        out["cpus"][cpu] = {
            "busy": 100 * (total - idle - iowait) / total,
            "user": 100 * (user + nice) / total,
            "sys": 100 * system / total,
            "softirq": 100 * (softirq + irq) / total,
        }
    for name, ticks in post["proc"].items():
        if name in pre["proc"] and dt > 0:
            out["procs"][name] = (ticks - pre["proc"][name]) / CLK_TCK / dt
    for host, b in post["udp"].items():
        a = pre["udp"].get(host)
        if a:
            out["udp_errors"][host] = {
                k: b[k] - a[k] for k in ("RcvbufErrors", "SndbufErrors", "InErrors") if k in b
            }
    return out


def mean_usage(usages):
    usages = [u for u in usages if u]
    if not usages:
        return None
    out = {"cpus": {}, "procs": {}, "udp_errors": {}}
    for cpu in sorted({c for u in usages for c in u["cpus"]}):
        rows = [u["cpus"][cpu] for u in usages if cpu in u["cpus"]]
        out["cpus"][cpu] = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    for name in sorted({p for u in usages for p in u["procs"]}):
        out["procs"][name] = statistics.mean(u["procs"][name] for u in usages if name in u["procs"])
    for host in sorted({h for u in usages for h in u["udp_errors"]}):
        rows = [u["udp_errors"][host] for u in usages if host in u["udp_errors"]]
        out["udp_errors"][host] = {k: sum(r.get(k, 0) for r in rows) for k in rows[0]}
    return out


def load_variant(res, v, runs):
    d = os.path.join(res, v)
    status = (read(os.path.join(d, "status")) or "skipped: did not run").strip()
    out = {
        "name": (read(os.path.join(d, "name")) or v).strip(),
        "status": "ok" if status == "ok" else "skipped",
    }
    if status != "ok":
        out["reason"] = status.partition(": ")[2] or status
        return out
    out["pins"] = (read(os.path.join(d, "pins.txt")) or "").strip().splitlines()
    samples = {"ping_ms": [ping_sample(os.path.join(d, f"ping.{r}.txt")) for r in range(1, runs + 1)]}
    cpu = {}
    for test, payload in TESTS.items():
        per_run = [iperf_sample(os.path.join(d, f"{test}.{r}.json"), payload) for r in range(1, runs + 1)]
        keys = ["gbps", "retransmits"] if payload is None else ["gbps", "mpps", "loss_pct", "offered_mpps"]
        for k in keys:
            samples[f"{test}_{k}"] = [s[k] if s else None for s in per_run]
        cpu[test] = mean_usage(
            usage_between(
                parse_snap(os.path.join(d, f"{test}.{r}.pre")),
                parse_snap(os.path.join(d, f"{test}.{r}.post")),
            )
            for r in range(1, runs + 1)
            if per_run[r - 1]  # a failed run's CPU use says nothing
        )
    out["median"] = {k: median(v_) for k, v_ in samples.items()}
    out["samples"] = samples
    out["failed_runs"] = {k: sum(x is None for x in v_) for k, v_ in samples.items() if k.endswith(("gbps", "_ms"))}
    out["cpu"] = cpu
    out["tunnel_sockets"] = {
        h: [
            {"local": l, "peer": p, "rcvbuf": rb, "sndbuf": tb, "drops": d}
            for l, p, rb, tb, d in wg_sockets(os.path.join(d, f"sockets-{h}.txt"))
        ]
        for h in ("a", "b")
    }
    return out


def wg_sockets(path, port="51820"):
    """The UDP sockets on the WireGuard port, from `ss -Huanmp`: (local, peer, rb, tb, drops)."""
    text = read(path) or ""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) < 5 or not parts[3].endswith(":" + port):
            continue
        mem = lines[i + 1] if i + 1 < len(lines) else ""
        m = re.search(r"rb(\d+),t\d+,tb(\d+).*?,d(\d+)\)", mem)
        if m:
            peer = parts[4] if not parts[4].endswith(":*") else None
            out.append((parts[3], peer, int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return out


def iperf_buffers(res, variants, runs):
    """The UDP socket buffers iperf3 got (it reports what the kernel granted)."""
    for v in variants:
        for r in range(1, runs + 1):
            try:
                with open(os.path.join(res, v, f"udp1392.{r}.json")) as f:
                    start = json.load(f).get("start", {})
            except (OSError, ValueError):
                continue
            if start.get("sndbuf_actual"):
                return start["sndbuf_actual"], start["rcvbuf_actual"]
    return None


def fmt(x, digits, suffix=""):
    return "—" if x is None else f"{x:.{digits}f}{suffix}"


RATIO_KEYS = [("TCP", "tcp_gbps"), ("UDP1392", "udp1392_gbps"), ("UDP64", "udp64_mpps"), ("ping", "ping_ms")]

COLUMNS = [  # header, median key, digits, suffix
    ("TCP Gbps", "tcp_gbps", 2, ""),
    ("UDP1392 Gbps", "udp1392_gbps", 2, ""),
    ("UDP1392 Mpps", "udp1392_mpps", 3, ""),
    ("UDP1392 loss", "udp1392_loss_pct", 1, "%"),
    ("UDP64 Mpps", "udp64_mpps", 3, ""),
    ("ping ms", "ping_ms", 3, ""),
]


def table(rows, headers):
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda r: "  ".join(
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--json")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()

    meta = json.loads(read(os.path.join(args.results, "meta.json")))
    load_end = " ".join((read("/proc/loadavg") or "? ? ?").split()[:3])
    meta["loadavg_end"] = load_end
    runs = meta["runs"]
    variants = {v: load_variant(args.results, v, runs) for v in meta["variants"]}

    print()
    print(
        f"Tunnel benchmark: median of {runs} run(s), iperf3 {meta['seconds']} s per test; "
        f"host A (sender) on CPU{meta['cpu_a']}, host B (receiver) on CPU{meta['cpu_b']}; "
        f"kernel {meta['kernel']}; load average at start {meta['loadavg_start']}, at end {load_end}"
    )
    bufs = iperf_buffers(args.results, meta["variants"], runs)
    print(
        "UDP columns are what host B's iperf3 received (offered rate: unlimited, -b 0"
        + (f"; iperf3 UDP socket buffers: send {bufs[0] >> 10} KiB, receive {bufs[1] >> 10} KiB" if bufs else "")
        + "); TCP buffers autotuned."
    )
    print()
    rows = []
    for v, r in variants.items():
        if r["status"] != "ok":
            rows.append([r["name"]] + ["—"] * len(COLUMNS) + [f"skipped: {r['reason']}"])
            continue
        m = r["median"]
        rows.append([r["name"]] + [fmt(m[k], d, s) for _, k, d, s in COLUMNS] + [""])
    print(table(rows, ["variant"] + [c[0] for c in COLUMNS] + [""]))

    # Ratios against boringtun-cli, and the targets.
    bt = variants.get("boringtun")
    fly = variants.get("flynode")
    ratios = {}
    ratios_per_run = {}
    verdicts = {}

    def div(a, b):
        return a / b if a is not None and b else None

    def ratio(r, key):
        if not r or r["status"] != "ok" or not bt or bt["status"] != "ok":
            return None
        return div(r["median"][key], bt["median"][key])

    if bt and bt["status"] == "ok":
        print()
        rrows = []
        for v, r in variants.items():
            if v == "boringtun" or r["status"] != "ok":
                continue
            vals = {k: ratio(r, k) for _, k in RATIO_KEYS}
            if v == "flynode":
                ratios = vals
            rrows.append([f"{r['name']} / boringtun-cli"] + [fmt(vals[k], 2, "x") for k in vals])
        if rrows:
            print(table(rrows, ["ratio", "TCP", "UDP1392", "UDP64", "ping RTT (lower is better)"]))
        if fly and fly["status"] == "ok":
            # Run r of flynode and of boringtun-cli were measured within minutes of each
            # other (bench/tunnel.sh goes round robin): the spread of these paired ratios
            # is the benchmark's own noise.
            for _, k in RATIO_KEYS:
                ratios_per_run[k] = [div(a, b) for a, b in zip(fly["samples"][k], bt["samples"][k])]
            print(
                "flynode / boringtun-cli per run (paired): "
                + "  ".join(f"{label} " + ",".join(fmt(x, 2, "x") for x in ratios_per_run[k]) for label, k in RATIO_KEYS)
            )

    why_na = None
    if not fly:
        why_na = "flynode not selected"
    elif fly["status"] != "ok":
        why_na = f"flynode not measured: {fly['reason']}"
    elif not bt:
        why_na = "boringtun-cli not selected"
    elif bt["status"] != "ok":
        why_na = f"boringtun-cli not measured: {bt['reason']}"
    targets = [
        ("tcp", "TCP throughput >= 3x boringtun-cli", "tcp_gbps", lambda x: x >= TARGET),
        ("udp1392", "UDP 1392 B delivered >= 3x boringtun-cli", "udp1392_gbps", lambda x: x >= TARGET),
        ("udp64", "UDP 64 B delivered >= 3x boringtun-cli", "udp64_mpps", lambda x: x >= TARGET),
        ("ping", "idle ping RTT <= boringtun-cli's", "ping_ms", lambda x: x <= 1.0),
    ]
    print()
    print("Targets (flynode vs boringtun-cli, same run):")
    for name, text, key, ok in targets:
        x = ratios.get(key)
        if why_na:
            verdicts[name] = "n/a"
            print(f"  n/a   {text} ({why_na})")
        elif x is None:
            verdicts[name] = "n/a"
            print(f"  n/a   {text} (a measurement failed)")
        else:
            verdicts[name] = "PASS" if ok(x) else "FAIL"
            print(f"  {verdicts[name]:<5} {text}: {x:.2f}x")

    # Where the work ran.
    print()
    print("Where the work ran (mean over runs; busy % of each CPU counts everything on the machine,")
    print("other people's work too; tunnel processes in CPUs used; UDP receive-buffer drops on each")
    print("host during the test):")
    for v, r in variants.items():
        if r["status"] != "ok":
            continue
        print(f"  {r['name']}:")
        for p in r["pins"]:
            print(f"    {p}")
        for test in TESTS:
            u = r["cpu"].get(test)
            if not u:
                continue
            cpus = "  ".join(
                f"{c} {x['busy']:3.0f}% (usr {x['user']:.0f} sys {x['sys']:.0f} sirq {x['softirq']:.0f})"
                for c, x in u["cpus"].items()
            )
            procs = "  ".join(f"{n} {x:.2f}" for n, x in u["procs"].items())
            drops = "  ".join(
                f"{h}:RcvbufErrors +{e.get('RcvbufErrors', 0)}" for h, e in u["udp_errors"].items() if e.get("RcvbufErrors")
            )
            extra = ""
            if test != "tcp":
                om = r["median"].get(f"{test}_offered_mpps")
                extra = f"  sent {fmt(om, 3)} Mpps"
            else:
                rt = r["median"].get("tcp_retransmits")
                extra = f"  retransmits {fmt(rt, 0)}"
            print(f"    {test:<8} {cpus}{('  ' + procs) if procs else ''}{extra}{('  ' + drops) if drops else ''}")
        for h, socks in r["tunnel_sockets"].items():
            if socks:
                desc = "; ".join(
                    f"{x['local']}{' -> ' + x['peer'] if x['peer'] else ''} rcvbuf {x['rcvbuf'] >> 10} KiB"
                    f" sndbuf {x['sndbuf'] >> 10} KiB drops {x['drops']}"
                    for x in socks
                )
                print(f"    host {h.upper()} tunnel UDP sockets (end of runs): {desc}")
        per_run = "  ".join(
            f"{k}: " + ",".join(fmt(x, 3) for x in r["samples"][k])
            for k in ("tcp_gbps", "udp1392_gbps", "udp64_mpps", "ping_ms")
        )
        print(f"    runs     {per_run}")

    result = {
        "meta": meta,
        "variants": variants,
        "ratios_vs_boringtun": ratios,
        "ratios_vs_boringtun_per_run": ratios_per_run,
        "targets": verdicts,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"\nJSON written to {args.json}")
    if args.strict and any(x != "PASS" for x in verdicts.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
