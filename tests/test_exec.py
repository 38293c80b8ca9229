"""The `exec` backend (SPEC §8): local programs behind routes, against real
programs (ffmpeg through contrib/models/ffmpeg.json, small Python scripts
written by the tests), their limits, cancellation, the bwrap sandbox and
fair share between two users."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import textwrap
import time

import pytest

from conftest import IMAGE, SMALL, until, need

TOP = pathlib.Path(__file__).resolve().parent.parent
FFMPEG_MODELS = TOP / "contrib" / "models" / "ffmpeg.json"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)
NOBODY = 65534


def program(tmp_path, name, body):
    """An executable Python program in tmp_path."""
    p = tmp_path / name
    p.write_text("#!/usr/bin/python3\nimport json, os, sys, time\n" + textwrap.dedent(body))
    p.chmod(0o755)
    return str(p)


def route_entry(command, **extra):
    entry = {"backend": "exec", "command": command, "media_type": "image/png",
             "schema": {"type": "object"}}
    entry.update(extra)
    return entry


def models(tmp_path, routes):
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": routes}))
    return f"models={p}"


def ffprobe(path):
    r = subprocess.run([need("ffprobe"), "-v", "error", "-count_frames", "-show_entries",
                        "stream=codec_name,width,height,nb_read_frames,r_frame_rate",
                        "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["streams"][0]


def b3(path):
    return subprocess.run([need("b3sum"), "--no-names", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def group_alive(pgid):
    """Whether any process is in process group pgid (zombies included)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid:
                return True
    return False


def test_ffmpeg_routes_make_what_was_asked(mount_factory):
    need("ffmpeg")
    m = mount_factory([f"models={FFMPEG_MODELS}"])
    img = "image/ffmpeg/mandelbrot/t2i"
    vid = "video/ffmpeg/gradients/t2v"
    life = "image/ffmpeg/life/t2i"
    a = m.submit(img, {"width": 320, "height": 240})
    b = m.submit(vid, {"width": 160, "height": 120, "rate": 10, "duration": 2, "seed": 7})
    c = m.submit(life, {"width": 64, "height": 48, "seed": 3})
    assert m.wait(img, a) == m.wait(vid, b) == m.wait(life, c) == "complete"
    s = ffprobe(m.job(img, a) / "output.png")
    assert (s["codec_name"], s["width"], s["height"]) == ("png", 320, 240)
    s = ffprobe(m.job(vid, b) / "output.mp4")
    assert (s["codec_name"], s["width"], s["height"]) == ("h264", 160, 120)
    assert s["nb_read_frames"] == "20" and s["r_frame_rate"] == "10/1"
    s = ffprobe(m.job(life, c) / "output.png")
    assert (s["width"], s["height"]) == (64, 48)
    st = m.status(vid, b)
    assert st["progress"] == 1 and st["output"]["media_type"] == "video/mp4"
    assert "gradients=size=160x120:rate=10:seed=7, 20 frames" in (m.job(vid, b) / "log").read_text()
    # The schema is the route's: a bad field fails at write().
    err, line = m.submit_err(img, b'{"width": 7}\n')
    assert "width" in line


def test_an_input_reaches_the_program_as_a_read_only_file(mount_factory, tmp_path):
    prog = program(tmp_path, "copy.py", """
        req = json.load(sys.stdin)
        path = req["image"]
        st = os.stat(path)
        out = os.environ["RENDERFS_OUTPUT"]
        with os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w") as s:
            s.write(f"log input {path} mode {st.st_mode & 0o777:o} "
                    f"beside {os.path.dirname(path) == os.path.dirname(out)}\\n")
        open(out, "wb").write(open(path, "rb").read())
    """)
    m = mount_factory([models(tmp_path, {"image/copy/default/i2i": route_entry(
        [prog], schema={"type": "object", "properties": {"image": {"type": "string"}}})})])
    src = m.submit(IMAGE, {"prompt": "input", **SMALL})
    assert m.wait(IMAGE, src) == "complete"
    h = m.status(IMAGE, src)["output"]["blake3"]
    j = m.submit("image/copy/default/i2i", {"image": f"cas:{h}"})
    assert m.wait("image/copy/default/i2i", j) == "complete"
    d = m.job("image/copy/default/i2i", j)
    assert b3(d / "output.png") == h
    log = (d / "log").read_text()
    assert re.search(r"log input \S+/tmp/exec-\w+/input-0\.png mode 444 beside True", log) or \
        re.search(r"input \S+/tmp/exec-\w+/input-0\.png mode 444 beside True", log), log
    assert not list((m.store / "tmp").iterdir())  # the scratch directory is gone


def test_fields_models_take_are_not_masked_as_secrets(mount_factory, tmp_path):
    """SPEC §7 masks request fields named like secrets; read as substrings
    that also masked `keyframes`, `keywords` and `max_tokens`, and the
    program got "***" for them. Words decide now: api_key is masked in
    request.json and for the program, keyframes and max_tokens reach it."""
    seen = tmp_path / "seen.json"
    prog = program(tmp_path, "echo.py", f"""
        open({str(seen)!r}, "w").write(sys.stdin.read())
        open(os.environ["RENDERFS_OUTPUT"], "wb").write({PNG!r})
    """)
    schema = {"type": "object", "properties": {
        "keyframes": {"type": "array", "maxItems": 4}, "max_tokens": {"type": "integer"},
        "keywords": {"type": "string"}, "api_key": {"type": "string"}}}
    m = mount_factory([models(tmp_path, {"image/echo/default/t2i": route_entry(
        [prog], schema=schema)})])
    req = {"keyframes": [0, 12], "max_tokens": 77, "keywords": "fox", "api_key": "sk-live-1"}
    j = m.submit("image/echo/default/t2i", req)
    assert m.wait("image/echo/default/t2i", j) == "complete"
    stored = json.loads((m.job("image/echo/default/t2i", j) / "request.json").read_text())
    got = json.loads(seen.read_text())
    for r in (stored, got):
        assert r["keyframes"] == [0, 12] and r["max_tokens"] == 77 and r["keywords"] == "fox"
        assert r["api_key"] == "***"


def test_route_env_secrets_are_masked_in_log_and_error(mount_factory, tmp_path):
    """A route's env value named like a secret (HF_TOKEN) never shows: not
    in the log the program's stderr goes to, nor in the error message made
    of its last lines."""
    token = "hf_live_4c0ffee5ecret"
    prog = program(tmp_path, "leak.py", """
        sys.stderr.write("using token " + os.environ["HF_TOKEN"] + " for the download\\n")
        sys.exit(3)
    """)
    m = mount_factory([models(tmp_path, {"image/leak/default/t2i": route_entry(
        [prog], env={"HF_TOKEN": token})})])
    j = m.submit("image/leak/default/t2i", {})
    assert m.wait("image/leak/default/t2i", j) == "error"
    d = m.job("image/leak/default/t2i", j)
    st = json.loads((d / "status.json").read_text())
    assert "using token *** for the download" in st["error"]["message"], st
    for text in ((d / "log").read_text(), (d / "error").read_text(), json.dumps(st), m.log()):
        assert token not in text


def test_progress_lines_move_progress(mount_factory, tmp_path):
    gate = tmp_path / "gate"
    prog = program(tmp_path, "slow.py", f"""
        s = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
        s.write("progress 0.5\\n")
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        open(os.environ["RENDERFS_OUTPUT"], "wb").write({PNG!r})
    """)
    m = mount_factory([models(tmp_path, {"image/slow/default/t2i": route_entry([prog])})])
    j = m.submit("image/slow/default/t2i", {})
    until(lambda: float((m.job("image/slow/default/t2i", j) / "progress").read_text()) == 0.5,
          "progress 0.5")
    assert m.status("image/slow/default/t2i", j)["status"] == "running"
    gate.touch()
    assert m.wait("image/slow/default/t2i", j) == "complete"
    assert float((m.job("image/slow/default/t2i", j) / "progress").read_text()) == 1


def test_cancel_leaves_no_process_of_the_job(mount_factory, tmp_path):
    """The program starts a child that ignores SIGTERM: cancel ends both
    (SIGTERM to the group, SIGKILL after 2 s)."""
    prog = program(tmp_path, "stubborn.py", """
        import signal
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(600)
            os._exit(0)
        s = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
        s.write(f"log pgid {os.getpgid(0)} pid {os.getpid()}\\n")
        time.sleep(600)
    """)
    route = "image/stubborn/default/t2i"
    m = mount_factory([models(tmp_path, {route: route_entry([prog])})])
    j = m.submit(route, {})
    log = m.job(route, j) / "log"
    until(lambda: "pgid" in log.read_text(), "the program's pgid in the log")
    pgid, pid = map(int, re.search(r"pgid (\d+) pid (\d+)", log.read_text()).groups())
    assert pgid == pid and group_alive(pgid)  # a session of its own
    (m.job(route, j) / "ctl").write_text("cancel\n")
    assert m.wait(route, j) == "cancelled"
    until(lambda: not group_alive(pgid), "no process of the job's group", timeout=10)
    assert not list((m.store / "tmp").iterdir())


FAILS = {
    "exit3": ("""
        print("boom: the model file is missing", file=sys.stderr)
        sys.exit(3)
    """, {}, "backend_failed", r"exit status 3: boom: the model file is missing"),
    "memory": ("""
        x = bytearray(1 << 30)
        open(os.environ["RENDERFS_OUTPUT"], "wb").write(b"x")
    """, {"limits": {"memory": 200 << 20}}, "backend_failed", r"exceeded memory limit of 200 MiB"),
    "cpu": ("""
        while True:
            pass
    """, {"limits": {"cpu_s": 1}}, "backend_failed", r"exceeded the CPU time limit of 1 s"),
    "empty": ("""
        open(os.environ["RENDERFS_OUTPUT"], "wb").close()
    """, {}, "output_invalid", r"is empty"),
    "none": ("""
        pass
    """, {}, "output_invalid", r"the program wrote no \S+/output\.png"),
    "wrongtype": ("""
        open(os.environ["RENDERFS_OUTPUT"], "w").write("<html>not an image</html>")
    """, {}, "output_invalid", r"not image/png"),
    "symlink": ("""
        os.symlink("/etc/passwd", os.environ["RENDERFS_OUTPUT"])
    """, {}, "output_invalid", r"not a file in the job's scratch directory"),
    "fifo": ("""
        os.mkfifo(os.environ["RENDERFS_OUTPUT"])
    """, {}, "output_invalid", r"not a regular file"),
}


def test_failures_are_named(mount_factory, tmp_path):
    routes = {f"image/fail{k}/default/t2i": route_entry([program(tmp_path, f"{k}.py", body)], **extra)
              for k, (body, extra, _, _) in FAILS.items()}
    m = mount_factory([models(tmp_path, routes)])
    jobs = {k: m.submit(f"image/fail{k}/default/t2i", {}) for k in FAILS}
    for k, (_, _, code, msg) in FAILS.items():
        route = f"image/fail{k}/default/t2i"
        assert m.wait(route, jobs[k]) == "error", k
        st = m.status(route, jobs[k])
        assert st["error"]["code"] == code, (k, st["error"])
        assert re.search(msg, st["error"]["message"]), (k, st["error"])
        assert st["attempts"] == 1, k
    assert "root:" not in "".join(p.read_text(errors="replace")
                                  for p in (m.store / "blobs").rglob("*") if p.is_file())
    assert not list((m.store / "tmp").iterdir())


def test_the_sandbox_against_the_same_program_unsandboxed(mount_factory, tmp_path):
    need("bwrap")
    prog = program(tmp_path, "probe.py", """
        import socket
        req = json.load(sys.stdin)
        res = {}
        try:
            socket.create_connection(("127.0.0.1", req["port"]), timeout=2).close()
            res["connect"] = "ok"
        except OSError as e:
            res["connect"] = e.strerror
        try:
            open(req["host_file"], "w").write("escaped")
            res["write"] = "ok"
        except OSError as e:
            res["write"] = e.strerror
        try:
            res["store"] = sorted(os.listdir(req["store_dir"]))
        except OSError as e:
            res["store"] = e.strerror
        print("probe " + json.dumps(res), file=sys.stderr)
        open(os.environ["RENDERFS_OUTPUT"], "wb").write(%r)
    """ % PNG)
    routes = {f"image/{sb}/default/t2i": route_entry([prog], sandbox=sb) for sb in ("none", "bwrap")}
    m = mount_factory([models(tmp_path, routes)])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    got = {}
    try:
        for sb in ("none", "bwrap"):
            route = f"image/{sb}/default/t2i"
            j = m.submit(route, {"port": listener.getsockname()[1],
                                 "host_file": str(tmp_path / f"written-{sb}"),
                                 "store_dir": str(m.store / "keys")})
            assert m.wait(route, j) == "complete", (m.job(route, j) / "log").read_text()
            line = re.search(r"probe (.*)", (m.job(route, j) / "log").read_text()).group(1)
            got[sb] = json.loads(line)
    finally:
        listener.close()
    assert got["none"]["connect"] == "ok" and got["none"]["write"] == "ok"
    assert isinstance(got["none"]["store"], list) and got["none"]["store"], got  # the signing key
    assert (tmp_path / "written-none").read_text() == "escaped"
    assert got["bwrap"]["connect"] != "ok"
    assert not (tmp_path / "written-bwrap").exists()
    assert got["bwrap"]["store"] in ("No such file or directory", "Permission denied"), got


def test_a_killed_daemon_takes_its_programs_and_the_job_runs_again(mount_factory, tmp_path):
    gate = tmp_path / "gate"
    prog = program(tmp_path, "wait.py", f"""
        s = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
        s.write(f"log pid {{os.getpid()}}\\n")
        while not os.path.exists({str(gate)!r}):
            time.sleep(0.01)
        open(os.environ["RENDERFS_OUTPUT"], "wb").write({PNG!r})
    """)
    route = "image/wait/default/t2i"
    opts = [models(tmp_path, {route: route_entry([prog])})]
    m = mount_factory(opts)
    j = m.submit(route, {})
    log = m.job(route, j) / "log"
    until(lambda: "pid" in log.read_text(), "the program's pid in the log")
    pid = int(re.search(r"pid (\d+)", log.read_text()).group(1))
    m.kill()
    until(lambda: not os.path.exists(f"/proc/{pid}") or
          open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
          "the program gone with the daemon", timeout=5)
    assert [p.name for p in (m.store / "tmp").iterdir()] == [f"exec-{j}"]
    # The next mount clears what the program left, before anything runs.
    m2 = mount_factory(opts + ["workers=0"], store=m.store, name="mnt2")
    assert not list((m.store / "tmp").iterdir())
    assert m2.status(route, j)["status"] == "queued"
    m2.stop()
    gate.touch()
    m3 = mount_factory(opts, store=m.store, name="mnt3")
    assert m3.wait(route, j) == "complete"
    assert m3.status(route, j)["attempts"] == 2


def test_fair_share_between_two_users_and_no_stray_processes(mount_factory, tmp_path):
    """200 jobs, the first 100 of root's before the first of nobody's, on
    two workers: nobody's do not wait behind all of root's."""
    need("setpriv")
    os.chmod(tmp_path, 0o755)
    prog = program(tmp_path, "quick.py", f"""
        sys.stdin.read()
        open(os.environ["RENDERFS_OUTPUT"], "wb").write({PNG!r})
    """)
    route = "image/quick/default/t2i"
    m = mount_factory([models(tmp_path, {route: route_entry([prog])}), "workers=2",
                       "allow_other", "rate=0"])
    root_ids = [m.submit(route, {"n": i}) for i in range(100)]
    script = "exec 3<>new; for i in $(seq 100); do echo \"{\\\"n\\\": $i}\" >&3; read id <&3; " \
             "echo $id; done"
    r = subprocess.run([need("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        "--clear-groups", "bash", "-c", script], cwd=m.route(route),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    nobody_ids = r.stdout.split()
    assert len(nobody_ids) == 100
    for j in root_ids + nobody_ids:
        assert m.wait(route, j) == "complete"
    done = sorted((m.status(route, j)["completed_at"], "nobody" if j in nobody_ids else "root")
                  for j in root_ids + nobody_ids)
    first_half = [who for _, who in done[:100]]
    assert first_half.count("nobody") >= 30, first_half.count("nobody")
    daemon = m.proc.pid
    children = [d for d in os.listdir("/proc") if d.isdigit() and
                int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == daemon]
    # Only the notifier's helper is the daemon's child now.
    assert len(children) <= 1, children
