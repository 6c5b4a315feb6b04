#!/usr/bin/env python3
"""A soak run (see bench/soak.sh): 3 nodes on Redis + Postgres + ClickHouse
(`creditgate cluster`) at a fixed rate on 1,000 keys for SOAK_SECS (default 1,800 s),
sampling every SAMPLE_SECS (10 s) each node's resident memory, open sockets, requests in
flight, tracked keys, queued returns and analytics rows per flush. Writes
target/soak/soak.csv, soak.svg (the plot) and report.md, and exits 1 when a verification
errs, a key over-spends (the load tool checks) or memory grows after warm-up.

Knobs: SOAK_SECS, RATE (verifications/s, default 1000), KEYS (1000), SAMPLE_SECS (10).
"""

import atexit
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (the shared helpers: Proc, wait_up, BIN, ROOT_KEY)

SOAK_SECS = int(os.environ.get("SOAK_SECS", "1800"))
RATE = int(os.environ.get("RATE", "1000"))
KEYS = int(os.environ.get("KEYS", "1000"))
SAMPLE_SECS = int(os.environ.get("SAMPLE_SECS", "10"))
OUT = b.ROOT / "target" / "soak"
GAUGES = (
    "creditgate_http_requests_in_flight",
    "creditgate_engine_tracked_keys",
    "creditgate_engine_failed_returns_queued",
    "creditgate_analytics_flushed_rows",
)
# Memory is flat when the last third's mean is within this of the middle third's.
FLAT = 0.10


def node_pids(root):
    """The `creditgate serve` processes anywhere under `root`, in start order."""
    parent, cmds = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmds[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    pids = []
    for pid, cmd in cmds.items():
        p = parent.get(pid, 0)
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root and b"serve" in cmd:
            pids.append(pid)
    return sorted(pids)


def rss_mib(pid):
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sockets(pid):
    n = 0
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            n += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return n


def gauges(url):
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for name in GAUGES:
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def sample(urls, pids, started, rows, stop):
    while not stop.wait(SAMPLE_SECS):
        t = round(time.time() - started)
        for i, (url, pid) in enumerate(zip(urls, pids)):
            try:
                row = {"t": t, "node": i, "rss_mib": round(rss_mib(pid), 1),
                       "sockets": sockets(pid)}
                row.update(gauges(url))
            except OSError as e:
                b.log(f"sample of node {i} failed: {e}")
                continue
            rows.append(row)


def svg(rows, path):
    """Resident memory per node over time, as a plain SVG line plot."""
    w, h, pad = 800, 300, 40
    t_max = max((r["t"] for r in rows), default=1) or 1
    m_max = max((r["rss_mib"] for r in rows), default=1) * 1.1 or 1
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    lines = []
    for node in sorted({r["node"] for r in rows}):
        pts = " ".join(
            f"{pad + (w - 2 * pad) * r['t'] / t_max:.1f},"
            f"{h - pad - (h - 2 * pad) * r['rss_mib'] / m_max:.1f}"
            for r in rows if r["node"] == node)
        lines.append(f'<polyline fill="none" stroke="{colors[node % 3]}" points="{pts}"/>'
                     f'<text x="{w - pad + 2}" y="{pad + 14 * node}" font-size="11" '
                     f'fill="{colors[node % 3]}">node {node}</text>')
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 40}" height="{h}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>'
        f'<text x="{pad}" y="{h - 10}" font-size="11">0 s</text>'
        f'<text x="{w - pad - 40}" y="{h - 10}" font-size="11">{t_max} s</text>'
        f'<text x="2" y="{pad - 8}" font-size="11">RSS MiB (max {m_max / 1.1:.0f})</text>'
        + "".join(lines) + "</svg>\n")


def at(rows, node, t):
    """The sample of `node` nearest to `t` seconds."""
    mine = [r for r in rows if r["node"] == node]
    return min(mine, key=lambda r: abs(r["t"] - t)) if mine else None


def main():
    atexit.register(lambda: [p.stop() for p in b.Proc.all])
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="creditgate-soak-") as tmp:
        cluster, urls = b.local_cluster(Path(tmp) / "cluster.out")
        try:
            pids = node_pids(cluster.p.pid)
            if len(pids) != 3:
                raise SystemExit(f"soak: found {len(pids)} node processes, not 3")
            b.log(f"soak: {RATE}/s on {KEYS} keys for {SOAK_SECS} s, nodes {pids}")
            rows, stop = [], threading.Event()
            started = time.time()
            sampler = threading.Thread(target=sample, args=(urls, pids, started, rows, stop))
            sampler.start()
            load = subprocess.run(
                [b.BIN, "loadtest", "--nodes", ",".join(urls), "--root-key", b.ROOT_KEY,
                 "--keys", str(KEYS), "--credits", str(10**12), "--rate", str(RATE),
                 "--duration", str(SOAK_SECS), "--json", str(OUT / "loadtest.json")],
                capture_output=True, text=True, timeout=SOAK_SECS + 600)
            stop.set()
            sampler.join()
        finally:
            cluster.stop()
    (OUT / "loadtest.txt").write_text(load.stdout + load.stderr)
    with open(OUT / "soak.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["t", "node", "rss_mib", "sockets", *GAUGES])
        wr.writeheader()
        wr.writerows(rows)
    svg(rows, OUT / "soak.svg")

    report = [f"# Soak: {RATE}/s on {KEYS} keys, 3 nodes, {SOAK_SECS} s",
              "", "| node | RSS at 1 min | at 10 min | at 30 min (end) | sockets at end |",
              "|---|---|---|---|---|"]
    flat = True
    for node in range(3):
        cells = []
        for t in (60, 600, SOAK_SECS):
            r = at(rows, node, t)
            cells.append(f"{r['rss_mib']:.1f} MiB (t={r['t']} s)" if r else "-")
        end = at(rows, node, SOAK_SECS)
        report.append(f"| {node} | {' | '.join(cells)} | {end['sockets'] if end else '-'} |")
        mine = [r["rss_mib"] for r in rows if r["node"] == node]
        third = max(len(mine) // 3, 1)
        middle = sum(mine[third:2 * third]) / max(len(mine[third:2 * third]), 1)
        last = sum(mine[-third:]) / third
        if middle and last > middle * (1 + FLAT):
            flat = False
            report.append(f"\nnode {node}: memory grew from {middle:.1f} to {last:.1f} MiB")
    report += ["", "The load tool's summary:", "", "```", load.stdout.strip(), "```",
               "", "![RSS per node](soak.svg)", ""]
    (OUT / "report.md").write_text("\n".join(report))
    print("\n".join(report))
    if load.returncode != 0:
        raise SystemExit(f"soak: the load tool failed ({load.returncode}): see {OUT}/loadtest.txt")
    if not flat:
        raise SystemExit("soak: memory was not flat after warm-up")


if __name__ == "__main__":
    main()
