"""SPEC §2 and §7: malformed requests get a precise errno and message, and
change nothing else; the daemon keeps serving."""
import errno
import json
import os

import pytest

from conftest import IMAGE, SMALL, VIDEO

EINVAL, EFBIG = errno.EINVAL, errno.EFBIG
OK = {"prompt": "ok", **SMALL}


def obj(**kw):
    return json.dumps({**OK, **kw}).encode()


BAD = [
    ("not json", b"hello world\n", EINVAL, "must be a JSON object"),
    ("array", b"[1, 2, 3]\n", EINVAL, "must be a JSON object"),
    ("number", b"42\n", EINVAL, "must be a JSON object"),
    ("string", b'"prompt"\n', EINVAL, "must be a JSON object"),
    ("broken value", b'{"prompt": tru}\n', EINVAL, "not valid JSON"),
    ("trailing comma", b'{"prompt": "a",}\n', EINVAL, "not valid JSON"),
    ("single quotes", b"{'prompt': 'a'}\n", EINVAL, "not valid JSON"),
    ("bad bracket", b'{"prompt": ["a"}\n', EINVAL, "does not close"),
    ("deep nesting", b'{"a":' + b"[" * 70 + b"]" * 70 + b"}\n", EINVAL, "deeper than 64"),
    ("duplicate key", b'{"prompt": "a", "prompt": "b"}\n', EINVAL, "duplicate key"),
    ("nested duplicate", b'{"input": {"prompt": "a", "prompt": "a"}}\n', EINVAL,
     "duplicate key"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}\n', EINVAL, "not valid JSON"),
    ("overlong utf-8", b'{"prompt": "\xc0\xaf"}\n', EINVAL, "not valid JSON"),
    ("raw NUL", b'{"prompt": "a\x00b"}\n', EINVAL, "NUL byte"),
    ("raw NUL outside", b'{"prompt": "a"\x00}\n', EINVAL, "NUL byte"),
    ("escaped NUL", b'{"prompt": "a\\u0000b"}\n', EINVAL, "must not contain NUL"),
    ("control char", b'{"prompt": "a\x01b"}\n', EINVAL, "control character"),
    ("missing prompt", b'{"width": 64}\n', EINVAL, "'prompt' is required"),
    ("wrong type", obj(prompt=5), EINVAL, "'prompt' must be a string, not integer"),
    ("width string", obj(width="64"), EINVAL, "'width' must be an integer from 64"),
    ("width float", obj(width=64.5), EINVAL, "'width' must be an integer from 64"),
    ("width odd", obj(width=65), EINVAL, "a multiple of 8"),
    ("huge number", b'{"prompt": "a", "width": 1' + b"0" * 400 + b"}\n", EINVAL,
     "'width'"),
    ("huge exponent", b'{"prompt": "a", "seed": 1e999}\n', EINVAL, "'seed'"),
    ("negative seed", obj(seed=-1), EINVAL, "'seed' must be an integer from 0"),
    ("unknown field", obj(steps=4), EINVAL, "unknown field 'steps'"),
    ("bad enum", obj(format="gif"), EINVAL, "'format' must be one of \"png\""),
    ("long prompt", obj(prompt="x" * 2001), EINVAL, "at most 2000 characters"),
    ("null prompt", obj(prompt=None), EINVAL, "'prompt' must be a string, not null"),
    ("envelope bad name slash", json.dumps({"input": OK, "name": "a/b"}).encode(), EINVAL,
     "'name' must match"),
    ("envelope name dotdot", json.dumps({"input": OK, "name": ".."}).encode(), EINVAL,
     "'name' must match"),
    ("envelope name too long", json.dumps({"input": OK, "name": "a" * 65}).encode(), EINVAL,
     "'name' must match"),
    ("envelope bad priority", json.dumps({"input": OK, "priority": "urgent"}).encode(),
     EINVAL, "'priority' must be one of"),
    ("envelope bad timeout", json.dumps({"input": OK, "timeout_s": 0}).encode(), EINVAL,
     "'timeout_s' must be an integer"),
    ("envelope unknown option", json.dumps({"input": OK, "retries": 3}).encode(), EINVAL,
     "unknown envelope option 'retries'"),
    ("envelope input not object", b'{"input": [1]}\n', EINVAL, "'input' must be a JSON object"),
]


@pytest.mark.parametrize("name,data,want,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_request(mnt, name, data, want, msg):
    e, line = mnt.submit_err(IMAGE, data)
    assert e == want, (name, os.strerror(e), line)
    assert line.startswith("error: ") and msg in line, line
    assert msg in mnt.log()
    assert [p for p in os.listdir(mnt.route(IMAGE)) if p not in ("new", "schema.json")] == []
    jid = mnt.submit(IMAGE, OK)
    assert mnt.wait(IMAGE, jid) == "complete"


def test_17_mib_body_is_efbig(mnt):
    body = b'{"prompt": "' + b"x" * (17 << 20) + b'"}\n'
    fd = os.open(mnt.route(VIDEO) / "new", os.O_WRONLY)
    written = 0
    with pytest.raises(OSError) as ei:
        while written < len(body):  # as cp does: short writes continue
            written += os.write(fd, body[written:written + (4 << 20)])
    assert ei.value.errno == EFBIG and 16 << 20 <= written + (4 << 20)
    with pytest.raises(OSError) as ci:
        os.close(fd)  # the oversized object never completed
    assert ci.value.errno == EINVAL
    assert "larger than max_request" in mnt.log()
    assert [p for p in os.listdir(mnt.route(VIDEO)) if p not in ("new", "schema.json")] == []
    jid = mnt.submit(IMAGE, OK)
    assert mnt.wait(IMAGE, jid) == "complete"


def test_bad_objects_do_not_disturb_good_ones_in_a_batch(mnt):
    """A write reports the bytes of the objects before a bad one; the retry
    of the rest fails on the bad one alone; the objects after it go in with
    the next write (SPEC §2 as refined by the hardening of `new`)."""
    one, bad, three = obj(prompt="one") + b"\n", b'{"prompt": 1}\n', obj(prompt="three") + b"\n"
    fd = os.open(mnt.route(IMAGE) / "new", os.O_RDWR)
    try:
        assert os.write(fd, one + bad + three) == len(one)
        with pytest.raises(OSError) as ei:
            os.write(fd, bad + three)
        assert ei.value.errno == EINVAL
        assert os.write(fd, three) == len(three)
        lines = os.read(fd, 65536).decode().splitlines()
    finally:
        os.close(fd)
    assert len(lines) == 3 and lines[1].startswith("error:") and "'prompt'" in lines[1]
    assert not lines[0].startswith("error") and not lines[2].startswith("error")
    assert mnt.wait(IMAGE, lines[0]) == mnt.wait(IMAGE, lines[2]) == "complete"


def test_garbage_in_ctl_and_unknown_names(mnt):
    jid = mnt.submit(IMAGE, OK)
    ctl = mnt.job(IMAGE, jid) / "ctl"
    for junk in (b"\x00\xff\n", b"priority\n", b"priority extreme\n", b"x" * 5000):
        fd = os.open(ctl, os.O_WRONLY)
        with pytest.raises(OSError) as ei:
            os.write(fd, junk)
        os.close(fd)
        assert ei.value.errno == EINVAL
    for name in ("..%2f", "a" * 300, ".hidden", "01ARZ3NDEKTSV4RRFFQ69G5FA"):
        with pytest.raises(OSError) as ei:
            os.stat(mnt.route(IMAGE) / name)
        assert ei.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
    assert mnt.wait(IMAGE, jid) == "complete"
