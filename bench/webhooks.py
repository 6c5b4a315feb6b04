#!/usr/bin/env python3
"""Webhook figures of one embedded node, in one run (not in CI):

  events/s     EVENTS `credits.exhausted` events (EVENTS keys of 1 credit, each verified
               once) delivered to one local receiver that answers 200 at once: the rate
               between the first and the last arrival, and from the first verification.
  p99          keys.verifyKey on one hot key (wrk, CONNS connections, DURATION s) with no
               webhook endpoint, then again while an endpoint that never answers has a
               backlog of EVENTS events (and a second, answering endpoint gets the same
               events: how late the last one arrives is printed too).

Usage: python3 bench/webhooks.py   (needs wrk and a release build: cargo build --release)
Knobs: EVENTS (1000) DURATION (10) CONNS (32). Every process started here is stopped.
"""

import http.client
import http.server
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the helpers of bench/run)

EVENTS = int(os.environ.get("EVENTS", "1000"))


class Receiver:
    """A local HTTP receiver: records (webhook-id, arrival time), answers 200, or never
    answers (`hang`)."""

    def __init__(self, hang=False):
        self.got = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.got.append((self.headers.get("webhook-id"), time.time()))
                if hang:
                    time.sleep(3600)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self):
        with self.lock:
            return {i for i, _ in self.got}

    def wait(self, n, secs):
        deadline = time.time() + secs
        while time.time() < deadline:
            with self.lock:
                firsts = {}
                for i, t in self.got:
                    firsts.setdefault(i, t)
            if len(firsts) >= n:
                return sorted(firsts.values())
            time.sleep(0.05)
        raise SystemExit(f"bench: {len(self.ids())} of {n} events arrived in {secs}s")


def endpoint(url, receiver):
    return bench.call(url, "webhooks.createEndpoint",
                      {"url": receiver.url, "events": ["credits.exhausted"]})["endpointId"]


def exhaust(url, n, threads=8):
    """n keys of 1 credit, each verified once (one credits.exhausted event each);
    returns when the verifications started."""
    api = bench.call(url, "apis.createApi", {"name": "webhooks"})["apiId"]
    keys = [bench.call(url, "keys.createKey", {"apiId": api, "credits": {"remaining": 1}})["key"]
            for _ in range(n)]
    started = time.time()

    def worker(part):
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        for k in part:
            conn.request("POST", "/v2/keys.verifyKey", body=json.dumps({"key": k}),
                         headers={"Authorization": "Bearer " + bench.ROOT_KEY,
                                  "Content-Type": "application/json"})
            data = json.loads(conn.getresponse().read())["data"]
            assert data["code"] == "VALID", data

    ts = [threading.Thread(target=worker, args=(keys[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return started


def main():
    bench.need("wrk", "wrk")
    os.environ["CREDITGATE_WEBHOOK_ALLOW_PRIVATE"] = "true"
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = bench.serve_embedded(tmp)
        try:
            bench.wait_up(url)
            hot = str(Path(tmp) / "hot.keys")
            bench.make_keys(url, 1, hot)
            bench.log("verifications with no endpoint")
            base = bench.wrk_all([url], hot, bench.CONNS, bench.DURATION)

            bench.log(f"{EVENTS} events to one receiver")
            fast = Receiver()
            first_endpoint = endpoint(url, fast)
            started = exhaust(url, EVENTS)
            arrivals = fast.wait(EVENTS, 300)
            span = max(arrivals[-1] - arrivals[0], 1e-6)
            rate = EVENTS / span
            rate_from_start = EVENTS / (arrivals[-1] - started)
            bench.call(url, "webhooks.deleteEndpoint", {"endpointId": first_endpoint})

            bench.log("verifications while an endpoint hangs with a backlog")
            hanging, other = Receiver(hang=True), Receiver()
            endpoint(url, hanging)
            endpoint(url, other)
            started = exhaust(url, EVENTS)
            loaded = bench.wrk_all([url], hot, bench.CONNS, bench.DURATION)
            late = other.wait(EVENTS, 300)[-1] - started
            held = len(hanging.got)
        finally:
            proc.stop()
            logs = list(Path(tmp).glob("embedded-*/log"))
            if logs:
                keep = bench.ROOT / "target" / "webhooks-bench.log"
                keep.write_text(logs[0].read_text())
                bench.log(f"the node's log: {keep}")
    print(f"# Webhooks, embedded node ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| events/s to one receiver (first to last arrival, {EVENTS} events) | {rate:.0f} |")
    print(f"| events/s from the first verification to the last arrival | {rate_from_start:.0f} |")
    print(f"| verifications/s, no endpoint | {base['rps']:.0f} (p99 {base['p99']:.2f} ms) |")
    print(f"| verifications/s, an endpoint hanging with {EVENTS} events due "
          f"| {loaded['rps']:.0f} (p99 {loaded['p99']:.2f} ms) |")
    print(f"| the answering endpoint's last event arrived after | {late:.1f} s "
          f"(the hanging one was sent {held}) |")


if __name__ == "__main__":
    main()
