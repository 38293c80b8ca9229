#!/usr/bin/python3
"""What a job of the `exec` backend costs (figures, not a timed test).

N jobs (default 200) of a program that does nothing but copy a 45-byte PNG
to $RENDERFS_OUTPUT are submitted at once (one write to `new`) to a mount
with workers=2, three times: unsandboxed, under bwrap, and, as the
baseline, the synth route's smallest image (a job with no process). Printed
for each: jobs/s and ms per job from the write to the last complete, and
the same program started N times directly from this script (2 at a time,
no renderfs) so that what renderfs adds can be told from what starting a
process (and bwrap) costs on this machine. Completion is watched through
`stats`.

usage: bench/bench_exec.py [BUILD_DIR] [N]
"""
import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import benchmount

TOP = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else TOP / "build")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
PNG = b"\x89PNG\r\n\x1a\n" + bytes(37)
SYNTH = "image/synth/default/t2i"


def complete(mnt, route, n):
    for line in (mnt / "stats").read_text().splitlines():
        if line.startswith(f'renderfs_jobs{{route="{route}",status="'):
            st = line.split('status="')[1].split('"')[0]
            if st in ("error", "cancelled") and line.split()[-1] != "0":
                sys.exit(f"a job of {route} ended {st}")
            if st == "complete" and int(line.split()[-1]) == n:
                return True
    return False


def run(base, route, req, n):
    mnt = base / "mnt"
    mnt.mkdir(exist_ok=True)
    store = base / f"store-{route.replace('/', '-')}"
    proc = benchmount.mount(BUILD, mnt, [f"store={store}", f"models={base / 'models.json'}",
                                         "workers=2", "rate=0"], base / "mnt.log")
    fd = os.open(mnt / route / "new", os.O_RDWR)
    data = b"".join(json.dumps({**req, "seed": i}).encode() + b"\n" for i in range(n))
    t0 = time.monotonic()
    os.write(fd, data)
    os.read(fd, 64 * n)
    os.close(fd)
    while not complete(mnt, route, n):
        time.sleep(0.01)
    wall = time.monotonic() - t0
    benchmount.unmount(mnt, proc)
    return wall


def direct(argv, env, n):
    def one(_):
        subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        list(ex.map(one, range(n)))
    return time.monotonic() - t0


def main():
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as d:
        base = pathlib.Path(d)
        (base / "tiny.png").write_bytes(PNG)
        cmd = ["/bin/sh", "-c", 'cat "$0" > "$RENDERFS_OUTPUT"', str(base / "tiny.png")]
        routes = {f"image/noop{sb}/default/t2i": {
            "backend": "exec", "command": cmd, "media_type": "image/png",
            "sandbox": sb, "read_only": [str(base / "tiny.png")], "schema": {"type": "object"}}
            for sb in ("none", "bwrap")}
        (base / "models.json").write_text(json.dumps({"routes": routes}))
        rows = [("synth 64x64 image (no process)",
                 run(base, SYNTH, {"prompt": "x", "width": 64, "height": 64}, N))]
        rows.append(("exec, no sandbox", run(base, "image/noopnone/default/t2i", {}, N)))
        have_bwrap = shutil.which("bwrap")
        if have_bwrap:
            rows.append(("exec, bwrap", run(base, "image/noopbwrap/default/t2i", {}, N)))
        out = base / "direct.png"
        env = {"PATH": "/usr/bin:/bin", "RENDERFS_OUTPUT": str(out)}
        rows.append(("the program alone, 2 at a time", direct(cmd, env, N)))
        if have_bwrap:
            bw = [have_bwrap, "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
                  "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                  "--proc", "/proc", "--dev", "/dev", "--ro-bind", str(base), str(base),
                  "--bind", d, d, "--unshare-all", "--die-with-parent", "--new-session", "--"]
            rows.append(("the program under bwrap alone", direct(bw + cmd, env, N)))
    base_wall = rows[0][1]
    print(f"{N} jobs each, workers=2")
    for name, wall in rows:
        print(f"  {name:34s} {N / wall:8.0f} jobs/s  {wall / N * 1000:6.2f} ms/job  "
              f"({wall / base_wall:.2f}x synth)")


if __name__ == "__main__":
    main()
