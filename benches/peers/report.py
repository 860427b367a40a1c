#!/usr/bin/env python3
"""Helpers of benches/peers/run.sh: the JSON of each run, the side-by-side table, and the small
parsing jobs that bash does badly. Standard library only.

    report.py secs DURATION            seconds (rounded up) of 10s, 500ms, 2m, 1m30s
    report.py ports N                  N free loopback ports, all held until every one is chosen
    report.py endpoints FILE           array_urls secret_file node_service of ferrocotta up's endpoints.json
    report.py record SYS WORKLOAD CONC EXIT OUT ERR
                                       one JSON line (stdout) and a progress line (stderr) for a run
    report.py table JSONL "SYS ..."    the side-by-side table
    report.py resp FILE                the Redis-protocol addresses of ferrocotta up's endpoints.json
    report.py rb_record SYS PIPELINE CLIENTS EXIT OUT ERR
                                       JSON lines, as `record` writes them, from one redis-benchmark --csv
                                       run (one per test: workload rb-set-P1, rb-get-P16, ...)
"""

import json
import re
import socket
import sys

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def secs(text):
    if not re.fullmatch(r"(\d+(\.\d+)?(ms|s|m|h))+", text):
        sys.exit(f"not a duration: {text!r} (use e.g. 10s, 500ms, 2m)")
    total = sum(float(n) * UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ms|s|m|h)", text))
    print(int(total) + (0 if total == int(total) else 1))


def ports(count):
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def endpoints(path):
    e = json.load(open(path))
    nodes = [p["service"] for p in e["processes"] if p["role"] == "node"]
    print(e["array_urls"], e["secret_file"], nodes[0] if nodes else "-")


def resp(path):
    e = json.load(open(path))
    addrs = [p["resp"] for p in e["processes"] if p.get("resp")]
    if not addrs:
        sys.exit("no Redis-protocol port in " + path)
    print(" ".join(addrs))


def rb_record(system, pipeline, clients, rc, out, err):
    """redis-benchmark --csv prints "test","rps","avg_latency_ms","min_latency_ms",
    "p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"; an error answered by the
    server ends the run with "Error from server: ..." on stderr."""
    errors = sum(1 for line in open(err, errors="replace") if "Error from server" in line)
    rows = []
    try:
        lines = [l.strip() for l in open(out) if l.strip()]
        head = [h.strip('"') for h in lines[0].split(",")]
        for line in lines[1:]:
            row = dict(zip(head, [v.strip('"') for v in line.split(",")]))
            rows.append(row)
    except (OSError, IndexError):
        rows = []
    if int(rc) != 0 or not rows:
        tail = open(err, errors="replace").read().strip().splitlines()[-3:]
        for test in ("set", "get"):
            r = {"workload": f"rb-{test}-P{pipeline}", "concurrency": int(clients), "failed": True,
                 "stderr": " | ".join(tail), "system": system, "exit_code": int(rc)}
            print(json.dumps(r, sort_keys=True))
            print("  " + summary(r), file=sys.stderr)
        return
    for row in rows:
        r = {
            "workload": f"rb-{row['test'].lower()}-P{pipeline}",
            "concurrency": int(clients),
            "ops_per_s": float(row["rps"]),
            "latency_us_p50": round(float(row["p50_latency_ms"]) * 1000),
            "latency_us_p99": round(float(row["p99_latency_ms"]) * 1000),
            "errors": {"server": errors} if errors else {},
            "system": system,
            "exit_code": int(rc),
        }
        print(json.dumps(r, sort_keys=True))
        print("  " + summary(r), file=sys.stderr)


def summary(r):
    head = f"{r['system']:<10} {r['workload']:<12} {r['concurrency']:>4}"
    if r.get("failed"):
        return f"{head}  FAILED (exit {r['exit_code']}): {r['stderr']}"
    errors = ",".join(f"{k}={v}" for k, v in r["errors"].items()) or "-"
    return (
        f"{head} {r['ops_per_s']:>9.0f} ops/s  p50 {r['latency_us_p50']:>7} us"
        f"  p99 {r['latency_us_p99']:>8} us  errors {errors}"
    )


def record(system, workload, conc, rc, out, err):
    try:
        r = json.load(open(out))
        # `ferrocotta bench` calls get-eventual `get` with --eventual; name the workload as asked.
        r["workload"] = workload
    except (OSError, ValueError):
        tail = open(err, errors="replace").read().strip().splitlines()[-3:]
        r = {"workload": workload, "concurrency": int(conc), "failed": True, "stderr": " | ".join(tail)}
    r["system"], r["exit_code"] = system, int(rc)
    print(json.dumps(r, sort_keys=True))
    print("  " + summary(r), file=sys.stderr)


def cell(r):
    if r is None:
        return f"{'-':>9} {'-':>7} {'-':>8}"
    if r.get("failed"):
        return f"{'FAILED':>9} {'-':>7} {'-':>8}"
    mark = "!" if r["errors"] else " "
    return f"{r['ops_per_s']:>8.0f}{mark} {r['latency_us_p50']:>7} {r['latency_us_p99']:>8}"


def ratio(fc, peer):
    if not fc or not peer or fc.get("failed") or peer.get("failed") or peer["ops_per_s"] <= 0:
        return f"{'-':>10}"
    return f"{fc['ops_per_s'] / peer['ops_per_s']:>9.2f}x"


def table(path, systems):
    systems = systems.split()
    runs = [json.loads(line) for line in open(path) if line.strip()]
    order, by = [], {}
    for r in runs:
        key = (r["workload"], r["concurrency"])
        if key not in by:
            order.append(key)
            by[key] = {}
        by[key][r["system"]] = r
    peers = [s for s in systems if s != "ferrocotta"] if "ferrocotta" in systems else []
    width = len(cell(None))
    top = f"{'':<13} {'':>5}" + "".join(f" | {s:^{width}}" for s in systems)
    head = f"{'WORKLOAD':<13} {'CONC':>5}" + "".join(f" | {'OPS/S':>9} {'P50_US':>7} {'P99_US':>8}" for _ in systems)
    if peers:
        top += " | OPS/S RATIO ferrocotta/..."
        head += " | " + " ".join(f"{p:>10}" for p in peers)
    print(top)
    print(head)
    print("-" * len(head))
    for key in order:
        got = by[key]
        line = f"{key[0]:<13} {key[1]:>5}" + "".join(f" | {cell(got.get(s))}" for s in systems)
        if peers:
            line += " | " + " ".join(ratio(got.get("ferrocotta"), got.get(p)) for p in peers)
        print(line)
    print()
    print("OPS/S: successful operations per second of the measured period; P50_US, P99_US: latency in")
    print("microseconds; '!': the run had failed operations (below); ratio > 1: ferrocotta did more ops/s.")
    notes = [summary(r) for r in runs if r.get("failed") or r["errors"]]
    if notes:
        print("runs with failed operations:")
        for n in notes:
            print("  " + n)


def main(argv):
    commands = {
        "secs": (secs, 1),
        "ports": (lambda n: ports(int(n)), 1),
        "endpoints": (endpoints, 1),
        "record": (record, 6),
        "table": (table, 2),
        "resp": (resp, 1),
        "rb_record": (rb_record, 6),
    }
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][1]:
        sys.exit(__doc__)
    fn, _ = commands[argv[1]]
    fn(*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
