"""SPEC §4: changes made by the daemon reach inotify watchers (inotifywait,
tail -f), in order, without polling; the notifier survives `-s` and
unmount."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import IMAGE, SMALL, VIDEO, need


class Watch:
    """inotifywait -m on some paths; events as (dir, events set, name)."""

    def __init__(self, *paths, events=None):
        cmd = [need("inotifywait"), "-m", "--format", "%w|%e|%f"]
        for e in events or ():
            cmd += ["-e", e]
        self.proc = subprocess.Popen([*cmd, *map(str, paths)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.events, self.cond = [], threading.Condition()
        for line in self.proc.stderr:
            if "Watches established" in line:
                break
            if "Couldn't" in line or "Failed" in line:
                pytest.fail(line)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            d, ev, name = line.rstrip("\n").split("|", 2)
            with self.cond:
                self.events.append((d.rstrip("/"), set(ev.split(",")), name, time.monotonic()))
                self.cond.notify_all()

    def wait_for(self, pred, timeout=30, what="event"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, e in enumerate(self.events):
                    if pred(e):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {what} within {timeout} s; got:\n"
                                + "\n".join(f"{d} {sorted(ev)} {n}" for d, ev, n, _ in
                                            self.events))
                self.cond.wait(left)

    def index(self, name, *evs, d=None, start=0, timeout=30):
        return self.wait_for(
            lambda e: self.events.index(e) >= start and e[2] == name and set(evs) <= e[1]
            and (d is None or e[0] == str(d)),
            timeout, what=f"{'|'.join(evs)} on {name}")

    def count(self, name, ev):
        with self.cond:
            return sum(1 for e in self.events if e[2] == name and ev in e[1])

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def watches():
    ws = []

    def make(*paths, events=None):
        w = Watch(*paths, events=events)
        ws.append(w)
        return w
    yield make
    for w in ws:
        w.close()


def blocker(m):
    """Occupy the only worker with a long video, so later jobs stay queued."""
    jid = m.submit(VIDEO, {"prompt": "blocker", "width": 320, "height": 192,
                           "num_frames": 600, "seed": 3})
    m.wait(VIDEO, jid, states=("running",))
    return jid


def ctl(m, route, jid, cmd):
    with open(m.job(route, jid) / "ctl", "w") as f:
        f.write(cmd + "\n")


def test_created_job_appears_in_route_dir_and_jobs(mount_factory, watches):
    m = mount_factory(["workers=0"])
    w = watches(m.route(IMAGE), m.path / "jobs", events=["create"])
    jid = m.submit(IMAGE, {"prompt": "c", **SMALL})
    w.index(jid, "CREATE", "ISDIR", d=m.route(IMAGE))
    w.index(jid, "CREATE", d=m.path / "jobs")
    named = m.submit(IMAGE, {"input": {"prompt": "n", **SMALL}, "name": "my-render"})
    assert named == "my-render"
    w.index("my-render", "CREATE", "ISDIR", d=m.route(IMAGE))
    link = next(p for p in (m.path / "jobs").iterdir() if os.readlink(p).endswith("/my-render"))
    w.index(link.name, "CREATE", d=m.path / "jobs")  # jobs/ names the ULID
    links = [e for e in w.events if e[0] == str(m.path / "jobs")]
    assert len(links) == 2, links  # jobs/ has ULIDs: one per job
    # Nothing was created by the notification: the listing is as before.
    assert sorted(os.listdir(m.route(IMAGE))) == sorted(["new", "schema.json", jid,
                                                         "my-render"])
    # It counted what it did: four operations, none failed or dropped.
    stats = (m.path / "stats").read_text()
    for line in ('renderfs_notify_ops_total{result="ok"} 4',
                 'renderfs_notify_ops_total{result="failed"} 0',
                 'renderfs_notify_events_total{fate="dropped"} 0'):
        assert line in stats.splitlines(), stats


def test_status_change_is_modify_then_close_write(mount_factory, watches):
    m = mount_factory(["workers=0"])
    jid = m.submit(IMAGE, {"prompt": "s", **SMALL})
    d = m.job(IMAGE, jid)
    w = watches(d)
    ctl(m, IMAGE, jid, "cancel")
    for f in ("status", "status.json"):
        i = w.index(f, "MODIFY")
        j = w.index(f, "CLOSE_WRITE", start=i + 1)
        assert j > i
    # Content read after the event reflects the change.
    assert (d / "status").read_text() == "cancelled\n"
    assert json.loads((d / "status.json").read_text())["status"] == "cancelled"
    # status before status.json, and `retry` makes the pair again.
    n = len(w.events)
    ctl(m, IMAGE, jid, "retry")
    i = w.index("status", "CLOSE_WRITE", start=n)
    w.index("status.json", "CLOSE_WRITE", start=i)
    assert (d / "status").read_text() == "queued\n"


def test_run_events_in_order_and_output_complete_on_close_write(mount_factory, watches):
    """A watcher of a queued job sees running, progress, log, the output's
    CREATE then CLOSE_WRITE, and only then `complete`; the output it reads
    on CLOSE_WRITE is whole."""
    m = mount_factory(["workers=1"])
    blk = blocker(m)
    jid = m.submit(VIDEO, {"prompt": "o", "width": 128, "height": 96, "num_frames": 40,
                           "seed": 5})
    d = m.job(VIDEO, jid)
    w = watches(d)
    script = (f'inotifywait -m -e close_write --format %f "{d}" 2>/dev/null | '
              'while read f; do case "$f" in output.*) b3sum --no-names "$0/$f"; '
              'exit;; esac; done')
    reader = subprocess.Popen(["sh", "-c", script, str(d)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        time.sleep(0.3)  # the shell's watch is in place
        ctl(m, VIDEO, blk, "cancel")
        assert m.wait(VIDEO, jid) == "complete"
        out = reader.stdout.readline()  # inotifywait -m outlives the loop: one line
    finally:
        os.killpg(reader.pid, signal.SIGTERM)
        reader.wait()
    st = m.status(VIDEO, jid)
    assert out.strip() == st["output"]["blake3"], "the watcher read a partial output"

    running = w.index("status", "CLOSE_WRITE")
    prog = w.index("progress", "MODIFY", start=running)
    w.index("log", "MODIFY", start=running)
    create = w.index("output.mp4", "CREATE", start=prog)
    closew = w.index("output.mp4", "CLOSE_WRITE", start=create)
    done = w.index("status", "CLOSE_WRITE", start=closew)
    w.index("status.json", "CLOSE_WRITE", start=done)
    assert (d / "status").read_text() == "complete\n"


def test_remote_job_progress_and_result_with_complete(mount_factory, watches, tmp_path, fal):
    """A remote job whose service's last log line counts no steps reaches
    progress 1 in the write that completes it: a watcher of `progress`
    still hears of it, before `complete`, and result.json is there once
    `complete` is."""
    route = "image/fake/default/t2i"
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"routes": {route: fal.route()}}))
    fal.queue_polls, fal.hold, fal.done_logs = 1000, True, ["saving"]
    m = mount_factory([f"models={models}"])
    jid = m.submit(route, {"prompt": "x"})
    d = m.job(route, jid)
    deadline = time.monotonic() + 30
    while "in its queue at position" not in (d / "log").read_text():
        assert time.monotonic() < deadline, "never queued at the service"
        time.sleep(0.05)
    w = watches(d)
    fal.queue_polls = 0  # working: "denoising 3/12" is progress 0.25
    first = w.index("progress", "MODIFY")
    assert (d / "progress").read_text() == "0.25\n"
    fal.hold = False
    assert m.wait(route, jid) == "complete"
    out = w.index("output.png", "CLOSE_WRITE", start=first + 1)
    done = w.index("status", "CLOSE_WRITE", start=out)  # complete
    prog = w.index("progress", "MODIFY", start=first + 1, timeout=5)
    assert prog < done, "progress 1 announced after complete"
    assert (d / "progress").read_text() == "1\n"
    assert json.loads((d / "result.json").read_text())["seed"] == 42


def test_progress_is_coalesced_to_ten_per_second(mount_factory, watches):
    m = mount_factory(["workers=1"])
    blk = blocker(m)
    jid = m.submit(VIDEO, {"prompt": "p", "width": 64, "height": 64, "num_frames": 400,
                           "seed": 2})
    w = watches(m.job(VIDEO, jid), events=["modify"])
    t0 = time.monotonic()
    ctl(m, VIDEO, blk, "cancel")
    assert m.wait(VIDEO, jid) == "complete"
    w.index("status", "MODIFY")
    took = time.monotonic() - t0
    n = w.count("progress", "MODIFY")
    assert n >= 2, "progress was not announced"
    # (Counted, not spaced: the watcher's read times bunch under load.)
    assert n <= 10 * took + 2, f"{n} progress events in {took:.2f} s"


def test_tail_f_log_follows_lines(mount_factory):
    m = mount_factory(["workers=1"])
    blk = blocker(m)
    jid = m.submit(VIDEO, {"prompt": "t", **SMALL, "num_frames": 10})
    tail = subprocess.Popen(["tail", "-n", "+1", "-f", str(m.job(VIDEO, jid) / "log")],
                            stdout=subprocess.PIPE, text=True)
    try:
        ctl(m, VIDEO, blk, "cancel")
        lines, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            line = tail.stdout.readline()
            lines.append(line)
            if line.rstrip().endswith(" complete"):
                break
        assert lines[-1].rstrip().endswith(" complete"), lines
        assert any("started attempt 1" in x for x in lines), lines
        assert all(x[:4].isdigit() and "T" in x.split()[0] for x in lines), lines
    finally:
        tail.terminate()
        tail.wait()


def test_deletion_by_retain_and_by_rmdir(mount_factory, watches):
    m = mount_factory(["retain=2s"])
    a = m.submit(IMAGE, {"prompt": "ret", **SMALL})
    assert m.wait(IMAGE, a) == "complete"
    w = watches(m.route(IMAGE), m.path / "jobs", m.job(IMAGE, a))
    # Collected by the daemon: the directory, its link, the watch on it.
    w.index(a, "DELETE", "ISDIR", d=m.route(IMAGE), timeout=20)
    w.index(a, "DELETE", d=m.path / "jobs")
    w.wait_for(lambda e: e[0] == str(m.job(IMAGE, a)) and "DELETE_SELF" in e[1],
               what="DELETE_SELF on the job directory")
    assert not m.job(IMAGE, a).exists()

    b = m.submit(IMAGE, {"prompt": "rm", **SMALL})
    assert m.wait(IMAGE, b) == "complete"
    os.rmdir(m.job(IMAGE, b))
    w.index(b, "DELETE", d=m.path / "jobs")
    time.sleep(0.5)
    dels = [e for e in w.events if e[2] == b and "DELETE" in e[1] and
            e[0] == str(m.route(IMAGE))]
    assert len(dels) == 1, f"rmdir was announced {len(dels)} times"


def test_users_cannot_take_the_notifier_path(mount_factory):
    m = mount_factory(["workers=0"])
    jid = m.submit(IMAGE, {"prompt": "u", **SMALL})
    for call in (lambda: os.mkdir(m.route(IMAGE) / "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                 lambda: os.symlink("x", m.path / "jobs" / "01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                 lambda: open(m.job(IMAGE, jid) / "output.png", "x"),
                 lambda: os.mkdir(m.job(IMAGE, jid) / "x")):
        with pytest.raises(PermissionError):
            call()
    with pytest.raises(OSError):
        (m.job(IMAGE, jid) / "status").write_text("complete\n")
    assert (m.job(IMAGE, jid) / "status").read_text() == "queued\n"


def test_single_threaded_and_unmount_while_busy(mount_factory, watches):
    m = mount_factory(["workers=2"], args=["-s"])
    w = watches(m.route(IMAGE), events=["create"])
    ids = [m.submit(IMAGE, {"prompt": f"s{i}", **SMALL}) for i in range(20)]
    for jid in ids:
        w.index(jid, "CREATE", "ISDIR")
    assert m.wait(IMAGE, ids[-1]) == "complete"
    # Unmount with the notifier busy: a burst of jobs whose events are
    # still being made. The daemon must exit promptly and cleanly.
    for i in range(200):
        m.submit(IMAGE, {"prompt": f"b{i}", **SMALL})
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 15


def test_nonotify_makes_no_events(mount_factory, watches):
    m = mount_factory(["workers=1", "nonotify"])
    w = watches(m.route(IMAGE), events=["create"])
    jid = m.submit(IMAGE, {"prompt": "q", **SMALL})
    assert m.wait(IMAGE, jid) == "complete"
    time.sleep(0.5)
    assert w.count(jid, "CREATE") == 0


def test_names_looked_up_first_are_still_announced(mount_factory, watches):
    """A reader that finds the output (or the job) before the notifier gets
    to it must not hide the CREATE from watchers."""
    m = mount_factory(["workers=1"])
    for k in range(3):
        blk = blocker(m)
        jid = m.submit(VIDEO, {"prompt": f"race {k}", **SMALL, "num_frames": 30})
        d = m.job(VIDEO, jid)
        w = watches(d, events=["create"])
        stop, seen = threading.Event(), []

        def poke():
            while not stop.is_set():
                try:
                    os.stat(d / "output.mp4")
                    seen.append(time.monotonic())
                except FileNotFoundError:
                    pass
        t = threading.Thread(target=poke)
        t.start()
        try:
            ctl(m, VIDEO, blk, "cancel")
            assert m.wait(VIDEO, jid) == "complete"
            w.index("output.mp4", "CREATE")
        finally:
            stop.set()
            t.join()
        assert seen, "the reader never saw the output"


def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return out


def alive(pid):
    """Running (a zombie waiting for init to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_while_notifying(mount_factory):
    """The daemon dies at once under SIGKILL even with notifications in
    flight (a thread of its own waiting on its mount could not be killed),
    and its helper process follows."""
    for rnd in range(8):
        m = mount_factory(["workers=2"], name=f"k{rnd}")
        helpers = children(m.proc.pid)
        assert len(helpers) == 1, helpers
        stop = threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                try:
                    m.submit(IMAGE, {"prompt": f"k{rnd} {i}", **SMALL})
                except (OSError, AssertionError):
                    return
                i += 1
        def look():
            # lookups in the route directory hold its lock while the
            # daemon answers; the notifier's mkdir there waits for them
            k = 0
            while not stop.is_set():
                try:
                    os.stat(m.route(IMAGE) / f"01ARZ3NDEKTSV4RRFFQ69G{k % 1000:04d}")
                except OSError:
                    pass
                k += 1
        ts = [threading.Thread(target=load) for _ in range(3)]
        ts += [threading.Thread(target=look) for _ in range(3)]
        for t in ts:
            t.start()
        time.sleep(0.3 + 0.07 * rnd)
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=10)
        stop.set()
        for t in ts:
            t.join(timeout=30)
        deadline = time.monotonic() + 10
        while alive(helpers[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(helpers[0]), "the helper outlived the daemon"
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True)
        m.proc = None


def test_final_status_is_announced_under_a_flood(mount_factory):
    """However many changes a burst makes, the last change of every file (a
    final status above all) is announced: a script that reads `status` at
    each event never waits forever. 16 writers flood a route with 80,000
    tiny jobs; halfway, 8 longer jobs are watched from creation to
    completion, the way a shell script does: read status at every event,
    done at `complete`. Nothing is dropped (the old ring dropped here)."""
    m = mount_factory(["workers=2", "rate=0", "user_queue_max=1000000"])
    batch = b"".join(json.dumps({"prompt": f"flood {i}", **SMALL}).encode() + b"\n"
                     for i in range(200))

    half = threading.Barrier(17)

    def flood():
        fd = os.open(m.route(IMAGE) / "new", os.O_WRONLY)
        try:
            for i in range(25):  # 80,000 jobs in all
                if i == 10:
                    half.wait()
                os.write(fd, batch)
        finally:
            os.close(fd)
    writers = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
    for t in writers:
        t.start()
    half.wait()  # 32,000 jobs in: the notifier is well behind
    watched = {str(m.job(VIDEO, j)): j for j in (
        m.submit(VIDEO, {"input": {"prompt": f"watched {i}", "width": 320, "height": 240,
                                   "num_frames": 40}, "priority": "high"}) for i in range(8))}
    proc = subprocess.Popen([need("inotifywait"), "-m", "-q", "-e", "close_write", "--format",
                             "%w%f", *watched], stdout=subprocess.PIPE, text=True)
    seen_complete = set()

    def script():
        for line in proc.stdout:
            path = line.rstrip("\n")
            if path.endswith("/status") and open(path).read() == "complete\n":
                seen_complete.add(os.path.dirname(path))
    reader = threading.Thread(target=script, daemon=True)
    reader.start()
    try:
        for t in writers:
            t.join()
        deadline = time.monotonic() + 180
        while len(seen_complete) < len(watched):
            states = [open(os.path.join(d, "status")).read().strip() for d in watched]
            if time.monotonic() > deadline:
                pytest.fail(f"a status event after `complete` never came: states {states}, "
                            f"seen complete {len(seen_complete)} of {len(watched)}\n"
                            + (m.path / "stats").read_text())
            time.sleep(0.2)
        stats = (m.path / "stats").read_text()
        assert 'renderfs_notify_events_total{fate="dropped"} 0' in stats
    finally:
        proc.terminate()
        proc.wait(timeout=10)
