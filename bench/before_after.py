#!/usr/bin/python3
"""The performance figures of two builds side by side, in one run.

usage: bench/before_after.py REV [--build DIR] [--rounds N]

Builds revision REV (the code before a change: a commit, a tag) into a
temporary folder, then measures it and the current build (--build,
default build/) in alternation, each figure as a ratio to its baseline
measured in the same round (absolute numbers on a shared machine are
noise):

  1. BLAKE3: each build's own bench_store on the same 1 GiB file in the
     page cache: its hash against `b3sum` with 1 and 2 threads.
  2. Submission under 16 writers: each build's renderfs mounted with
     workers=0, rate=0; the current bench_submit writes 16 x 1,000 jobs
     through `new` (bench_fs.py (a)): jobs/s, p99, and jobs/s as a ratio
     to 1 writer in the same round.
  3. The GPU renderer: each build's `kernel_driver --bench`, where
     nvidia-smi finds a GPU; otherwise the figures are owed.

Prints every round, then the best of the rounds for each build.
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import benchmount

TOP = pathlib.Path(__file__).resolve().parent.parent
IMAGE = "image/synth/default/t2i"


def build_type(build):
    """The after build's CMAKE_BUILD_TYPE, for the before build."""
    cache = build / "CMakeCache.txt"
    if cache.exists():
        m = re.search(r"^CMAKE_BUILD_TYPE:\w+=(.*)$", cache.read_text(), re.M)
        if m and m.group(1):
            return m.group(1)
    return "RelWithDebInfo"


def build_rev(rev, dest, btype):
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(TOP), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    # The revision's sibling ../shared, as the project expects it.
    shared = TOP.parent / "shared"
    if shared.exists():
        os.symlink(shared, dest / "shared")
    b = dest / "build"
    with open(dest / "build.log", "wb") as log:
        for cmd in (["cmake", "-S", str(src), "-B", str(b), f"-DCMAKE_BUILD_TYPE={btype}"],
                    ["cmake", "--build", str(b), "-j", str(os.cpu_count() or 2), "--target",
                     "renderfs", "bench_store", "bench_submit", "kernel_driver"]):
            if subprocess.run(cmd, stdout=log, stderr=log).returncode != 0:
                sys.exit(f"building {rev} failed:\n" + (dest / "build.log").read_text()[-4000:])
    return b


def blake3_ratios(build, work, file):
    out = subprocess.run([str(build / "bench" / "bench_store"), "--file", str(file), "--store",
                          str(work), "--jobs", "200"], capture_output=True, text=True,
                         check=True).stdout
    r = {}
    for t in (1, 2):
        m = re.search(rf"ratio ours/b3sum, {t} threads?\s*:\s*([\d.]+)", out)
        r[t] = float(m.group(1)) if m else float("nan")
    return r


def mount(build, where, name):
    path, store = where / name, where / (name + "-store")
    path.mkdir()
    return path, benchmount.mount(build, path, [f"store={store}", "workers=0", "rate=0",
                                                "user_queue_max=1000000"],
                                  where / (name + ".log"))


def submit(client, path, writers, per):
    out = subprocess.run([str(client), str(path / IMAGE / "new"), str(writers), str(per)],
                         capture_output=True, text=True, check=True).stdout
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


def writers16(build, client, where, name):
    path, proc = mount(build, where, name)
    try:
        one = submit(client, path, 1, 2000)
        many = submit(client, path, 16, 1000)
    finally:
        benchmount.unmount(path, proc)
    return {"jobs_per_s": many["jobs_per_s"], "p99_ms": many["p99_ms"],
            "scaling": many["jobs_per_s"] / one["jobs_per_s"]}


def gpu_figures(build):
    if not shutil.which("nvidia-smi") or subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return None
    return subprocess.run([str(build / "kernels" / "kernel_driver"), "--bench"],
                          capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--build", default=str(TOP / "build"))
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    after = pathlib.Path(a.build).resolve()
    client = after / "bench" / "bench_submit"
    for need in (after / "tools" / "renderfs", after / "bench" / "bench_store", client):
        if not need.exists():
            sys.exit(f"{need} is not built")
    with tempfile.TemporaryDirectory(prefix="renderfs-before-after-", dir="/var/tmp") as d:
        d = pathlib.Path(d)
        btype = build_type(after)
        print(f"building {a.rev} ({btype}) ...", flush=True)
        before = build_rev(a.rev, d / "before", btype)
        builds = (("before", before), ("after", after))
        file = d / "bench-1024mib.bin"
        with open(file, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
        best = {n: {} for n, _ in builds}
        for rnd in range(1, a.rounds + 1):
            for n, b in builds:
                r = blake3_ratios(b, d / f"store-{n}-{rnd}", file)
                w = writers16(b, client, d, f"m-{n}-{rnd}")
                print(f"round {rnd} {n:6}: BLAKE3/b3sum 1 thread {r[1]:.2f}, 2 threads "
                      f"{r[2]:.2f}; 16 writers {w['jobs_per_s']:.0f} jobs/s, p99 "
                      f"{w['p99_ms']:.2f} ms, {w['scaling']:.2f}x 1 writer", flush=True)
                bb = best[n]
                bb["b1"] = max(bb.get("b1", 0), r[1])
                bb["b2"] = max(bb.get("b2", 0), r[2])
                bb["jps"] = max(bb.get("jps", 0), w["jobs_per_s"])
                bb["p99"] = min(bb.get("p99", 1e9), w["p99_ms"])
                bb["scale"] = max(bb.get("scale", 0), w["scaling"])
        print(f"\n{'best of ' + str(a.rounds) + ' rounds':34} {'before':>10} {'after':>10}  "
              "target")
        rows = (("BLAKE3 / b3sum, 1 thread", "b1", "{:.2f}", ">= 0.95"),
                ("BLAKE3 / b3sum, 2 threads", "b2", "{:.2f}", ">= 0.95"),
                ("16 writers, durable jobs/s", "jps", "{:.0f}", ">= 20000"),
                ("16 writers, p99 ms", "p99", "{:.2f}", "< 2"),
                ("16 writers / 1 writer, jobs/s", "scale", "{:.2f}", ""))
        for label, k, fmt, target in rows:
            print(f"{label:34} {fmt.format(best['before'][k]):>10} "
                  f"{fmt.format(best['after'][k]):>10}  {target}")
        for n, b in builds:
            g = gpu_figures(b)
            if g is None:
                print(f"GPU ({n}): no GPU here; the GPU figures are owed")
                break
            print(f"GPU ({n}):\n{g}")


if __name__ == "__main__":
    main()
