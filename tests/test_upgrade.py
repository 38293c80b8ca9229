"""Stores written with index formats 1, 2 and 7 (tests/data/make-store.sh) are
upgraded, one step at a time, when they are mounted: every job reads as
before, with the same inode numbers, the queue keeps its order, names and
memoization still work, and fsck is clean (it checks the names, blob
users, job counts and delayed set that the later formats add). A remote
job queued in format 7's shared remote group moves to its route's own
queue group (format 8) and runs from there. Read-only tools refuse them
with a message."""
import json
import os
import subprocess
import re
import tarfile
import time

import pytest

from conftest import IMAGE, TOP, WAN, need, until

DATA = TOP / "tests" / "data"
INDEX_FORMAT = int(re.search(r"#define INDEX_FORMAT_VERSION (\d+)",
                             (TOP / "store" / "index.h").read_text()).group(1))


def unpack(tmp_path, fmt):
    with tarfile.open(DATA / f"store-format{fmt}.tar.gz") as t:
        t.extractall(tmp_path)
    return tmp_path / "store", json.loads((DATA / f"store-format{fmt}.json").read_text())


@pytest.mark.parametrize("fmt", [1, 2, 7])
def test_old_store_is_upgraded(tmp_path, mount_factory, renderctl, fmt):
    store, expected = unpack(tmp_path, fmt)
    now = INDEX_FORMAT

    r = renderctl("fsck", store, check=1)
    assert f"format version {fmt}; mounting the store with renderfs upgrades it to {now}" \
        in r.stdout

    m = mount_factory(["workers=0"], store=store)
    read = len(expected)  # steps 1-3 and 14 (the usage ledger) read every job
    assert f"upgraded the index of '{store}' from format {fmt} to {now} ({read} jobs)" \
        in m.log()
    listed = {e for route in (IMAGE, WAN) for e in os.listdir(m.route(route))
              if (m.route(route) / e).is_dir()}
    assert listed == set(expected)
    queued = {}
    for name, want in expected.items():
        d = m.job(want["route"], name)
        got = json.loads((d / "status.json").read_text())
        got.pop("progress")
        assert got.pop("retry_at") is None  # added in format 5
        want.pop("retry_at", None)
        assert got.pop("waiting_for") is None  # added in format 8
        # Added in format 15: what its attempts used (unknown before: none).
        assert got.pop("usage") == {"device": None, "seconds": 0.0}
        outputs = got.pop("outputs")  # added in format 12: every output, the first first
        assert outputs == ([want["output"]] if want["output"] else None)
        got["log"] = (d / "log").read_text()
        got["request"] = json.loads((d / "request.json").read_text())
        got["ino"] = os.stat(d).st_ino
        got["status_ino"] = os.stat(d / "status").st_ino
        assert got == want, name
        if want["status"] == "queued" and want["route"] == IMAGE:
            queued[want["request"]["prompt"]] = name
        if want["status"] == "complete":
            out = d / want["output"]["name"]
            b3 = subprocess.run([need("b3sum"), "--no-names", str(out)], capture_output=True,
                                text=True, check=True).stdout.split()[0]
            assert b3 == want["output"]["blake3"]
    # The owner's listing (jobs/) has every job by id.
    assert sorted(os.listdir(m.path / "jobs")) == sorted(v["id"] for v in expected.values())
    # Queue order survived: high, normal, low.
    assert [m.status(IMAGE, queued[p])["position"] for p in ("q high", "q normal", "q low")] \
        == [0, 1, 2]
    # The upgrade entered the jobs that had ended into the usage ledger.
    usage = json.loads((m.path / "usage").read_text())
    ended = [v for v in expected.values() if v["status"] in ("complete", "error", "cancelled")]
    assert sum(n for u in usage.values() for r in u["total"]["jobs"].values()
               for n in r.values()) == len(ended)
    # Those that ended before today (UTC) are attested at start, as the
    # day before today's, all in one period (the fixtures of formats 1 and
    # 2 are older than the day of this test; format 7's may be of today).
    today = time.strftime("%Y-%m-%d", time.gmtime())
    before = [v for v in ended if v["completed_at"] < today]
    if before:
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
        att = m.path / "ledger" / f"{day}.json"
        until(att.exists, "the daily attestation of the upgraded jobs")
        doc = json.loads(att.read_text())
        assert doc["from"] is None and doc["to"] == today + "T00:00:00.000Z"
        assert doc["entries"] == len(before)
    m.stop()
    r = renderctl("fsck", store, check=0)
    assert "0 problems" in r.stdout

    # Running again: the queue drains in order; names and memoization still
    # find the upgraded jobs.
    m = mount_factory(["workers=1"], store=store, name="mnt2")
    assert "upgraded the index" not in m.log()
    for name, want in expected.items():
        if want["route"] == WAN and want["status"] == "queued":
            # Claimed from its route's own group: it runs (no key here).
            assert m.wait(WAN, name) == "error"
            assert m.status(WAN, name)["error"]["code"] == "backend_not_configured"
    done = {p: m.wait(IMAGE, queued[p]) for p in queued}
    assert set(done.values()) == {"complete"}
    started = [m.status(IMAGE, queued[p])["started_at"] for p in ("q high", "q normal", "q low")]
    assert started == sorted(started)
    owl = expected["owl"]
    assert m.submit(IMAGE, {"input": owl["request"], "name": "owl"}) == "owl"
    err, line = m.submit_err(IMAGE, json.dumps(
        {"input": dict(owl["request"], seed=99), "name": "owl"}).encode() + b"\n")
    assert err == 17 and "owl" in line, (err, line)  # EEXIST
    fox = next(v for v in expected.values() if v["request"].get("prompt") == "red fox"
               and not v["cached"])
    again = m.submit(IMAGE, fox["request"])
    assert m.wait(IMAGE, again) == "complete"
    st = m.status(IMAGE, again)
    assert st["cached"] and st["output"]["blake3"] == fox["output"]["blake3"]
    # Deleting an upgraded job removes it from every listing.
    subprocess.run(["rm", "-r", str(m.job(IMAGE, fox["id"]))], check=True)
    assert fox["id"] not in os.listdir(m.route(IMAGE))
    assert fox["id"] not in os.listdir(m.path / "jobs")
    m.stop()
    r = renderctl("fsck", store, check=0)
    assert "0 problems" in r.stdout
