#!/usr/bin/python3
"""What replication to a bucket costs (figures, not a timed test).

The bucket is the npm S3 server s3rver on 127.0.0.1 (installed with npm
into a temporary folder), reached directly; the baseline is Debian's
`aws s3 cp` (awscli: 8 MiB parts, 10 at a time) of the same bytes to and
from the same server, in the same run.

(a) upload: a 1 GiB output (an exec route writing random bytes) made
    without replica=, put in the outbox with `renderctl replica push`, then
    a mount with replica=: the time until the bucket confirmed it (the
    outbox is empty), against `aws s3 cp FILE s3://...` of the blob file.
(b) fetch: a second mount with an empty store and the same bucket: the
    time of `stat cas/<hex>` (the lookup fetches the blob, verifies its
    hash and keeps it), against `aws s3 cp s3://... FILE`.
(c) the latency a fetch adds to a first read: 20 blobs of 1 MiB made by
    the first mount; the second reads each through cas/<hex> once (fetched)
    and again (here): p50 of the first reads, of the second, and the
    difference.

usage: bench/bench_replica.py [BUILD_DIR] [MiB]   (default 1024)
"""
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import benchmount

TOP = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else TOP / "build")
MIB = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
ROUTE = "image/big/default/t2i"
ENV = dict(os.environ, AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER",
           AWS_REGION="us-east-1")
RUN_JS = """
const S3rver = require('s3rver');
const s = new S3rver({port: 0, address: '127.0.0.1', directory: process.argv[2],
                      silent: true, configureBuckets: [{name: 'rfs', configs: []}]});
s.run().then((a) => { console.log(JSON.stringify(a)); });
"""


def mount(base, name, opts):
    mnt = base / name
    mnt.mkdir(exist_ok=True)
    return mnt, benchmount.mount(BUILD, mnt, opts, base / f"{name}.log", env=ENV, within_s=10)


def submit(mnt, route, obj):
    fd = os.open(mnt / route / "new", os.O_RDWR)
    os.write(fd, json.dumps(obj).encode() + b"\n")
    jid = os.read(fd, 4096).decode().strip()
    os.close(fd)
    return jid


def wait(mnt, route, jid):
    while (st := (mnt / route / jid / "status").read_text().strip()) not in (
            "complete", "error", "cancelled"):
        time.sleep(0.05)
    assert st == "complete", (mnt / route / jid / "log").read_text()
    return json.loads((mnt / route / jid / "status.json").read_text())["output"]


def backlog(mnt):
    for line in (mnt / "stats").read_text().splitlines():
        if line.startswith("renderfs_replica_backlog_objects "):
            return int(float(line.split()[1]))
    return -1


def read_time(path):
    """Seconds to open and read path whole."""
    t = time.monotonic()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return time.monotonic() - t


def aws(endpoint, cfg, *args):
    t = time.monotonic()
    subprocess.run(["/usr/bin/aws", "--endpoint-url", endpoint, *args], check=True,
                   capture_output=True, env=dict(ENV, AWS_CONFIG_FILE=str(cfg),
                                                 AWS_SHARED_CREDENTIALS_FILE="/dev/null"))
    return time.monotonic() - t


def main():
    base = pathlib.Path(tempfile.mkdtemp(prefix="bench-replica-"))
    npm = base / "npm"
    npm.mkdir()
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "s3rver@3.7.1"],
                   cwd=npm, check=True)
    (npm / "run.js").write_text(RUN_JS)
    (base / "s3").mkdir()
    s3 = subprocess.Popen(["node", str(npm / "run.js"), str(base / "s3")], cwd=npm,
                          stdout=subprocess.PIPE, text=True)
    port = json.loads(s3.stdout.readline())["port"]
    endpoint = f"http://127.0.0.1:{port}"
    cfg = base / "aws-config"
    cfg.write_text("[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n")
    prog = base / "big.py"
    prog.write_text("#!/usr/bin/python3\nimport json, os, sys\n" + textwrap.dedent("""
        n = json.load(sys.stdin)["mib"] << 20
        with open(os.environ["RENDERFS_OUTPUT"], "wb") as f:
            f.write(b"\\x89PNG\\r\\n\\x1a\\n")
            while n:
                k = min(n, 1 << 20)
                f.write(os.urandom(k))
                n -= k
        """))
    prog.chmod(0o755)
    models = base / "models.json"
    models.write_text(json.dumps({"routes": {ROUTE: {
        "backend": "exec", "command": [str(prog)], "media_type": "image/png",
        "max_output": 1 << 40, "timeout_s": 3600,
        "schema": {"type": "object", "properties": {"mib": {"type": "integer"}}}}}}))
    replica = ["replica=s3://rfs/bench", f"replica_endpoint={endpoint}", "replica_path_style"]
    try:
        # (a) upload
        a_store = base / "store-a"
        mnt, proc = mount(base, "a", [f"store={a_store}", f"models={models}"])
        big = wait(mnt, ROUTE, submit(mnt, ROUTE, {"mib": MIB}))
        small = [wait(mnt, ROUTE, submit(mnt, ROUTE, {"mib": 1, "n": i}))["blake3"]
                 for i in range(20)]
        benchmount.unmount(mnt, proc)
        h = big["blake3"]
        blobfile = a_store / "blobs" / h[:2] / h
        subprocess.run([str(BUILD / "tools" / "renderctl"), "replica", "push", str(a_store)],
                       check=True, capture_output=True)
        t = time.monotonic()
        mnt, proc = mount(base, "a", [f"store={a_store}", f"models={models}", *replica])
        while backlog(mnt) != 0:
            time.sleep(0.02)
        up = time.monotonic() - t
        up_aws = aws(endpoint, cfg, "s3", "cp", str(blobfile), "s3://rfs/awscp/blob")
        # (b) fetch
        b_store = base / "store-b"
        mb, pb = mount(base, "b", [f"store={b_store}", *replica])
        t = time.monotonic()
        os.stat(mb / "cas" / h)
        down = time.monotonic() - t
        assert (b_store / "blobs" / h[:2] / h).stat().st_size == big["size"]
        down_aws = aws(endpoint, cfg, "s3", "cp", "s3://rfs/awscp/blob", str(base / "dl"))
        # (c) first reads of 1 MiB blobs that only the bucket has
        first = [read_time(mb / "cas" / s) for s in small]   # fetched
        again = [read_time(mb / "cas" / s) for s in small]   # here
        benchmount.unmount(mb, pb)
        benchmount.unmount(mnt, proc)
        size = big["size"] / (1 << 20)
        print(f"(a) upload of a {size:.0f} MiB blob: renderfs {up:.2f} s "
              f"({size / up:.0f} MiB/s), aws s3 cp {up_aws:.2f} s ({size / up_aws:.0f} MiB/s): "
              f"ratio {up_aws / up:.2f} (throughput, renderfs / aws)")
        print(f"(b) fetch of it: renderfs {down:.2f} s ({size / down:.0f} MiB/s), "
              f"aws s3 cp {down_aws:.2f} s ({size / down_aws:.0f} MiB/s): "
              f"ratio {down_aws / down:.2f}")
        p1, p2 = statistics.median(first) * 1000, statistics.median(again) * 1000
        print(f"(c) first read of a 1 MiB blob only the bucket has: p50 {p1:.1f} ms; "
              f"read again (here): p50 {p2:.1f} ms; added by the fetch {p1 - p2:.1f} ms")
    finally:
        for d in ("a", "b"):
            subprocess.run(["fusermount3", "-u", "-z", str(base / d)], capture_output=True)
        s3.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
