"""renderctl submit, wait and ls (SPEC §11) against a real mount: what
they print, their exit statuses, the mount found from where they run,
and `submit --wait` on a terminal (a pseudo-terminal: the progress bar
moves, Ctrl-C asks whether to cancel)."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import textwrap
import time

from conftest import IMAGE, SMALL, tool, until

SLOW = "image/slow/default/t2i"
FAIL = "image/fail/default/t2i"


def program(tmp_path, name, body):
    p = tmp_path / name
    p.write_text("#!/usr/bin/python3\nimport json, os, sys, time\n" + textwrap.dedent(body))
    p.chmod(0o755)
    return str(p)


def mount_with_routes(mount_factory, tmp_path):
    """A mount with two exec routes: one that reports progress 0.5 and
    waits for tmp_path/go before writing its PNG, one that fails."""
    go = tmp_path / "go"
    slow = program(tmp_path, "slow.py", f"""
        status = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
        status.write("log halfway there\\n")
        status.write("progress 0.5\\n")
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
        src = {str(tmp_path / "src.png")!r}
        open(os.environ["RENDERFS_OUTPUT"], "wb").write(open(src, "rb").read())
    """)
    fail = program(tmp_path, "fail.py", """
        sys.stderr.write("the model is not there\\n")
        sys.exit(3)
    """)
    routes = {SLOW: {"backend": "exec", "command": [slow], "media_type": "image/png",
                     "schema": {"type": "object"}},
              FAIL: {"backend": "exec", "command": [fail], "media_type": "image/png",
                     "schema": {"type": "object"}}}
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": routes}))
    m = mount_factory([f"models={p}"])
    src = m.submit(IMAGE, {"prompt": "source", **SMALL})
    assert m.wait(IMAGE, src) == "complete"
    (tmp_path / "src.png").write_bytes((m.job(IMAGE, src) / "output.png").read_bytes())
    return m, go


def ctl(*args, cwd=None, env=None, stdin=None, timeout=60):
    e = dict(os.environ)
    e.pop("RENDERFS_MOUNT", None)
    e.update(env or {})
    return subprocess.run([tool("renderctl"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=e, input=stdin, timeout=timeout)


def test_submit_prints_the_job_and_wait_prints_the_output(mount_factory):
    m = mount_factory()
    r = ctl("submit", IMAGE, "-", "--wait", "--mount", m.path,
            stdin=json.dumps({"prompt": "a kite", **SMALL}))
    assert r.returncode == 0, r.stderr
    job, out = r.stdout.splitlines()
    assert out == job + "/output.png" and os.path.exists(out)
    assert job.startswith(str(m.path / IMAGE) + "/")
    assert json.loads(open(job + "/status.json").read())["status"] == "complete"
    assert "started attempt 1" in r.stderr  # the log, plainly, off a terminal


def test_submit_finds_the_mount_from_inside_it_or_the_environment(mount_factory, tmp_path):
    m = mount_factory()
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "inside", **SMALL}))
    r = ctl("submit", IMAGE, req, cwd=m.path / "image")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(m.path / IMAGE) + "/")
    r = ctl("submit", IMAGE, req, cwd=tmp_path, env={"RENDERFS_MOUNT": str(m.path)})
    assert r.returncode == 0 and r.stdout.startswith(str(m.path)), r.stderr
    r = ctl("submit", IMAGE, req, "--mount", tmp_path)
    assert r.returncode == 2 and "is not a renderfs mount" in r.stderr
    r = ctl("submit", "image/nope/x/y", req, "--mount", m.path)
    assert r.returncode == 2 and "no route 'image/nope/x/y'" in r.stderr


def test_submit_options_and_batches(mount_factory, tmp_path):
    """--name names the job (the same again is the same job); a JSON Lines
    file is a batch, one path per job; a refused request exits 2 with the
    daemon's words and prints no path for it."""
    m = mount_factory()
    r = ctl("submit", IMAGE, "--name", "kite-1", "--priority", "high", "--timeout", "30",
            "--mount", m.path, stdin=json.dumps({"prompt": "named", **SMALL}))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{m.path / IMAGE}/kite-1\n"
    again = ctl("submit", IMAGE, "--name", "kite-1", "--priority", "high", "--timeout", "30",
                "--mount", m.path, stdin=json.dumps({"prompt": "named", **SMALL}))
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
    other = ctl("submit", IMAGE, "--name", "kite-1", "--mount", m.path,
                stdin=json.dumps({"prompt": "another", **SMALL}))
    assert other.returncode == 2 and "File exists" in other.stderr, other.stderr
    # An envelope gets the options beside its own.
    env = ctl("submit", IMAGE, "--name", "kite-2", "--mount", m.path,
              stdin=json.dumps({"input": {"prompt": "env", **SMALL}, "priority": "low"}))
    assert env.returncode == 0 and env.stdout.endswith("/kite-2\n"), env.stderr
    batch = "\n".join(json.dumps({"prompt": f"b{i}", **SMALL}) for i in range(3))
    r = ctl("submit", IMAGE, "--mount", m.path, stdin=batch)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    bad = ctl("submit", IMAGE, "--mount", m.path,
              stdin=json.dumps({"prompt": "x", "width": -5}))
    assert bad.returncode == 2 and bad.stdout == "" and "width" in bad.stderr, bad.stderr
    assert "Invalid argument" in bad.stderr


def test_wait_exits_with_the_worst(mount_factory, tmp_path):
    m, go = mount_with_routes(mount_factory, tmp_path)
    ok = m.submit(IMAGE, {"prompt": "ok", **SMALL})
    bad = m.submit(FAIL, {})
    r = ctl("wait", m.job(IMAGE, ok), m.job(FAIL, bad))
    assert r.returncode == 1, r
    assert r.stdout == f"{m.job(IMAGE, ok)}/output.png\n"
    assert f"{m.job(FAIL, bad)}: error: backend_failed:" in r.stderr
    assert "the model is not there" in r.stderr
    slow = m.submit(SLOW, {})
    (m.job(SLOW, slow) / "ctl").write_text("cancel\n")
    r = ctl("wait", m.job(SLOW, slow), m.job(IMAGE, ok))
    assert r.returncode == 3 and "cancelled" in r.stderr, r
    assert ctl("wait", m.job(IMAGE, ok)).returncode == 0
    r = ctl("wait", m.path / IMAGE / "nope")
    assert r.returncode == 2 and "not a job directory" in r.stderr


def test_ls_lists_jobs_with_status_progress_age_owner(mount_factory, tmp_path):
    m, go = mount_with_routes(mount_factory, tmp_path)
    slow = m.submit(SLOW, {})
    until(lambda: (m.job(SLOW, slow) / "progress").read_text() == "0.5\n", "progress")
    bad = m.submit(FAIL, {})
    assert m.wait(FAIL, bad) == "error"
    r = ctl("ls", "--mount", m.path)
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    assert head.split() == ["ID", "STATUS", "PROGRESS", "AGE", "OWNER", "ROUTE"]
    table = {f[0]: f for f in (row.split() for row in rows)}
    assert len(rows) == 3  # the source image, slow and bad, oldest first
    assert rows[0].split()[5] == IMAGE
    assert table[slow][1:3] == ["running", "50%"] and table[slow][4] == "root"
    assert table[slow][5] == SLOW and re.fullmatch(r"\d+s", table[slow][3])
    assert table[bad][1] == "error"
    r = ctl("ls", FAIL, "--mount", m.path)
    assert [row.split()[0] for row in r.stdout.splitlines()[1:]] == [bad]
    r = ctl("ls", "--status", "running", cwd=m.path)
    assert [row.split()[0] for row in r.stdout.splitlines()[1:]] == [slow]
    go.touch()
    assert m.wait(SLOW, slow) == "complete"


def read_until(fd, pattern, timeout=30):
    """Read the terminal until pattern appears; what was read."""
    seen, end = b"", time.monotonic() + timeout
    while not re.search(pattern, seen):
        left = end - time.monotonic()
        assert left > 0, f"{pattern!r} never shown; the terminal showed {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def spawn(args, cwd):
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        os.environ.pop("RENDERFS_MOUNT", None)
        os.execv(tool("renderctl"), ["renderctl", *map(str, args)])
    return pid, fd


def test_submit_wait_on_a_terminal_draws_a_moving_bar(mount_factory, tmp_path):
    m, go = mount_with_routes(mount_factory, tmp_path)
    req = tmp_path / "req.json"
    req.write_text("{}")
    pid, fd = spawn(["submit", SLOW, req, "--wait"], m.path)
    try:
        seen = read_until(fd, rb"\] +50% .*halfway there")
        assert b"[##########..........]" in seen
        go.touch()
        seen += read_until(fd, rb"output\.png")
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0, seen
        assert re.search(rb"\] +0% ", seen), seen  # it moved from 0 to 50
    finally:
        os.close(fd)


def test_ctrl_c_asks_whether_to_cancel(mount_factory, tmp_path):
    m, go = mount_with_routes(mount_factory, tmp_path)
    req = tmp_path / "req.json"
    req.write_text("{}")
    pid, fd = spawn(["submit", SLOW, req, "--wait"], m.path)
    try:
        read_until(fd, rb"50%")
        os.kill(pid, signal.SIGINT)
        read_until(fd, rb"cancel the job\? \[y/N\] ")
        os.write(fd, b"y\n")
        seen = read_until(fd, rb"cancelled")
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 3, seen
    finally:
        os.close(fd)
    jobs = [p for p in os.listdir(m.path / SLOW) if p not in ("new", "schema.json")]
    assert [m.status(SLOW, j)["status"] for j in jobs] == ["cancelled"]
    # Answered no, the job goes on and renderctl exits 130.
    pid, fd = spawn(["submit", SLOW, req, "--wait"], m.path)
    try:
        read_until(fd, rb"50%")
        os.kill(pid, signal.SIGINT)
        read_until(fd, rb"\[y/N\] ")
        os.write(fd, b"n\n")
        seen = read_until(fd, rb"goes on")
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 130, seen
    finally:
        os.close(fd)
    go.touch()
    jobs = [p for p in os.listdir(m.path / SLOW) if p not in ("new", "schema.json")]
    assert sorted(m.wait(SLOW, j) for j in jobs) == ["cancelled", "complete"]


TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def man_lint(page):
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", page], capture_output=True,
                       text=True, env={**os.environ, "MANWIDTH": "80"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def test_manual_pages_are_clean_and_cover_the_commands_and_options(tmp_path):
    """groff finds nothing to warn about; renderfs(8) names every option
    `renderfs --help` lists, renderctl(1) every command its usage lists;
    cmake --install puts both, and the bash completion, where man and bash
    look."""
    page8 = man_lint(os.path.join(TOP, "docs/man/renderfs.8"))
    page1 = man_lint(os.path.join(TOP, "docs/man/renderctl.1"))
    helptext = subprocess.run([tool("renderfs"), "--help"], capture_output=True,
                              text=True).stdout + subprocess.run(
        [tool("renderfs"), "--help"], capture_output=True, text=True).stderr
    options = re.findall(r"^    ([a-z_]+)(?:=|\s)", helptext, re.M)
    assert len(options) >= 15, helptext
    for opt in options:
        assert re.search(rf"\b{opt}\b", page8), f"renderfs.8 does not name {opt}"
    usage = subprocess.run([tool("renderctl"), "--help"], capture_output=True, text=True).stdout
    commands = sorted(set(re.findall(r"^  ([a-z]+) ", usage, re.M)))
    assert {"submit", "wait", "ls", "verify", "fsck", "keygen", "gc", "render"} <= set(commands)
    for cmd in commands:
        assert f"renderctl {cmd}" in page1, f"renderctl.1 does not show {cmd}"
    build = os.path.dirname(os.path.dirname(tool("renderctl")))
    subprocess.run(["cmake", "--install", build, "--prefix", tmp_path], check=True,
                   capture_output=True)
    for f in ("share/man/man1/renderctl.1", "share/man/man8/renderfs.8",
              "share/bash-completion/completions/renderctl", "bin/renderctl", "bin/renderfs"):
        assert (tmp_path / f).exists(), f


def test_bash_completion_offers_the_mount_routes(mount_factory):
    m = mount_factory()
    script = (f"source {TOP}/contrib/bash-completion/renderctl; "
              "COMP_WORDS=(renderctl submit image/syn); COMP_CWORD=2; _renderctl; "
              "printf '%s\\n' \"${COMPREPLY[@]}\"; "
              "COMP_WORDS=(renderctl submit x --pri); COMP_CWORD=3; _renderctl; "
              "printf '%s\\n' \"${COMPREPLY[@]}\"")
    r = subprocess.run(["bash", "-c", script], cwd=m.path / "image", capture_output=True,
                       text=True)
    assert r.stdout.split() == [IMAGE, "--priority"], r
