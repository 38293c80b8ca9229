"""The Replicate and openai-images backends (SPEC §8) against fakes written
from the services' documentation (fakereplicate.py, fakeopenai.py): each
protocol end to end, every final state, the error shapes, several
outputs, cancellation, and paid work never sent twice."""

import json
import time

import pytest

from fakeopenai import FakeOpenAI
from fakereplicate import FakeReplicate
from conftest import until

ROUTE = "image/rep/default/t2i"
OAI = "image/oai/default/t2i"


@pytest.fixture
def rep():
    f = FakeReplicate()
    yield f
    f.close()


def models(tmp_path, routes):
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": routes}))
    return f"models={p}"


def log_of(m, route, jid):
    return (m.job(route, jid) / "log").read_text()


# ---- Replicate ----

def test_replicate_prediction_end_to_end(mount_factory, tmp_path, rep, renderctl):
    m = mount_factory([models(tmp_path, {ROUTE: rep.route()})])
    jid = m.submit(ROUTE, {"prompt": "a heron", "seed": 3})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    assert len(rep.creates) == 1
    pid, path, body, headers = rep.creates[0]
    assert path == "/v1/models/acme/painter/predictions"
    assert body == {"input": {"prompt": "a heron", "seed": 3}}
    assert headers["Authorization"] == "Bearer " + FakeReplicate.KEY
    after = headers["Cancel-After"]
    assert after.endswith("s") and 5 <= int(after[:-1]) <= 60
    job = m.job(ROUTE, jid)
    assert (job / "output.png").read_bytes() == rep.output(pid)
    log = log_of(m, ROUTE, jid)
    # logs is one growing string: each line once; a line redrawn with \r
    # is logged as it was last drawn.
    for line in ("replicate: loading weights", "replicate:  50%|#####     | 2/4",
                 "replicate: 100%|##########| 4/4", "replicate: saving"):
        assert log.count(line + "\n") == 1, log
    assert "0/4" not in log
    assert "1.250 s of predict_time" in log
    result = json.loads((job / "result.json").read_text())
    st = m.status(ROUTE, jid)
    assert result["output"] == "cas:" + st["output"]["blake3"]
    assert result["metrics"]["predict_time"] == 1.25
    assert st["usage"] == {"device": "remote:replicate", "seconds": 1.25}  # the ledger's
    assert "input" not in result and "logs" not in result
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["backend"] == "replicate" and manifest["remote_request_id"] == pid
    assert manifest["model_version"] == "v-abc123"
    assert renderctl("verify", str(job / "output.png")).returncode == 0
    for text in (log, (job / "status.json").read_text(), (m.path / "stats").read_text(),
                 m.log(), (job / "result.json").read_text()):
        assert FakeReplicate.KEY not in text


def test_replicate_by_version_and_several_outputs(mount_factory, tmp_path, rep):
    rep.outputs = 3
    route = rep.route(version="5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa")
    del route["model"]
    m = mount_factory([models(tmp_path, {ROUTE: route})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    pid, path, body, _ = rep.creates[0]
    assert path == "/v1/predictions"
    assert body["version"] == route["version"] and body["input"]["prompt"] == "x"
    job = m.job(ROUTE, jid)
    assert [(job / n).read_bytes() for n in ("output.png", "output.1.png", "output.2.png")] == \
        [rep.output(pid, k) for k in range(3)]
    result = json.loads((job / "result.json").read_text())
    st = m.status(ROUTE, jid)
    assert result["output"] == ["cas:" + o["blake3"] for o in st["outputs"]]


def test_replicate_progress_from_its_logs(mount_factory, tmp_path, rep):
    rep.hold = True
    m = mount_factory([models(tmp_path, {ROUTE: rep.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    job = m.job(ROUTE, jid)
    until(lambda: (job / "progress").read_text() == "0.5\n", "progress from 2/4")
    assert "prediction pred-1 is processing" in log_of(m, ROUTE, jid)
    rep.hold = False
    assert m.wait(ROUTE, jid) == "complete"


@pytest.mark.parametrize("final,code,words", [
    ("failed", "backend_failed", "failed: CUDA out of memory"),
    ("canceled", "cancelled_remotely", "cancelled pred-1"),
    ("aborted", "cancelled_remotely", "aborted prediction pred-1 before it ran"),
])
def test_replicate_final_states_end_the_job(mount_factory, tmp_path, rep, final, code, words):
    """All four final statuses end the job (a client that missed `aborted`
    polled forever); none is retried."""
    rep.final = final
    m = mount_factory([models(tmp_path, {ROUTE: rep.route()}), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == code and st["attempts"] == 1, st
    assert words.replace("cancelled pred-1", "cancelled prediction pred-1") in \
        st["error"]["message"], st
    assert len(rep.creates) == 1


def test_replicate_errors_and_retries(mount_factory, tmp_path, rep):
    """429 with Retry-After on create and 503 on get are retried (the
    prediction created once); a wrong token is backend_auth and a 422
    keeps Replicate's `detail`; neither is retried."""
    rep.create_429, rep.poll_503 = 1, 2
    routes = {ROUTE: rep.route(), "image/rep/default/bad": rep.route(key="r8_wrong_000000")}
    m = mount_factory([models(tmp_path, routes), "max_attempts=4"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid, timeout=60) == "complete", log_of(m, ROUTE, jid)
    assert len(rep.creates) == 1 and (rep.create_429, rep.poll_503) == (0, 0)
    assert "prediction not available" in log_of(m, ROUTE, jid)
    bad = m.submit("image/rep/default/bad", {"prompt": "x"})
    assert m.wait("image/rep/default/bad", bad) == "error"
    st = m.status("image/rep/default/bad", bad)
    assert st["error"]["code"] == "backend_auth" and st["attempts"] == 1
    assert "r8_wrong" not in json.dumps(st) and "r8_wrong" not in m.log()
    rep.reject = "prompt: must be at most 100 characters"
    rj = m.submit(ROUTE, {"prompt": "y"})
    assert m.wait(ROUTE, rj) == "error"
    st = m.status(ROUTE, rj)
    assert st["error"]["code"] == "backend_rejected" and st["attempts"] == 1
    assert "must be at most 100 characters" in st["error"]["message"]


def test_replicate_faults_a_retry_can_save(mount_factory, tmp_path, rep):
    """A get that hangs past request_timeout_s, answers that are a proxy's
    page, a download cut short: the job completes, created once."""
    rep.poll_hang, rep.poll_garbled, rep.files_cut = 1, 2, 1
    m = mount_factory([models(tmp_path, {ROUTE: rep.route(request_timeout_s=1)}),
                       "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid, timeout=60) == "complete", log_of(m, ROUTE, jid)
    assert len(rep.creates) == 1
    assert (rep.poll_hang, rep.poll_garbled, rep.files_cut) == (0, 0, 0)
    log = log_of(m, ROUTE, jid)
    assert "prediction not available" in log and "is not a prediction" in log
    assert "following prediction pred-1" in log  # the attempt after the cut download
    assert (m.job(ROUTE, jid) / "output.png").read_bytes() == rep.output("pred-1")


def test_replicate_deadline_and_wrong_type(mount_factory, tmp_path, rep):
    """A prediction that never ends: at the deadline the cancel is posted
    and the job is `timeout`; a file of another media type is refused."""
    rep.hold = True
    routes = {ROUTE: rep.route(timeout_s=1), "image/rep/default/other": rep.route()}
    m = mount_factory([models(tmp_path, routes)])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    assert m.status(ROUTE, jid)["error"]["code"] == "timeout"
    assert rep.cancels == ["pred-1"]
    rep.hold, rep.file_type = False, "text/html"
    other = m.submit("image/rep/default/other", {"prompt": "y"})
    assert m.wait("image/rep/default/other", other) == "error"
    st = m.status("image/rep/default/other", other)
    assert st["error"]["code"] == "output_invalid" and "text/html" in st["error"]["message"]


def test_replicate_cancel_reaches_the_service(mount_factory, tmp_path, rep):
    rep.hold = True
    m = mount_factory([models(tmp_path, {ROUTE: rep.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: "loading weights" in log_of(m, ROUTE, jid), "the prediction processing")
    (m.job(ROUTE, jid) / "ctl").write_text("cancel\n")
    assert m.wait(ROUTE, jid) == "cancelled"
    assert rep.cancels == ["pred-1"]


def test_replicate_kill_9_while_processing_resumes(mount_factory, tmp_path, rep):
    """kill -9 of the daemon while the prediction runs: the next mount
    follows it; it was created once and each log line is logged once."""
    rep.hold = True
    opts = [models(tmp_path, {ROUTE: rep.route()})]
    m = mount_factory(opts)
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: "2/4" in log_of(m, ROUTE, jid), "the prediction processing")
    m.kill()
    rep.hold = False
    m2 = mount_factory(opts, store=m.store, name="mnt2")
    assert m2.wait(ROUTE, jid) == "complete", log_of(m2, ROUTE, jid)
    assert len(rep.creates) == 1 and rep.cancels == []
    log = log_of(m2, ROUTE, jid)
    assert "following prediction pred-1" in log
    assert log.count("replicate: loading weights") == 1
    assert (m2.job(ROUTE, jid) / "output.png").read_bytes() == rep.output("pred-1")


# ---- OpenAI images ----

@pytest.mark.parametrize("flavour", ["openai", "sd-server", "localai"])
def test_openai_images_several_outputs(mount_factory, tmp_path, flavour, renderctl):
    """n=2 gives output.png and output.1.png, from base64 (OpenAI asked for
    it, sd-server always) or from URLs (LocalAI's default, when the route
    asks for url); result.json names them as cas:<hex>."""
    svc = FakeOpenAI(flavour)
    try:
        extra = {"model": "local-sd", "response_format": "url"} if flavour == "localai" else \
            {"model": "dall-e-3"} if flavour == "openai" else {}
        m = mount_factory([models(tmp_path, {OAI: svc.route(**extra)})])
        jid = m.submit(OAI, {"prompt": "two cats", "n": 2, "size": "256x256"})
        assert m.wait(OAI, jid) == "complete", log_of(m, OAI, jid)
        body, headers = svc.requests[0]
        assert body["prompt"] == "two cats" and body["n"] == 2 and body["size"] == "256x256"
        if flavour == "openai":
            assert body["model"] == "dall-e-3" and body["response_format"] == "b64_json"
            assert headers["Authorization"] == "Bearer " + FakeOpenAI.KEY
        else:
            assert "Authorization" not in headers  # a local server: no key, none sent
        job = m.job(OAI, jid)
        assert [(job / n).read_bytes() for n in ("output.png", "output.1.png")] == \
            [svc.image(1, k) for k in range(2)]
        st = m.status(OAI, jid)
        result = json.loads((job / "result.json").read_text())
        key = "url" if flavour == "localai" else "b64_json"
        assert [d[key] for d in result["data"]] == ["cas:" + o["blake3"] for o in st["outputs"]]
        assert renderctl("verify", str(job / "output.1.png")).returncode == 0
    finally:
        svc.close()


def test_openai_images_download_retried_without_paying_twice(mount_factory, tmp_path):
    """The images are made and paid for; their download is cut. The next
    attempt downloads them again from the answer kept with the job, and
    asks for no new images."""
    svc = FakeOpenAI("localai")
    try:
        svc.files_cut = 1
        m = mount_factory([models(tmp_path, {OAI: svc.route(model="local-sd",
                                                            response_format="url")}),
                           "max_attempts=3"])
        jid = m.submit(OAI, {"prompt": "x", "n": 2})
        assert m.wait(OAI, jid, timeout=60) == "complete", log_of(m, OAI, jid)
        assert len(svc.requests) == 1 and svc.files_cut == 0
        assert m.status(OAI, jid)["attempts"] == 2
        assert "storing the images an earlier attempt was given" in log_of(m, OAI, jid)
        job = m.job(OAI, jid)
        assert [(job / n).read_bytes() for n in ("output.png", "output.1.png")] == \
            [svc.image(1, k) for k in range(2)]
    finally:
        svc.close()


@pytest.mark.parametrize("flavour,words", [
    ("openai", "size: Invalid size"),   # {"error": {"message", "param"}}
    ("sd-server", "Invalid size"),      # {"error": "text"}
])
def test_openai_images_error_shapes(mount_factory, tmp_path, flavour, words):
    svc = FakeOpenAI(flavour)
    try:
        svc.fail = (400, "Invalid size")
        m = mount_factory([models(tmp_path, {OAI: svc.route()}), "max_attempts=3"])
        jid = m.submit(OAI, {"prompt": "x"})
        assert m.wait(OAI, jid) == "error"
        st = m.status(OAI, jid)
        assert st["error"]["code"] == "backend_rejected" and st["attempts"] == 1
        assert f"answered HTTP 400: {words}" in st["error"]["message"], st
        assert len(svc.requests) == 1
    finally:
        svc.close()


def test_openai_images_busy_is_retried_and_garbage_is_not(mount_factory, tmp_path):
    """503 with Retry-After: nothing was made, so it is asked again (and
    completes); an answer that is not JSON is output_invalid at once."""
    svc = FakeOpenAI("openai")
    try:
        svc.busy = 1
        m = mount_factory([models(tmp_path, {OAI: svc.route()}), "max_attempts=3"])
        jid = m.submit(OAI, {"prompt": "x"})
        assert m.wait(OAI, jid, timeout=60) == "complete", log_of(m, OAI, jid)
        st = m.status(OAI, jid)
        assert st["attempts"] == 2 and len(svc.requests) == 2 and svc.busy == 0
        svc.garbled = True
        bad = m.submit(OAI, {"prompt": "y"})
        assert m.wait(OAI, bad) == "error"
        st = m.status(OAI, bad)
        assert st["error"]["code"] == "output_invalid" and st["attempts"] == 1, st
    finally:
        svc.close()


def test_openai_images_bytes_of_another_kind_are_refused(mount_factory, tmp_path):
    """Base64 carries no media type: its magic must be the route's."""
    svc = FakeOpenAI("sd-server")
    try:
        svc.payload = b"\xff\xd8\xff\xe0" + b"\x00" * 64  # a JPEG's start
        m = mount_factory([models(tmp_path, {OAI: svc.route()})])
        jid = m.submit(OAI, {"prompt": "x"})
        assert m.wait(OAI, jid) == "error"
        st = m.status(OAI, jid)
        assert st["error"]["code"] == "output_invalid"
        assert "image/jpeg, not image/png" in st["error"]["message"]
        assert not (m.job(OAI, jid) / "output.png").exists()
    finally:
        svc.close()


def test_openai_images_hang_ends_at_the_deadline(mount_factory, tmp_path):
    """A server that never answers: the job ends `timeout` at its deadline
    (the transfer closed), and is not sent again."""
    svc = FakeOpenAI("sd-server")
    try:
        svc.hang = 30
        m = mount_factory([models(tmp_path, {OAI: svc.route(timeout_s=2)}), "max_attempts=3"])
        jid = m.submit(OAI, {"prompt": "x"})
        t0 = time.monotonic()
        assert m.wait(OAI, jid) == "error"
        assert time.monotonic() - t0 < 15
        st = m.status(OAI, jid)
        assert st["error"]["code"] == "timeout" and len(svc.requests) == 1, st
    finally:
        svc.hang = 0
        svc.close()


def test_openai_images_request_of_unknown_fate_is_not_sent_again(mount_factory, tmp_path):
    """kill -9 while the server makes the images: whether it made (and
    billed) them is unknown; the next mount ends the job `interrupted`."""
    svc = FakeOpenAI("openai")
    try:
        svc.hang = 3
        opts = [models(tmp_path, {OAI: svc.route()})]
        m = mount_factory(opts)
        jid = m.submit(OAI, {"prompt": "x"})
        until(lambda: len(svc.requests) == 1, "the request at the server")
        m.kill()
        svc.hang = 0
        m2 = mount_factory(opts, store=m.store, name="mnt2")
        assert m2.wait(OAI, jid) == "error"
        st = m2.status(OAI, jid)
        assert st["error"]["code"] == "interrupted" and "not sent again" in st["error"]["message"]
        time.sleep(0.3)
        assert len(svc.requests) == 1
    finally:
        svc.close()


def test_openai_images_takes_its_key_and_refuses_inputs(mount_factory, tmp_path):
    """The default OpenAI endpoint without a key is backend_not_configured
    with how to set one; a wrong key is backend_auth."""
    svc = FakeOpenAI("openai")
    try:
        p = tmp_path / "models.json"
        p.write_text(json.dumps({"routes": {
            OAI: svc.route(key="sk-wrong-000000"),
            "image/oai/default/real": {"backend": "openai-images", "model": "gpt-image-1",
                                       "key_env": "RENDERFS_TEST_NO_SUCH_KEY",
                                       "media_type": "image/png",
                                       "schema": {"type": "object"}}}}))
        m = mount_factory([f"models={p}"])
        a = m.submit(OAI, {"prompt": "x"})
        b = m.submit("image/oai/default/real", {"prompt": "x"})
        assert m.wait(OAI, a) == "error" and m.wait("image/oai/default/real", b) == "error"
        assert m.status(OAI, a)["error"]["code"] == "backend_auth"
        sb = m.status("image/oai/default/real", b)["error"]
        assert sb["code"] == "backend_not_configured" and "RENDERFS_TEST_NO_SUCH_KEY" in sb["message"]
        assert "sk-wrong" not in m.log() and "sk-wrong" not in log_of(m, OAI, a)
    finally:
        svc.close()


def test_openai_images_b64_json_decoded_bit_for_bit(mount_factory, tmp_path):
    svc = FakeOpenAI("sd-server")
    try:
        m = mount_factory([models(tmp_path, {OAI: svc.route()})])
        jid = m.submit(OAI, {"prompt": "x"})
        assert m.wait(OAI, jid) == "complete"
        raw = json.loads((m.job(OAI, jid) / "result.json").read_text())
        assert raw["created"] == 1764900000
        assert (m.job(OAI, jid) / "output.png").read_bytes() == svc.image(1, 0)
    finally:
        svc.close()
