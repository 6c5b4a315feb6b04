#!/usr/bin/env python3
"""Holds and idempotent verifications beside plain verifications, in one run.

For creditgate embedded and for 3 nodes on Redis + Postgres + ClickHouse (`creditgate
cluster`), on one key and on 1,000 keys, for DURATION seconds each (THREADS client
threads, keep-alive connections, requests spread over the nodes):

  verify      keys.verifyKey, cost 1
  idem        keys.verifyKey with a fresh idempotencyKey per request (decided on the ledger)
  pair        keys.reserveCredits 10, then keys.settleCredits at a cost 0..10

and prints a table of operations (pairs for `pair`) per second. The client is Python on
the same machine, so the figures compare the three workloads with each other, not with
wrk's. Usage: bench/holds [--embedded-only]. Every process started here is stopped.
"""

import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the helpers of bench/run)

DURATION = bench.DURATION
THREADS = int(bench.os.environ.get("THREADS", "16"))


def post(conn, route, body):
    conn.request("POST", f"/v2/{route}", body=json.dumps(body),
                 headers={"Authorization": "Bearer " + bench.ROOT_KEY,
                          "Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    return r.status, data.get("data")


def workload(urls, keys, kind, secs):
    stop = time.time() + secs
    counts = []
    errors = []
    lock = threading.Lock()

    def worker(i):
        host = urls[i % len(urls)].removeprefix("http://")
        conn = http.client.HTTPConnection(host, timeout=30)
        rng = random.Random(i)
        n = 0
        while time.time() < stop:
            key = keys[rng.randrange(len(keys))]
            if kind == "verify":
                s, d = post(conn, "keys.verifyKey", {"key": key, "credits": {"cost": 1}})
            elif kind == "idem":
                s, d = post(conn, "keys.verifyKey", {"key": key, "credits": {"cost": 1},
                                                     "idempotencyKey": f"b{i}-{n}-{time.time_ns()}"})
            else:
                s, d = post(conn, "keys.reserveCredits", {"key": key, "amount": 10})
                if s == 200 and d.get("holdId"):
                    s, d = post(conn, "keys.settleCredits",
                                {"holdId": d["holdId"], "cost": rng.randrange(11)})
            if s != 200 or not d.get("valid"):
                with lock:
                    errors.append((s, d))
                continue
            n += 1
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        bench.log(f"{kind}: {len(errors)} failed, first {errors[0]}")
    return sum(counts) / secs


def measure(label, urls, tmp):
    rows = []
    for nkeys in (1, 1000):
        keys = bench.make_keys(urls[0], nkeys, str(Path(tmp) / f"{label}-{nkeys}.keys"))
        workload(urls, keys, "verify", 3)  # warm up
        row = [label, nkeys]
        for kind in ("verify", "idem", "pair"):
            rate = workload(urls, keys, kind, DURATION)
            bench.log(f"{label}, {nkeys} key(s), {kind}: {rate:,.0f}/s")
            row.append(rate)
        rows.append(row)
    return rows


def main():
    embedded_only = "--embedded-only" in sys.argv
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = bench.serve_embedded(tmp)
        try:
            bench.wait_up(url)
            rows += measure("embedded", [url], tmp)
        finally:
            proc.stop()
        if not embedded_only:
            out_path = Path(tmp) / "cluster.out"
            proc = bench.Proc([bench.BIN, "cluster", "--nodes", "3", "--root-key", bench.ROOT_KEY],
                              stdout=open(out_path, "w"), stderr=bench.subprocess.DEVNULL)
            try:
                deadline = time.time() + 180
                urls = None
                while time.time() < deadline and urls is None:
                    m = bench.re.search(r"--nodes (\S+)", out_path.read_text())
                    if m:
                        urls = m.group(1).split(",")
                    else:
                        time.sleep(0.5)
                if urls is None:
                    raise SystemExit("bench: the local cluster did not start in 180s")
                for u in urls:
                    bench.wait_up(u)
                rows += measure("3 nodes (Redis + Postgres)", urls, tmp)
            finally:
                proc.stop()
    print(f"\n{THREADS} client threads, {DURATION} s per cell; operations per second "
          "(pair = reserve + settle)\n")
    print("| target | keys | verify | idempotent verify | reserve + settle pairs |")
    print("|---|---|---|---|---|")
    for label, nkeys, v, i, p in rows:
        print(f"| {label} | {nkeys:,} | {v:,.0f} | {i:,.0f} ({i / v:.2f}) | {p:,.0f} ({p / v:.2f}) |")


if __name__ == "__main__":
    main()
