"""Inputs from the store (SPEC §3): a request string cas:<hex> names a blob
of this store, checked at submit, referenced while the job exists, listed
in the manifest, and sent to a remote service inline (a data: URI). A
pipeline through files only: a synth image, then a fake fal service that
takes it."""

import base64
import errno
import json
import subprocess

import pytest

SYNTH = "image/synth/default/t2i"
VIDEO = "video/synth/default/t2v"
I2I = "image/fake/default/i2i"


def mount(mount_factory, tmp_path, fal, opts=()):
    entry = fal.route(model="fal-ai/fake/i2i")
    entry["schema"]["properties"]["image_url"] = {"type": "string"}
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {I2I: entry}}))
    return mount_factory([f"models={p}", *opts])


def test_a_blob_of_the_store_goes_to_the_service_inline(mount_factory, tmp_path, fal,
                                                         renderctl):
    m = mount(mount_factory, tmp_path, fal)
    src = m.submit(SYNTH, {"prompt": "a red fox", "width": 64, "height": 64, "seed": 3})
    assert m.wait(SYNTH, src) == "complete"
    out = m.status(SYNTH, src)["output"]
    png = (m.job(SYNTH, src) / "output.png").read_bytes()

    jid = m.submit(I2I, {"prompt": "the fox, at night", "image_url": "cas:" + out["blake3"]})
    assert m.wait(I2I, jid) == "complete", (m.job(I2I, jid) / "log").read_text()
    body = fal.submissions[0][1]
    assert body["prompt"] == "the fox, at night"
    assert body["image_url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    # request.json keeps the name of the blob, the manifest the chain.
    assert json.loads((m.job(I2I, jid) / "request.json").read_text())["image_url"] \
        == "cas:" + out["blake3"]
    manifest = json.loads((m.job(I2I, jid) / "manifest.json").read_text())
    assert manifest["inputs"] == [{"blake3": out["blake3"], "field": "image_url",
                                   "job": src, "size": out["size"]}]

    # The input is referenced while the job that names it exists.
    blob = m.path / "cas" / out["blake3"]
    (m.job(SYNTH, src) / "output.png").unlink()
    subprocess.run(["rm", "-r", str(m.job(SYNTH, src))], check=True)
    assert blob.read_bytes() == png
    subprocess.run(["rm", "-r", str(m.job(I2I, jid))], check=True)
    assert not blob.exists()
    m.stop()
    r = renderctl("fsck", str(m.store))
    assert r.returncode == 0, r.stdout + r.stderr


def test_inputs_are_checked_at_submit(mount_factory, tmp_path, fal):
    m = mount(mount_factory, tmp_path, fal)
    e, line = m.submit_err(I2I, json.dumps(
        {"prompt": "x", "image_url": "cas:" + "0" * 64}).encode() + b"\n")
    assert e == errno.EINVAL and "'image_url': no blob cas:" + "0" * 64 in line, line
    # A backend that takes no input from the store says so.
    src = m.submit(SYNTH, {"prompt": "a", "width": 64, "height": 64})
    assert m.wait(SYNTH, src) == "complete"
    h = m.status(SYNTH, src)["output"]["blake3"]
    e, line = m.submit_err(SYNTH, json.dumps({"prompt": "cas:" + h}).encode() + b"\n")
    assert e == errno.EINVAL and "takes no input from the store" in line, line
    # Too large to go inline: refused at write(), not minutes later.
    big = m.submit(VIDEO, {"prompt": "sea", "width": 640, "height": 360, "num_frames": 48,
                           "format": "y4m"})
    assert m.wait(VIDEO, big, timeout=120) == "complete"
    st = m.status(VIDEO, big)["output"]
    assert st["size"] > 10 << 20
    e, line = m.submit_err(I2I, json.dumps(
        {"prompt": "x", "image_url": "cas:" + st["blake3"]}).encode() + b"\n")
    assert e == errno.EFBIG and "input_too_large" in line, line
    assert fal.submissions == []


def test_private_mount_names_only_the_owners_blobs(mount_factory, tmp_path, fal):
    """On a `private` mount a request may name only a blob of its owner's
    jobs; another user's reads exactly as no blob at all."""
    import os
    from test_multiuser import NOBODY, as_nobody
    os.chmod(tmp_path, 0o755)
    m = mount(mount_factory, tmp_path, fal, ["private", "allow_other"])
    root_job = m.submit(SYNTH, {"prompt": "root's", "width": 64, "height": 64})
    assert m.wait(SYNTH, root_job) == "complete"
    h = m.status(SYNTH, root_job)["output"]["blake3"]

    def nobody_submits(h):
        req = json.dumps({"prompt": "x", "image_url": "cas:" + h})
        r = as_nobody(f"exec 3<>new; echo '{req}' >&3; read line <&3; echo \"$line\"",
                      m.route(I2I))
        return r.returncode, r.stdout + r.stderr
    rc, out = nobody_submits(h)
    assert rc != 0 or "error" in out
    assert f"no blob cas:{h} in this store that you can read" in out, out
    rc0, out0 = nobody_submits("1" * 64)
    assert out0.replace("1" * 64, h) == out  # the same words, nothing told
    # Its own output it may name.
    r = as_nobody("exec 3<>new; echo '{\"prompt\": \"mine\", \"width\": 64, \"height\": 64}'"
                  " >&3; read id <&3; echo $id", m.route(SYNTH))
    mine = r.stdout.strip()
    assert m.wait(SYNTH, mine) == "complete"
    h2 = m.status(SYNTH, mine)["output"]["blake3"]
    rc, out = nobody_submits(h2)
    assert rc == 0 and "error" not in out, out
    jid = out.strip()
    assert m.wait(I2I, jid) == "complete"
    assert m.status(I2I, jid)["owner"] == NOBODY


def test_three_stages_through_files_and_the_chain(mount_factory, tmp_path, fal, renderctl):
    """A synth image, then a fake image-to-video service given it, then a
    fake video-to-audio service given that video: all through files; the
    last output's `renderctl verify` walks the three signed manifests back
    to the first job, and names a link that is gone."""
    fal.video = True
    i2v = fal.route(model="fal-ai/fake/i2v", media_type="video/mp4")
    i2v["schema"]["properties"]["image_url"] = {"type": "string"}
    v2a = fal.route(model="fal-ai/fake/v2a", media_type="video/mp4")
    v2a["schema"]["properties"]["video_url"] = {"type": "string"}
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {"video/fake/default/i2v": i2v,
                                        "video/fake/default/v2a": v2a}}))
    m = mount_factory([f"models={p}"])
    a = m.submit(SYNTH, {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 9})
    assert m.wait(SYNTH, a) == "complete"
    a_out = m.status(SYNTH, a)["output"]["blake3"]
    b = m.submit("video/fake/default/i2v", {"prompt": "waves", "image_url": "cas:" + a_out})
    assert m.wait("video/fake/default/i2v", b) == "complete"
    b_out = m.status("video/fake/default/i2v", b)["output"]["blake3"]
    c = m.submit("video/fake/default/v2a", {"prompt": "gulls", "video_url": "cas:" + b_out})
    assert m.wait("video/fake/default/v2a", c) == "complete"
    video = (m.job("video/fake/default/i2v", b) / "output.mp4").read_bytes()
    assert fal.submissions[1][1]["video_url"] == \
        "data:video/mp4;base64," + base64.b64encode(video).decode()
    last = m.job("video/fake/default/v2a", c) / "output.mp4"
    r = renderctl("verify", str(last))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chain: 3 jobs, every link signed and named" in r.stdout, r.stdout
    at = [r.stdout.index(f"job {j} ") for j in (c, b, a)]
    assert at == sorted(at), r.stdout  # from the last job back to the first
    assert f"input video_url: cas:{b_out[:16]}... from job {b}" in r.stdout
    assert f"input image_url: cas:{a_out[:16]}... from job {a}" in r.stdout
    # The first job goes: its output lives on (the second job's input),
    # and the chain names the missing link.
    subprocess.run(["rm", "-r", str(m.job(SYNTH, a))], check=True)
    r = renderctl("verify", str(last))
    assert r.returncode == 1 and f"job {a} is gone" in r.stdout, r.stdout
    m.stop()
    r = renderctl("fsck", str(m.store))
    assert r.returncode == 0, r.stdout + r.stderr
