"""The store trusts nothing it did not make (SPEC §5, §6): folders another
user can write, symlinks and FIFOs where blobs should be, a damaged index,
a full disk."""
import datetime
import errno
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import IMAGE, SMALL, VIDEO, tool

OK = {"prompt": "trust", **SMALL}


def make_store(mount_factory, name="mnt"):
    m = mount_factory(name=name)
    jid = m.submit(IMAGE, OK)
    assert m.wait(IMAGE, jid) == "complete"
    out = json.loads((m.job(IMAGE, jid) / "status.json").read_text())["output"]["blake3"]
    m.stop()
    return m, jid, out


def mount_fails(m, *needles):
    r = subprocess.run([tool("renderfs"), "-f", str(m.path), "-o", ",".join(m.opts)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert not os.path.ismount(m.path)
    return r.stderr


# ---- 10. folders others can write, symlinks inside the store ----

def test_symlinked_tmp_is_refused_and_its_target_untouched(mount_factory, tmp_path):
    m, _, _ = make_store(mount_factory)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    shutil.rmtree(m.store / "tmp")
    os.symlink(victim, m.store / "tmp")
    mount_fails(m, "refusing store", "tmp' is a symbolic link")
    assert (victim / "precious").read_text() == "keep me"
    r = subprocess.run([tool("renderctl"), "gc", str(m.store)], capture_output=True, text=True)
    assert r.returncode != 0 and "symbolic link" in r.stderr
    assert (victim / "precious").read_text() == "keep me"


@pytest.mark.parametrize("where,mode,why", [
    ("", 0o777, "writable by others"),
    ("", 0o775, "writable by its group"),
    ("blobs", 0o777, "writable by others"),
    ("index", 0o722, "writable by others"),
])
def test_store_writable_by_others_is_refused(mount_factory, where, mode, why):
    m, _, _ = make_store(mount_factory)
    os.chmod(m.store / where, mode)
    mount_fails(m, "refusing store", why)


def test_store_owned_by_another_user_is_refused(mount_factory):
    m, _, _ = make_store(mount_factory)
    os.chown(m.store / "keys", 65534, 65534)
    mount_fails(m, "refusing store", "owned by uid 65534")


def test_symlinked_blob_folder_and_key_are_refused(mount_factory, tmp_path):
    m, _, out = make_store(mount_factory)
    sub = m.store / "blobs" / out[:2]
    elsewhere = tmp_path / "elsewhere"
    shutil.move(sub, elsewhere)
    os.symlink(elsewhere, sub)
    mount_fails(m, "is a symbolic link")
    os.unlink(sub)
    shutil.move(elsewhere, sub)
    key = next((m.store / "keys").glob("*.key"))
    shutil.move(key, tmp_path / "k")
    os.symlink(tmp_path / "k", key)
    mount_fails(m, "is a symbolic link")


# ---- 11. a FIFO in a blob's place ----

def test_fifo_blob_is_refused_not_hung(mount_factory):
    m, jid, out = make_store(mount_factory)
    blob = m.store / "blobs" / out[:2] / out
    os.chmod(blob, 0o644)
    os.unlink(blob)
    os.mkfifo(blob, 0o444)
    m.start()
    before = int(re.search(r"^renderfs_integrity_failures_total (\d+)$",
                           (m.path / "stats").read_text(), re.M).group(1))
    for path in (m.job(IMAGE, jid) / "output.png", m.path / "cas" / out):
        r = subprocess.run(["cat", str(path)], capture_output=True, timeout=20)
        assert r.returncode != 0 and b"Input/output error" in r.stderr, r
    after = int(re.search(r"^renderfs_integrity_failures_total (\d+)$",
                          (m.path / "stats").read_text(), re.M).group(1))
    assert after >= before + 2
    assert m.wait(IMAGE, m.submit(IMAGE, {**OK, "prompt": "still serving"})) == "complete"


# ---- 12. a damaged index never costs an output ----

def test_stray_blobs_go_to_lost_found_and_adopt_brings_them_back(mount_factory, renderctl):
    m, jid, out = make_store(mount_factory)
    data = (m.store / "index" / "data.mdb").read_bytes()
    key = bytes.fromhex(out)
    # The blob's entry in the blobs database (its key), damaged by one bit:
    # the blob file no longer has an entry, the job still names it.
    at = [i for i in range(len(data)) if data.startswith(key, i)]
    assert at
    damaged = None
    for i in at:
        d = bytearray(data)
        d[i] ^= 1
        (m.store / "index" / "data.mdb").write_bytes(bytes(d))
        r = renderctl("fsck", m.store)
        if "which is not in the index" in r.stdout:
            damaged = i
            break
    assert damaged is not None, "no single bit made the blob entry unreadable"
    blob = m.store / "blobs" / out[:2] / out
    content = blob.read_bytes()
    m.start()
    m.stop()
    assert "moved to lost+found" in m.log()
    assert not blob.exists()
    assert (m.store / "lost+found" / out).read_bytes() == content
    r = renderctl("fsck", "--adopt", m.store)
    assert f"adopted blob {out}" in r.stdout, r.stdout + r.stderr
    assert blob.read_bytes() == content
    m.start()
    assert (m.job(IMAGE, jid) / "output.png").read_bytes() == content


# ---- 13. a full disk ----

@pytest.fixture
def small_fs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("cannot mount a tmpfs: " + r.stderr)
    yield d
    subprocess.run(["umount", "-l", str(d)])


def fill(path, leave):
    """Fill the filesystem of path until `leave` bytes are free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


def failing_on_a_full_disk(mount_factory, small_fs):
    """A mount with one worker on a nearly full store, and a job too big
    for it that has just failed its first attempt: (mount, job id, log)."""
    m = mount_factory(["max_attempts=10", "workers=1"], store=small_fs / "store")
    fill(small_fs, 1 << 20)
    jid = m.submit(VIDEO, {"prompt": "a big one", "width": 320, "height": 240,
                           "num_frames": 60, "format": "y4m"})
    log = m.job(VIDEO, jid) / "log"
    deadline = time.monotonic() + 60
    while "retrying" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    return m, jid, log


def test_disk_full_while_rendering_is_a_transient_store_error(mount_factory, small_fs):
    m, jid, log = failing_on_a_full_disk(mount_factory, small_fs)
    text = log.read_text()
    assert "(store: no space left on device" in text, text
    os.unlink(small_fs / "filler")
    assert m.wait(VIDEO, jid, timeout=120) == "complete", log.read_text()
    st = m.status(VIDEO, jid)
    assert st["attempts"] >= 2 and st["error"] is None


def test_disk_full_at_submit_says_so(mount_factory, small_fs):
    m = mount_factory(["workers=0"], store=small_fs / "store")
    fill(small_fs, 0)
    payload = json.dumps({**OK, "prompt": "p" * 1900}).encode() + b"\n"
    refused = None
    for _ in range(2000):
        fd = os.open(m.route(IMAGE) / "new", os.O_RDWR)
        try:
            os.write(fd, payload)
        except OSError as e:
            refused = (e.errno, os.read(fd, 4096).decode())
        finally:
            os.close(fd)
        if refused:
            break
    assert refused and refused[0] == errno.ENOSPC, refused
    assert refused[1].rstrip().endswith("no space left on device"), refused
    os.unlink(small_fs / "filler")
    m.submit(IMAGE, OK)


def test_a_retry_waiting_for_its_time_holds_no_worker(mount_factory, small_fs):
    """A job that failed transiently goes back to the queue with a time
    (status.json `retry_at`); no worker sleeps through the backoff, so with
    one worker another job runs meanwhile. Before, the worker slept with
    the failed job until its retry."""
    m, big, log = failing_on_a_full_disk(mount_factory, small_fs)
    small = m.submit(IMAGE, {"prompt": "small", "width": 64, "height": 64})
    assert m.wait(IMAGE, small) == "complete"
    st = m.status(VIDEO, big)
    assert st["status"] == "queued" and st["attempts"] == 1, st
    retry_at = datetime.datetime.fromisoformat(st["retry_at"].replace("Z", "+00:00"))
    assert retry_at > datetime.datetime.now(datetime.timezone.utc), st
    assert st["position"] is None and (m.job(VIDEO, big) / "position").read_text() == ""
    os.unlink(small_fs / "filler")
    assert m.wait(VIDEO, big, timeout=120) == "complete", log.read_text()
    st = m.status(VIDEO, big)
    assert st["attempts"] >= 2 and st["retry_at"] is None
