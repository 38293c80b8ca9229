"""Shared fixtures for the black-box tests: where the built tools are."""
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest

TOP = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(os.environ.get("RENDERFS_BUILD", TOP / "build"))


def tool(name):
    path = BUILD / "tools" / name
    if not path.exists():
        pytest.fail(f"{path} is not built: run tests/run (or cmake --build {BUILD})")
    return str(path)


@pytest.fixture
def renderctl():
    exe = tool("renderctl")

    def run(*args, check=None, **kw):
        r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True,
                           timeout=120, **kw)
        if check is not None:
            assert r.returncode == check, (
                f"renderctl {' '.join(map(str, args))}: exit {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        return r
    return run


def npm_install(folder, package):
    """npm install package into folder; skip when npm cannot reach its
    registry, fail on any other error."""
    need("npm")
    r = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", package],
                       cwd=folder, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        if re.search(r"ENOTFOUND|ECONNREFUSED|ETIMEDOUT|EAI_AGAIN|network", r.stderr):
            pytest.skip(f"npm cannot reach its registry to install {package}: "
                        + r.stderr.strip().splitlines()[-1])
        pytest.fail(f"npm install {package} failed:\n" + r.stderr)
    return folder


def need(tool_name):
    if shutil.which(tool_name) is None:
        pytest.fail(f"{tool_name} is not installed (contrib/install-deps installs it)")
    return tool_name


import errno  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402


def until(cond, what, timeout=30):
    """Wait for cond() to hold (polled every 20 ms); fail naming what."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


IMAGE = "image/synth/default/t2i"
VIDEO = "video/synth/default/t2v"
WAN = "video/wan/default/t2v"
SMALL = {"width": 64, "height": 64}


class Mount:
    """A renderfs daemon in the foreground on a temporary mountpoint."""

    def __init__(self, tmp_path, opts=(), store=None, name="mnt", args=()):
        self.path = tmp_path / name
        self.args = list(args)
        self.store = store or tmp_path / "store"
        self.logpath = tmp_path / f"{name}.log"
        self.opts = ["store=" + str(self.store), *opts]
        self.proc = None
        self.path.mkdir(exist_ok=True)

    def start(self, env=None):
        self.logfile = open(self.logpath, "ab")
        self.proc = subprocess.Popen(
            [tool("renderfs"), "-f", *self.args, str(self.path), "-o", ",".join(self.opts)],
            stdout=self.logfile, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                pytest.fail(f"renderfs exited {self.proc.returncode} before mounting:\n"
                            + self.log())
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("renderfs did not mount within 20 s:\n" + self.log())
            time.sleep(0.02)
        return self

    def log(self):
        return self.logpath.read_text(errors="replace")

    def stop(self):
        """Unmount strictly: fusermount3 -u must succeed and the daemon exit 0."""
        r = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True,
                           text=True)
        assert r.returncode == 0, f"fusermount3 -u: {r.stderr}\n{self.log()}"
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("renderfs did not exit after unmount:\n" + self.log())
        self.logfile.close()
        assert rc == 0, f"renderfs exited {rc}:\n{self.log()}"
        self.proc = None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        self.proc = None

    # ---- helpers over plain files ----

    def route(self, route):
        return self.path / route

    def submit(self, route, obj):
        """Write one request through an O_RDWR descriptor; return the id line."""
        data = (obj if isinstance(obj, (bytes, str)) else json.dumps(obj))
        if isinstance(data, str):
            data = data.encode()
        fd = os.open(self.route(route) / "new", os.O_RDWR)
        try:
            os.write(fd, data + b"\n")
            line = os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        assert line.endswith("\n") and not line.startswith("error:"), line
        return line.strip()

    def submit_err(self, route, data):
        """Write bytes expecting failure; return (errno, response line)."""
        fd = os.open(self.route(route) / "new", os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                os.write(fd, data)
            line = os.read(fd, 65536).decode()
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        return ei.value.errno, line

    def job(self, route, jid):
        return self.route(route) / jid

    def wait(self, route, jid, states=("complete", "error", "cancelled"), timeout=60):
        st = self.job(route, jid) / "status"
        deadline = time.monotonic() + timeout
        while True:
            s = st.read_text().strip()
            if s in states:
                return s
            if time.monotonic() > deadline:
                pytest.fail(f"job {jid} still {s} after {timeout} s\n{self.log()}")
            time.sleep(0.01)

    def status(self, route, jid):
        return json.loads((self.job(route, jid) / "status.json").read_text())


@pytest.fixture
def mount_factory(tmp_path):
    mounts = []

    def make(opts=(), store=None, name="mnt", env=None, start=True, args=()):
        m = Mount(tmp_path, opts, store, name, args)
        mounts.append(m)
        return m.start(env) if start else m
    yield make
    for m in mounts:
        if m.proc is not None:
            if m.proc.poll() is None:
                try:
                    m.stop()
                except BaseException:
                    m.kill()  # best effort, then report the failure
                    raise
            else:
                log = m.log()
                m.kill()
                pytest.fail(f"renderfs died during the test:\n{log}")


@pytest.fixture
def mnt(mount_factory):
    return mount_factory()


@pytest.fixture
def fal():
    """A fal queue service on 127.0.0.1 (tests/fakefal.py)."""
    from fakefal import FakeFal
    f = FakeFal()
    yield f
    f.close()
