"""Remote jobs (SPEC §8) against a fake fal queue service (fakefal.py):
the protocol end to end, concurrency, retries that hold no worker, the
circuit breaker, cancellation at the service, and paid work resumed (never
sent twice) after a restart."""

import errno
import json
import os
import re
import subprocess
import threading
import time

import pytest

from fakefal import FakeFal
from conftest import until

ROUTE = "image/fake/default/t2i"
SYNTH = "image/synth/default/t2i"


def models(tmp_path, fal, **extra):
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {ROUTE: fal.route(**extra)}}))
    return f"models={p}"


def stats(m):
    return (m.path / "stats").read_text()


def test_fal_job_end_to_end(mount_factory, tmp_path, fal):
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "a lighthouse", "seed": 7})
    assert m.wait(ROUTE, jid) == "complete", (m.job(ROUTE, jid) / "log").read_text()
    rid, body, headers = fal.submissions[0]
    assert len(fal.submissions) == 1
    assert body == {"prompt": "a lighthouse", "seed": 7}
    assert headers["Authorization"] == "Key " + FakeFal.KEY
    assert (m.job(ROUTE, jid) / "output.png").read_bytes() == fal.output(rid)
    log = (m.job(ROUTE, jid) / "log").read_text()
    assert f"queued as request {rid}" in log
    # fal sends its whole log list each time: each line is appended once.
    assert log.count("fal: loading model") == 1 and log.count("fal: step 2 of 2") == 1
    manifest = json.loads((m.job(ROUTE, jid) / "manifest.json").read_text())
    assert manifest["backend"] == "fal" and manifest["model"] == "fal-ai/fake/image"
    # The usage ledger counts fal's own measure of the run (SPEC §14).
    assert m.status(ROUTE, jid)["usage"] == {"device": "remote:fal", "seconds": 0.75}
    usage = json.loads((m.path / "usage").read_text())[str(os.getuid())]["total"]
    assert usage["seconds"] == {"remote:fal": 0.75} and usage["jobs"] == {ROUTE: {"complete": 1}}
    for text in (log, (m.job(ROUTE, jid) / "status.json").read_text(), stats(m), m.log(),
                 (m.path / "models.json").read_text()):
        assert FakeFal.KEY not in text


def test_a_user_submits_watches_and_copies_with_real_tools(mount_factory, tmp_path, fal):
    """The whole story with the tools a user has: a request written to
    `new` by the shell, the job waited for with inotifywait, the output
    copied with cp, verified by minisign and named by b3sum; fal's log
    lines in `log`, its result in result.json."""
    from conftest import need
    m = mount_factory([models(tmp_path, fal)])
    script = f"""
set -e
cd '{m.path / ROUTE}'
exec 3<>new
printf '{{"prompt": "a lighthouse at dusk"}}' >&3
read -r id <&3
exec 3>&-
# Wait with inotify; the status is read again after each event (or 2 s).
until [ "$(cat "$id/status")" = complete ]; do
    [ "$(cat "$id/status")" = error ] && exit 9
    {need("inotifywait")} -qq -t 2 -e modify,close_write "$id/status" || [ $? -eq 2 ]
done
cp "$id/output.png" '{tmp_path}/out.png'
cp "$id/output.png.minisig" '{tmp_path}/out.png.minisig'
{need("minisign")} -Vqm '{tmp_path}/out.png' -p '{m.path / "render.pub"}'
echo "$id"
{need("b3sum")} --no-names '{tmp_path}/out.png'
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    jid, b3 = r.stdout.split()
    st = m.status(ROUTE, jid)
    assert st["output"]["blake3"] == b3
    assert (tmp_path / "out.png").read_bytes() == fal.output(fal.submissions[0][0])
    log = (m.job(ROUTE, jid) / "log").read_text()
    assert "fal: loading model" in log and "fal: step 2 of 2" in log
    result = json.loads((m.job(ROUTE, jid) / "result.json").read_text())
    assert result["images"][0]["url"] == "cas:" + b3 and result["seed"] == 42


def test_rejected_request_is_not_retried(mount_factory, tmp_path, fal):
    fal.reject = "prompt is too dull"
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "backend_rejected" and st["attempts"] == 1
    assert "prompt: prompt is too dull" in st["error"]["message"]


def test_output_of_another_media_type_is_refused(mount_factory, tmp_path, fal):
    fal.file_type = "text/html"
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "output_invalid" and "text/html" in st["error"]["message"]
    assert not (m.job(ROUTE, jid) / "output.png").exists()


def test_concurrency_bounds_jobs_in_flight(mount_factory, tmp_path, fal):
    fal.hold = True
    m = mount_factory([models(tmp_path, fal, concurrency=2), "workers=1"])
    ids = [m.submit(ROUTE, {"prompt": f"p{i}"}) for i in range(6)]
    until(lambda: len(fal.submissions) == 2, "two submissions")
    time.sleep(0.5)  # room for a third, were the bound not kept
    assert len(fal.submissions) == 2
    st = m.status(ROUTE, ids[-1])
    assert st["status"] == "queued" and "concurrency" in st["waiting_for"], st
    assert 'renderfs_remote_in_flight{route="%s"} 2' % ROUTE in stats(m)
    fal.hold = False
    for jid in ids:
        assert m.wait(ROUTE, jid) == "complete"
    assert fal.max_outstanding == 2 and len(fal.submissions) == 6


def test_failing_service_holds_no_worker(mount_factory, tmp_path, fal):
    """With workers=1, a synth job completes while a remote job waits
    between attempts (a retry is a time in the queue, not a thread)."""
    fal.fail_submit = 503
    m = mount_factory([models(tmp_path, fal, breaker=100), "workers=1", "max_attempts=10"])
    rj = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: m.status(ROUTE, rj)["retry_at"] is not None, "a delayed retry")
    sj = m.submit(SYNTH, {"prompt": "meanwhile", "width": 64, "height": 64})
    assert m.wait(SYNTH, sj, timeout=30) == "complete"
    st = m.status(ROUTE, rj)
    assert st["status"] in ("queued", "running") and st["error"] is None
    fal.fail_submit = None
    assert m.wait(ROUTE, rj, timeout=60) == "complete"
    assert len(fal.submissions) == 1  # the refused ones were never queued


def breaker_state(m, fal):
    """The state of the fake service's breaker (the built-in fal routes
    have breakers of their own)."""
    target = re.escape(f"{fal.base}/fal-ai/fake/image")
    g = re.search(r'renderfs_breaker_state\{backend="fal",target="' + target + r'"\} (\d)',
                  stats(m))
    return int(g.group(1))


def test_breaker_opens_holds_jobs_and_closes(mount_factory, tmp_path, fal):
    fal.fail = 503
    m = mount_factory([models(tmp_path, fal, breaker=2, breaker_s=1), "max_attempts=2"])
    ids = [m.submit(ROUTE, {"prompt": f"p{i}"}) for i in range(4)]
    until(lambda: breaker_state(m, fal) == 1, "the breaker open")
    assert f'target="{fal.base}/fal-ai/fake/image"' in stats(m)
    queued = [m.status(ROUTE, j) for j in ids]
    assert all(s["status"] in ("queued", "running") for s in queued), queued

    def held():
        # Jobs claimed with the ones that opened it come back to the
        # queue as their own runs meet the open breaker.
        return any(s["status"] == "queued" and s["waiting_for"]
                   and "circuit breaker" in s["waiting_for"]
                   for s in (m.status(ROUTE, j) for j in ids))
    until(held, "a job held in the queue by the breaker")
    # It stays open and probes: jobs wait, none fails, however long.
    time.sleep(3)
    assert all(m.status(ROUTE, j)["status"] in ("queued", "running") for j in ids)
    logs = "".join((m.job(ROUTE, j) / "log").read_text() for j in ids)
    assert "circuit breaker is open until" in logs
    fal.fail = None
    for jid in ids:
        assert m.wait(ROUTE, jid, timeout=60) == "complete"
    assert breaker_state(m, fal) == 0, stats(m)
    assert len(fal.submissions) == 4


def test_cancel_reaches_the_service(mount_factory, tmp_path, fal):
    fal.hold = True
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: "fal: loading model" in (m.job(ROUTE, jid) / "log").read_text(),
          "the job in progress at the service")
    (m.job(ROUTE, jid) / "ctl").write_text("cancel\n")
    assert m.wait(ROUTE, jid) == "cancelled"
    assert fal.cancels == [fal.submissions[0][0]]
    assert "cancel of request req-1: CANCELLATION_REQUESTED" in (
        m.job(ROUTE, jid) / "log").read_text()


def test_rmdir_of_a_running_job_waits_for_its_run_holding_no_thread(mount_factory, tmp_path,
                                                                   fal):
    """rmdir of a running job cancels it and is answered once the run has
    let go (a remote run: once the service has answered the cancel).
    Meanwhile no request thread of the daemon waits for it: with one
    (max_threads=1) the mount answers while the service holds the cancel.
    Held past the bound, the rmdir fails with EBUSY and the job stays;
    once cancelled, the next rmdir deletes it."""
    fal.hold = True
    fal.cancel_gate = gate = threading.Event()
    m = mount_factory([models(tmp_path, fal), "max_threads=1"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    job = m.job(ROUTE, jid)
    until(lambda: "fal: loading model" in (job / "log").read_text(),
          "the job in progress at the service")
    answer = {}

    def rm():
        try:
            os.rmdir(job)
            answer["errno"] = 0
        except OSError as e:
            answer["errno"] = e.errno
        answer["at"] = time.monotonic()

    t = threading.Thread(target=rm)
    try:
        t.start()
        until(lambda: fal.cancels, "the cancel at the service")
        # Answered while the rmdir waits, by the one request thread.
        assert f'renderfs_jobs{{route="{ROUTE}",status="running"}} 1' in stats(m)
        read_at = time.monotonic()
        t.join(30)
        assert read_at < answer["at"], "the mount answered only after the rmdir"
        assert answer["errno"] == errno.EBUSY, answer
        assert job.is_dir()
    finally:
        gate.set()
        t.join(30)
    assert m.wait(ROUTE, jid) == "cancelled"
    assert fal.cancels == [fal.submissions[0][0]] and len(fal.submissions) == 1
    os.rmdir(job)
    assert not job.exists() and jid not in os.listdir(m.path / ROUTE)


def test_rmdir_of_a_running_job_deletes_it_once_cancelled(mount_factory, tmp_path, fal):
    fal.hold = True
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    job = m.job(ROUTE, jid)
    until(lambda: "fal: loading model" in (job / "log").read_text(),
          "the job in progress at the service")
    os.rmdir(job)
    assert not job.exists() and jid not in os.listdir(m.path / ROUTE)
    assert fal.cancels == [fal.submissions[0][0]] and len(fal.submissions) == 1
    counts = stats(m)
    assert f'renderfs_jobs{{route="{ROUTE}",status="running"}} 0' in counts
    assert f'renderfs_jobs{{route="{ROUTE}",status="cancelled"}} 0' in counts


def test_deadline_cancels_at_the_service(mount_factory, tmp_path, fal):
    fal.hold = True
    m = mount_factory([models(tmp_path, fal, timeout_s=1)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    assert m.status(ROUTE, jid)["error"]["code"] == "timeout"
    assert fal.cancels == ["req-1"]


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_restart_follows_the_request_and_never_resubmits(mount_factory, tmp_path, fal, how):
    """The daemon stops (or is killed with SIGKILL) while the request is
    IN_PROGRESS at fal: the next mount follows it, never submits again."""
    fal.hold = True
    opts = [models(tmp_path, fal)]
    m = mount_factory(opts)
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: "fal: denoising 3/12" in (m.job(ROUTE, jid) / "log").read_text(),
          "the job in progress at the service")
    m.stop() if how == "stop" else m.kill()
    fal.hold = False
    m2 = mount_factory(opts, store=m.store, name="mnt2")
    assert m2.wait(ROUTE, jid) == "complete"
    assert len(fal.submissions) == 1 and fal.cancels == []
    log = (m2.job(ROUTE, jid) / "log").read_text()
    assert "following request req-1" in log
    assert log.count("fal: loading model") == 1  # seen before the restart: not again
    assert (m2.job(ROUTE, jid) / "output.png").read_bytes() == fal.output("req-1")


def test_submission_of_unknown_fate_is_not_sent_again(mount_factory, tmp_path, fal):
    """The daemon dies after sending a submission and before fal's answer:
    whether fal queued it is unknown, so the job ends `interrupted` and
    nothing is sent again."""
    fal.submit_delay = 3
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: len(fal.submissions) == 1, "the submission at the service")
    m.kill()
    fal.submit_delay = 0
    m2 = mount_factory([models(tmp_path, fal)], store=m.store, name="mnt2")
    assert m2.wait(ROUTE, jid) == "error"
    st = m2.status(ROUTE, jid)
    assert st["error"]["code"] == "interrupted" and "not sent again" in st["error"]["message"]
    assert len(fal.submissions) == 1


def test_job_credentials_are_used_and_never_leave(mount_factory, tmp_path, fal, renderctl):
    """A job's own key (envelope `credentials`, SPEC §7) reaches the service
    in its header and nowhere else: not in any file of the mount, the
    daemon's log, stats, or any file of the store (sealed there, and wiped
    when the job ends)."""
    entry = fal.route(key_env="RENDERFS_TEST_NO_SUCH_KEY")
    del entry["key"]
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {ROUTE: entry}}))
    m = mount_factory([f"models={p}"])
    # Without a key of its own the route cannot run.
    bare = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, bare) == "error"
    assert m.status(ROUTE, bare)["error"]["code"] == "backend_not_configured"
    assert "credentials" in m.status(ROUTE, bare)["error"]["message"]
    jid = m.submit(ROUTE, {"input": {"prompt": "y"}, "credentials": {"key": FakeFal.KEY}})
    assert m.wait(ROUTE, jid) == "complete"
    assert fal.submissions[-1][2]["Authorization"] == "Key " + FakeFal.KEY
    secret = FakeFal.KEY.encode()
    seen = []
    for root in (m.path, m.store):
        for f in root.rglob("*"):
            if f.is_file() and not f.name.endswith("output.png"):
                try:
                    if secret in f.read_bytes():
                        seen.append(str(f))
                except OSError:
                    pass
    assert seen == [], seen
    assert FakeFal.KEY not in m.log()
    m.stop()
    r = renderctl("fsck", str(m.store))
    assert r.returncode == 0, r.stdout + r.stderr


def test_credentials_a_backend_does_not_take_are_refused(mount_factory, tmp_path, fal):
    import errno
    m = mount_factory([models(tmp_path, fal)])
    e, line = m.submit_err(SYNTH, json.dumps(
        {"input": {"prompt": "x"}, "credentials": {"key": "k-123"}}).encode() + b"\n")
    assert e == errno.EINVAL and "the synth backend" in line and "k-123" not in line
    e, line = m.submit_err(ROUTE, json.dumps(
        {"input": {"prompt": "x"}, "credentials": {"token": "k-123"}}).encode() + b"\n")
    assert e == errno.EINVAL and "credentials.token" in line and "k-123" not in line


def test_remote_position_progress_and_provenance(mount_factory, tmp_path, fal):
    """fal's queue position is the job's `position` while it waits there;
    a step count in fal's log is its progress; the manifest names fal's
    request id; the submission carries what is left of the deadline."""
    fal.queue_polls = 1000  # in fal's queue, moving up each poll
    fal.hold = True
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    job = m.job(ROUTE, jid)
    until(lambda: "in its queue at position" in (job / "log").read_text(), "queued at fal")
    pos = (job / "position").read_text().strip()
    st = m.status(ROUTE, jid)
    assert st["status"] == "running" and pos.isdigit() and int(pos) < 1000, (pos, st)
    assert isinstance(st["position"], int)
    fal.queue_polls = 0  # out of the queue, working
    until(lambda: (job / "position").read_text() == "", "position cleared")
    until(lambda: (job / "progress").read_text() == "0.25\n", "progress from 3/12")
    assert m.status(ROUTE, jid)["position"] is None
    fal.hold = False
    assert m.wait(ROUTE, jid) == "complete"
    assert (job / "progress").read_text() == "1\n"
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["remote_request_id"] == "req-1"
    timeout = int(fal.submissions[0][2]["X-Fal-Request-Timeout"])
    assert 1 <= timeout <= 60


def test_several_files_and_the_result(mount_factory, tmp_path, fal, renderctl):
    """A result with several files gives output.png, output.1.png, ... in
    the service's order, each signed; result.json keeps the whole result
    with each file URL as cas:<hex>; status.json lists them all."""
    fal.images = 3
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "three owls"})
    assert m.wait(ROUTE, jid) == "complete", (m.job(ROUTE, jid) / "log").read_text()
    job = m.job(ROUTE, jid)
    names = sorted(p.name for p in job.iterdir())
    for n in ("output.png", "output.1.png", "output.2.png", "output.1.png.minisig",
              "output.2.png.minisig", "result.json"):
        assert n in names, names
    files = [job / "output.png", job / "output.1.png", job / "output.2.png"]
    assert [f.read_bytes() for f in files] == [fal.output("req-1", k) for k in range(3)]
    st = m.status(ROUTE, jid)
    assert [o["name"] for o in st["outputs"]] == ["output.png", "output.1.png", "output.2.png"]
    assert st["outputs"][0] == st["output"]
    result = json.loads((job / "result.json").read_text())
    assert result["seed"] == 42 and result["has_nsfw_concepts"] == [False] * 3
    assert [i["url"] for i in result["images"]] == ["cas:" + o["blake3"] for o in st["outputs"]]
    manifest = json.loads((job / "manifest.json").read_text())
    assert [o["blake3"] for o in manifest["outputs"]] == [o["blake3"] for o in st["outputs"]]
    r = renderctl("verify", str(job / "output.2.png"))
    assert r.returncode == 0, r.stdout + r.stderr
    for o in st["outputs"]:
        assert (m.path / "cas" / o["blake3"]).read_bytes() == (job / o["name"]).read_bytes()
    subprocess.run(["rm", "-r", str(job)], check=True)
    assert not job.exists()
    for o in st["outputs"]:
        assert not (m.path / "cas" / o["blake3"]).exists()
    m.stop()
    r = renderctl("fsck", str(m.store))
    assert r.returncode == 0, r.stdout + r.stderr


def test_several_files_appear_to_inotify_before_complete(mount_factory, tmp_path, fal):
    """Each output file is created (IN_CREATE) before `status` says
    complete, the extra ones as the first (SPEC §3, §4)."""
    from test_notify import Watch
    fal.images, fal.hold = 2, True
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "two"})
    job = m.job(ROUTE, jid)
    until(lambda: "fal: loading model" in (job / "log").read_text(), "in progress")
    w = Watch(job)
    try:
        fal.hold = False
        assert m.wait(ROUTE, jid) == "complete"
        first = w.index("output.png", "CREATE")
        extra = w.index("output.1.png", "CREATE")
        # `complete` is announced after both (status changes last).
        w.wait_for(lambda e: e[2] == "status" and "CLOSE_WRITE" in e[1]
                   and w.events.index(e) > max(first, extra), what="status after the outputs")
    finally:
        w.proc.kill()


def test_faults_a_retry_can_save_never_fail_a_job(mount_factory, tmp_path, fal):
    """503 with Retry-After and a garbled answer on status, 429 on the
    result, a download cut short: the job completes, submitted once (a
    later attempt follows the same request)."""
    fal.status_503, fal.status_garbled, fal.result_429, fal.files_cut = 2, 2, 1, 1
    m = mount_factory([models(tmp_path, fal), "max_attempts=5"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid, timeout=90) == "complete", (m.job(ROUTE, jid) / "log").read_text()
    assert len(fal.submissions) == 1
    assert (m.job(ROUTE, jid) / "output.png").read_bytes() == fal.output("req-1")
    log = (m.job(ROUTE, jid) / "log").read_text()
    assert "status not available" in log and "not a status object" in log
    assert "following request req-1" in log  # the attempt after the 429 or the cut
    assert (fal.status_503, fal.status_garbled, fal.result_429, fal.files_cut) == (0, 0, 0, 0)


def test_faults_no_retry_can_save_end_the_job_at_once(mount_factory, tmp_path, fal):
    """A wrong key is backend_auth and a file over max_output is
    output_invalid: not retried, and the key is in no message."""
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {
        ROUTE: fal.route(key="sk-wrong-0123456789"),
        "image/fake/default/small": fal.route(max_output=1000)}}))
    m = mount_factory([f"models={p}", "max_attempts=5"])
    a = m.submit(ROUTE, {"prompt": "x"})
    fal.file_size = 5000
    b = m.submit("image/fake/default/small", {"prompt": "y"})
    assert m.wait(ROUTE, a) == "error" and m.wait("image/fake/default/small", b) == "error"
    sa, sb = m.status(ROUTE, a), m.status("image/fake/default/small", b)
    assert sa["error"]["code"] == "backend_auth" and sa["attempts"] == 1
    assert "sk-wrong" not in json.dumps(sa) and "sk-wrong" not in m.log()
    assert "sk-wrong" not in (m.job(ROUTE, a) / "log").read_text()
    assert sb["error"]["code"] == "output_invalid" and sb["attempts"] == 1
    assert "1000 bytes" in sb["error"]["message"]


def test_connection_refused_is_retried_and_never_interrupted(mount_factory, tmp_path, fal):
    """No connection at all: nothing reached the service, so the attempt
    is retried (backend_unavailable) and the submission is not of unknown
    fate (never `interrupted`)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": {ROUTE: fal.route(base_url=f"http://127.0.0.1:{port}",
                                                         breaker=100)}}))
    m = mount_factory([f"models={p}", "max_attempts=2"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid, timeout=60) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "backend_unavailable" and st["attempts"] == 2, st
    assert f"127.0.0.1:{port}" in st["error"]["message"]
    assert "retrying" in (m.job(ROUTE, jid) / "log").read_text()


def test_hang_and_reset_on_status_are_asked_again(mount_factory, tmp_path, fal):
    """A status answer that never comes (request_timeout_s) and one cut
    mid-body (the connection reset) are asked again in the same attempt."""
    fal.status_hang, fal.status_reset = 1, 1
    m = mount_factory([models(tmp_path, fal, request_timeout_s=1), "max_attempts=1"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid, timeout=60) == "complete", (m.job(ROUTE, jid) / "log").read_text()
    assert len(fal.submissions) == 1 and (fal.status_hang, fal.status_reset) == (0, 0)
    log = (m.job(ROUTE, jid) / "log").read_text()
    assert log.count("status not available") == 2, log
    assert re.search(r"status not available \(GET http://127\.0\.0\.1:\d+/fal-ai/fake/requests/"
                     r"req-1/status: Timeout", log), log


def test_deadline_at_fal_is_the_jobs_timeout(mount_factory, tmp_path, fal):
    """504 with X-Fal-Request-Timeout-Type: user: fal stopped the work at
    the deadline we gave it; not a busy service, not retried."""
    fal.deadline_504 = 1
    m = mount_factory([models(tmp_path, fal), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "timeout" and st["attempts"] == 1, st
    assert "X-Fal-Request-Timeout" in st["error"]["message"]
    assert len(fal.submissions) == 1


def test_forbidden_is_backend_auth(mount_factory, tmp_path, fal):
    fal.fail_submit = 403
    m = mount_factory([models(tmp_path, fal), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "backend_auth" and st["attempts"] == 1, st


def test_signed_query_strings_are_masked(mount_factory, tmp_path, fal):
    """A file URL signed in its query string (S3/GCS style) fails: the
    messages name the file, never its signature."""
    secret = "Zm9vYmFyc2VjcmV0c2lnbmF0dXJl"
    fal.file_query = f"?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={secret}"
    fal.file_404 = 1
    m = mount_factory([models(tmp_path, fal)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert "/files/req-1.png" in st["error"]["message"], st
    for text in (json.dumps(st), (m.job(ROUTE, jid) / "log").read_text(), m.log(), stats(m)):
        assert secret not in text and "AKIAEXAMPLE" not in text
