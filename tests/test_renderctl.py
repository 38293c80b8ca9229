"""renderctl keygen/verify/fsck/gc, checked with the stock minisign and b3sum."""
import os
import pathlib
import re
import stat
import subprocess

from conftest import need


def keygen(renderctl, d):
    r = renderctl("keygen", d, check=0)
    key, pub = r.stdout.split()
    assert key.endswith(".key") and pub.endswith(".pub")
    return pathlib.Path(key), pathlib.Path(pub)


def minisign_sign(key, f, comment):
    subprocess.run([need("minisign"), "-S", "-s", str(key), "-m", str(f), "-t", comment],
                   check=True, capture_output=True)


def b3sum(f):
    out = subprocess.run([need("b3sum"), "--no-names", str(f)], check=True,
                         capture_output=True, text=True).stdout
    return out.strip()


def test_keygen_files_are_minisign_keys(renderctl, tmp_path):
    key, pub = keygen(renderctl, tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    keyid = key.stem
    assert re.fullmatch(r"[0-9A-F]{16}", keyid)
    assert pub.read_text().startswith("untrusted comment: minisign public key ")
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(100000))
    minisign_sign(key, f, "renderfs test")
    subprocess.run([need("minisign"), "-Vm", str(f), "-p", str(pub)], check=True,
                   capture_output=True)


def test_verify_good_and_tampered(renderctl, tmp_path):
    key, pub = keygen(renderctl, tmp_path)
    f = tmp_path / "out.mp4"
    f.write_bytes(os.urandom(1 << 20) + b"tail")
    minisign_sign(key, f, "renderfs job=T route=video/synth/default/t2v")
    r = renderctl("verify", f, "--pub", pub, check=0)
    assert f"blake3: {b3sum(f)}" in r.stdout
    assert "signature: good" in r.stdout
    assert f"key id: {key.stem}" in r.stdout
    assert "trusted comment: renderfs job=T route=video/synth/default/t2v" in r.stdout
    f.write_bytes(f.read_bytes()[:-1] + b"!")
    r = renderctl("verify", f, "--pub", pub, check=1)
    assert "signature: BAD" in r.stdout


def test_verify_finds_render_pub_above(renderctl, tmp_path):
    """The mount's layout: render.pub at the top, keys/<KEYID>.pub for old keys."""
    mnt = tmp_path / "mnt"
    job = mnt / "video" / "synth" / "default" / "t2v" / "01JOB"
    job.mkdir(parents=True)
    key, pub = keygen(renderctl, tmp_path)
    old_key, old_pub = keygen(renderctl, tmp_path)
    (mnt / "render.pub").write_text(pub.read_text())
    (mnt / "keys").mkdir()
    (mnt / "keys" / old_pub.name).write_text(old_pub.read_text())
    f = job / "output.y4m"
    f.write_bytes(b"YUV4MPEG2 " + os.urandom(5000))
    minisign_sign(key, f, "current key")
    assert "signature: good" in renderctl("verify", f, check=0).stdout
    minisign_sign(old_key, f, "rotated-out key")
    r = renderctl("verify", f, check=0)
    assert f"public key: {mnt}/keys/{old_pub.name}" in r.stdout
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(b"x")
    minisign_sign(key, other, "no key nearby")
    r = renderctl("verify", other, check=1)
    assert "no public key" in r.stderr


def test_verify_checks_hash_in_trusted_comment(renderctl, tmp_path):
    key, pub = keygen(renderctl, tmp_path)
    f = tmp_path / "img.png"
    f.write_bytes(os.urandom(4096))
    minisign_sign(key, f, f"renderfs blake3={b3sum(f)} size=4096")
    renderctl("verify", f, "--pub", pub, check=0)
    minisign_sign(key, f, f"renderfs blake3={'0' * 64} size=4096")
    r = renderctl("verify", f, "--pub", pub, check=1)
    assert "signature: good" in r.stdout and "names blake3" in r.stdout
    minisign_sign(key, f, f"renderfs blake3={b3sum(f)} size=4097")
    r = renderctl("verify", f, "--pub", pub, check=1)
    assert "names size 4097" in r.stdout


def test_verify_bad_inputs(renderctl, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    r = renderctl("verify", f, check=1)
    assert f"{f}.minisig" in r.stderr
    (tmp_path / "f.minisig").write_text("not a signature\n")
    r = renderctl("verify", f, check=1)
    assert "not a minisign signature" in r.stderr
    r = renderctl("verify", tmp_path / "missing", check=1)
    assert "missing" in r.stderr


def test_fsck_and_gc(renderctl, tmp_path):
    store = tmp_path / "store"
    r = renderctl("fsck", store, check=1)
    assert str(store) in r.stdout
    r = renderctl("gc", store, check=0)          # creates and recovers the store
    assert "moved 0" in r.stdout
    r = renderctl("fsck", store, check=0)
    assert "0 problems" in r.stdout
    # A stray file in blobs/ is garbage, not a problem; gc moves it aside
    # (never deletes: a damaged index may have lost a blob a job names).
    stray = store / "blobs" / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir()
    stray.write_text("orphan")
    r = renderctl("fsck", store, check=0)
    assert "not referenced" in r.stdout
    assert "moved 1" in renderctl("gc", store, check=0).stdout
    assert not stray.exists()
    assert (store / "lost+found" / stray.name).read_text() == "orphan"
    assert "1 file(s) in" in renderctl("fsck", store, check=0).stdout
    # Rotation keeps the old public key.
    keys_before = sorted(p.name for p in (store / "keys").glob("*.pub"))
    r = renderctl("keygen", "--store", store, check=0)
    keys_after = sorted(p.name for p in (store / "keys").glob("*.pub"))
    assert len(keys_before) == 1 and len(keys_after) == 2
    assert set(keys_before) < set(keys_after)
    renderctl("fsck", store, check=0)
    # A damaged index is reported with its file name.
    data = store / "index" / "data.mdb"
    # Half of what LMDB's pages use (the file runs ahead of them).
    info = subprocess.run(["mdb_stat", "-e", str(store / "index")], capture_output=True,
                          text=True, check=True).stdout
    used = int(re.search(r"Number of pages used: (\d+)", info).group(1)) * os.sysconf("SC_PAGESIZE")
    assert used < data.stat().st_size
    with open(data, "r+b") as fh:
        fh.truncate(used // 2)
    r = renderctl("fsck", store, check=1)
    assert "data.mdb" in r.stdout
    # A key readable by others is a problem.
    data.unlink()


def test_key_permissions_reported(renderctl, tmp_path):
    store = tmp_path / "store"
    renderctl("gc", store, check=0)
    key = next((store / "keys").glob("*.key"))
    key.chmod(0o644)
    r = renderctl("fsck", store, check=1)
    assert str(key) in r.stdout and "chmod 600" in r.stdout
    r = renderctl("gc", store, check=1)
    assert str(key) in r.stderr


def test_usage(renderctl):
    assert renderctl(check=2).stderr.startswith("usage:")
    assert "unknown command" in renderctl("frobnicate", check=2).stderr
    out = renderctl("--help", check=0).stdout
    assert "fsck [--adopt] [--remote [--deep]] STORE" in out and "replica status|push|verify" in out
