#!/usr/bin/python3
"""What webhook delivery costs (figures, not a timed test).

One receiver on 127.0.0.1 (Python's ThreadingHTTPServer, answering 200)
and a mount with workers=2:

(a) latency: N jobs (default 500) with a webhook for `completed`, submitted
    in one write; for each, the time from the change (the job's
    completed_at, in the body) to the delivery's arrival. Printed: p50 and
    p99, against the baseline of one POST of the same body sent by this
    script to the same receiver (what a delivery costs at the least).
(b) throughput: the receiver down while N jobs finish (the backlog is in
    the index), then up; deliveries per second until all have arrived,
    against the baseline of the same N POSTs sent by this script 32 at a
    time (the daemon's deliveries in flight) with one connection each.

usage: bench/bench_webhooks.py [BUILD_DIR] [N]
"""
import concurrent.futures
import http.client
import http.server
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import benchmount

TOP = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else TOP / "build")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
ROUTE = "image/synth/default/t2i"


class Receiver:
    def __init__(self):
        self.arrived = {}  # job id (or key) -> arrival time
        self.lock = threading.Lock()
        self.port = 0
        self.up()

    def up(self):
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                t = time.time()
                key = self.headers.get("x-key")  # the baseline's own POSTs
                if key is None:
                    key = json.loads(body)["data"]["id"]
                with rec.lock:
                    rec.arrived[key] = (t, body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class S(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True
            request_queue_size = 256

        self.server = S(("127.0.0.1", self.port), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self):
        with self.lock:
            return len(self.arrived)


def post(port, body, key):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    t = time.time()
    c.request("POST", "/hook", body, {"Content-Type": "application/json", "x-key": key})
    c.getresponse().read()
    c.close()
    return t


def mount(base, name):
    mnt = base / name
    mnt.mkdir()
    return mnt, benchmount.mount(BUILD, mnt, [f"store={base / name}-store", "workers=2", "rate=0",
                                              "webhook_retry=" + "+".join(["1s"] * 24)],
                                 base / f"{name}.log")


def submit(mnt, url, tag):
    data = b"".join(json.dumps({"input": {"prompt": f"{tag} {i}", "width": 64, "height": 64},
                                "webhook": url}).encode() + b"\n" for i in range(N))
    fd = os.open(mnt / ROUTE / "new", os.O_RDWR)
    os.write(fd, data)
    ids, buf = [], b""
    while len(ids) < N:
        buf += os.read(fd, 65536)
        *lines, buf = buf.split(b"\n")
        ids += [x.decode() for x in lines]
    os.close(fd)
    return ids


def backlog(mnt):
    for line in (mnt / "stats").read_text().splitlines():
        if line.startswith("renderfs_webhook_backlog "):
            return int(line.split()[1])
    return -1


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def ts(s):
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc).timestamp()


def main():
    base = pathlib.Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    rec = Receiver()
    url = f"http://127.0.0.1:{rec.port}/hook"

    # (a) latency
    mnt, proc = mount(base, "a")
    ids = submit(mnt, url, "lat")
    deadline = time.monotonic() + 300
    while rec.count() < N:
        if time.monotonic() > deadline:
            sys.exit(f"only {rec.count()} of {N} deliveries arrived")
        time.sleep(0.05)
    lat = []
    for jid in ids:
        t, body = rec.arrived[jid]
        lat.append(t - ts(json.loads(body)["data"]["completed_at"]))
    sample = rec.arrived[ids[0]][1]
    base_lat = []
    for i in range(200):
        t0 = time.time()
        post(rec.port, sample, f"base{i}")
        base_lat.append(rec.arrived[f"base{i}"][0] - t0)
    benchmount.unmount(mnt, proc)
    print(f"(a) latency, change to arrival, {N} jobs: p50 {pct(lat, 50) * 1e3:.2f} ms, "
          f"p99 {pct(lat, 99) * 1e3:.2f} ms; one POST from this script: "
          f"p50 {pct(base_lat, 50) * 1e3:.2f} ms, p99 {pct(base_lat, 99) * 1e3:.2f} ms; "
          f"ratio p50 {pct(lat, 50) / pct(base_lat, 50):.1f}x, "
          f"p99 {pct(lat, 99) / pct(base_lat, 99):.1f}x")

    # (b) throughput of one receiver with a backlog
    with rec.lock:
        rec.arrived.clear()
    rec.down()
    mnt, proc = mount(base, "b")
    submit(mnt, url, "thr")
    deadline = time.monotonic() + 300
    while backlog(mnt) != N:
        if time.monotonic() > deadline:
            sys.exit("the backlog did not reach N")
        time.sleep(0.05)
    # Every delivery has failed once and waits 1 s: bring the receiver up
    # and count from the first arrival.
    rec.up()
    while rec.count() == 0:
        time.sleep(0.001)
    t0 = time.time()
    while rec.count() < N:
        if time.monotonic() > deadline:
            sys.exit(f"only {rec.count()} of {N} deliveries arrived")
        time.sleep(0.01)
    first = min(t for t, _ in rec.arrived.values())
    last = max(t for t, _ in rec.arrived.values())
    rate = (N - 1) / max(last - first, 1e-6)
    benchmount.unmount(mnt, proc)
    with rec.lock:
        rec.arrived.clear()
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        t0 = time.time()
        list(ex.map(lambda i: post(rec.port, sample, f"t{i}"), range(N)))
        base_rate = N / (time.time() - t0)
    print(f"(b) throughput, one receiver, backlog of {N}: {rate:.0f} deliveries/s; "
          f"{N} POSTs from this script 32 at a time: {base_rate:.0f}/s; "
          f"ratio {rate / base_rate:.2f}x")
    subprocess.run(["rm", "-rf", str(base)])


main()
