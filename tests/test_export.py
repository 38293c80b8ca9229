"""SPEC §12: re-export. Kernel file handles (what NFS servers hand out)
survive cache drops and daemon restarts; inode numbers, link counts and
directory offsets are stable; nfs-ganesha (FSAL_VFS, contrib/ganesha.conf)
serves job files and outputs over NFSv4 without rpcbind and NFSv3 with it,
to libnfs clients, across cache drops and restarts; Samba
(contrib/smb.conf) lists routes, takes a job by `put` into `new` and
serves its output."""
import ctypes
import errno
import json
import os
import pathlib
import re
import socket
import subprocess
import threading
import time

import pytest

from conftest import BUILD, IMAGE, SMALL, TOP, need

libc = ctypes.CDLL(None, use_errno=True)


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def handle_of(path):
    fh, mount_id = FileHandle(), ctypes.c_int()
    fh.handle_bytes = 128
    if libc.name_to_handle_at(-100, str(path).encode(), ctypes.byref(fh),
                              ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return fh


def open_handle(mountpoint, fh, flags=os.O_RDONLY):
    mfd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def read_fd(fd):
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def restart(m):
    m.stop()
    m.start()


def test_file_handles_survive_drop_caches_and_restart(mount_factory):
    m = mount_factory(["workers=1"])
    jid = m.submit(IMAGE, {"prompt": "fh", **SMALL})
    assert m.wait(IMAGE, jid) == "complete"
    job = m.job(IMAGE, jid)
    files = {p: p.read_bytes() for p in (job / "output.png", job / "status.json",
                                         job / "request.json", m.path / "README")}
    handles = {p: handle_of(p) for p in files}
    dirs = {p: sorted(os.listdir(p)) for p in (job, m.route(IMAGE), m.path / "jobs")}
    dhandles = {p: handle_of(p) for p in dirs}

    def check():
        for p, fh in handles.items():
            assert read_fd(open_handle(m.path, fh)) == files[p], p
        for p, fh in dhandles.items():
            fd = open_handle(m.path, fh, os.O_RDONLY | os.O_DIRECTORY)
            try:
                assert sorted(os.listdir(fd)) == dirs[p], p
            finally:
                os.close(fd)

    drop_caches()
    check()
    restart(m)
    drop_caches()
    check()

    # A deleted job's handles are stale, not someone else's files.
    os.rmdir(job)
    drop_caches()
    with pytest.raises(OSError) as ei:
        open_handle(m.path, handles[job / "output.png"])
    assert ei.value.errno == errno.ESTALE
    # A different store on the same mountpoint: every old handle is stale
    # (the generation comes from the store id), even where node ids match.
    m.stop()
    other = mount_factory(["workers=0"], store=m.store.parent / "other-store", name="mnt")
    other.submit(IMAGE, {"prompt": "other", **SMALL})
    drop_caches()
    with pytest.raises(OSError) as ei:
        open_handle(other.path, dhandles[m.route(IMAGE)], os.O_RDONLY | os.O_DIRECTORY)
    assert ei.value.errno == errno.ESTALE


def test_inode_numbers_and_link_counts(mount_factory):
    m = mount_factory(["workers=0"])
    ids = [m.submit(IMAGE, {"prompt": f"i{i}", **SMALL}) for i in range(3)]
    paths = [m.path, m.path / "image", m.route(IMAGE), m.path / "jobs",
             m.job(IMAGE, ids[0]), m.job(IMAGE, ids[0]) / "status", m.route(IMAGE) / "new"]
    before = {p: os.lstat(p).st_ino for p in paths}
    assert len(set(before.values())) == len(paths)
    assert os.stat(m.route(IMAGE)).st_nlink == 2 + 3  # ., its entry, one per job dir
    assert os.stat(m.job(IMAGE, ids[0])).st_nlink == 2
    assert os.stat(m.job(IMAGE, ids[0]) / "status").st_nlink == 1
    subdirs = [e for e in os.scandir(m.path) if e.is_dir(follow_symlinks=False)]
    assert os.stat(m.path).st_nlink == 2 + len(subdirs)
    restart(m)
    drop_caches()
    assert {p: os.lstat(p).st_ino for p in paths} == before


class Dir:
    """opendir/readdir/telldir/seekdir from libc: offsets as NFS sees them."""

    class Dirent(ctypes.Structure):
        _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                    ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                    ("d_name", ctypes.c_char * 256)]

    def __init__(self, path):
        libc.opendir.restype = ctypes.c_void_p
        libc.readdir.restype = ctypes.POINTER(self.Dirent)
        libc.readdir.argtypes = [ctypes.c_void_p]
        libc.telldir.restype = ctypes.c_long
        libc.telldir.argtypes = [ctypes.c_void_p]
        libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
        libc.closedir.argtypes = [ctypes.c_void_p]
        self.d = libc.opendir(str(path).encode())
        assert self.d, path

    def read(self, n=None):
        out = []
        while n is None or len(out) < n:
            ent = libc.readdir(self.d)
            if not ent:
                break
            out.append((ent.contents.d_name.decode(), ent.contents.d_off))
        return out

    def close(self):
        libc.closedir(self.d)


def test_directory_offsets_survive_reopen_restart_and_deletion(mount_factory):
    m = mount_factory(["workers=0"])
    ids = [m.submit(IMAGE, {"prompt": f"o{i}", **SMALL}) for i in range(40)]
    d = Dir(m.route(IMAGE))
    first = d.read(12)
    d.close()
    names = [n for n, _ in first]
    assert names[:4] == [".", "..", "new", "schema.json"]
    cookie = first[-1][1]  # resume after the 12th entry
    expect = ids[8:]

    def rest():
        d = Dir(m.route(IMAGE))
        libc.seekdir(d.d, cookie)
        names = [n for n, _ in d.read()]
        d.close()
        return names

    assert rest() == expect
    restart(m)
    assert rest() == expect
    # Deleting entries before the cookie, and the entry it names, moves
    # nothing: the listing resumes at the first job after it.
    os.rmdir(m.job(IMAGE, ids[0]))
    os.rmdir(m.job(IMAGE, ids[7]))
    assert rest() == expect
    # Jobs listed in jobs/ resume the same way.
    d = Dir(m.path / "jobs")
    part = d.read(10)
    d.close()
    d = Dir(m.path / "jobs")
    libc.seekdir(d.d, part[-1][1])
    tail = [n for n, _ in d.read()]
    d.close()
    assert [n for n, _ in part[2:]] + tail == sorted(set(ids) - {ids[0], ids[7]})


# ---- NFS through nfs-ganesha ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, log, timeout=30):
    name = os.path.basename(proc.args[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"{name} is not listening on {port}:\n{log.read_text()}")


class Ganesha:
    """ganesha.nfsd in the foreground with contrib/ganesha.conf, adapted."""

    def __init__(self, tmp_path, mount, protocols):
        self.tmp, self.mount, self.protocols = tmp_path, mount, protocols
        self.port, self.mnt_port = free_port(), free_port()
        conf = (TOP / "contrib" / "ganesha.conf").read_text()
        for old, new in (("NFS_Port = 2049;", f"NFS_Port = {self.port};\n\tBind_addr = 127.0.0.1;"),
                         ("MNT_Port = 20048;", f"MNT_Port = {self.mnt_port};"),
                         ("Path = /mnt/render;", f"Path = {mount.path};"),
                         ("Protocols = 3, 4;", f"Protocols = {protocols};")):
            assert old in conf, old
            conf = conf.replace(old, new)
        self.conf = tmp_path / "ganesha.conf"
        self.conf.write_text(conf)
        self.log = tmp_path / "ganesha.log"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [need("ganesha.nfsd"), "-F", "-f", str(self.conf), "-L", str(self.log),
             "-p", str(self.tmp / "ganesha.pid"), "-N", "NIV_EVENT"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, self.proc, self.log)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart_with_renderfs(self):
        """Ganesha holds files open on the mount: stop it, restart
        renderfs, start it again."""
        dev = os.stat(self.mount.path).st_dev
        self.stop()
        restart(self.mount)
        # Ganesha's handles carry the FUSE device number (FUSE reports no
        # fsid; see contrib/ganesha.conf): the kernel gives the lowest free
        # one back to the new mount.
        assert os.stat(self.mount.path).st_dev == dev, "the remount got another device number"
        self.start()


@pytest.fixture
def ganesha(tmp_path):
    made = []

    def make(mount, protocols):
        g = Ganesha(tmp_path, mount, protocols)
        made.append(g)
        g.start()
        return g
    yield make
    for g in made:
        g.stop()


@pytest.fixture
def rpcbind():
    """rpcbind for NFSv3 (the MOUNT protocol registers with it)."""
    if subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True).returncode == 0:
        yield
        return
    proc = subprocess.Popen([need("rpcbind"), "-f", "-w"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True).returncode:
        assert time.monotonic() < deadline, "rpcbind did not start"
        time.sleep(0.1)
    yield
    proc.terminate()
    proc.wait(timeout=10)


def nfs(tool, url):
    r = subprocess.run([need(tool), url], capture_output=True, timeout=60)
    assert r.returncode == 0 and b"STALE" not in r.stderr, (url, r.stderr.decode())
    return r.stdout


def test_nfs_v4_without_rpcbind(mount_factory, ganesha):
    m = mount_factory(["workers=1"])
    jid = m.submit(IMAGE, {"prompt": "nfs4", **SMALL})
    assert m.wait(IMAGE, jid) == "complete"
    g = ganesha(m, "4")
    base = f"nfs://127.0.0.1/render/{IMAGE}"
    q = f"?version=4&nfsport={g.port}"
    st = m.status(IMAGE, jid)
    local = (m.job(IMAGE, jid) / "output.png").read_bytes()

    def check():
        listing = nfs("nfs-ls", f"{base}{q}").decode()
        assert re.search(rf"\s{jid}$", listing, re.M) and re.search(r"\snew$", listing, re.M), listing
        assert nfs("nfs-cat", f"{base}/{jid}/status{q}") == b"complete\n"
        assert json.loads(nfs("nfs-cat", f"{base}/{jid}/status.json{q}"))["id"] == jid
        out = nfs("nfs-cat", f"{base}/{jid}/output.png{q}")
        assert out == local and len(out) == st["output"]["size"]

    check()
    drop_caches()
    check()
    g.restart_with_renderfs()
    check()


def test_nfs_v3_client_handles_survive_drop_caches_and_restart(mount_factory, ganesha,
                                                                 rpcbind):
    m = mount_factory(["workers=1"])
    jid = m.submit(IMAGE, {"prompt": "nfs3", **SMALL})
    assert m.wait(IMAGE, jid) == "complete"
    g = ganesha(m, "3")
    local = (m.job(IMAGE, jid) / "output.png").read_bytes()
    hold = BUILD / "tests" / "nfs_hold"
    assert hold.exists(), f"{hold} is not built (needs libnfs-dev: contrib/install-deps)"
    url = f"nfs://127.0.0.1{m.path}/{IMAGE}/{jid}/output.png?version=3"
    client = subprocess.Popen([str(hold), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def read():
        client.stdin.write("read\n")
        client.stdin.flush()
        line = client.stdout.readline().strip()
        assert line.startswith("ok "), line
        return bytes.fromhex(line[3:])

    try:
        assert read() == local
        drop_caches()
        assert read() == local
        # The same open file handle, after renderfs and Ganesha restarted.
        g.restart_with_renderfs()
        drop_caches()
        assert read() == local
        # Listing and reading by path still work too.
        listing = nfs("nfs-ls", f"nfs://127.0.0.1{m.path}/{IMAGE}?version=3").decode()
        assert jid in listing
    finally:
        client.stdin.close()
        client.wait(timeout=30)


# ---- SMB through Samba ----

def test_smb_list_submit_get(mount_factory, tmp_path):
    # smbd serves the guest as nobody, who must reach the share path.
    for p in [tmp_path, *tmp_path.parents]:
        if p == pathlib.Path("/tmp") or p == p.parent:
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)
    m = mount_factory(["workers=1", "allow_other"])
    port = free_port()
    conf = (TOP / "contrib" / "smb.conf").read_text()
    state = tmp_path / "samba"
    dirs = "".join(f"\t{k} = {state / k.split()[0]}\n" for k in
                   ("private dir", "lock directory", "state directory", "cache directory",
                    "pid directory", "ncalrpc dir"))
    for k in ("private", "lock", "state", "cache", "pid", "ncalrpc"):
        (state / k).mkdir(parents=True)
    for old, new in (("smb ports = 445", f"smb ports = {port}\n\tinterfaces = 127.0.0.1\n"
                                         f"\tbind interfaces only = yes\n{dirs}"),
                     ("path = /mnt/render", f"path = {m.path}")):
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "smb.conf").write_text(conf)
    log = tmp_path / "smbd.log"
    # Its own process group: smbd signals its group when it exits.
    smbd = subprocess.Popen([need("smbd"), "--foreground", "--no-process-group",
                             "--debug-stdout", "-s",
                             str(tmp_path / "smb.conf")], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, smbd, log)

        def smb(cmd):
            r = subprocess.run([need("smbclient"), "//127.0.0.1/render", "-p", str(port), "-N",
                                "-c", cmd], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "NT_STATUS" not in r.stdout, (cmd, r.stdout, r.stderr)
            return r.stdout

        listing = smb(f"ls {IMAGE.replace('/', chr(92))}\\*")
        assert re.search(r"^\s+new\s", listing, re.M) and "schema.json" in listing, listing
        # SMB change notify rides on inotify: a client watching the route
        # sees the job appear (FILE_ACTION_ADDED, 0001).
        notify = subprocess.Popen(["stdbuf", "-oL", need("smbclient"), "//127.0.0.1/render", "-p",
                                   str(port), "-N", "-c", f"notify {IMAGE.replace('/', chr(92))}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        threading.Thread(target=lambda: seen.extend(x.strip() for x in notify.stdout),
                         daemon=True).start()
        time.sleep(1)
        req = tmp_path / "req.json"
        req.write_text(json.dumps({"input": {"prompt": "smb", **SMALL}, "name": "smb-job"}) + "\n")
        smb(f"cd {IMAGE}; put {req} new")
        assert m.wait(IMAGE, "smb-job") == "complete"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "0001 smb-job" not in seen:
            time.sleep(0.05)
        notify.kill()
        notify.wait()
        assert "0001 smb-job" in seen, seen
        st = m.status(IMAGE, "smb-job")
        assert st["owner"] == 65534, "the guest account (nobody) owns what it submitted"
        got = tmp_path / "got.png"
        smb(f"cd {IMAGE}/smb-job; get output.png {got}")
        b3 = subprocess.run([need("b3sum"), "--no-names", str(got)], capture_output=True,
                            text=True, check=True).stdout.strip()
        assert b3 == st["output"]["blake3"]
        smb(f"cd {IMAGE}/smb-job; get status {tmp_path / 'status'}")
        assert (tmp_path / "status").read_text() == "complete\n"
    finally:
        smbd.terminate()
        smbd.wait(timeout=30)


def test_cas_offsets_survive_restart_and_collection(mount_factory):
    m = mount_factory(["workers=1"])
    ids = [m.submit(IMAGE, {"prompt": f"cas {i}", **SMALL}) for i in range(6)]
    for jid in ids:
        assert m.wait(IMAGE, jid) == "complete"
    blob_of = {m.status(IMAGE, jid)["output"]["blake3"]: jid for jid in ids}
    cas = m.path / "cas"
    d = Dir(cas)
    full = [n for n, _ in d.read()][2:]
    d.close()
    assert full == [x for h in sorted(blob_of) for x in (h, h + ".minisig")]
    d = Dir(cas)
    part = d.read(5)  # ., .., blob 1, its .minisig, blob 2
    d.close()
    cookie = part[-1][1]

    def rest():
        d = Dir(cas)
        libc.seekdir(d.d, cookie)
        names = [n for n, _ in d.read()]
        d.close()
        return names

    assert rest() == full[3:]
    restart(m)
    assert rest() == full[3:]
    # Collect the blob the cookie names: the listing goes on after it.
    os.rmdir(m.job(IMAGE, blob_of[full[2]]))
    assert rest() == full[4:]
