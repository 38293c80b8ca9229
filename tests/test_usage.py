"""SPEC §14: the usage ledger. Every job that reaches a final state adds to
its owner's totals in the transaction of that state; `usage` shows them
(the caller's; root: everyone's); attestations in ledger/ are signed
(minisign verifies them) and chained, and `renderctl fsck` names an
attestation that was edited or removed."""
import errno
import json
import os
import shutil
import subprocess

import pytest

from conftest import IMAGE, SMALL, VIDEO, need
from test_multiuser import NOBODY, as_nobody, submit_as_nobody

FINAL = ("complete", "error", "cancelled")


def expected_usage(m, jobs):
    """Per uid, what the job records say: the usage ledger's shape."""
    want = {}
    for route, jid in jobs:
        st = m.status(route, jid)
        u = want.setdefault(str(st["owner"]), {"jobs": {}, "seconds": {}, "output_bytes": 0,
                                               "cache_hits": 0})
        r = u["jobs"].setdefault(route, {})
        r[st["status"]] = r.get(st["status"], 0) + 1
        dev = st["usage"]["device"]
        ms = round(st["usage"]["seconds"] * 1000)
        if dev or ms:
            u["seconds"][dev or "unknown"] = u["seconds"].get(dev or "unknown", 0) + ms
        if st["cached"]:
            u["cache_hits"] += 1
        elif st["status"] == "complete":
            u["output_bytes"] += sum(o["size"] for o in st["outputs"])
    return want


def as_ms(summary):
    """A usage summary with its seconds as integer milliseconds."""
    s = dict(summary)
    s["seconds"] = {k: round(v * 1000) for k, v in summary["seconds"].items()}
    return s


def mixed_jobs(m):
    """complete, cached, error and cancelled jobs of root, and two of nobody's."""
    jobs = []
    for i in range(3):
        jobs.append((IMAGE, m.submit(IMAGE, {"prompt": f"usage {i}", "seed": i, **SMALL})))
    for _, jid in jobs:
        m.wait(IMAGE, jid)
    jobs.append((IMAGE, m.submit(IMAGE, {"prompt": "usage 0", "seed": 0, **SMALL})))  # cached
    jobs.append((VIDEO, m.submit(VIDEO, {"input": {"prompt": "slow", "width": 640,
                                                   "height": 360, "num_frames": 1000},
                                         "timeout_s": 1})))
    cancel = m.submit(VIDEO, {"prompt": "long", "width": 640, "height": 360,
                              "num_frames": 1000})
    jobs.append((VIDEO, cancel))
    m.wait(VIDEO, cancel, states=("running",) + FINAL)
    (m.job(VIDEO, cancel) / "ctl").write_text("cancel\n")
    for i in range(2):
        jobs.append((IMAGE, submit_as_nobody(m, f"nobody job {i}")))
    states = {jid: m.wait(route, jid) for route, jid in jobs}
    assert sorted(states.values()) == sorted(["complete"] * 6 + ["error", "cancelled"]), states
    assert m.status(IMAGE, jobs[3][1])["cached"] is True
    return jobs


def test_usage_equals_the_job_records_and_each_uid_sees_its_own(mount_factory):
    m = mount_factory(["allow_other"])
    jobs = mixed_jobs(m)
    want = expected_usage(m, jobs)
    assert set(want) == {str(os.getuid()), str(NOBODY)}
    got = json.loads((m.path / "usage").read_text())
    assert set(got) == set(want), got
    for uid, w in want.items():
        assert as_ms(got[uid]["total"]) == w, (uid, got[uid], w)
        # One day here (the test does not cross midnight, or its days add up).
        days = list(got[uid]["days"].values())
        assert sum(d["cache_hits"] for d in days) == w["cache_hits"]
        assert sum(d["output_bytes"] for d in days) == w["output_bytes"]
    # The CPU ran the complete jobs: seconds are counted on it.
    assert got[str(os.getuid())]["total"]["seconds"]["cpu"] > 0
    # nobody sees its own totals and no one else's.
    r = as_nobody("cat usage", m.path)
    assert r.returncode == 0, r.stderr
    mine = json.loads(r.stdout)
    assert set(mine) == {str(NOBODY)} and mine[str(NOBODY)] == got[str(NOBODY)]
    # The ledger keeps a deleted job's usage.
    shutil.rmtree(m.job(IMAGE, jobs[0][1]))
    assert json.loads((m.path / "usage").read_text()) == got
    # ...and survives a restart.
    m.stop()
    m.start()
    assert json.loads((m.path / "usage").read_text()) == got


def test_retry_counts_both_runs(mount_factory):
    m = mount_factory(["workers=0"])
    jid = m.submit(IMAGE, {"prompt": "retried", **SMALL})
    (m.job(IMAGE, jid) / "ctl").write_text("cancel\n")
    (m.job(IMAGE, jid) / "ctl").write_text("retry\n")
    (m.job(IMAGE, jid) / "ctl").write_text("cancel\n")
    got = json.loads((m.path / "usage").read_text())[str(os.getuid())]["total"]
    assert got["jobs"] == {IMAGE: {"cancelled": 2}}, got
    # Nothing ran: no seconds.
    assert got["seconds"] == {} and got["output_bytes"] == 0


def minisign_ok(d, name, pub):
    r = subprocess.run([need("minisign"), "-Vm", str(d / name), "-x",
                        str(d / (name + ".minisig")), "-p", str(pub)],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stdout + r.stderr


def test_attestations_verify_chain_and_fsck_names_tampering(mount_factory, renderctl,
                                                            tmp_path):
    m = mount_factory(["allow_other"])
    jobs = mixed_jobs(m)
    usage = json.loads((m.path / "usage").read_text())
    ledger = m.path / "ledger"
    assert sorted(os.listdir(ledger)) == ["attest"]
    # Only the store's owner (or root) attests.
    r = as_nobody("echo attest > ledger/attest", m.path)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    (ledger / "attest").write_text("attest\n")
    listing = os.listdir(ledger)
    assert listing[0] == "attest" and len(listing) == 3, listing
    first = listing[1][:-len(".json")]
    assert listing[1:] == [first + ".json", first + ".json.minisig"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for n in listing[1:]:
        shutil.copy(ledger / n, copy / n)
    ok, out = minisign_ok(copy, first + ".json", m.path / "render.pub")
    assert ok, out
    doc = json.loads((ledger / (first + ".json")).read_text())
    assert doc["previous"] is None and doc["from"] is None and doc["period"] == first
    assert doc["entries"] == len(jobs)
    assert {u: as_ms(s) for u, s in doc["usage"].items()} == \
        {u: as_ms(v["total"]) for u, v in usage.items()}
    # It is a blob of the store: cas/<its BLAKE3>.
    b3 = subprocess.run([need("b3sum"), "--no-names", str(copy / (first + ".json"))],
                        capture_output=True, text=True, check=True).stdout.strip()
    assert (m.path / "cas" / b3).read_bytes() == (copy / (first + ".json")).read_bytes()
    # Nothing happened since: nothing to attest.
    with pytest.raises(OSError) as ei:
        (ledger / "attest").write_text("attest\n")
    assert ei.value.errno == errno.EALREADY
    # One more job, a second attestation chained to the first.
    jid = m.submit(IMAGE, {"prompt": "after", **SMALL})
    m.wait(IMAGE, jid)
    (ledger / "attest").write_text("attest\n")
    second = [n for n in os.listdir(ledger) if n.endswith(".json")][1][:-5]
    doc2 = json.loads((ledger / (second + ".json")).read_text())
    assert doc2["previous"] == b3 and doc2["previous_period"] == first
    assert doc2["from_ms"] == doc["to_ms"] and doc2["entries"] == 1
    assert doc2["usage"][str(os.getuid())]["jobs"] == {IMAGE: {"complete": 1}}
    b3_2 = subprocess.run([need("b3sum"), "--no-names", str(ledger / (second + ".json"))],
                          capture_output=True, text=True, check=True).stdout.strip()
    m.stop()

    r = renderctl("fsck", m.store)
    assert r.returncode == 0 and "2 attestations checked" in r.stdout, r.stdout
    # Edit the first attestation: fsck names it.
    blob = m.store / "blobs" / b3[:2] / b3
    text = blob.read_bytes()
    os.chmod(blob, 0o644)
    blob.write_bytes(text.replace(b'"entries"', b'"entrieS"'))
    r = renderctl("fsck", m.store)
    assert r.returncode == 1 and f"attestation {first}: " in r.stdout and \
        "was modified" in r.stdout, r.stdout
    blob.write_bytes(text)
    os.chmod(blob, 0o444)
    r = renderctl("fsck", m.store)
    assert r.returncode == 0, r.stdout
    # Remove the second: fsck names it.
    blob2 = m.store / "blobs" / b3_2[:2] / b3_2
    assert blob2.exists()
    blob2.unlink()
    r = renderctl("fsck", m.store)
    assert r.returncode == 1 and f"attestation {second}: " in r.stdout and \
        "cannot be read" in r.stdout, r.stdout


def test_renderctl_usage_table_json_and_filters(mount_factory, renderctl):
    m = mount_factory(["allow_other"])
    mixed_jobs(m)
    usage = json.loads((m.path / "usage").read_text())
    r = renderctl("usage", "--mount", m.path, "--json", check=0)
    assert json.loads(r.stdout) == usage
    r = renderctl("usage", "--mount", m.path, "--uid", NOBODY, "--json", check=0)
    assert set(json.loads(r.stdout)) == {str(NOBODY)}
    # A table: one line per uid and route with its outcomes, then seconds
    # by device, then output bytes and cache hits.
    r = renderctl("usage", "--mount", m.path, check=0)
    sections = [sec.splitlines() for sec in r.stdout.strip().split("\n\n")]
    assert [sec[0].split() for sec in sections] == [
        ["UID", "ROUTE", "COMPLETE", "ERROR", "CANCELLED"], ["UID", "DEVICE", "SECONDS"],
        ["UID", "OUTPUT_BYTES", "CACHE_HITS"]], r.stdout
    rows = {(ln.split()[0], ln.split()[1]): ln.split()[2:] for ln in sections[0][1:]}
    me = str(os.getuid())
    assert rows == {(str(NOBODY), IMAGE): ["2", "0", "0"], (me, IMAGE): ["4", "0", "0"],
                    (me, VIDEO): ["0", "1", "1"]}, r.stdout
    secs = {(ln.split()[0], ln.split()[1]): ln.split()[2] for ln in sections[1][1:]}
    assert secs[(me, "cpu")] == "%.3f" % usage[me]["total"]["seconds"]["cpu"]
    tot = {ln.split()[0]: ln.split()[1:] for ln in sections[2][1:]}
    assert tot[me] == [str(usage[me]["total"]["output_bytes"]), "1"]
    # --since today: the same totals; --since the future: nothing.
    r = renderctl("usage", "--mount", m.path, "--since", "1d", "--json", check=0)
    assert {u: as_ms(v["total"]) for u, v in json.loads(r.stdout).items()} == \
        {u: as_ms(v["total"]) for u, v in usage.items()}
    # --since tomorrow: nothing.
    r = renderctl("usage", "--mount", m.path, "--since", "2999-01-01", "--json", check=0)
    assert json.loads(r.stdout) == {}
    r = renderctl("usage", "--mount", m.path, "--since", "yesterday", check=2)
    assert "--since" in r.stderr
    # --attest makes an attestation and prints its path.
    r = renderctl("usage", "--mount", m.path, "--attest", check=0)
    path = r.stdout.strip()
    assert path.startswith(str(m.path / "ledger")) and path.endswith(".json")
    assert os.path.exists(path) and os.path.exists(path + ".minisig")
