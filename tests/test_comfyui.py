"""The comfyui backend (SPEC §8, §9) against a fake ComfyUI written from
its server (fakecomfy.py): request fields bound into a workflow in API
format, the prompt id durable before it is submitted, completion from
/history, files from /view, node errors at submit, a server restart
losing the prompt, and cancelling one prompt while another runs without
touching it."""

import errno
import json
import pathlib
import struct

import pytest

from conftest import IMAGE, SMALL, until
from fakecomfy import WORKFLOW, FakeComfy

ROUTE = "image/comfy/default/t2i"
GOOD = "image/comfy/default/good"
CONTRIB = pathlib.Path(__file__).resolve().parent.parent / "contrib"


@pytest.fixture
def comfy():
    f = FakeComfy()
    yield f
    f.close()


def models(tmp_path, routes, workflow=WORKFLOW):
    (tmp_path / "workflow.json").write_text(json.dumps(workflow))
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": routes}))
    return f"models={p}"


def log_of(m, route, jid):
    return (m.job(route, jid) / "log").read_text()


def prompt_of(comfy, jid):
    """The prompt id of job jid (its client_id names the job)."""
    return next(pid for pid, body in comfy.prompts
                if body["extra_data"]["renderfs_job"] == jid)


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_comfyui_prompt_end_to_end(mount_factory, tmp_path, comfy, renderctl):
    """The request's fields land on the bound node inputs (and nothing
    else of the workflow changes); the prompt id the server got is the one
    made durable before; the image comes from /view with the requested
    size; result.json keeps the outputs with cas: names."""
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    jid = m.submit(ROUTE, {"prompt": "a heron at dusk", "seed": 42, "width": 96})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    assert len(comfy.prompts) == 1
    pid, body = comfy.prompts[0]
    sent = body["prompt"]
    assert sent["6"]["inputs"]["text"] == "a heron at dusk"
    assert sent["3"]["inputs"]["seed"] == 42
    assert sent["5"]["inputs"]["width"] == 96 and sent["5"]["inputs"]["height"] == 48
    assert sent["7"] == WORKFLOW["7"] and sent["3"]["inputs"]["model"] == ["4", 0]
    assert body["prompt_id"] == pid and body["extra_data"]["renderfs_job"] == jid
    assert body["client_id"].startswith("renderfs-")
    job = m.job(ROUTE, jid)
    out = (job / "output.png").read_bytes()
    assert out == comfy.image(sent) and png_size(out) == (96, 48)
    assert comfy.views == ["filename=renderfs_00000_0_.png&subfolder=runs&type=output"]
    st = m.status(ROUTE, jid)
    result = json.loads((job / "result.json").read_text())
    assert result["prompt_id"] == pid and result["status"]["status_str"] == "success"
    assert result["outputs"]["9"]["images"][0]["file"] == "cas:" + st["output"]["blake3"]
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["backend"] == "comfyui" and manifest["remote_request_id"] == pid
    assert f"comfyui: queued prompt {pid}" in log_of(m, ROUTE, jid)
    assert renderctl("verify", str(job / "output.png")).returncode == 0
    assert comfy.interrupts == 0


def test_comfyui_inline_workflow_several_images_and_previews(mount_factory, tmp_path, comfy):
    """An inline workflow; with no output_node, every node's files of type
    "output" in node order (a preview's temp file is not an output)."""
    wf = json.loads(json.dumps(WORKFLOW))
    wf["5"]["inputs"]["batch_size"] = 2
    wf["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    route = comfy.route(workflow=wf)
    del route["output_node"]
    m = mount_factory([models(tmp_path, {ROUTE: route})])
    jid = m.submit(ROUTE, {"prompt": "two owls"})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    sent = comfy.prompts[0][1]["prompt"]
    job = m.job(ROUTE, jid)
    assert sorted(p.name for p in job.iterdir()
                  if p.name.startswith("output") and p.suffix == ".png") == \
        ["output.1.png", "output.png"]
    assert [(job / n).read_bytes() for n in ("output.png", "output.1.png")] == \
        [comfy.image(sent, 0), comfy.image(sent, 1)]
    assert not any("type=temp" in v for v in comfy.views)


def test_comfyui_node_errors_at_submit_are_rejected_naming_the_node(mount_factory, tmp_path,
                                                                     comfy):
    """400 with node_errors: backend_rejected with the node, its class and
    the server's words; not retried, nothing queued."""
    wf = json.loads(json.dumps(WORKFLOW))
    wf["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    routes = {ROUTE: comfy.route(), GOOD: comfy.route(workflow=WORKFLOW)}
    m = mount_factory([models(tmp_path, routes, workflow=wf), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "backend_rejected" and st["attempts"] == 1, st
    msg = st["error"]["message"]
    assert "node 4 (CheckpointLoaderSimple)" in msg and "Value not in list" in msg, msg
    assert "missing.safetensors" in msg
    assert comfy.prompts == [] and len(comfy.rejected) == 1
    # A bound value the server refuses names its node too.
    big = m.submit(GOOD, {"prompt": "x", "width": 4096})
    assert m.wait(GOOD, big) == "error"
    st = m.status(GOOD, big)
    assert st["error"]["code"] == "backend_rejected"
    assert "node 5 (EmptyLatentImage)" in st["error"]["message"], st


def test_comfyui_execution_error_names_the_node(mount_factory, tmp_path, comfy):
    comfy.fail_node = ("3", "CUDA out of memory. Tried to allocate 2.00 GiB")
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()}), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "error"
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "backend_failed" and st["attempts"] == 1, st
    msg = st["error"]["message"]
    assert "node 3 (KSampler)" in msg and "CUDA out of memory" in msg, msg


def test_comfyui_server_restart_losing_the_prompt_is_retried(mount_factory, tmp_path, comfy):
    """The server restarts while the prompt runs: its history stays empty
    forever. The job notices the prompt is nowhere (not queued, not
    running, not in the history) and the next attempt submits it again,
    instead of waiting until its deadline."""
    comfy.hold = True
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()}), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: len(comfy.prompts) == 1, "the prompt submitted")
    comfy.wait_running(comfy.prompts[0][0])
    until(lambda: "is running" in log_of(m, ROUTE, jid), "the job to see it run")
    comfy.restart()
    comfy.release()
    assert m.wait(ROUTE, jid, timeout=60) == "complete", log_of(m, ROUTE, jid)
    st = m.status(ROUTE, jid)
    assert st["attempts"] == 2, st
    assert len(comfy.prompts) == 2 and comfy.prompts[0][0] != comfy.prompts[1][0]
    assert "no longer has prompt " + comfy.prompts[0][0] in log_of(m, ROUTE, jid)


def test_comfyui_cancel_one_prompt_while_another_runs(mount_factory, tmp_path, comfy):
    """Three jobs: A runs, B and C wait in ComfyUI's queue (B's position
    shown). Cancelling B deletes it from the queue; A and C are untouched
    and complete. Cancelling a running prompt cancels that prompt by id;
    nothing ever calls the global /interrupt."""
    comfy.hold = True
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    a = m.submit(ROUTE, {"prompt": "a"})
    until(lambda: len(comfy.prompts) == 1, "A submitted")
    b = m.submit(ROUTE, {"prompt": "b"})
    c = m.submit(ROUTE, {"prompt": "c"})
    until(lambda: len(comfy.prompts) == 3, "B and C submitted")
    pa, pb, pc = (prompt_of(comfy, j) for j in (a, b, c))
    comfy.wait_running(pa)
    # Places in ComfyUI's queue go by the order it got them.
    first, second = sorted((b, c), key=lambda j: [p for p, _ in comfy.prompts].index(
        prompt_of(comfy, j)))
    until(lambda: [(m.job(ROUTE, j) / "position").read_text() for j in (first, second)] ==
          ["1\n", "2\n"], "B and C behind A")
    (m.job(ROUTE, b) / "ctl").write_text("cancel\n")
    assert m.wait(ROUTE, b) == "cancelled"
    until(lambda: pb in comfy.deletes, "B deleted from the queue")
    assert [it[1] for it in comfy.pending] == [pc]
    assert comfy.running[1] == pa and comfy.interrupts == 0
    comfy.release()
    assert m.wait(ROUTE, a) == "complete" and m.wait(ROUTE, c) == "complete"
    assert pb not in comfy.history and set(comfy.history) == {pa, pc}

    comfy.hold = True
    d = m.submit(ROUTE, {"prompt": "d"})
    until(lambda: len(comfy.prompts) == 4, "D submitted")
    pd = comfy.prompts[3][0]
    comfy.wait_running(pd)
    (m.job(ROUTE, d) / "ctl").write_text("cancel\n")
    assert m.wait(ROUTE, d) == "cancelled"
    until(lambda: pd in comfy.cancels, "D cancelled by id")
    until(lambda: pd in comfy.history, "D interrupted at the server")
    assert comfy.history[pd]["status"]["status_str"] == "error"
    assert comfy.interrupts == 0


def test_comfyui_older_server_cannot_cancel_a_running_prompt(mount_factory, tmp_path, comfy):
    """A server without /api/jobs/{id}/cancel: the running prompt is left
    to finish (the job is cancelled here, the log says why); the global
    /interrupt, which would stop other jobs' prompts, is never used."""
    comfy.hold, comfy.job_cancel = True, False
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: len(comfy.prompts) == 1, "the prompt submitted")
    comfy.wait_running(comfy.prompts[0][0])
    (m.job(ROUTE, jid) / "ctl").write_text("cancel\n")
    assert m.wait(ROUTE, jid) == "cancelled"
    until(lambda: "cannot cancel one running prompt" in log_of(m, ROUTE, jid), "the log")
    assert comfy.interrupts == 0 and comfy.running is not None


def test_comfyui_kill_9_follows_the_same_prompt(mount_factory, tmp_path, comfy):
    """kill -9 while the prompt runs: the next mount follows the prompt id
    it recorded; the workflow is submitted once."""
    comfy.hold = True
    opts = [models(tmp_path, {ROUTE: comfy.route()})]
    m = mount_factory(opts)
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: "is running" in log_of(m, ROUTE, jid), "the prompt running")
    m.kill()
    m2 = mount_factory(opts, store=m.store, name="mnt2")
    # The route's client id is the same at every mount of the store: the
    # progress of the prompt queued before still arrives.
    until(lambda: (m2.job(ROUTE, jid) / "progress").read_text() == "0.5\n",
          "progress after the restart: " + log_of(m2, ROUTE, jid) + str(comfy.ws_clients) + m2.log())
    assert len(set(comfy.ws_clients)) == 1
    comfy.release()
    assert m2.wait(ROUTE, jid) == "complete", log_of(m2, ROUTE, jid)
    assert len(comfy.prompts) == 1
    assert "following prompt " + comfy.prompts[0][0] in log_of(m2, ROUTE, jid)


@pytest.mark.parametrize("takes_ids", [True, False])
def test_comfyui_lost_submission_answer(mount_factory, tmp_path, comfy, takes_ids):
    """The server queues the prompt but its answer never arrives. A
    current server took our prompt id, so the job finds the prompt and
    follows it (submitted once); an older server named it itself, so
    whether it has it is unknown: `interrupted`, never sent twice. The
    prompt found is followed at the polling schedule's pace (a run that
    came to it this way once asked the server again at once, every time)."""
    comfy.takes_ids, comfy.submit_drop, comfy.work_s = takes_ids, 1, 2
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()}), "max_attempts=3"])
    jid = m.submit(ROUTE, {"prompt": "x"})
    state = m.wait(ROUTE, jid)
    log = log_of(m, ROUTE, jid)
    assert len(comfy.prompts) == 1, log
    if takes_ids:
        assert state == "complete", log
        assert "has prompt " + comfy.prompts[0][0] in log
        # 2 s of work: a poll at 0.2 s growing by 5/4 is 6 or 7 polls.
        assert comfy.queue_gets + comfy.history_gets <= 20, (comfy.queue_gets,
                                                             comfy.history_gets)
    else:
        assert state == "error"
        st = m.status(ROUTE, jid)
        assert st["error"]["code"] == "interrupted" and st["attempts"] == 1, st


def test_comfyui_history_busy_is_asked_again(mount_factory, tmp_path, comfy):
    comfy.history_503 = 2
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    assert comfy.history_503 == 0 and len(comfy.prompts) == 1
    assert "asking again" in log_of(m, ROUTE, jid)


def test_comfyui_request_fields_the_workflow_does_not_take(mount_factory, tmp_path, comfy):
    """A field the workflow does not take is refused at submit (the schema
    allowed it), naming it; nothing reaches the server."""
    route = comfy.route()
    route["schema"]["additionalProperties"] = True
    m = mount_factory([models(tmp_path, {ROUTE: route})])
    errno_, line = m.submit_err(ROUTE, json.dumps({"prompt": "x", "steps": 30}).encode())
    assert errno_ == errno.EINVAL and "steps" in line, line
    assert comfy.prompts == []


def test_comfyui_cas_input_is_uploaded_for_load_image(mount_factory, tmp_path, comfy):
    """A cas: input bound to LoadImage is uploaded (multipart, type=input,
    overwrite, named by its hash) before the prompt, which names the
    upload; the fake's image-to-image graph returns its input, so the
    output is the input's bytes; the manifest lists the input."""
    wf = json.loads(json.dumps(WORKFLOW))
    wf["10"] = {"class_type": "LoadImage", "inputs": {"image": "example.png", "upload": "image"}}
    route = comfy.route(workflow=wf)
    route["bindings"]["image"] = "10.inputs.image"
    route["schema"]["properties"]["image"] = {"type": "string"}
    m = mount_factory([models(tmp_path, {ROUTE: route})])
    src = m.submit(IMAGE, {"prompt": "source", **SMALL})
    assert m.wait(IMAGE, src) == "complete"
    h = m.status(IMAGE, src)["output"]["blake3"]
    data = (m.job(IMAGE, src) / "output.png").read_bytes()
    jid = m.submit(ROUTE, {"prompt": "restyle", "image": f"cas:{h}"})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    assert len(comfy.uploads) == 1
    fields, filename, content = comfy.uploads[0]
    assert content == data and fields == {"type": "input", "overwrite": "true"}
    assert filename == f"renderfs-{h[:32]}.png"
    assert comfy.prompts[0][1]["prompt"]["10"]["inputs"]["image"] == filename
    assert (m.job(ROUTE, jid) / "output.png").read_bytes() == data
    manifest = json.loads((m.job(ROUTE, jid) / "manifest.json").read_text())
    assert [i["blake3"] for i in manifest["inputs"]] == [h], manifest
    assert f"input 'image' uploaded as {filename}" in log_of(m, ROUTE, jid)


def test_contrib_comfyui_models_file(mount_factory, tmp_path, comfy):
    """contrib/models/comfyui.json and its workflow mount and run as they
    are (only base_url pointed at the fake server): its defaults reach the
    graph, the user's fields override them."""
    routes = json.loads((CONTRIB / "models" / "comfyui.json").read_text())["routes"]
    route = routes["image/comfyui/sd15/t2i"]
    route["base_url"] = comfy.base
    route["workflow"] = str(CONTRIB / "models" / route["workflow"])
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"routes": routes}))
    m = mount_factory([f"models={p}"])
    r = "image/comfyui/sd15/t2i"
    jid = m.submit(r, {"prompt": "a lighthouse", "width": 96, "height": 64, "seed": 5})
    assert m.wait(r, jid) == "complete", log_of(m, r, jid)
    sent = comfy.prompts[0][1]["prompt"]
    assert sent["6"]["inputs"]["text"] == "a lighthouse"
    assert sent["7"]["inputs"]["text"] == "blurry, low quality"  # the schema's default
    assert sent["3"]["inputs"]["steps"] == 20 and sent["3"]["inputs"]["seed"] == 5
    assert png_size((m.job(r, jid) / "output.png").read_bytes()) == (96, 64)


def test_comfyui_progress_from_its_websocket(mount_factory, tmp_path, comfy):
    """The sampler's steps reach `progress` through ComfyUI's websocket
    (one socket for the route, under the client id its prompts name; a
    preview frame over 64 KiB is skipped, the server's ping answered);
    the websocket going away loses progress, never the job."""
    comfy.hold = True
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    progress = m.job(ROUTE, jid) / "progress"
    until(lambda: progress.read_text() == "0.5\n", "progress 2/4 from the websocket")
    assert comfy.ws_clients == [comfy.prompts[0][1]["client_id"]] and comfy.pongs >= 1
    for ws in list(comfy.sockets.values()):
        ws.close()
    comfy.release()
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    assert progress.read_text() == "1\n"
    # Another job on the same route: the socket comes back (the watcher
    # reconnects while prompts are in flight).
    comfy.hold = True
    j2 = m.submit(ROUTE, {"prompt": "y"})
    until(lambda: (m.job(ROUTE, j2) / "progress").read_text() == "0.5\n", "progress again")
    comfy.release()
    assert m.wait(ROUTE, j2) == "complete"


def test_comfyui_websocket_that_breaks_the_protocol(mount_factory, tmp_path, comfy):
    """Sockets that break RFC 6455 (reserved bits, a 2^62-byte frame, an
    oversized ping, a length with its top bit set) are dropped and opened again later; the daemon neither
    crashes nor holds what was claimed; a message in two frames (text,
    continuation) is put together: progress arrives."""
    comfy.hold, comfy.ws_hostile = True, True
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: (m.job(ROUTE, jid) / "progress").read_text() == "0.5\n",
          "progress after four broken sockets", timeout=40)
    assert len(comfy.ws_clients) >= 5
    comfy.release()
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)


def test_comfyui_answers_of_the_wrong_shape(mount_factory, tmp_path, comfy):
    """A queue whose items are not lists and an error whose messages are
    not a list: read as what they are (json-c's array calls would read an
    object as an array), the job ends with a clear error."""
    comfy.garbage, comfy.hold = True, True
    m = mount_factory([models(tmp_path, {ROUTE: comfy.route()})])
    jid = m.submit(ROUTE, {"prompt": "x"})
    until(lambda: "is running" in log_of(m, ROUTE, jid), "the queue read")
    comfy.release()
    assert m.wait(ROUTE, jid) == "error", log_of(m, ROUTE, jid)
    st = m.status(ROUTE, jid)
    assert st["error"]["code"] == "backend_failed", st
    assert "failed (no reason given)" in st["error"]["message"], st


def test_comfyui_without_a_websocket_still_ends(mount_factory, tmp_path, comfy):
    """A server (or proxy) without /ws: no progress, said once in the log;
    completion comes from /history as always."""
    comfy.work_s = 1
    route = comfy.route()
    m = mount_factory([models(tmp_path, {ROUTE: route})])
    comfy.no_ws = True
    jid = m.submit(ROUTE, {"prompt": "x"})
    assert m.wait(ROUTE, jid) == "complete", log_of(m, ROUTE, jid)
    log = log_of(m, ROUTE, jid)
    assert log.count("no progress from the server") == 1, log
