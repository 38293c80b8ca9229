"""SPEC §2: submitting through `new`, with shell tools and raw descriptors."""
import errno
import json
import os
import re
import subprocess

import pytest

from conftest import IMAGE, SMALL, VIDEO, WAN

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def sh(cmd, cwd):
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def jobs_on(mnt, route):
    return sorted(p.name for p in mnt.route(route).iterdir()
                  if p.name not in ("new", "schema.json"))


def test_echo_cp_cat_batch(mnt, tmp_path):
    route = mnt.route(IMAGE)
    r = sh(f"echo '{json.dumps({'prompt': 'echo', **SMALL})}' > new", route)
    assert r.returncode == 0, r.stderr
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompt": "cp", **SMALL}))
    assert sh(f"cp {req} new", route).returncode == 0
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"prompt": f"b{i}", **SMALL}) + "\n"
                             for i in range(5)))
    assert sh(f"cat {batch} > new", route).returncode == 0
    ids = jobs_on(mnt, IMAGE)
    assert len(ids) == 7 and all(ULID.match(i) for i in ids)
    for i in ids:
        assert mnt.wait(IMAGE, i) == "complete"


def test_read_back_ids_and_errors_on_one_descriptor(mnt):
    r = sh("exec 3<>new; echo '{\"prompt\":\"a\",\"width\":64,\"height\":64}' >&3; "
           "read a <&3; echo '{\"prompt\":1}' >&3; read b <&3; "
           "printf '{\"prompt\":\"c\"}\\n{\"prompt\":\"d\"}\\n' >&3; read c <&3; read d <&3; "
           "echo \"$a|$b|$c|$d\"", mnt.route(IMAGE))
    a, b, c, d = r.stdout.strip().split("|")
    assert ULID.match(a) and ULID.match(c) and ULID.match(d) and len({a, c, d}) == 3
    assert b == "error: 'prompt' must be a string, not integer"
    assert "echo: write error: Invalid argument" in r.stderr


def test_concatenated_objects_and_byte_by_byte(mnt):
    fd = os.open(mnt.route(IMAGE) / "new", os.O_WRONLY)
    data = b'{"prompt":"x","width":64,"height":64}{"prompt":"y","width":64,"height":64}'
    for i in range(len(data)):
        os.write(fd, data[i:i + 1])
    os.close(fd)
    assert len(jobs_on(mnt, IMAGE)) == 2


def test_writes_at_offsets_fill_the_buffer(mnt):
    """dd seek=/NFS: a later piece first, then the hole; parsing waits."""
    data = json.dumps({"prompt": "offsets", **SMALL}).encode() + b"\n"
    fd = os.open(mnt.route(IMAGE) / "new", os.O_RDWR)
    os.pwrite(fd, data[10:], 10)
    assert jobs_on(mnt, IMAGE) == []
    os.pwrite(fd, data[:10], 0)
    line = os.pread(fd, 100, len(data)).decode()
    os.close(fd)
    assert ULID.match(line.strip()) and jobs_on(mnt, IMAGE) == [line.strip()]


def test_incomplete_trailing_object_fails_close(mnt):
    fd = os.open(mnt.route(IMAGE) / "new", os.O_WRONLY)
    os.write(fd, b'{"prompt": "half"')
    with pytest.raises(OSError) as ei:
        os.close(fd)
    assert ei.value.errno == errno.EINVAL
    assert jobs_on(mnt, IMAGE) == []
    assert "incomplete request" in mnt.log()


def test_acknowledged_inside_the_write(mnt):
    """The id exists (status readable) as soon as write() returned."""
    fd = os.open(mnt.route(VIDEO) / "new", os.O_RDWR)
    os.write(fd, json.dumps({"prompt": "now", **SMALL, "num_frames": 2}).encode())
    jid = os.read(fd, 100).decode().strip()
    os.close(fd)
    assert (mnt.job(VIDEO, jid) / "status").read_text() in (
        "queued\n", "running\n", "complete\n")


def test_normalized_request_defaults_seed_sorted(mnt):
    jid = mnt.submit(VIDEO, {"prompt": "fox", "width": 64, "height": 64, "num_frames": 2})
    text = (mnt.job(VIDEO, jid) / "request.json").read_text()
    req = json.loads(text)
    assert req["fps"] == 24 and req["format"] == "mp4" and req["negative_prompt"] \
        if "negative_prompt" in req else True
    assert req["fps"] == 24 and req["format"] == "mp4"
    assert isinstance(req["seed"], int) and 0 <= req["seed"] < 2**32
    assert list(req) == sorted(req), "keys sorted"
    assert text.endswith("\n")


def test_request_json_resubmitted_reproduces_the_output(mnt):
    a = mnt.submit(IMAGE, {"prompt": "again", **SMALL})
    mnt.wait(IMAGE, a)
    req = (mnt.job(IMAGE, a) / "request.json").read_text()
    b = mnt.submit(IMAGE, req.strip())
    assert mnt.wait(IMAGE, b) == "complete"
    assert (mnt.job(IMAGE, a) / "output.png").read_bytes() == \
        (mnt.job(IMAGE, b) / "output.png").read_bytes()
    sb = mnt.status(IMAGE, b)
    assert sb["cached"] is True and sb["output"]["blake3"] == \
        mnt.status(IMAGE, a)["output"]["blake3"]


def test_envelope_name_is_idempotent_and_exclusive(mnt):
    env = {"input": {"prompt": "named", **SMALL, "seed": 1}, "name": "my-job.1"}
    assert mnt.submit(IMAGE, env) == "my-job.1"
    assert mnt.submit(IMAGE, env) == "my-job.1"
    assert jobs_on(mnt, IMAGE) == ["my-job.1"]
    env["input"]["seed"] = 2
    e, line = mnt.submit_err(IMAGE, json.dumps(env).encode())
    assert e == errno.EEXIST and "name 'my-job.1' is taken" in line
    assert mnt.wait(IMAGE, "my-job.1") == "complete"
    ulid = mnt.status(IMAGE, "my-job.1")["id"]
    assert os.readlink(mnt.path / "jobs" / ulid) == f"../{IMAGE}/my-job.1"
    assert (mnt.path / "jobs" / ulid / "status").read_text() == "complete\n"


def test_a_named_request_without_a_seed_sent_again_is_the_same_job(mnt):
    """The seed a request leaves out is chosen for it; for a named job it
    is derived from the owner, route and name, so sending the same named
    request again (a retry after a lost answer) finds the job instead of
    failing EEXIST over a seed the sender never chose. Another name gets
    another seed."""
    env = {"input": {"prompt": "no seed", **SMALL}, "name": "retry-me"}
    assert mnt.submit(IMAGE, env) == "retry-me"
    assert mnt.submit(IMAGE, env) == "retry-me"
    env["name"] = "other"
    assert mnt.submit(IMAGE, env) == "other"
    seeds = [json.loads((mnt.job(IMAGE, j) / "request.json").read_text())["seed"]
             for j in ("retry-me", "other")]
    assert seeds[0] != seeds[1]
    bare = mnt.submit(IMAGE, {"prompt": "no seed", **SMALL})
    assert isinstance(json.loads((mnt.job(IMAGE, bare) / "request.json").read_text())["seed"],
                      int)


def test_envelope_priority_and_timeout(mount_factory):
    m = mount_factory(["workers=0"])
    low = m.submit(IMAGE, {"input": {"prompt": "l", **SMALL}, "priority": "low"})
    norm = m.submit(IMAGE, {"input": {"prompt": "n", **SMALL}})
    high = m.submit(IMAGE, {"input": {"prompt": "h", **SMALL}, "priority": "high",
                            "timeout_s": 5})
    pos = {j: (m.job(IMAGE, j) / "position").read_text() for j in (low, norm, high)}
    assert pos == {high: "0\n", norm: "1\n", low: "2\n"}
    assert m.status(IMAGE, high)["priority"] == "high"


@pytest.mark.parametrize("opts,make,expect", [
    (["user_queue_max=2", "workers=0"], 3, "user_queue_max=2"),
    (["queue_max=2", "workers=0"], 3, "queue_max=2"),
    (["rate=1", "burst=2", "workers=0"], 3, "rate=1 per second"),
])
def test_quotas_and_rate_limit_give_eagain(mount_factory, opts, make, expect):
    m = mount_factory(opts)
    for i in range(make - 1):
        m.submit(IMAGE, {"prompt": f"q{i}", **SMALL})
    e, line = m.submit_err(IMAGE, json.dumps({"prompt": "over", **SMALL}).encode())
    assert e == errno.EAGAIN and expect in line


def test_secrets_are_masked(mount_factory, tmp_path):
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"routes": {"image/remote/default/t2i": {
        "backend": "fal", "model": "fal-ai/test", "media_type": "image/png",
        "schema": {"type": "object", "required": ["prompt"], "properties": {
            "prompt": {"type": "string"}, "api_key": {"type": "string"},
            "auth": {"type": "object", "properties": {"Token": {"type": "string"}}}}}}}}))
    m = mount_factory([f"models={models}"])
    jid = m.submit("image/remote/default/t2i",
                   {"prompt": "p", "api_key": "sk-123", "auth": {"Token": "t-456"}})
    text = (m.job("image/remote/default/t2i", jid) / "request.json").read_text()
    assert "sk-123" not in text and "t-456" not in text
    assert json.loads(text) == {"auth": {"Token": "***"}, "api_key": "***", "prompt": "p"}
    assert m.wait("image/remote/default/t2i", jid) == "error"
    assert "sk-123" not in m.log()


def test_wan_route_ends_backend_not_configured(mnt):
    jid = mnt.submit(WAN, {"prompt": "a red fox in snow"})
    assert mnt.wait(WAN, jid) == "error"
    st = mnt.status(WAN, jid)
    assert st["error"]["code"] == "backend_not_configured"
    assert "FAL_KEY" in st["error"]["message"]
    assert (mnt.job(WAN, jid) / "error").read_text() == st["error"]["message"] + "\n"


def test_default_fal_routes_check_requests_at_write(mnt):
    """SPEC §9's default fal routes carry the services' input schemas: a bad
    request fails at write(), a good one is taken (and, without a key,
    ends backend_not_configured saying how to give one)."""
    qwen, v2a = "image/qwen/default/t2i", "audio/mmaudio/default/v2a"
    routes = {r["route"]: r for r in json.loads((mnt.path / "models.json").read_text())["routes"]}
    assert routes[qwen]["model"] == "fal-ai/qwen-image"
    assert routes[v2a]["model"] == "fal-ai/mmaudio-v2"
    e, line = mnt.submit_err(qwen, b'{"prompt": "x", "num_inference_steps": 1}\n')
    assert e == errno.EINVAL and "num_inference_steps" in line, line
    e, line = mnt.submit_err(v2a, b'{"prompt": "rain"}\n')
    assert e == errno.EINVAL and "video_url" in line, line
    src = mnt.submit(VIDEO, {"prompt": "rain on a lake", **SMALL, "num_frames": 4})
    assert mnt.wait(VIDEO, src) == "complete"
    h = mnt.status(VIDEO, src)["output"]["blake3"]
    jid = mnt.submit(v2a, {"prompt": "rain", "video_url": "cas:" + h})
    assert mnt.wait(v2a, jid) == "error"
    st = mnt.status(v2a, jid)
    assert st["error"]["code"] == "backend_not_configured" and "FAL_KEY" in st["error"]["message"]
    assert json.loads((mnt.job(v2a, jid) / "request.json").read_text())["video_url"] == "cas:" + h
