"""SPEC §13: webhooks. Deliveries follow Standard Webhooks, so stock
verifiers accept them: the npm package `standardwebhooks` checks `v1`
(HMAC-SHA256 with the owner's webhook.secret) and PyNaCl checks `v1a`
(Ed25519 with webhook.pub). A pending delivery is durable with the change
it reports: it survives kill -9 and keeps its webhook-id."""
import base64
import errno
import json
import os
import re
import subprocess
import time

import pytest

from conftest import IMAGE, SMALL, VIDEO, need, npm_install, until
from fakehook import Hook

nacl_signing = pytest.importorskip("nacl.signing", reason="python3-nacl is not installed "
                                   "(contrib/install-deps installs it)")

NOBODY = 65534
ALL = ["start", "progress", "output", "completed"]

VERIFY_JS = r"""
const { Webhook } = require("standardwebhooks");
let input = "";
process.stdin.on("data", d => input += d);
process.stdin.on("end", () => {
  const out = [];
  for (const c of JSON.parse(input)) {
    try {
      new Webhook(c.secret).verify(Buffer.from(c.body, "base64").toString("utf8"), c.headers);
      out.push("ok");
    } catch (e) {
      out.push("fail: " + e.message);
    }
  }
  process.stdout.write(JSON.stringify(out));
});
"""


@pytest.fixture(scope="module")
def sw_verify(tmp_path_factory):
    """v1 verification by the npm package standardwebhooks."""
    d = npm_install(tmp_path_factory.mktemp("standardwebhooks"), "standardwebhooks@1")
    (d / "verify.js").write_text(VERIFY_JS)

    def verify(cases):
        """cases: (secret, headers, body bytes); returns 'ok' or 'fail: ...' each."""
        data = [{"secret": s, "headers": {k: h[k] for k in
                                          ("webhook-id", "webhook-timestamp",
                                           "webhook-signature")},
                 "body": base64.b64encode(b).decode()} for s, h, b in cases]
        r = subprocess.run(["node", "verify.js"], cwd=d, input=json.dumps(data),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    return verify


def v1a_ok(pub, req, body=None):
    """Verify the v1a signature of a request with PyNaCl."""
    assert pub.startswith("whpk_")
    key = nacl_signing.VerifyKey(base64.b64decode(pub[5:]))
    h = req["headers"]
    msg = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + (
        req["body"] if body is None else body)
    sigs = [s[4:] for s in h["webhook-signature"].split() if s.startswith("v1a,")]
    assert len(sigs) == 1, h["webhook-signature"]
    try:
        key.verify(msg, base64.b64decode(sigs[0]))
        return True
    except Exception:
        return False


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def envelope(hook, prompt, events=None, route_input=None, **kw):
    e = {"input": route_input or {"prompt": prompt, **SMALL}, "webhook": hook.url, **kw}
    if events:
        e["webhook_events"] = events
    return e


def body(req):
    return json.loads(req["body"])


def for_job(reqs, jid, event=None):
    return [r for r in reqs if body(r)["data"]["id"] == jid
            and (event is None or body(r)["type"] == "job." + event)]


def stats(m):
    out = {}
    for line in (m.path / "stats").read_text().splitlines():
        mm = re.match(r'renderfs_webhook_(\w+?)(?:\{outcome="(\w+)"\})? (\d+)$', line)
        if mm:
            out[mm.group(1) + ("." + mm.group(2) if mm.group(2) else "")] = int(mm.group(3))
    return out


def test_deliveries_verify_with_stock_libraries(mnt, hook, sw_verify):
    m = mnt
    jid = m.submit(IMAGE, envelope(hook, "signed", ALL))
    m.wait(IMAGE, jid)
    # Deliveries go out in parallel: they may arrive in any order. Once
    # none is pending, each was received (the receiver keeps a request
    # before it answers) and recorded.
    hook.wait_for(lambda r: for_job(r, jid, "completed") and for_job(r, jid, "output"),
                  "job.output and job.completed")
    until(lambda: stats(m)["backlog"] == 0, "every delivery recorded")
    reqs = hook.wait_for(lambda r: True, "the requests")
    secret = (m.path / "webhook.secret").read_text().strip()
    pub = (m.path / "webhook.pub").read_text().strip()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    # In the order of the changes they report (their timestamps): start
    # first, the output before the completion.
    order = ["job.start", "job.progress", "job.output", "job.completed"]
    types = [body(r)["type"] for r in sorted(for_job(reqs, jid), key=lambda r: (
        body(r)["timestamp"], order.index(body(r)["type"])))]
    assert types[0] == "job.start" and types.index("job.output") < types.index("job.completed") \
        and set(types) <= {"job.start", "job.progress", "job.output", "job.completed"}, types
    assert types.count("job.output") == types.count("job.completed") == 1, types
    for r in reqs:
        h = r["headers"]
        assert r["path"] == "/hook" and h["content-type"] == "application/json"
        assert h["webhook-id"].startswith("msg_") and "." not in h["webhook-id"]
        assert abs(int(h["webhook-timestamp"]) - time.time()) < 300
        b = body(r)
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", b["timestamp"])
    done = body(for_job(reqs, jid, "completed")[0])["data"]
    assert done["status"] == "complete" and done["id"] == jid
    assert done == m.status(IMAGE, jid)  # data is status.json
    assert len({r["headers"]["webhook-id"] for r in reqs}) == len(reqs)
    # Both signatures verify; a body changed by one byte fails both.
    assert sw_verify([(secret, r["headers"], r["body"]) for r in reqs]) == ["ok"] * len(reqs)
    assert all(v1a_ok(pub, r) for r in reqs)
    fin = for_job(reqs, jid, "completed")[0]
    tampered = fin["body"].replace(b'"complete"', b'"Complete"')
    assert tampered != fin["body"]
    assert sw_verify([(secret, fin["headers"], tampered)])[0].startswith("fail")
    assert not v1a_ok(pub, fin, tampered)
    # Another secret does not verify it either.
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    assert sw_verify([(other, fin["headers"], fin["body"])])[0].startswith("fail")
    # The job's webhooks file lists each delivery and its attempt.
    text = (m.job(IMAGE, jid) / "webhooks").read_text()
    for r in reqs:
        assert re.search(re.escape(r["headers"]["webhook-id"]) + r" job\.\w+ \S+ delivered "
                         r"attempts=1\n", text), text
    assert text.count(" http=200 ") == len(reqs), text
    st = stats(m)
    assert st["attempts_total.delivered"] == len(reqs) and st["backlog"] == 0, st
    # The secret is nowhere else: not in the log, stats or the job's files.
    assert secret[6:] not in m.log() and secret[6:] not in (m.path / "stats").read_text()
    for f in os.listdir(m.job(IMAGE, jid)):
        if not f.startswith("output"):
            assert secret[6:] not in (m.job(IMAGE, jid) / f).read_text(errors="replace")


def test_default_event_is_completed_and_jobs_without_webhook_have_none(mnt, hook):
    m = mnt
    jid = m.submit(IMAGE, envelope(hook, "default events"))
    plain = m.submit(IMAGE, {"prompt": "no hook", **SMALL})
    m.wait(IMAGE, jid)
    m.wait(IMAGE, plain)
    reqs = hook.wait_for(lambda r: for_job(r, jid, "completed"), "job.completed")
    time.sleep(0.5)
    assert [body(r)["type"] for r in hook.requests] == ["job.completed"]
    assert "webhooks" in os.listdir(m.job(IMAGE, jid))
    assert "webhooks" not in os.listdir(m.job(IMAGE, plain))
    assert reqs


def test_refused_webhooks(mnt, hook):
    m = mnt
    bad = [
        ({"webhook": "ftp://127.0.0.1/x"}, "http:// or https://"),
        ({"webhook": 42}, "URL string"),
        ({"webhook": "http://127.0.0.1/a b"}, "spaces"),
        ({"webhook": "http://x/" + "a" * 3000}, "bytes"),
        ({"webhook": hook.url, "webhook_events": ["finished"]}, "webhook_events"),
        ({"webhook": hook.url, "webhook_events": []}, "webhook_events"),
        ({"webhook_events": ["start"]}, "without a 'webhook'"),
    ]
    for extra, words in bad:
        req = {"input": {"prompt": "x", **SMALL}, **extra}
        err, line = m.submit_err(IMAGE, json.dumps(req).encode() + b"\n")
        assert err == errno.EINVAL and words in line, (extra, line)


def test_retry_across_kill_keeps_the_webhook_id(mount_factory, hook):
    """500, then kill -9 of the daemon, then 200 after the restart: one 2xx
    delivery, the same webhook-id on both attempts."""
    opts = ["workers=1", "webhook_retry=2s"]
    m = mount_factory(opts)
    hook.answers = [(500, {})]
    jid = m.submit(IMAGE, envelope(hook, "kill between"))
    m.wait(IMAGE, jid)
    hook.wait_for(lambda r: len(r) == 1, "the first attempt")
    until(lambda: "http=500" in (m.job(IMAGE, jid) / "webhooks").read_text(),
          "the first attempt recorded")
    m.kill()
    m2 = mount_factory(opts, store=m.store, name="mnt2")
    reqs = hook.wait_for(lambda r: len(r) >= 2, "the second attempt")
    time.sleep(2.5)  # a third would come 2 s after a failed second
    reqs = list(hook.requests)
    assert [r["status"] for r in reqs] == [500, 200]
    assert reqs[0]["headers"]["webhook-id"] == reqs[1]["headers"]["webhook-id"]
    assert reqs[0]["body"] == reqs[1]["body"]
    text = (m2.job(IMAGE, jid) / "webhooks").read_text()
    assert " delivered attempts=2\n" in text and "http=500 HTTP 500" in text, text


def test_given_up_then_redeliver(mount_factory, hook):
    m = mount_factory(["webhook_retry=1s+1s"])
    hook.default = 503
    jid = m.submit(IMAGE, envelope(hook, "give up"))
    m.wait(IMAGE, jid)
    hook.wait_for(lambda r: len(r) == 3, "three attempts")
    until(lambda: " given up attempts=3" in (m.job(IMAGE, jid) / "webhooks").read_text(),
          "given up")
    time.sleep(1.5)
    assert len(hook.requests) == 3
    assert stats(m)["deliveries_ended_total.given_up"] == 1
    hook.default = 200
    with open(m.job(IMAGE, jid) / "ctl", "w") as f:
        f.write("redeliver\n")
    reqs = hook.wait_for(lambda r: len(r) == 4, "the redelivery")
    assert reqs[3]["status"] == 200
    assert len({r["headers"]["webhook-id"] for r in reqs}) == 1
    until(lambda: " delivered attempts=4" in (m.job(IMAGE, jid) / "webhooks").read_text(),
          "delivered after redeliver")
    # Nothing left to redeliver.
    with pytest.raises(OSError) as ei:
        with open(m.job(IMAGE, jid) / "ctl", "w") as f:
            f.write("redeliver\n")
    assert ei.value.errno == errno.EALREADY


def test_410_stops_and_retry_after_is_honoured(mount_factory, hook):
    m = mount_factory(["webhook_retry=1h"])
    hook.answers = [(410, {})]
    gone = m.submit(IMAGE, envelope(hook, "gone"))
    m.wait(IMAGE, gone)
    until(lambda: " gone attempts=1" in (m.job(IMAGE, gone) / "webhooks").read_text(),
          "gone after 410")
    assert stats(m)["deliveries_ended_total.gone"] == 1
    # The schedule says an hour; the receiver asks for 1 s.
    hook.answers = [(503, {"Retry-After": "1"})]
    later = m.submit(IMAGE, envelope(hook, "retry after"))
    m.wait(IMAGE, later)
    reqs = hook.wait_for(lambda r: len(for_job(r, later)) == 2, "the retry after 1 s",
                         timeout=10)
    first, second = for_job(reqs, later)
    assert 0.9 <= second["at"] - first["at"] < 5, second["at"] - first["at"]
    assert second["status"] == 200
    assert len(for_job(hook.requests, gone)) == 1


def test_redirects_are_not_followed_and_deny_net_applies(mount_factory, hook):
    other = Hook()
    try:
        m = mount_factory(["webhook_retry=1h"])
        hook.answers = [(307, {"Location": other.url})]
        jid = m.submit(IMAGE, envelope(hook, "redirect"))
        m.wait(IMAGE, jid)
        until(lambda: "redirects are not followed" in
              (m.job(IMAGE, jid) / "webhooks").read_text(), "the 307 attempt recorded")
        assert other.requests == []
        m.stop()
        d = mount_factory(["webhook_retry=1h", "deny_net=127.0.0.0/8"], name="denied")
        jid = d.submit(IMAGE, envelope(other, "denied"))
        d.wait(IMAGE, jid)
        until(lambda: " pending attempts=1" in (d.job(IMAGE, jid) / "webhooks").read_text(),
              "the denied attempt recorded")
        text = (d.job(IMAGE, jid) / "webhooks").read_text()
        assert "deny_net" in text, text
        assert other.requests == []
    finally:
        other.close()


def test_progress_at_most_every_2s(mnt, hook):
    m = mnt
    jid = m.submit(VIDEO, envelope(hook, "p", ["progress", "completed"], route_input={
        "prompt": "p", "width": 320, "height": 192, "num_frames": 300, "seed": 4}))
    m.wait(VIDEO, jid, timeout=120)
    reqs = hook.wait_for(lambda r: for_job(r, jid, "completed"), "job.completed")
    prog = [body(r) for r in for_job(reqs, jid, "progress")]
    st = m.status(VIDEO, jid)
    ran = (time.mktime(time.strptime(st["completed_at"][:19], "%Y-%m-%dT%H:%M:%S"))
           - time.mktime(time.strptime(st["started_at"][:19], "%Y-%m-%dT%H:%M:%S")))
    assert prog, "no progress event"
    assert len(prog) <= ran / 2 + 2, (len(prog), ran)
    times = [time.mktime(time.strptime(b["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
             + float("0" + b["timestamp"][19:-1]) for b in prog]
    assert all(b - a >= 1.99 for a, b in zip(times, times[1:])), times


def test_secret_is_per_uid(mount_factory, tmp_path, hook, sw_verify):
    os.chmod(tmp_path, 0o755)
    m = mount_factory(["allow_other"])
    mine = (m.path / "webhook.secret").read_text()
    r = subprocess.run([need("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        "--clear-groups", "bash", "-c",
                        "stat -c '%u %a' webhook.secret && cat webhook.secret && "
                        "exec 3<>image/synth/default/t2i/new && echo '"
                        + json.dumps(envelope(hook, "theirs")) + "' >&3 && "
                        "read id <&3 && echo $id"],
                       cwd=m.path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    owner_mode, theirs, jid = r.stdout.splitlines()
    assert owner_mode == f"{NOBODY} 400"
    assert theirs.startswith("whsec_") and theirs != mine.strip()
    st = os.stat(m.path / "webhook.secret")
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o400
    assert (m.path / "webhook.secret").read_text() == mine  # stable
    m.wait(IMAGE, jid)
    req = hook.wait_for(lambda r: for_job(r, jid, "completed"), "nobody's delivery")[0]
    assert sw_verify([(theirs, req["headers"], req["body"]),
                      (mine.strip(), req["headers"], req["body"])])[0] == "ok"
    assert sw_verify([(mine.strip(), req["headers"], req["body"])])[0].startswith("fail")


def test_backlog_survives_a_receiver_down_for_30s(mount_factory, hook):
    """1,000 jobs with webhooks while the receiver is down for 30 s: every
    completion is delivered once it is up, none twice, none lost, and the
    daemon's memory does not grow with the backlog."""
    n = 1000
    # Under AddressSanitizer, freed memory waits in a quarantine of up to
    # 256 MiB before it is reused, which reads as growth: measured without.
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS"),
                                                 "quarantine_size_mb=0"]))
    m = mount_factory(["webhook_retry=" + "+".join(["2s"] * 24)], env=env)
    hook.down()
    t_down = time.monotonic()
    reqs = b"".join(json.dumps(envelope(hook, f"b{i}")).encode() + b"\n" for i in range(n))
    fd = os.open(m.route(IMAGE) / "new", os.O_RDWR)
    try:
        os.write(fd, reqs)
        ids = []
        buf = b""
        while len(ids) < n:
            buf += os.read(fd, 65536)
            *lines, buf = buf.split(b"\n")
            ids += [x.decode() for x in lines]
    finally:
        os.close(fd)
    assert len(ids) == n and not any(i.startswith("error") for i in ids)

    def rss_kb():
        for line in open(f"/proc/{m.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    until(lambda: all((m.job(IMAGE, j) / "status").read_text() == "complete\n"
                      for j in ids), "all jobs complete", timeout=120)
    until(lambda: stats(m)["backlog"] == n, "the backlog of 1,000")
    rss_backlog = rss_kb()
    time.sleep(max(0, 30 - (time.monotonic() - t_down)))
    assert stats(m)["backlog"] == n and hook.requests == []
    hook.up()
    got = hook.wait_for(lambda r: len({body(x)["data"]["id"] for x in r}) == n,
                        "every job's completion delivered", timeout=120)
    until(lambda: stats(m)["backlog"] == 0, "the backlog emptied")
    time.sleep(1)
    got = list(hook.requests)
    assert len(got) == n, f"{len(got) - n} deliveries more than once"
    assert sorted(body(r)["data"]["id"] for r in got) == sorted(ids)
    assert len({r["headers"]["webhook-id"] for r in got}) == n
    assert stats(m)["attempts_total.delivered"] == n
    grown = rss_kb() - rss_backlog
    assert grown < 16 * 1024, f"RSS grew {grown} KiB while delivering the backlog"
