"""SPEC §6: SIGKILL while 8 writers submit and jobs run; every acknowledged
job survives and completes, no output is partial, fsck is clean."""
import json
import os
import re
import signal
import subprocess
import threading
import time

from conftest import IMAGE, SMALL, VIDEO, need, tool


def writer(m, n, acked, stop):
    i = 0
    while not stop.is_set() and i < 40:
        route = VIDEO if i % 4 == 0 else IMAGE
        req = {"prompt": f"w{n}-{i}", **SMALL}
        if route == VIDEO:
            req["num_frames"] = 24
        time.sleep(0.02)
        try:
            fd = os.open(m.route(route) / "new", os.O_RDWR)
        except OSError:
            return
        try:
            os.write(fd, json.dumps(req).encode() + b"\n")
            line = os.read(fd, 100).decode().strip()
            acked.append((route, line))
        except OSError:
            return
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        i += 1


def test_kill_9_loses_no_acknowledged_job(mount_factory):
    m = mount_factory(["workers=2"])
    # A long job that is surely running at the kill.
    long_id = m.submit(VIDEO, {"prompt": "long", "width": 320, "height": 192,
                               "num_frames": 300, "seed": 1})
    m.wait(VIDEO, long_id, states=("running",))
    acked, stop = [(VIDEO, long_id)], threading.Event()
    threads = [threading.Thread(target=writer, args=(m, n, acked, stop)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True)
    assert len(acked) > 50, "the writers should have got through many submissions"
    m.proc = None

    m.start()
    recovered = re.search(r"recovered .*: (\d+) jobs back in the queue", m.log())
    assert recovered and int(recovered.group(1)) >= 1, m.log()
    for route, jid in acked:
        assert m.wait(route, jid, timeout=120) == "complete", (jid, m.status(route, jid), m.log()[-3000:])
        st = m.status(route, jid)
        out = m.job(route, jid) / st["output"]["name"]
        b3 = subprocess.run([need("b3sum"), "--no-names", str(out)], capture_output=True,
                            text=True, check=True).stdout.strip()
        assert b3 == st["output"]["blake3"] and out.stat().st_size == st["output"]["size"]
    assert m.status(VIDEO, long_id)["attempts"] == 2
    assert not os.listdir(m.store / "tmp")
    m.stop()
    r = subprocess.run([tool("renderctl"), "fsck", str(m.store)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
