#!/usr/bin/env python3
"""creditgate's performance table, measured on this machine (see bench/run).

1. `../shared/bench/side-by-side.sh` for 1 and 1,000 keys: the HTTP ceiling (hyper
   hello), the Node peer, creditgate embedded and one node on Redis, in one run each;
   the ratios, and the CPU per verification of the server and of redis-server.
2. Three nodes on Redis + Postgres + ClickHouse (`creditgate cluster`), one wrk per
   node at the same total connections, right after; its ratio is to the ceiling of (1).
3. Ledger load: SQL row writes and transactions per 1,000 verifications, embedded and on
   the 3 nodes, from the nodes' own /metrics counters.
4. A repeatable figure: callgrind instructions of the creditgate process per
   verification (embedded, 1 key and 1,000 keys), which does not depend on the machine's
   load, and the part of it in the request path (the client connection's task): the
   total also counts the background work that fell in the window (analytics rows,
   refills, key reads after a cache entry's 10 s), which moves it between runs of one
   build by more than most changes.

Every load loop is bounded in time; every process started here is stopped at the end.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench")).resolve()
BIN = os.environ.get("BIN", str(ROOT / "target" / "release" / "creditgate"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = int(os.environ.get("CONNS", "32"))
REPEAT = os.environ.get("REPEAT", "1")
ROOT_KEY = "bench_root_" + str(os.getpid())
CREDITS = 10**12


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/v2/liveness", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"bench: {url} did not come up in {secs}s")


def call(url, route, body):
    req = urllib.request.Request(
        f"{url}/v2/{route}",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + ROOT_KEY, "Content-Type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req, timeout=30))["data"]


def make_keys(url, n, path):
    api = call(url, "apis.createApi", {"name": "bench"})["apiId"]
    keys = [
        call(url, "keys.createKey", {"apiId": api, "credits": {"remaining": CREDITS}})["key"]
        for _ in range(n)
    ]
    Path(path).write_text("\n".join(keys) + "\n")
    return keys


def metrics(url):
    """The counters of one node's /metrics that the figures need (summed over labels)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for name in (
        "creditgate_verifications_total",
        "creditgate_ledger_row_writes_total",
        "creditgate_ledger_transactions_total",
    ):
        out[name] = sum(
            float(m.group(1))
            for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        )
    return out


def side_by_side(keys):
    log(f"side-by-side, {keys} key(s) ({DURATION}s per target, x{REPEAT})")
    env = dict(os.environ, KEYS=str(keys), BIN=BIN, REPEAT=REPEAT, DURATION=str(DURATION),
               CONNS=str(CONNS))
    out = subprocess.run(["bash", str(SHARED / "side-by-side.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    sys.stderr.write(out.stdout)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"bench: side-by-side.sh failed ({out.returncode})")
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ("hello", "node-rlf", "cg-embedded", "cg-redis"):
            p99s = [float(x) for x in cells[4].split()]
            rows[cells[0]] = {"rps": float(cells[2]), "p99": sorted(p99s)[len(p99s) // 2],
                              "cpu_us": cpu_per_verification(cells[1], cells[6])}
    return rows


def cpu_per_verification(rates, cpus):
    """CPU µs per request of the server and of redis-server, the median over the runs,
    from side-by-side.sh's columns: each run's req/s (`38007 35335`) and CPU %
    (`116/31 114/33`, server/redis-server). Within one stretch of the machine it
    depends less than the throughput on how the closed loop's hand-offs fall, so it
    resolves smaller changes in an A/B; compare it only within one run."""
    per_run = []
    for rps, cpu in zip(rates.split(), cpus.split()):
        srv, _, rds = cpu.partition("/")
        if float(rps) > 0:
            per_run.append((1e4 * float(srv) / float(rps), 1e4 * float(rds or 0) / float(rps)))
    if not per_run:
        return None
    mid = len(per_run) // 2
    return (sorted(r[0] for r in per_run)[mid], sorted(r[1] for r in per_run)[mid])


class Proc:
    """A child process stopped (SIGINT, then SIGKILL) when the bench ends."""

    all = []

    def __init__(self, args, **kw):
        self.p = subprocess.Popen(args, start_new_session=True, **kw)
        Proc.all.append(self)

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


def serve_embedded(tmp, prefix=()):
    port = free_port()
    data = Path(tmp) / f"embedded-{port}"
    data.mkdir()
    env = dict(os.environ, CREDITGATE_LOG="warn", CREDITGATE_ROOT_KEY=ROOT_KEY)
    proc = Proc([*prefix, BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data)],
                env=env, stdout=subprocess.DEVNULL, stderr=open(data / "log", "w"))
    return proc, f"http://127.0.0.1:{port}"


def delta(after, before, name):
    return after[name] - before[name]


def ledger_load(urls, keys_file, conns):
    """Row writes / transactions per 1,000 verifications over one wrk run per node, in
    steady state: after a warm-up long enough for every key's first refill."""
    many = sum(1 for _ in open(keys_file)) > 1
    wrk_all(urls, keys_file, conns, 10 if many else 3)
    before = [metrics(u) for u in urls]
    res = wrk_all(urls, keys_file, conns, DURATION)
    time.sleep(0.5)
    after = [metrics(u) for u in urls]
    sums = {k: sum(delta(a, b, k) for a, b in zip(after, before)) for k in after[0]}
    v = max(sums["creditgate_verifications_total"], 1)
    return res, {
        "verifications": v,
        "rows_per_1000": 1000 * sums["creditgate_ledger_row_writes_total"] / v,
        "tx_per_1000": 1000 * sums["creditgate_ledger_transactions_total"] / v,
    }


def wrk_all(urls, keys_file, conns, secs):
    """One wrk per node at once, `conns` connections in all; summed rate, worst p99."""
    each = max(1, conns // len(urls))
    env = dict(os.environ, KEYS_FILE=keys_file, ROOT_KEY=ROOT_KEY)
    procs = [
        subprocess.Popen(
            ["wrk", "-t1", f"-c{each}", f"-d{secs}s", "-s", str(SHARED / "load" / "verify-file.lua"), u],
            env=env, stdout=subprocess.PIPE, text=True)
        for u in urls
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=secs + 60)
        line = next((l for l in out.splitlines() if l.startswith("WRKRESULT")), "")
        results.append({k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)})
    return {
        "rps": sum(r.get("rps", 0) for r in results),
        "p99": max(r.get("p99_ms", 0) for r in results),
        "non2xx": sum(r.get("non2xx", 0) for r in results),
    }


def embedded_ledger_load(tmp, keys):
    log(f"ledger load, embedded, {keys} keys")
    proc, url = serve_embedded(tmp)
    wait_up(url)
    keys_file = str(Path(tmp) / f"emb-{keys}.keys")
    make_keys(url, keys, keys_file)
    res, load = ledger_load([url], keys_file, CONNS)
    proc.stop()
    return res, load


def modest_ledger_load(tmp, keys=1000, rate=300, secs=45, measure_from=25):
    """Many keys at modest rates: `keys` keys at `rate` verifications/s in all (each key
    every few seconds; `creditgate loadtest`, open loop), embedded. Row writes and
    transactions per 1,000 verifications from `measure_from` s to the end, when every
    key has been returned once and spent again."""
    log(f"ledger load, embedded, {keys} keys at {rate}/s in all ({secs}s)")
    proc, url = serve_embedded(tmp)
    wait_up(url)
    load = Proc([BIN, "loadtest", "--nodes", url, "--root-key", ROOT_KEY, "--keys", str(keys),
                 "--credits", str(CREDITS), "--rate", str(rate), "--duration", str(secs),
                 "--json", str(Path(tmp) / "modest.json")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The load tool creates its keys first; its rate starts after that.
    deadline = time.time() + 120
    while metrics(url)["creditgate_verifications_total"] < rate and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(measure_from)
    before = metrics(url)
    time.sleep(secs - measure_from - 5)
    after = metrics(url)
    load.p.wait(timeout=120)
    proc.stop()
    v = max(delta(after, before, "creditgate_verifications_total"), 1)
    return {
        "verifications": v,
        "rows_per_1000": 1000 * delta(after, before, "creditgate_ledger_row_writes_total") / v,
        "tx_per_1000": 1000 * delta(after, before, "creditgate_ledger_transactions_total") / v,
        "rate": rate,
        "keys": keys,
    }


# (rate in all, seconds, measured from): each key every 3.3 s, and every 20 s.
MODEST_RUNS = ((300, 45, 25), (50, 100, 60))


def modest_ledger_loads(tmp):
    return [modest_ledger_load(tmp, rate=rate, secs=secs, measure_from=start)
            for rate, secs, start in MODEST_RUNS]


def print_modest(m):
    print(f"ledger, embedded, {m['keys']:,} keys at {m['rate']}/s in all (each key every "
          f"{m['keys'] / m['rate']:.1f} s): {m['rows_per_1000']:.1f} SQL row writes and "
          f"{m['tx_per_1000']:.1f} transactions per 1,000 verifications "
          f"({m['verifications']:,.0f} verifications)")


def three_nodes(tmp, keys, shards=None, cpu=False):
    """3 nodes on one Redis (or a Redis Cluster of `shards` masters), Postgres and
    ClickHouse. With `cpu`, also the CPU seconds the nodes and the redis-servers used
    during the measured run."""
    hot = f"a {shards}-shard Redis Cluster" if shards else "Redis"
    log(f"3 nodes on {hot} + Postgres + ClickHouse, {keys} key(s)")
    extra = ["--redis-cluster-shards", str(shards)] if shards else []
    proc, urls = local_cluster(Path(tmp) / f"cluster-{keys}-{shards}.out", extra)
    keys_file = str(Path(tmp) / f"cluster-{keys}-{shards}.keys")
    make_keys(urls[0], keys, keys_file)
    if not cpu:
        res, load = ledger_load(urls, keys_file, CONNS)
        proc.stop()
        return res, load
    wrk_all(urls, keys_file, CONNS, 10)  # warm-up: every key's first refill
    before = [metrics(u) for u in urls]
    cpu_before = tree_cpu(proc.p.pid)
    res = wrk_all(urls, keys_file, CONNS, DURATION)
    cpu_after = tree_cpu(proc.p.pid)
    after = [metrics(u) for u in urls]
    v = max(sum(delta(a, b, "creditgate_verifications_total") for a, b in zip(after, before)), 1)
    proc.stop()
    used = {k: cpu_after.get(k, 0) - cpu_before.get(k, 0) for k in ("nodes", "redis")}
    return res, {"verifications": v, "cpu_us": {k: 1e6 * t / v for k, t in used.items()}}


def local_cluster(out_path, extra=()):
    """`creditgate cluster --nodes 3` (its output in `out_path`): the process and the
    node URLs, once every node answers."""
    proc = Proc([BIN, "cluster", "--nodes", "3", "--root-key", ROOT_KEY, *extra],
                stdout=open(out_path, "w"), stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    urls = None
    while time.time() < deadline and urls is None:
        m = re.search(r"--nodes (\S+)", out_path.read_text())
        if m:
            urls = m.group(1).split(",")
        elif proc.p.poll() is not None:
            raise SystemExit("bench: creditgate cluster exited; run scripts/install-deps")
        else:
            time.sleep(0.5)
    if urls is None:
        raise SystemExit("bench: the local cluster did not start in 180s")
    for u in urls:
        wait_up(u)
    return proc, urls


def tree_cpu(root):
    """CPU seconds (user + system) used so far by the processes under `root`: the
    creditgate nodes and the redis-servers, by kind."""
    tick = os.sysconf("SC_CLK_TCK")
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)] = (int(fields[1]), fields)
            except OSError:
                pass
    out = {"nodes": 0.0, "redis": 0.0}
    for pid, (ppid, fields) in parent.items():
        p, under = ppid, False
        while p > 1:
            if p == root:
                under = True
                break
            p = parent.get(p, (0,))[0]
        if not under:
            continue
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        secs = (int(fields[11]) + int(fields[12])) / tick
        if b"redis-server" in cmd:
            out["redis"] += secs
        elif b" serve" in cmd:
            out["nodes"] += secs
    return out


def redis_cluster_table():
    """Issue 13's figures: 3 nodes, 1,000 keys, on one Redis and on a 3-shard Redis
    Cluster, alternated REPEAT times in one run."""
    tmp = tempfile.mkdtemp(prefix="cg-bench.")
    rows = {None: [], 3: []}
    try:
        for _ in range(int(REPEAT)):
            for shards in (None, 3):
                rows[shards].append(three_nodes(tmp, 1000, shards, cpu=True))
    finally:
        for p in Proc.all:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"3 nodes, 1,000 keys, wrk 1 thread per node, {CONNS} connections in all, "
          f"{DURATION} s, runs alternated x{REPEAT}: median")
    print()
    print("| hot store | verifications/s | p99 | CPU per verification: nodes | redis-servers |")
    print("|---|---|---|---|---|")
    for shards, name in ((None, "one Redis"), (3, "Redis Cluster, 3 masters + 3 replicas")):
        runs = sorted(rows[shards], key=lambda r: r[0]["rps"])
        res, load = runs[len(runs) // 2]
        print(f"| {name} | {res['rps']:,.0f} | {res['p99']:.1f} ms | "
              f"{load['cpu_us']['nodes']:.0f} µs | {load['cpu_us']['redis']:.0f} µs |")


def callgrind(tmp, keys=1, warm=3000, requests=2000):
    """Instructions of the creditgate process per verification, embedded, on `keys` keys
    verified in turn by one sequential client: `warm` verifications first (the first
    refills, caches, the analytics statements of each batch shape), then `requests`
    measured."""
    log(f"callgrind: {keys} key(s), {warm} + {requests} verifications on one embedded node "
        "under valgrind")
    out = Path(tmp) / f"callgrind-{keys}.out"
    proc, url = serve_embedded(
        tmp, ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no"))
    wait_up(url, secs=180)
    secrets = make_keys(url, keys, str(Path(tmp) / f"cg-{keys}.keys"))
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    bodies = [json.dumps({"key": k, "credits": {"cost": 1}}) for k in secrets]
    headers = {"Authorization": "Bearer " + ROOT_KEY, "Content-Type": "application/json"}
    sent = 0

    def verify(n):
        nonlocal sent
        for _ in range(n):
            conn.request("POST", "/v2/keys.verifyKey", bodies[sent % len(bodies)], headers)
            sent += 1
            r = conn.getresponse()
            data = r.read()
            if r.status != 200 or b'"VALID"' not in data:
                raise SystemExit(f"bench: verification failed under callgrind: {r.status} {data!r}")

    verify(warm)
    subprocess.run(["callgrind_control", "--zero", str(proc.p.pid)], check=True,
                   capture_output=True, timeout=60)
    verify(requests)
    subprocess.run(["callgrind_control", "--dump", str(proc.p.pid)], check=True,
                   capture_output=True, timeout=60)
    conn.close()
    proc.stop()
    dumps = sorted(Path(tmp).glob(f"callgrind-{keys}.out.*"), key=lambda p: p.stat().st_mtime)
    # The dump callgrind_control asked for holds the measured part only.
    for d in dumps:
        text = d.read_text(errors="replace")
        if "\ndesc: Trigger: dump" in text:
            total = next(int(l.split()[1]) for l in text.splitlines()
                         if l.startswith("summary:"))
            return {"total": total / requests, "request": request_path(d) / requests}
    raise SystemExit("bench: no callgrind dump of the measured part")


def request_path(dump):
    """Instructions of the one client connection's task (hyper reading, routing, the
    verification, the answer) in a callgrind dump: the part of the total that does not
    depend on which background work (analytics rows, refills, pollers) fell in the
    window. (Work the task hands to other threads, such as a SQL read of a key whose
    cache entry expired, is not in it.)"""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                          "--auto=no", str(dump)], capture_output=True, text=True,
                         timeout=300).stdout
    for line in out.splitlines():
        if "axum::serve::handle_connection::{{closure}}::{{closure}} [" in line:
            return int(line.split()[0].replace(",", ""))
    raise SystemExit("bench: no connection task in the callgrind dump")


def callgrinds(tmp):
    return {k: callgrind(tmp, keys=k) for k in (1, 1000)}


def print_callgrind(keys, n):
    print(f"callgrind: {n['total']:,.0f} instructions of the creditgate process per "
          f"verification, {n['request']:,.0f} of them in the request path (embedded, "
          f"{keys:,} key(s) verified in turn, 2,000 verifications after 3,000)")


def in_scratch(run):
    """`run(tmp)` in a scratch folder; every process started meanwhile is stopped after."""
    tmp = tempfile.mkdtemp(prefix="cg-bench.")
    try:
        return run(tmp)
    finally:
        for p in Proc.all:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def need(tool, package):
    if shutil.which(tool) is None:
        log(f"installing {package}")
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=False,
                       capture_output=True)
    if shutil.which(tool) is None:
        raise SystemExit(f"bench: needs {tool} (apt-get install -y {package})")


def main():
    if "--redis-cluster" in sys.argv:
        need("wrk", "wrk")
        if not Path(BIN).exists():
            raise SystemExit("bench: build first: cargo build --release")
        redis_cluster_table()
        return
    if "--ledger" in sys.argv:
        for m in in_scratch(modest_ledger_loads):
            print_modest(m)
        return
    if "--callgrind" in sys.argv:
        need("valgrind", "valgrind")
        for k, n in in_scratch(callgrinds).items():
            print_callgrind(k, n)
        return
    quick = "--quick" in sys.argv
    need("wrk", "wrk")
    need("valgrind", "valgrind")
    if not Path(BIN).exists():
        raise SystemExit("bench: build first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="cg-bench.")
    try:
        sbs = {k: side_by_side(k) for k in (1, 1000)}
        three = {k: three_nodes(tmp, k) for k in (1, 1000)} if not quick else {}
        emb_load = embedded_ledger_load(tmp, 1000)
        modest = modest_ledger_loads(tmp)
        instr = callgrinds(tmp)
    finally:
        for p in Proc.all:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def cell(rps, p99, k):
        ceiling = sbs[k].get("hello", {}).get("rps", 0) or 1
        return f"{rps / ceiling:.2f} ({rps:,.0f}/s, p99 {p99:.1f} ms)"

    names = [("hello", "HTTP ceiling (hyper hello)"),
             ("node-rlf", "Node + rate-limiter-flexible on Redis"),
             ("cg-embedded", "creditgate embedded"),
             ("cg-redis", "creditgate, one node on Redis")]
    print()
    print(f"keys.verifyKey, wrk 1 thread, {CONNS} connections, {DURATION} s, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print()
    print("| target | 1 hot key | 1,000 keys |")
    print("|---|---|---|")
    for t, label in names:
        if all(t in sbs[k] for k in (1, 1000)):
            print(f"| {label} | " + " | ".join(
                cell(sbs[k][t]["rps"], sbs[k][t]["p99"], k) for k in (1, 1000)) + " |")
    if three:
        print("| creditgate, 3 nodes on Redis + Postgres | " + " | ".join(
            cell(three[k][0]["rps"], three[k][0]["p99"], k) for k in (1, 1000)) + " |")
    print()
    print("CPU per verification (µs of the server / of redis-server, median of the runs):")
    print()
    print("| target | 1 hot key | 1,000 keys |")
    print("|---|---|---|")
    for t, label in names[1:]:
        cpu = [sbs[k].get(t, {}).get("cpu_us") for k in (1, 1000)]
        if all(cpu):
            print(f"| {label} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in cpu) + " |")
    print()
    for k, n in instr.items():
        print_callgrind(k, n)
    res, load = emb_load
    print(f"ledger, embedded, 1,000 keys: {load['rows_per_1000']:.1f} SQL row writes and "
          f"{load['tx_per_1000']:.1f} transactions per 1,000 verifications "
          f"({load['verifications']:,.0f} verifications, {res['rps']:,.0f}/s)")
    for m in modest:
        print_modest(m)
    for k, (res, load) in three.items():
        print(f"ledger, 3 nodes, {k:,} key(s): {load['rows_per_1000']:.1f} SQL row writes and "
              f"{load['tx_per_1000']:.1f} transactions per 1,000 verifications "
              f"({load['verifications']:,.0f} verifications, {res['rps']:,.0f}/s, "
              f"non-2xx {res['non2xx']:.0f})")


if __name__ == "__main__":
    main()
