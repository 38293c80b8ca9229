"""SPEC §1 and §3: the namespace, job directories, ctl, deletion, signatures."""
import errno
import json
import os
import re
import subprocess
import time

import pytest

from conftest import IMAGE, SMALL, VIDEO, need

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
FILES = {"request.json", "status", "progress", "position", "log", "error", "status.json",
         "ctl"}
DONE = {"output.png", "output.png.minisig", "manifest.json", "manifest.json.minisig"}


def test_root_listing_and_static_files(mnt):
    names = set(os.listdir(mnt.path))
    assert {"README", "models.json", "stats", "render.pub", "keys", "jobs", "cas",
            "image", "video"} <= names
    models = json.loads((mnt.path / "models.json").read_text())
    routes = {r["route"]: r for r in models["routes"]}
    assert routes[VIDEO]["backend"] == "synth" and routes["video/wan/default/t2v"][
        "backend"] == "fal"
    schema = json.loads((mnt.route(VIDEO) / "schema.json").read_text())
    assert schema == routes[VIDEO]["schema"] and "prompt" in schema["required"]
    assert "video/synth/default/t2v" in (mnt.path / "README").read_text()
    pub = (mnt.path / "render.pub").read_text()
    keyfiles = os.listdir(mnt.path / "keys")
    assert len(keyfiles) == 1 and (mnt.path / "keys" / keyfiles[0]).read_text() == pub
    # minisign writes the key id without leading zeros; the file name has 16 digits
    comment_id = pub.splitlines()[0].split()[-1]
    assert int(keyfiles[0][:16], 16) == int(comment_id, 16)


def test_sizes_are_exact_and_nlink_correct(mnt):
    jid = mnt.submit(IMAGE, {"prompt": "sizes", **SMALL})
    mnt.wait(IMAGE, jid)
    d = mnt.job(IMAGE, jid)
    assert set(os.listdir(d)) == FILES | DONE
    for name in os.listdir(d):
        if name == "ctl":
            continue
        st = os.stat(d / name)
        assert st.st_size == len((d / name).read_bytes()), name
        assert st.st_nlink == 1
    for name in ("README", "models.json", "render.pub"):
        assert os.stat(mnt.path / name).st_size == len((mnt.path / name).read_bytes())
    assert os.stat(d).st_nlink == 2
    assert os.stat(mnt.route(IMAGE)).st_nlink == 3
    families = [e for e in os.listdir(mnt.path / "image") if (mnt.path / "image" / e).is_dir()]
    assert sorted(families) == ["qwen", "synth"]
    assert os.stat(mnt.path / "image").st_nlink == 2 + len(families)


def test_job_lifecycle_files(mnt):
    jid = mnt.submit(VIDEO, {"prompt": "a red fox", **SMALL, "num_frames": 6})
    assert mnt.wait(VIDEO, jid) == "complete"
    d = mnt.job(VIDEO, jid)
    assert (d / "status").read_text() == "complete\n"
    assert (d / "progress").read_text() == "1\n"
    assert (d / "position").read_text() == ""
    assert (d / "error").read_text() == ""
    log = (d / "log").read_text().splitlines()
    assert len(log) >= 3 and all(RFC3339.match(x) for x in log), log
    assert "started attempt 1" in log[0] and log[-1].endswith("complete")
    st = mnt.status(VIDEO, jid)
    for k in ("id", "route", "owner", "status", "progress", "position", "created_at",
              "started_at", "completed_at", "attempts", "error", "output", "device",
              "cached"):
        assert k in st, k
    assert st["id"] == jid and st["owner"] == os.getuid() and st["attempts"] == 1
    assert st["device"] == "cpu" and st["cached"] is False and st["error"] is None
    out = d / "output.mp4"
    b3 = subprocess.run([need("b3sum"), "--no-names", str(out)], capture_output=True,
                        text=True, check=True).stdout.strip()
    assert st["output"] == {"name": "output.mp4", "blake3": b3, "size": out.stat().st_size,
                            "media_type": "video/mp4"}
    man = json.loads((d / "manifest.json").read_text())
    assert man["job"] == jid and man["output"]["blake3"] == b3 and man["route"] == VIDEO
    assert man["seed"] == json.loads((d / "request.json").read_text())["seed"]
    cas = mnt.path / "cas" / b3
    assert cas.read_bytes() == out.read_bytes()
    assert os.readlink(mnt.path / "jobs" / jid) == f"../{VIDEO}/{jid}"


def test_minisign_verifies_outputs_and_refuses_copies(mnt, tmp_path):
    jid = mnt.submit(IMAGE, {"prompt": "signed", **SMALL})
    mnt.wait(IMAGE, jid)
    d = mnt.job(IMAGE, jid)
    pub = mnt.path / "render.pub"
    for f in ("output.png", "manifest.json"):
        r = subprocess.run([need("minisign"), "-Vm", f, "-p", str(pub)], cwd=d,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    bad = tmp_path / "output.png"
    data = bytearray((d / "output.png").read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    (tmp_path / "output.png.minisig").write_bytes((d / "output.png.minisig").read_bytes())
    r = subprocess.run([need("minisign"), "-Vm", str(bad), "-p", str(pub)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    b3 = mnt.status(IMAGE, jid)["output"]["blake3"]
    r = subprocess.run([need("minisign"), "-Vm", str(mnt.path / "cas" / b3), "-p", str(pub)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_output_exists_before_status_complete(mnt):
    jid = mnt.submit(VIDEO, {"prompt": "order", **SMALL, "num_frames": 30})
    d = mnt.job(VIDEO, jid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = (d / "status").read_text()
        if status == "complete\n":
            break
        assert not (d / "output.mp4").exists() or status in ("running\n", "complete\n")
    # Once complete, the output is whole: its hash is the one recorded.
    st = mnt.status(VIDEO, jid)
    assert (d / "output.mp4").stat().st_size == st["output"]["size"]


def test_position_queue_and_cancel_queued(mount_factory):
    m = mount_factory(["workers=0"])
    ids = [m.submit(IMAGE, {"prompt": f"q{i}", **SMALL}) for i in range(3)]
    assert [(m.job(IMAGE, j) / "position").read_text() for j in ids] == ["0\n", "1\n", "2\n"]
    (m.job(IMAGE, ids[0]) / "ctl").write_text("cancel\n")
    assert (m.job(IMAGE, ids[0]) / "status").read_text() == "cancelled\n"
    assert (m.job(IMAGE, ids[2]) / "position").read_text() == "1\n"
    (m.job(IMAGE, ids[2]) / "ctl").write_text("priority high\n")
    assert (m.job(IMAGE, ids[2]) / "position").read_text() == "0\n"
    (m.job(IMAGE, ids[0]) / "ctl").write_text("retry\n")
    assert (m.job(IMAGE, ids[0]) / "status").read_text() == "queued\n"
    with pytest.raises(OSError) as ei:
        (m.job(IMAGE, ids[1]) / "ctl").write_text("explode\n")
    assert ei.value.errno == errno.EINVAL


def test_cancel_stops_a_running_job_within_a_second(mnt):
    jid = mnt.submit(VIDEO, {"prompt": "long", "width": 640, "height": 360,
                             "num_frames": 1000})
    mnt.wait(VIDEO, jid, states=("running",))
    d = mnt.job(VIDEO, jid)
    deadline = time.monotonic() + 30
    while (d / "progress").read_text() == "0\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    p = float((d / "progress").read_text())
    assert 0 < p < 1
    t0 = time.monotonic()
    (d / "ctl").write_text("cancel\n")
    assert mnt.wait(VIDEO, jid, timeout=5) == "cancelled"
    assert time.monotonic() - t0 < 1.0
    assert not (d / "output.mp4").exists()
    assert "cancelled" in (d / "log").read_text()


def test_timeout_ends_in_error(mnt):
    jid = mnt.submit(VIDEO, {"input": {"prompt": "slow", "width": 640, "height": 360,
                                       "num_frames": 1000}, "timeout_s": 1})
    assert mnt.wait(VIDEO, jid, timeout=10) == "error"
    st = mnt.status(VIDEO, jid)
    assert st["error"]["code"] == "timeout" and "deadline" in st["error"]["message"]


def test_rm_r_and_rmdir_delete_jobs(mnt):
    a = mnt.submit(IMAGE, {"prompt": "del a", **SMALL, "seed": 7})
    b = mnt.submit(IMAGE, {"prompt": "del b", **SMALL})
    mnt.wait(IMAGE, a)
    mnt.wait(IMAGE, b)
    blob = mnt.status(IMAGE, a)["output"]["blake3"]
    subprocess.run(["rm", "-r", str(mnt.job(IMAGE, a))], check=True)
    os.rmdir(mnt.job(IMAGE, b))
    assert not mnt.job(IMAGE, a).exists() and not mnt.job(IMAGE, b).exists()
    assert not (mnt.path / "jobs" / a).exists()
    assert not (mnt.path / "cas" / blob).exists()
    assert not list((mnt.store / "blobs").glob(f"*/{blob}"))


def test_unlink_files_leave_the_view_and_release_the_output(mnt):
    jid = mnt.submit(IMAGE, {"prompt": "unlink", **SMALL})
    mnt.wait(IMAGE, jid)
    d = mnt.job(IMAGE, jid)
    blob = mnt.status(IMAGE, jid)["output"]["blake3"]
    os.unlink(d / "log")
    os.unlink(d / "output.png")
    assert "log" not in os.listdir(d) and "output.png" not in os.listdir(d)
    assert not list((mnt.store / "blobs").glob(f"*/{blob}"))
    assert mnt.status(IMAGE, jid)["status"] == "complete"


def test_inodes_stable_across_remount(mount_factory):
    m = mount_factory()
    jid = m.submit(IMAGE, {"prompt": "inode", **SMALL})
    m.wait(IMAGE, jid)
    paths = [m.job(IMAGE, jid), m.job(IMAGE, jid) / "status", m.route(IMAGE) / "new",
             m.path / "README", m.job(IMAGE, jid) / "output.png"]
    before = [os.stat(p).st_ino for p in paths]
    assert len(set(before)) == len(before)
    m.stop()
    m.start()
    assert [os.stat(p).st_ino for p in paths] == before


def write_and_close(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def test_precise_errnos_and_xattrs(mnt):
    jid = mnt.submit(IMAGE, {"prompt": "errnos", **SMALL})
    d = mnt.job(IMAGE, jid)
    cases = [
        (lambda: os.mkdir(mnt.route(IMAGE) / "x"), errno.EPERM),
        (lambda: open(mnt.path / "newfile", "w"), errno.EPERM),
        (lambda: os.rename(d / "status", d / "s2"), errno.EPERM),
        (lambda: os.symlink("x", mnt.path / "jobs" / "y"), errno.EPERM),
        (lambda: os.getxattr(d / "status", "user.x"), errno.ENOTSUP),  # no xattrs at all
        (lambda: os.setxattr(d / "status", "user.x", b"1"), errno.ENOTSUP),
        (lambda: os.truncate(d / "status", 0), errno.EPERM),
        (lambda: os.stat(mnt.route(IMAGE) / "01ARZ3NDEKTSV4RRFFQ69G5FAV"), errno.ENOENT),
        (lambda: os.stat(mnt.path / "cas" / ("0" * 64)), errno.ENOENT),
        (lambda: open(mnt.route(IMAGE) / "schema.json", "w"), errno.EPERM),
        (lambda: write_and_close(d / "status"), errno.EPERM),
    ]
    for fn, want in cases:
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == want, (fn, ei.value)
    assert os.listxattr(d / "status") == []


def test_stats_prometheus(mnt):
    jid = mnt.submit(IMAGE, {"prompt": "stats", **SMALL})
    mnt.wait(IMAGE, jid)
    text = (mnt.path / "stats").read_text()
    assert f'renderfs_jobs{{route="{IMAGE}",status="complete"}} 1' in text
    assert 'renderfs_workers{group="cpu"}' in text
    assert "renderfs_job_latency_seconds_count 1" in text
    assert re.search(r"^renderfs_blobs 1$", text, re.M)
    for line in text.splitlines():
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? [0-9.e+-]+$", line), line


def test_corrupt_blob_reads_eio_and_is_counted(mnt):
    jid = mnt.submit(IMAGE, {"prompt": "rot", **SMALL})
    mnt.wait(IMAGE, jid)
    blob = mnt.status(IMAGE, jid)["output"]["blake3"]
    path = next((mnt.store / "blobs").glob(f"*/{blob}"))
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OSError) as ei:
        (mnt.job(IMAGE, jid) / "output.png").read_bytes()
    assert ei.value.errno == errno.EIO
    assert "renderfs_integrity_failures_total 1" in (mnt.path / "stats").read_text()


def test_retain_collects_finished_jobs(mount_factory):
    m = mount_factory(["retain=2s"])
    jid = m.submit(IMAGE, {"prompt": "short-lived", **SMALL})
    m.wait(IMAGE, jid)
    blob = m.status(IMAGE, jid)["output"]["blake3"]
    deadline = time.monotonic() + 15
    while m.job(IMAGE, jid).exists():
        assert time.monotonic() < deadline, "retain=2s did not collect the job"
        time.sleep(0.1)
    assert not (m.path / "jobs" / jid).exists()
    assert not list((m.store / "blobs").glob(f"*/{blob}"))


def test_large_output_reads_verified_by_group(mount_factory):
    """Outputs over 1 MiB are served group by group, each checked: a damaged
    group reads as EIO (and is counted) while the others still read; after
    a restart the first open checks the whole blob and refuses it."""
    m = mount_factory()
    req = {"prompt": "large", "width": 640, "height": 360, "num_frames": 12, "format": "y4m"}
    good = m.submit(VIDEO, {**req, "seed": 5})
    bad = m.submit(VIDEO, {**req, "seed": 6})
    assert m.wait(VIDEO, good) == m.wait(VIDEO, bad) == "complete"
    st = m.status(VIDEO, good)
    out = m.job(VIDEO, good) / "output.y4m"
    assert st["output"]["size"] > 3 << 20
    b3 = subprocess.run([need("b3sum"), "--no-names", str(out)], capture_output=True,
                        text=True, check=True).stdout.strip()
    assert b3 == st["output"]["blake3"]
    assert (m.path / "cas" / b3).read_bytes() == out.read_bytes()

    # Damage while the file is open: a changed file is checked whole at its
    # next open (see test_passthrough.py), reads check only their group.
    hb = m.status(VIDEO, bad)["output"]["blake3"]
    blob = next((m.store / "blobs").glob(f"*/{hb}"))
    fd = os.open(m.job(VIDEO, bad) / "output.y4m", os.O_RDONLY)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek((2 << 20) + 12345)
        c = f.read(1)
        f.seek((2 << 20) + 12345)
        f.write(bytes([c[0] ^ 0x40]))
    try:
        assert len(os.pread(fd, 65536, 0)) == 65536  # group 0 is sound
        with pytest.raises(OSError) as ei:
            os.pread(fd, 65536, 2 << 20)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert "does not match its hash" in m.log()
    failures = re.search(r"^renderfs_integrity_failures_total (\d+)$",
                         (m.path / "stats").read_text(), re.M)
    assert failures and int(failures.group(1)) >= 1
    m.stop()
    m.start()
    with pytest.raises(OSError) as ei:
        (m.job(VIDEO, bad) / "output.y4m").read_bytes()
    assert ei.value.errno == errno.EIO
    assert (m.job(VIDEO, good) / "output.y4m").stat().st_size == st["output"]["size"]


def test_manifest_is_what_ran_whatever_the_models_file_says_later(mount_factory, tmp_path):
    """manifest.json names the backend and model recorded when the job ran:
    byte for byte the same after the models file moves the route to
    another backend and the store is mounted again (it named the route's
    backend of the moment)."""
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"routes": {IMAGE: {"model": "procedural-v1"}}}))
    m = mount_factory([f"models={models}"])
    jid = m.submit(IMAGE, {"prompt": "provenance", "width": 64, "height": 64, "seed": 3})
    assert m.wait(IMAGE, jid) == "complete"
    before = (m.job(IMAGE, jid) / "manifest.json").read_bytes()
    man = json.loads(before)
    assert man["backend"] == "synth" and man["model"] == "procedural-v1"
    m.stop()
    models.write_text(json.dumps({"routes": {IMAGE: {"backend": "fal", "model": "fal-ai/x"}}}))
    m = mount_factory([f"models={models}"], store=m.store, name="again")
    routes = json.loads((m.path / "models.json").read_text())["routes"]
    assert [r["backend"] for r in routes if r["route"] == IMAGE] == ["fal"]
    assert (m.job(IMAGE, jid) / "manifest.json").read_bytes() == before
