#!/usr/bin/python3
"""Remote jobs in flight: what 1,000 of them cost the daemon (figures, not a
timed test).

Against a fake fal queue service, each request taking 2 s of simulated
work, N jobs (default 1,000) are submitted through `new` to a route with
concurrency=N, so that all are in flight at once. The service is
bench/leanfal.py: the protocol and answers of tests/fakefal.py served by
one asyncio thread, because on a small machine the service shares the
cores with the daemon, and tests/fakefal.py (http.server, a thread per
connection) spends most of a core when 1,000 jobs finish together: the
figure would then be the fake's. The same burst against tests/fakefal.py
is printed too. Printed:
every job's end state; the most requests in flight at the service at once;
the time from the last submission (the write to `new` returned) to the
last job complete, divided by the simulated 2 s (the engine's overhead:
polling granularity, result and download; it stays near 1 when nothing
waits in line); the daemon's CPU seconds per job; HTTP requests per job at
the service (status polling backs off); the daemon's thread count and RSS
before and at the peak (remote jobs hold no thread: the count must not
follow N). Completion is watched through `stats` (one read per 50 ms), not
by reading N status files. A baseline run with 1 job is measured first in
the same run, against the same service.

Then what jobs that wait cost: N/4 and N jobs held by the service (status
IN_PROGRESS until the mount stops), once their polling has backed off to
its slowest (a poll every 2 s each): the daemon's CPU per status poll,
which must not grow with the number of jobs waiting (a timer is found in
a heap, not by walking every job).

usage: bench/bench_remote.py [BUILD_DIR] [N]
"""
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

import benchmount
from leanfal import LeanFal

TOP = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))
from fakefal import FakeFal  # noqa: E402

BUILD = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else TOP / "build")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
ROUTE = "image/fake/default/t2i"
WORK_S = 2


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def complete(mnt, n):
    for line in (mnt / "stats").read_text().splitlines():
        if line.startswith(f'renderfs_jobs{{route="{ROUTE}",status="') and line.split()[-1] != "0":
            st = line.split('status="')[1].split('"')[0]
            if st in ("error", "cancelled"):
                sys.exit(f"a job ended {st}: see the mount's log")
            if st == "complete" and int(line.split()[-1]) == n:
                return True
    return False


def proc_status(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mount(base, fal, n, tag):
    tag = f"{type(fal).__name__}-{tag}"
    models = base / f"models-{tag}.json"
    models.write_text(json.dumps({"routes": {ROUTE: fal.route(concurrency=n, timeout_s=600)}}))
    mnt = base / f"mnt-{tag}"
    mnt.mkdir()
    return mnt, benchmount.mount(BUILD, mnt, [f"store={base}/store-{tag}", f"models={models}",
                                              "rate=0"], base / f"mnt-{tag}.log")


def submit(mnt, n):
    fd = os.open(mnt / ROUTE / "new", os.O_RDWR)
    os.write(fd, b"".join(json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(n)))
    ids = os.read(fd, 64 * n).decode().split()
    os.close(fd)
    assert len(ids) == n, ids[:3]


def waiting(base, fal, n):
    """Daemon CPU per status poll with n jobs held at the service."""
    fal.hold = True
    mnt, proc = mount(base, fal, n, f"wait-{n}")
    try:
        subs0 = len(fal.submissions)
        submit(mnt, n)
        deadline = time.monotonic() + 60
        while len(fal.submissions) - subs0 < n:
            if time.monotonic() > deadline:
                sys.exit(f"only {len(fal.submissions) - subs0} of {n} jobs reached the service")
            time.sleep(0.1)
        time.sleep(10)  # 0.2 s growing by 1/4 a poll reaches 2 s after ~8.5 s
        polls0, cpu0, t0 = fal.http_requests, cpu_s(proc.pid), time.monotonic()
        time.sleep(6)
        polls, cpu = fal.http_requests - polls0, cpu_s(proc.pid) - cpu0
        took = time.monotonic() - t0
    finally:
        benchmount.unmount(mnt, proc)
        fal.hold = False
    return {"n": n, "polls_per_s": polls / took, "cpu_ms_per_s": cpu * 1000 / took,
            "us_per_poll": cpu * 1e6 / polls if polls else float("nan")}


def run(base, fal, n):
    mnt, proc = mount(base, fal, n, str(n))
    threads0, rss0 = proc_status(proc.pid, "Threads"), proc_status(proc.pid, "VmRSS")
    peak = {"threads": threads0, "rss": rss0, "stop": False}

    def sample():
        while not peak["stop"]:
            peak["threads"] = max(peak["threads"], proc_status(proc.pid, "Threads"))
            peak["rss"] = max(peak["rss"], proc_status(proc.pid, "VmRSS"))
            time.sleep(0.05)
    t = threading.Thread(target=sample)
    t.start()
    reqs0, fal.max_outstanding = fal.http_requests, 0
    cpu0, svc0 = cpu_s(proc.pid), time.process_time()
    fd = os.open(mnt / ROUTE / "new", os.O_RDWR)
    data = b"".join(json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(n))
    os.write(fd, data)
    start = time.monotonic()  # the last submission is in
    ids = os.read(fd, 64 * n).decode().split()
    os.close(fd)
    assert len(ids) == n, ids[:3]
    while not complete(mnt, n):
        time.sleep(0.05)
    wall = time.monotonic() - start
    cpu, svc = cpu_s(proc.pid) - cpu0, time.process_time() - svc0
    t0s = sorted(r["t0"] for r in list(fal.requests.values())[-n:])
    print(f"  (at the service: first submission {t0s[0] - start:+.2f} s, last {t0s[-1] - start:+.2f} s)")
    states = {"complete": n}
    peak["stop"] = True
    t.join()
    benchmount.unmount(mnt, proc)
    return {"n": n, "states": states, "wall": wall, "threads0": threads0,
            "in_flight": fal.max_outstanding, "cpu_per_job": cpu / n, "svc_cpu": svc,
            "reqs_per_job": (fal.http_requests - reqs0) / n,
            "threads": peak["threads"], "rss0_mib": rss0 / 1024,
            "rss_growth_mib": (peak["rss"] - rss0) / 1024}


def main():
    fal, slow = LeanFal(), FakeFal()
    for f in (fal, slow):
        f.work_s = WORK_S
        f.queue_polls = 0
    try:
        with tempfile.TemporaryDirectory(prefix="bench-remote-") as d:
            base = pathlib.Path(d)
            one = run(base, fal, 1)
            many = run(base, fal, N)
            tests = run(base, slow, N)
            waits = [waiting(base, fal, k) for k in (max(N // 4, 1), N)]
    finally:
        fal.close()
        slow.close()
    for r, what in ((one, "lean fake"), (many, "lean fake"), (tests, "tests/fakefal.py")):
        print(f"{r['n']:5d} jobs ({what}): {r['states']}, {r['in_flight']} in flight at once; "
              f"last submit to last complete {r['wall']:.2f} s = {r['wall'] / WORK_S:.2f} x "
              f"the {WORK_S} s of work; {r['cpu_per_job'] * 1000:.2f} ms daemon CPU and "
              f"{r['reqs_per_job']:.1f} HTTP requests per job (the fake service and this "
              f"script: {r['svc_cpu']:.2f} s CPU); threads {r['threads0']} -> "
              f"{r['threads']}; RSS {r['rss0_mib']:.1f} MiB + {r['rss_growth_mib']:.1f} MiB")
    print(f"threads: {many['threads']} with {N} in flight vs {one['threads']} with 1 "
          f"(ratio {many['threads'] / one['threads']:.2f}); RSS growth per job in flight "
          f"{many['rss_growth_mib'] * 1024 / N:.1f} KiB; wall time {N} vs 1: "
          f"{many['wall'] / one['wall']:.2f}x")
    for w in waits:
        print(f"{w['n']:5d} jobs waiting: {w['polls_per_s']:.0f} status polls/s, daemon CPU "
              f"{w['cpu_ms_per_s']:.1f} ms/s = {w['us_per_poll']:.0f} us per poll")
    print(f"CPU per poll, {waits[1]['n']} jobs waiting vs {waits[0]['n']}: "
          f"{waits[1]['us_per_poll'] / waits[0]['us_per_poll']:.2f}x (flat: ~1)")
    ok = many["states"] == {"complete": N} and tests["states"] == {"complete": N}
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
