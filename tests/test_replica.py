"""SPEC §12: one CAS across machines through an S3-compatible bucket.

The bucket is the npm server s3rver behind tests/s3verify.py, which checks
every request's SigV4 signature with botocore's signer; real clients
(Debian's awscli, b3sum, minisign) read what renderfs put there."""
import errno
import json
import os
import re
import subprocess
import textwrap
import time

import pytest

from conftest import IMAGE, SMALL, need, tool, until

botocore = pytest.importorskip("botocore", reason="python3-botocore is not installed "
                               "(contrib/install-deps installs it)")

import fakes3  # noqa: E402  (needs botocore)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def s3rver_dir(tmp_path_factory):
    need("npm")
    need("node")
    return fakes3.install(tmp_path_factory.mktemp("s3rver"))


@pytest.fixture
def s3(s3rver_dir, tmp_path):
    b = fakes3.S3(s3rver_dir, tmp_path)
    yield b
    b.close()


def env_of(s3):
    return dict(os.environ, **s3.env)


def stats(m):
    out = {}
    for line in (m.path / "stats").read_text().splitlines():
        if line.startswith("renderfs_replica") or line.startswith("renderfs_cache"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def drained(m):
    until(lambda: stats(m)["renderfs_replica_backlog_objects"] == 0,
          "the outbox is empty", timeout=60)


def aws(s3, tmp_path, *args):
    """Debian's aws CLI against the test bucket (path-style addressing)."""
    cfg = tmp_path / "aws-config"
    cfg.write_text("[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n")
    env = dict(os.environ, AWS_CONFIG_FILE=str(cfg), AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               **s3.env)
    return subprocess.run(["/usr/bin/aws", "--endpoint-url", s3.endpoint, *args],
                          capture_output=True, text=True, env=env, timeout=120)


def b3(path):
    return subprocess.run([need("b3sum"), "--no-names", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def exec_models(tmp_path, size):
    """An exec route whose output is a PNG signature and `size` random bytes."""
    prog = tmp_path / "big.py"
    prog.write_text("#!/usr/bin/python3\nimport os\n" + textwrap.dedent(f"""
        with open(os.environ["RENDERFS_OUTPUT"], "wb") as f:
            f.write({PNG!r})
            left = {size}
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
        """))
    prog.chmod(0o755)
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {"image/big/default/t2i": {
        "backend": "exec", "command": [str(prog)], "media_type": "image/png",
        "schema": {"type": "object"}}}}))
    return f"models={p}"


def test_outputs_reach_the_bucket_signed_and_stock_clients_read_them(mount_factory, s3,
                                                                    tmp_path):
    need("minisign")
    m = mount_factory(s3.opts("team/a"), env=env_of(s3))
    ids = [m.submit(IMAGE, dict(SMALL, prompt="p", seed=i)) for i in range(3)]
    for jid in ids:
        assert m.wait(IMAGE, jid) == "complete"
    drained(m)
    st = stats(m)
    assert st["renderfs_replica_uploaded_total"] >= 3 * 4 + 1
    assert s3.verify.refused == [] and s3.verify.verified >= 13

    r = aws(s3, tmp_path, "s3", "ls", "--recursive", "s3://rfs/team/a/")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[-1] for line in r.stdout.splitlines()}
    keyid = None
    for jid in ids:
        out = m.status(IMAGE, jid)["output"]["blake3"]
        key = f"team/a/blobs/{out[:2]}/{out}"
        assert key in listed and key + ".minisig" in listed
        assert f"team/a/manifests/{jid}.json" in listed
        assert f"team/a/manifests/{jid}.json.minisig" in listed
    keys = [k for k in listed if re.fullmatch(r"team/a/keys/[0-9A-F]{16}\.pub", k)]
    assert len(keys) == 1, listed

    # Download one output, its signature and the key with the aws CLI.
    out = m.status(IMAGE, ids[0])["output"]["blake3"]
    for key, name in ((f"blobs/{out[:2]}/{out}", "blob"),
                      (f"blobs/{out[:2]}/{out}.minisig", "blob.minisig"),
                      (keys[0][len("team/a/"):], "key.pub"),
                      (f"manifests/{ids[0]}.json", "manifest.json"),
                      (f"manifests/{ids[0]}.json.minisig", "manifest.json.minisig")):
        r = aws(s3, tmp_path, "s3", "cp", f"s3://rfs/team/a/{key}", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    assert b3(tmp_path / "blob") == out
    assert (tmp_path / "blob").read_bytes() == (m.job(IMAGE, ids[0]) / "output.png").read_bytes()
    assert (tmp_path / "key.pub").read_text() == (m.path / "render.pub").read_text()
    for f in ("blob", "manifest.json"):
        r = subprocess.run([need("minisign"), "-V", "-p", str(tmp_path / "key.pub"),
                            "-m", str(tmp_path / f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["output"]["blake3"] == out


def test_signatures_are_checked_and_a_wrong_secret_uploads_nothing(mount_factory, s3,
                                                                   tmp_path):
    import http.client
    # The verifier refuses what botocore would not sign so.
    c = http.client.HTTPConnection("127.0.0.1", s3.verify.port, timeout=10)
    c.request("PUT", "/rfs/x", body=b"unsigned")
    assert c.getresponse().status == 403
    c.close()
    bad = dict(s3.env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    m = mount_factory(s3.opts("wrong"), env=dict(os.environ, **bad))
    jid = m.submit(IMAGE, dict(SMALL, prompt="p"))
    assert m.wait(IMAGE, jid) == "complete"  # jobs never wait for the bucket
    until(lambda: stats(m)['renderfs_replica_failures_total{kind="auth"}'] >= 1,
          "an upload refused for its signature")
    assert any("signature differs" in why for _, _, why in s3.verify.refused)
    assert not (s3.data / "rfs" / "wrong").exists()
    st = stats(m)
    assert st["renderfs_replica_backlog_objects"] >= 4 and st["renderfs_replica_uploaded_total"] == 0
    # A fetch refused for its signature is a failure (EIO), not a missing blob.
    with pytest.raises(OSError) as ei:
        (m.path / "cas" / ("1" * 64)).read_bytes()
    assert ei.value.errno == errno.EIO
    assert stats(m)['renderfs_replica_fetches_total{outcome="failed"}'] == 1
    assert "cannot fetch blobs/11/" + "1" * 64 in m.log() and "SignatureDoesNotMatch" in m.log()
    assert "not-the-secret" not in m.log() and "not-the-secret" not in (m.path / "stats").read_text()


def test_two_mounts_share_outputs_through_the_bucket(mount_factory, s3, tmp_path, fal):
    entry = fal.route(model="fal-ai/fake/i2i")
    entry["schema"]["properties"]["image_url"] = {"type": "string"}
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"routes": {"image/fake/default/i2i": entry}}))
    a = mount_factory(s3.opts("shared"), store=tmp_path / "store-a", name="a", env=env_of(s3))
    b = mount_factory(s3.opts("shared", [f"models={models}"]), store=tmp_path / "store-b",
                      name="b", env=env_of(s3))
    jid = a.submit(IMAGE, dict(SMALL, prompt="p", seed=41))
    assert a.wait(IMAGE, jid) == "complete"
    out = a.status(IMAGE, jid)["output"]
    png = (a.job(IMAGE, jid) / "output.png").read_bytes()
    drained(a)
    assert not any((tmp_path / "store-b" / "blobs").rglob(out["blake3"]))

    # b has never seen the blob: naming it as an input fetches it first.
    j2 = b.submit("image/fake/default/i2i", {"prompt": "at night",
                                             "image_url": "cas:" + out["blake3"]})
    assert b.wait("image/fake/default/i2i", j2) == "complete", \
        (b.job("image/fake/default/i2i", j2) / "log").read_text()
    import base64
    assert fal.submissions[0][1]["image_url"] == \
        "data:image/png;base64," + base64.b64encode(png).decode()
    assert (b.path / "cas" / out["blake3"]).read_bytes() == png
    assert b3(b.path / "cas" / out["blake3"]) == out["blake3"]

    # And a's reads b's output by its hash, which it has never seen.
    out2 = b.status("image/fake/default/i2i", j2)["output"]["blake3"]
    drained(b)
    assert (a.path / "cas" / out2).read_bytes() == \
        (b.job("image/fake/default/i2i", j2) / "output.png").read_bytes()
    # A hash nobody made is not there, for either.
    with pytest.raises(FileNotFoundError):
        (a.path / "cas" / ("0" * 64)).read_bytes()
    assert stats(a)['renderfs_replica_fetches_total{outcome="missing"}'] == 1
    assert s3.verify.refused == []


def test_bucket_down_jobs_go_on_backlog_survives_kill(mount_factory, s3, tmp_path):
    s3.down()
    m = mount_factory(s3.opts("down"), env=env_of(s3))
    ids = [m.submit(IMAGE, dict(SMALL, prompt="p", seed=1000 + i)) for i in range(200)]
    for jid in ids:
        assert m.wait(IMAGE, jid) == "complete"  # nothing waits for the bucket
    until(lambda: stats(m)['renderfs_replica_failures_total{kind="unavailable"}'] >= 1,
          "a failed attempt")
    st = stats(m)
    # Each blob, manifest and manifest signature, and the key (a blob's
    # signature goes once the bucket has the blob).
    assert st["renderfs_replica_backlog_objects"] == 200 * 3 + 1
    assert st["renderfs_replica_backlog_bytes"] > 0
    assert st["renderfs_replica_backlog_oldest_seconds"] > 0
    assert st["renderfs_replica_uploaded_total"] == 0
    # kill -9 with everything still in the outbox; the bucket comes back.
    m.kill()
    s3.up()
    m2 = mount_factory(s3.opts("down"), name="mnt", env=env_of(s3))
    drained(m2)
    for jid in ids:
        out = m2.status(IMAGE, jid)["output"]["blake3"]
        assert s3.object_path(f"down/blobs/{out[:2]}/{out}").read_bytes() == \
            (m2.job(IMAGE, jid) / "output.png").read_bytes()
        assert s3.object_path(f"down/manifests/{jid}.json").exists()
    assert s3.verify.refused == []


def test_multipart_upload_of_a_large_blob_survives_kill(mount_factory, s3, tmp_path):
    size = 40 << 20  # three parts of 16 MiB
    s3.verify.part_delay = 1.0  # parts are slow: the daemon dies with them in flight
    models = exec_models(tmp_path, size)
    m = mount_factory(s3.opts("big", [models]), env=env_of(s3))
    jid = m.submit("image/big/default/t2i", {})
    assert m.wait("image/big/default/t2i", jid, timeout=120) == "complete", \
        (m.job("image/big/default/t2i", jid) / "log").read_text()
    out = m.status("image/big/default/t2i", jid)["output"]["blake3"]

    def parts():
        with s3.verify.lock:
            return [p for meth, p in s3.verify.requests if meth == "PUT" and "partNumber=" in p]
    until(lambda: parts(), "a part on its way")
    m.kill()
    assert not s3.object_path(f"big/blobs/{out[:2]}/{out}").exists()
    s3.verify.part_delay = 0
    before = len(parts())
    m2 = mount_factory(s3.opts("big", [models]), env=env_of(s3))
    drained(m2)
    got = s3.object_path(f"big/blobs/{out[:2]}/{out}")
    assert got.stat().st_size == size + len(PNG)
    assert b3(got) == out
    assert len(parts()) - before == 3  # the upload started again, in three parts
    m2.stop()
    r = subprocess.run([tool("renderctl"), "fsck", "--remote", "--deep", str(m2.store)],
                       capture_output=True, text=True, env=env_of(s3), timeout=120)
    assert r.returncode == 0 and "1 blob(s) checked" in r.stdout, r.stdout


def test_a_failed_part_goes_again_alone(mount_factory, s3, tmp_path):
    size = 40 << 20
    s3.verify.fail_parts = {2: 2}  # part 2 fails twice, then goes through
    m = mount_factory(s3.opts("retry", [exec_models(tmp_path, size)]), env=env_of(s3))
    jid = m.submit("image/big/default/t2i", {})
    assert m.wait("image/big/default/t2i", jid, timeout=120) == "complete"
    out = m.status("image/big/default/t2i", jid)["output"]["blake3"]
    drained(m)
    assert b3(s3.object_path(f"retry/blobs/{out[:2]}/{out}")) == out
    with s3.verify.lock:
        parts = [re.search(r"partNumber=(\d+)", p).group(1)
                 for meth, p in s3.verify.requests if meth == "PUT" and "partNumber=" in p]
        starts = [p for meth, p in s3.verify.requests if meth == "POST" and "uploads=" in p]
    assert sorted(parts) == ["1", "2", "2", "2", "3"], parts  # one upload, part 2 three times
    assert len(starts) == 1
    assert stats(m)["renderfs_replica_uploaded_total"] >= 5


def test_the_cache_keeps_a_blob_until_its_signature_is_up(mount_factory, s3, tmp_path):
    s3.verify.fail_if = lambda meth, path: meth == "PUT" and path.endswith(".minisig")
    m = mount_factory(s3.opts("sigfirst", ["cache_max=1"]), env=env_of(s3))
    jid = m.submit(IMAGE, dict(SMALL, prompt="p", seed=5))
    assert m.wait(IMAGE, jid) == "complete"
    out = m.status(IMAGE, jid)["output"]["blake3"]
    path = m.store / "blobs" / out[:2] / out
    until(lambda: s3.object_path(f"sigfirst/blobs/{out[:2]}/{out}").exists(), "the blob up")
    # Its signature fails twice: the cache has looked at it in between.
    until(lambda: stats(m)['renderfs_replica_failures_total{kind="unavailable"}'] >= 2,
          "two failed signature uploads")
    assert path.exists() and stats(m)["renderfs_cache_evicted_total"] == 0
    s3.verify.fail_if = None
    drained(m)
    assert s3.object_path(f"sigfirst/blobs/{out[:2]}/{out}.minisig").exists()
    until(lambda: not path.exists(), "the blob dropped once its signature is up")
    assert b3(m.job(IMAGE, jid) / "output.png") == out  # and fetched back


def test_cache_max_drops_confirmed_blobs_and_fetches_them_back(mount_factory, s3, tmp_path):
    size = 256 << 10
    m = mount_factory(s3.opts("cache", [exec_models(tmp_path, size), "cache_max=600K"]),
                      env=env_of(s3))
    ids = [m.submit("image/big/default/t2i", {"n": i}) for i in range(6)]
    for jid in ids:
        assert m.wait("image/big/default/t2i", jid) == "complete"
    drained(m)
    until(lambda: stats(m)["renderfs_cache_bytes"] <= 600 * 1024, "the cache under its limit")
    st = stats(m)
    assert st["renderfs_cache_evicted_total"] >= 3
    store_blobs = m.store / "blobs"
    outs = [m.status("image/big/default/t2i", j)["output"]["blake3"] for j in ids]
    gone = [o for o in outs if not (store_blobs / o[:2] / o).exists()]
    assert len(gone) >= 3
    # Every output still reads, the dropped ones fetched again.
    for jid, o in zip(ids, outs):
        assert b3(m.job("image/big/default/t2i", jid) / "output.png") == o
    assert stats(m)['renderfs_replica_fetches_total{outcome="ok"}'] >= len(gone)

    # A tampered object in the bucket is refused, never kept.
    until(lambda: any(not (store_blobs / o[:2] / o).exists() for o in outs),
          "a blob dropped again")
    victim = next(o for o in outs if not (store_blobs / o[:2] / o).exists())
    obj = s3.object_path(f"cache/blobs/{victim[:2]}/{victim}")
    data = bytearray(obj.read_bytes())
    data[1000] ^= 1
    obj.write_bytes(bytes(data))
    jid = ids[outs.index(victim)]
    with pytest.raises(OSError) as ei:
        (m.job("image/big/default/t2i", jid) / "output.png").read_bytes()
    assert ei.value.errno == errno.EIO
    assert not (store_blobs / victim[:2] / victim).exists()
    assert stats(m)['renderfs_replica_fetches_total{outcome="corrupt"}'] == 1
    assert "hashes to" in m.log()


def test_replica_options_are_checked(mount_factory, s3, tmp_path):
    def refused(opts, env, words):
        m = mount_factory(opts, env=env, start=False)
        r = subprocess.run([tool("renderfs"), "-f", str(m.path), "-o", ",".join(m.opts)],
                           capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode != 0 and words in r.stderr, r.stderr
        assert not os.path.ismount(m.path)

    noenv = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    refused(["replica=s3://x/y"], env_of(s3), "not a bucket name")
    refused(["replica=http://rfs/y"], env_of(s3), "s3://BUCKET/PREFIX")
    refused(["replica=s3://rfs/y"], noenv, "AWS_ACCESS_KEY_ID")
    refused(["cache_max=1G"], env_of(s3), "need replica=")
    refused(["replica=s3://rfs/y", "replica_endpoint=ftp://x"], env_of(s3), "http(s)://")
    cred = tmp_path / "cred"
    cred.write_text("[default]\naws_access_key_id = S3RVER\naws_secret_access_key = S3RVER\n")
    cred.chmod(0o644)
    refused(["replica=s3://rfs/y", f"replica_credentials={cred}"], noenv, "mode 0600")
    # The same file, 0600, is taken: uploads go out with it.
    cred.chmod(0o600)
    m = mount_factory(s3.opts("cred", [f"replica_credentials={cred}"]), env=noenv)
    jid = m.submit(IMAGE, dict(SMALL, prompt="p"))
    assert m.wait(IMAGE, jid) == "complete"
    drained(m)
    assert s3.verify.refused == []


def test_push_status_and_verify_from_renderctl(mount_factory, s3, tmp_path, renderctl):
    m = mount_factory()
    ids = [m.submit(IMAGE, dict(SMALL, prompt="before", seed=i)) for i in range(2)]
    for jid in ids:
        assert m.wait(IMAGE, jid) == "complete"
    outs = [m.status(IMAGE, j)["output"]["blake3"] for j in ids]
    m.stop()
    r = renderctl("replica", "status", m.store, check=0)
    assert "never mounted with replica=" in r.stdout and "waiting:        0 object" in r.stdout
    # Blobs made before replication go up once pushed.
    r = renderctl("replica", "push", m.store, check=0)
    assert r.stdout.startswith("6 object(s)"), r.stdout  # 2 blobs, 2 manifests and signatures
    r = renderctl("replica", "status", m.store, check=0)
    assert "waiting:        6 object(s)" in r.stdout
    m2 = mount_factory(s3.opts("pushed"), env=env_of(s3))
    drained(m2)
    m2.stop()
    for o in outs:
        assert b3(s3.object_path(f"pushed/blobs/{o[:2]}/{o}")) == o
    r = renderctl("replica", "status", m.store, check=0)
    assert "in the bucket:  2 blob(s), 0 of them only there" in r.stdout, r.stdout
    assert f"s3://rfs/pushed {s3.endpoint} 1" in r.stdout
    renderctl("replica", "verify", "--deep", m.store, check=0, env=env_of(s3))
    r = renderctl("fsck", "--remote", m.store, check=0, env=env_of(s3))
    assert "2 blob(s) checked" in r.stdout
    # A changed object keeps its size (HEAD passes) but not its hash.
    obj = s3.object_path(f"pushed/blobs/{outs[0][:2]}/{outs[0]}")
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xff
    obj.write_bytes(bytes(data))
    renderctl("replica", "verify", m.store, check=0, env=env_of(s3))
    r = renderctl("fsck", "--remote", "--deep", m.store, check=1, env=env_of(s3))
    assert f"the bucket's blob {outs[0]} does not hash to its name" in r.stdout, r.stdout
    obj.unlink()
    r = renderctl("replica", "verify", m.store, check=1, env=env_of(s3))
    assert f"blob {outs[0]} is not in the bucket" in r.stdout, r.stdout


def test_private_mounts_fetch_others_blobs_for_root_only(mount_factory, s3, tmp_path):
    from test_multiuser import as_nobody
    os.chmod(tmp_path, 0o755)
    a = mount_factory(s3.opts("priv"), store=tmp_path / "store-a", name="a", env=env_of(s3))
    jid = a.submit(IMAGE, dict(SMALL, prompt="p", seed=77))
    assert a.wait(IMAGE, jid) == "complete"
    out = a.status(IMAGE, jid)["output"]["blake3"]
    drained(a)
    b = mount_factory(s3.opts("priv", ["private", "allow_other"]), store=tmp_path / "store-b",
                      name="b", env=env_of(s3))
    # nobody cannot make the daemon bring in a blob someone else made...
    r = as_nobody(f"cat cas/{out} >/dev/null", b.path)
    assert r.returncode != 0 and "No such file" in r.stderr, r.stderr
    st = stats(b)
    assert st['renderfs_replica_fetches_total{outcome="ok"}'] == 0
    assert st['renderfs_replica_fetches_total{outcome="missing"}'] == 0
    # ...nor name it as an input; root can read it.
    r = as_nobody("exec 3<>new; echo '%s' >&3; read line <&3; echo $line"
                  % json.dumps({"prompt": "cas:" + out, **SMALL}), b.route(IMAGE))
    assert stats(b)['renderfs_replica_fetches_total{outcome="ok"}'] == 0
    assert b3(b.path / "cas" / out) == out
    assert stats(b)['renderfs_replica_fetches_total{outcome="ok"}'] == 1
    r = as_nobody(f"cat cas/{out} >/dev/null", b.path)
    assert r.returncode != 0, "a private mount shows nobody a blob of no job of theirs"


def test_a_fetched_blob_needs_a_good_signature_when_the_bucket_has_one(mount_factory, s3,
                                                                         tmp_path):
    need("minisign")
    a = mount_factory(s3.opts("sig"), store=tmp_path / "store-a", name="a", env=env_of(s3))
    ids = [a.submit(IMAGE, dict(SMALL, prompt="p", seed=300 + i)) for i in range(4)]
    for jid in ids:
        assert a.wait(IMAGE, jid) == "complete"
    outs = [a.status(IMAGE, j)["output"]["blake3"] for j in ids]
    drained(a)

    def sig(o):
        return s3.object_path(f"sig/blobs/{o[:2]}/{o}.minisig")
    # 0: a flipped bit in the signature; 1: another blob's signature, by the
    # same key; 2: signed by a key the bucket does not publish; 3: no signature.
    text = sig(outs[0]).read_text().splitlines()
    line = bytearray(text[1].encode())
    line[60] = ord("A") if line[60] != ord("A") else ord("B")  # in the signature bytes
    text[1] = line.decode()
    sig(outs[0]).write_text("\n".join(text) + "\n")
    sig(outs[1]).write_bytes(sig(outs[2]).read_bytes())
    subprocess.run([need("minisign"), "-G", "-W", "-p", str(tmp_path / "other.pub"),
                    "-s", str(tmp_path / "other.key")], check=True, capture_output=True)
    blob = tmp_path / "blob2"
    blob.write_bytes((a.job(IMAGE, ids[2]) / "output.png").read_bytes())
    subprocess.run([need("minisign"), "-S", "-s", str(tmp_path / "other.key"), "-m", str(blob),
                    "-x", str(sig(outs[2])), "-t",
                    f"renderfs blake3={outs[2]} size={blob.stat().st_size}"],
                   check=True, capture_output=True)
    sig(outs[3]).unlink()

    b = mount_factory(s3.opts("sig"), store=tmp_path / "store-b", name="b", env=env_of(s3))
    for o in outs[:3]:
        with pytest.raises(OSError) as ei:
            (b.path / "cas" / o).read_bytes()
        assert ei.value.errno == errno.EIO, o
        assert not any((tmp_path / "store-b" / "blobs").rglob(o))
    log = b.log()
    assert "does not verify" in log and "is of another blob" in log
    assert "neither this store's keys/ nor the bucket's has" in log
    # Put before its signature (or without one): its hash is what was asked for.
    assert b3(b.path / "cas" / outs[3]) == outs[3]
    st = stats(b)
    assert st['renderfs_replica_fetches_total{outcome="corrupt"}'] == 3
    assert st['renderfs_replica_fetches_total{outcome="ok"}'] == 1


def test_a_prefix_with_a_space_reaches_renderctl(mount_factory, s3, renderctl):
    m = mount_factory(s3.opts("with space"), env=env_of(s3))
    jid = m.submit(IMAGE, dict(SMALL, prompt="p", seed=9))
    assert m.wait(IMAGE, jid) == "complete"
    out = m.status(IMAGE, jid)["output"]["blake3"]
    drained(m)
    m.stop()
    assert s3.object_path(f"with space/blobs/{out[:2]}/{out}").exists()
    r = renderctl("replica", "verify", m.store, check=0, env=env_of(s3))
    assert "1 blob(s) checked in s3://rfs/with space" in r.stdout, r.stdout
