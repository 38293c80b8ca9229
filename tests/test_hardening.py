"""Submission hardening (SPEC §1, §2, §7): what a write() to `new` reports is
exactly what it did, whatever the writer (`>>`, split writes, retries), and
no caller can hurt the daemon or other callers through `new`."""
import errno
import json
import os
import re
import resource
import subprocess
import threading
import time

import pytest

from conftest import IMAGE, SMALL, tool

OK = {"prompt": "ok", **SMALL}


def obj(**kw):
    return json.dumps({**OK, **kw}).encode()


def jobs(m, route=IMAGE):
    return sorted(p for p in os.listdir(m.route(route)) if p not in ("new", "schema.json"))


def stat_value(m, name):
    text = (m.path / "stats").read_text()
    found = re.search(r"^" + re.escape(name) + r" (\d+)$", text, re.M)
    assert found, name + " not in stats"
    return int(found.group(1))


# ---- 1. O_APPEND ----

def test_append_redirection_submits_like_truncate(mnt):
    route = mnt.route(IMAGE)
    r = subprocess.run(["bash", "-c", "echo '%s' >> new && echo '%s' >> new"
                        % (json.dumps({**OK, "prompt": "one"}), json.dumps({**OK, "prompt": "two"}))],
                       cwd=route, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(jobs(mnt)) == 2
    fd = os.open(route / "new", os.O_WRONLY | os.O_APPEND)
    data = obj(prompt="three") + b"\n" + obj(prompt="four")
    assert os.write(fd, data[:-5]) == len(data) - 5
    assert os.write(fd, data[-5:] + b"\n") == 6
    os.close(fd)
    assert len(jobs(mnt)) == 4
    for jid in jobs(mnt):
        assert mnt.wait(IMAGE, jid) == "complete"


# ---- 2. the count a write returns ----

def big_batch(before, after, pad):
    """`before` good objects, a bad one, `after` good ones, padded with
    whitespace so that one write() is split by the kernel."""
    good = [obj(prompt=f"good {i}") + b"\n" + b" " * pad + b"\n" for i in range(before + after)]
    bad = b'{"prompt": 1}\n'
    return b"".join(good[:before]) + bad + b"".join(good[before:]), len(b"".join(good[:before])), bad


@pytest.mark.parametrize("before,after", [(5, 5), (0, 10), (10, 0)])
def test_split_write_with_a_bad_object_neither_loses_nor_duplicates(mnt, before, after):
    data, bad_at, bad = big_batch(before, after, 300 << 10)
    assert len(data) > 2 << 20
    fd = os.open(mnt.route(IMAGE) / "new", os.O_RDWR)
    written, err = 0, None
    try:
        # What cat, dd and every careful loop do: retry the rest.
        while written < len(data):
            try:
                written += os.write(fd, data[written:])
            except OSError as e:
                err = e.errno
                break
        assert err == errno.EINVAL and written == bad_at
        # A writer that knows where the bad object ends goes on after it.
        rest = data[bad_at + len(bad):]
        while rest:
            rest = rest[os.write(fd, rest):]
        lines = os.read(fd, 1 << 20).decode().splitlines()
    finally:
        os.close(fd)
    assert len(jobs(mnt)) == before + after
    assert len(lines) == before + after + 1
    assert lines[before].startswith("error:") and "'prompt'" in lines[before]
    assert not any(x.startswith("error") for i, x in enumerate(lines) if i != before)


def test_engine_refusal_mid_batch_stops_the_count(mount_factory):
    m = mount_factory(["user_queue_max=3", "workers=0"])
    data = b"".join(obj(prompt=f"q{i}") + b"\n" for i in range(5))
    fd = os.open(m.route(IMAGE) / "new", os.O_RDWR)
    try:
        n = os.write(fd, data)
        assert n == len(b"".join(obj(prompt=f"q{i}") + b"\n" for i in range(3)))
        with pytest.raises(OSError) as ei:
            os.write(fd, data[n:])
        assert ei.value.errno == errno.EAGAIN
        lines = os.read(fd, 65536).decode().splitlines()
    finally:
        os.close(fd)
    assert len(jobs(m)) == 3 and len(lines) == 4 and "user_queue_max" in lines[3]


# ---- 3. EFBIG ----

def test_object_just_over_max_request_is_efbig_and_counted(mount_factory):
    m = mount_factory(["max_request=64K"])
    before = stat_value(m, "renderfs_submissions_rejected_total")
    e, line = m.submit_err(IMAGE, b'{"prompt": "' + b"y" * (100 << 10) + b'"}\n')
    assert e == errno.EFBIG, line
    assert "larger than max_request" in line
    # Just over: the object completes in the write that crosses the limit.
    just = b'{"prompt": "' + b"z" * ((64 << 10) - 12) + b'"}'
    assert len(just) == (64 << 10) + 2
    fd = os.open(m.route(IMAGE) / "new", os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, just + b"\n")
    finally:
        os.close(fd)
    assert ei.value.errno == errno.EFBIG
    assert stat_value(m, "renderfs_submissions_rejected_total") == before + 2
    assert jobs(m) == []


# ---- 4. strings json-c would change ----

@pytest.mark.parametrize("envelope,field,what", [
    ({"input": OK, "priority": "low\u0000"}, "priority", "NUL"),
    ({"input": OK, "name": "a\u0000"}, "name", "NUL"),
    ({"input": {**OK, "prompt": "a\ud800b"}}, "input.prompt", "lone surrogate"),
    ({**OK, "prompt": "\udc00"}, "prompt", "lone surrogate"),
    ({**OK, "prompt": "x\ud800\ud800"}, "prompt", "lone surrogate"),
])
def test_nul_and_lone_surrogate_escapes_are_refused(mnt, envelope, field, what):
    data = json.dumps(envelope, ensure_ascii=True).encode() + b"\n"
    e, line = mnt.submit_err(IMAGE, data)
    assert e == errno.EINVAL, line
    assert f"'{field}'" in line and what in line, line
    assert jobs(mnt) == []


def test_surrogate_pairs_are_fine(mnt):
    jid = mnt.submit(IMAGE, json.dumps({**OK, "prompt": "fox \U0001F98A"}, ensure_ascii=True))
    assert "\U0001F98A" in (mnt.job(IMAGE, jid) / "request.json").read_text()


# ---- 5. reading before any answer ----

def test_read_before_any_answer(mnt):
    r = subprocess.run(["bash", "-c", "exec 3<>new; head -c1 <&3; echo rc=$?"],
                       cwd=mnt.route(IMAGE), capture_output=True, text=True, timeout=30)
    assert r.stdout == "rc=0\n", r
    assert mnt.proc.poll() is None


# ---- 6. reserved names ----

@pytest.mark.parametrize("name", ["new", "schema.json", "01ARZ3NDEKTSV4RRFFQ69G5FAV"])
def test_reserved_names_are_refused(mnt, name):
    e, line = mnt.submit_err(IMAGE, json.dumps({"input": OK, "name": name}).encode() + b"\n")
    assert e == errno.EINVAL and "reserved" in line, line
    listing = os.listdir(mnt.route(IMAGE))
    assert listing.count("new") == 1 and listing.count("schema.json") == 1
    assert jobs(mnt) == []
    assert mnt.wait(IMAGE, mnt.submit(IMAGE, OK)) == "complete"


# ---- 8. memory a caller can make the daemon hold ----

def test_unfinished_requests_are_bounded_per_uid(mount_factory):
    m = mount_factory(["max_request=1M", "user_buffer_max=4M"])
    chunk = b'{"prompt": "' + b"p" * (900 << 10)
    fds, refused = [], None
    try:
        for _ in range(64):
            fd = os.open(m.route(IMAGE) / "new", os.O_WRONLY)
            fds.append(fd)
            try:
                os.write(fd, chunk)
            except OSError as e:
                refused = e.errno
                break
        assert refused == errno.EAGAIN and len(fds) <= 5
        assert stat_value(m, "renderfs_new_buffered_bytes") <= 4 << 20
        text = (m.path / "stats").read_text()
        assert 'renderfs_new_buffer_refused_total{budget="user_buffer_max"} 1' in text
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    # The kernel sends RELEASE after close() returns: wait for it.
    deadline = time.monotonic() + 10
    while stat_value(m, "renderfs_new_buffered_bytes") != 0:
        assert time.monotonic() < deadline, "the budget was not given back"
        time.sleep(0.05)
    assert m.wait(IMAGE, m.submit(IMAGE, OK)) == "complete"


@pytest.mark.parametrize("opt,msg", [("user_buffer_max=1K", "user_buffer_max"),
                                     ("buffer_max=1M", "buffer_max")])
def test_buffer_options_are_checked(mount_factory, opt, msg):
    m = mount_factory([opt], start=False)
    r = subprocess.run([tool("renderfs"), "-f", str(m.path), "-o", ",".join(m.opts)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and f"option '{msg}=" in r.stderr, r.stderr


# ---- 9. the daemon log ----

def test_rejections_are_rate_limited_in_the_log(mnt):
    fd = os.open(mnt.route(IMAGE) / "new", os.O_RDWR)
    try:
        for _ in range(2000):
            with pytest.raises(OSError):
                os.write(fd, b"junk\n")
    finally:
        os.close(fd)
    time.sleep(1.1)
    with pytest.raises(OSError):
        mnt.submit(IMAGE, b"junk")
    log = mnt.log()
    assert log.count("rejected (") < 60
    assert re.search(r"uid 0: \d+ rejected requests not logged", log), log[-2000:]
    assert stat_value(mnt, "renderfs_log_suppressed_total") > 1900
    assert stat_value(mnt, "renderfs_submissions_rejected_total") == 2001


# ---- 16. ls -l of a large route ----

def daemon_requests(m, action):
    """How many FUSE requests the daemon reads while action() runs (its
    reads of /dev/fuse, counted by strace)."""
    out = m.path.parent / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=read,readv,splice",
                               "-o", str(out), "-p", str(m.proc.pid)],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # attached to every thread
    action()
    tracer.send_signal(2)
    tracer.wait(timeout=30)
    calls = 0
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[-1] in ("read", "readv", "splice"):
            calls += int(f[3])
    return calls


def test_ls_l_asks_no_xattr_per_file(mount_factory):
    m = mount_factory(["workers=0", "rate=0"])
    batch = b"".join(obj(prompt=f"many {i}") + b"\n" for i in range(500))
    with open(m.route(IMAGE) / "new", "wb") as f:
        f.write(batch)
    time.sleep(1.5)  # announced; cached names expired
    subprocess.run(["ls", "-l", str(m.route(IMAGE))], check=True, capture_output=True)
    time.sleep(1.5)
    n = daemon_requests(m, lambda: subprocess.run(["ls", "-l", str(m.route(IMAGE))],
                                                  check=True, capture_output=True))
    # A readdirplus pass and a lookup or getattr per entry at most; three
    # getxattr per entry (SELinux label, two ACLs) before.
    assert n < 2 * 500, n
    with pytest.raises(OSError) as ei:
        os.getxattr(m.route(IMAGE) / "new", "security.selinux")
    assert ei.value.errno == errno.ENOTSUP


def test_write_beyond_a_hole_while_a_refused_object_is_dropped(mnt):
    """A write that lands beyond a hole (NFS, dd seek=) is buffered as it is,
    even while the rest of a refused object is still being dropped: it does
    not start inside the bad object, so it does not fail."""
    fd = os.open(mnt.route(IMAGE) / "new", os.O_RDWR)
    bad = b'{"prompt": "a\x00'
    with pytest.raises(OSError) as ei:
        os.pwrite(fd, bad, 0)
    assert ei.value.errno == errno.EINVAL
    later = b'"}\n' + obj(prompt="after the hole") + b"\n"
    assert os.pwrite(fd, later, 1 << 20) == len(later)
    assert os.read(fd, 4096).decode().startswith("error: ")
    with pytest.raises(OSError) as ei:
        os.close(fd)  # the hole was never filled
    assert ei.value.errno == errno.EINVAL
    assert jobs(mnt) == []


def test_readers_opening_and_closing_in_a_loop_do_not_exhaust_descriptors(mount_factory):
    """Each open file holds one of the daemon's descriptors until the
    kernel's RELEASE for it is handled, after the user's close(). With the
    kernel's default of 12 background requests at a time, 200 threads of
    one user opening and closing outputs in a loop queued some 20,000
    releases within seconds: the daemon ran out of descriptors and every
    open (and commit) failed with EMFILE. The daemon also starts under the
    low soft limit service managers give, and takes the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        m = mount_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = open(f"/proc/{m.proc.pid}/limits").read()
    assert re.search(rf"^Max open files\s+{hard}\s+{hard}\s", limits, re.M), limits
    jids = [m.submit(IMAGE, {"prompt": "fds", **SMALL, "seed": i}) for i in range(20)]
    paths = []
    for j in jids:
        assert m.wait(IMAGE, j) == "complete"
        paths.append(m.job(IMAGE, j) / "output.png")
    stop, errs = threading.Event(), []

    def loop(path):
        while not stop.is_set():
            try:
                os.close(os.open(path, os.O_RDONLY))
            except OSError as e:
                errs.append(e.errno)
                return

    threads = [threading.Thread(target=loop, args=(paths[i % 20],)) for i in range(200)]
    for t in threads:
        t.start()
    peak, deadline = 0, time.monotonic() + 4
    try:
        while time.monotonic() < deadline and not errs:
            peak = max(peak, len(os.listdir(f"/proc/{m.proc.pid}/fd")))
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errs, f"{len(errs)} opens failed: {sorted(set(map(errno.errorcode.get, errs)))}"
    assert peak < 1000, f"the daemon held {peak} descriptors"
    (m.job(IMAGE, jids[0]) / "output.png").read_bytes()
