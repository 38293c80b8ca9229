"""SPEC §10: options, --help, --version, errors naming the option, mount -t."""
import json
import os
import subprocess
import time

import pytest

from conftest import IMAGE, SMALL, TOP, tool


def run(*args, **kw):
    return subprocess.run([tool("renderfs"), *map(str, args)], capture_output=True, text=True,
                          timeout=30, **kw)


def test_help_lists_every_option_with_defaults():
    r = run("--help")
    assert r.returncode == 0
    for opt in ("store=DIR", "models=FILE", "workers=N", "gpus=all|none|LIST", "queue_max=N",
                "user_queue_max=N", "rate=N", "burst=N", "max_request=BYTES",
                "max_attempts=N", "retain=DURATION", "private", "keyfile=FILE", "default"):
        assert opt in r.stdout, opt


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("renderfs 0.1.0")


@pytest.mark.parametrize("opt,msg", [
    ("workers=lots", "option 'workers=lots': must be an integer from 0 to 1024"),
    ("rate=-1", "option 'rate=-1'"),
    ("max_request=12Q", "option 'max_request=12Q': must be a size"),
    ("retain=forever", "option 'retain=forever': must be a duration"),
    ("gpus=0:x", "option 'gpus=0:x'"),
    ("max_attempts=0", "option 'max_attempts=0'"),
    ("keyfile=/nonexistent/key", "option 'keyfile=/nonexistent/key'"),
    ("models=/nonexistent/models.json", "option 'models=/nonexistent/models.json'"),
    ("frobnicate=1", "frobnicate"),
])
def test_bad_option_stops_the_mount(tmp_path, opt, msg):
    mnt = tmp_path / "m"
    mnt.mkdir()
    r = run("-f", mnt, "-o", f"store={tmp_path}/s,{opt}")
    assert r.returncode != 0 and msg in r.stderr, r.stderr
    assert not os.path.ismount(mnt)


WF = {"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["4", 1]}}}


def comfy(**settings):
    """A models file with one comfyui route taking a prompt."""
    return json.dumps({"routes": {"image/x/y/z": {
        "backend": "comfyui", "media_type": "image/png",
        "schema": {"type": "object", "properties": {"prompt": {"type": "string"}}},
        **settings}}})


@pytest.mark.parametrize("content,msg", [
    ("{", "not valid JSON"),
    ('{"routes": {"bad route": {}}}', "route 'bad route'"),
    ('{"routes": {"image/x/y/z": {"backend": "nope"}}}', "'backend' must be one of"),
    ('{"routes": {"image/x/y/z": {"backend": "fal", "media_type": "image/png"}}}',
     "'schema' is required"),
    ('{"routes": {"image/x/y/z": {"backend": "fal", "media_type": "image/png", '
     '"schema": {"type": "object", "pattern": "x"}}}}', "unsupported schema keyword 'pattern'"),
    ('{"routes": {"image/synth/default/t2i": {"timeout_s": -5}}}', "'timeout_s'"),
    # the backend checks its own settings at mount
    ('{"routes": {"image/x/y/z": {"backend": "fal", "model": "m", "media_type": "image/png", '
     '"schema": {"type": "object"}, "kee": "x"}}}',
     "route 'image/x/y/z': unknown setting 'kee' for the fal backend (it takes base_url, key, "
     "key_env, request_timeout_s)"),
    ('{"routes": {"image/x/y/z": {"backend": "fal", "model": "m", "media_type": "image/png", '
     '"schema": {"type": "object"}, "key_env": 5}}}',
     "route 'image/x/y/z': 'key_env' must be a string"),
    ('{"routes": {"image/x/y/z": {"backend": "fal", "media_type": "image/png", '
     '"schema": {"type": "object"}}}}', "route 'image/x/y/z': 'model' is required"),
    ('{"routes": {"image/synth/default/t2i": {"base_url": "http://x"}}}',
     "route 'image/synth/default/t2i': unknown setting 'base_url' for the synth backend"),
    ('{"routes": {"image/x/y/z": {"backend": "nope", "media_type": "image/png"}}}',
     "'backend' must be one of synth, fal, replicate, openai-images, exec, comfyui"),
    # comfyui: the workflow and its bindings are checked against each other
    # and against the schema
    (comfy(), "route 'image/x/y/z': the comfyui backend needs 'workflow'"),
    (comfy(workflow="no-such.json"), "'workflow': cannot open"),
    (comfy(workflow=5), "'workflow' must be a file name or the workflow object"),
    (comfy(workflow={"nodes": [], "links": []}), "is in ComfyUI's UI format"),
    (comfy(workflow={"6": {"inputs": {}}}), "node '6' is not a node in API format"),
    (comfy(workflow=WF, bindings={"prompt": "7.inputs.text"}),
     "'bindings.prompt': the workflow has no node '7'"),
    (comfy(workflow=WF, bindings={"prompt": "6.inputs.clip"}),
     "'bindings.prompt': 6.inputs.clip is a link from another node's output"),
    (comfy(workflow=WF, bindings={"prompt": "6.text"}),
     "'bindings.prompt' must be a string \"<node id>.inputs.<name>\""),
    (comfy(workflow=WF), "'bindings': the schema's field 'prompt' is bound to no node input"),
    (comfy(workflow=WF, bindings={"prompt": "6.inputs.text", "seed": "6.inputs.seed"}),
     "'bindings.seed': the route's schema has no field 'seed'"),
    (comfy(workflow=WF, bindings={"prompt": "6.inputs.text"}, output_node="9"),
     "'output_node': the workflow has no node '9'"),
    ('{"routes": {"image/x/y/z": {"backend": "exec", "media_type": "image/png", '
     '"schema": {"type": "object"}, "command": "ffmpeg -i x"}}}',
     "route 'image/x/y/z': 'command' must be an array"),
    ('{"routes": {"image/x/y/z": {"backend": "exec", "media_type": "image/png", '
     '"schema": {"type": "object"}, "command": ["no-such-program-here"]}}}',
     "route 'image/x/y/z': 'command[0]': no executable program 'no-such-program-here' in "
     "the daemon's PATH"),
    ('{"routes": {"image/x/y/z": {"backend": "exec", "media_type": "image/png", '
     '"schema": {"type": "object"}, "command": ["true"], "sandbox": "docker"}}}',
     "'sandbox' must be \"none\" or \"bwrap\""),
    ('{"routes": {"image/x/y/z": {"backend": "exec", "media_type": "image/png", '
     '"schema": {"type": "object"}, "command": ["true"], "limits": {"gpu_memory": 5}}}}',
     "unknown limit 'gpu_memory'"),
    ('{"routes": {"image/x/y/z": {"backend": "exec", "media_type": "image/png", '
     '"schema": {"type": "object"}, "command": ["true"], "env": {"RENDERFS_OUTPUT": "/x"}}}}',
     "'env': 'RENDERFS_OUTPUT' is not a variable name a route may set"),
])
def test_bad_models_file_names_file_route_field(tmp_path, content, msg):
    models = tmp_path / "models.json"
    models.write_text(content)
    (tmp_path / "m").mkdir()
    r = run("-f", tmp_path / "m", "-o", f"store={tmp_path}/s,models={models}")
    assert r.returncode != 0 and msg in r.stderr and str(models) in r.stderr, r.stderr


def test_models_file_overrides_a_builtin_route(mount_factory, tmp_path):
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"routes": {IMAGE: {"timeout_s": 7}}}))
    m = mount_factory([f"models={models}"])
    routes = {r["route"]: r for r in json.loads((m.path / "models.json").read_text())["routes"]}
    assert routes[IMAGE]["timeout_s"] == 7 and routes[IMAGE]["backend"] == "synth"


def test_options_in_force_are_shown(mount_factory):
    m = mount_factory(["workers=0", "rate=5", "burst=9", "retain=2h"])
    readme = (m.path / "README").read_text()
    assert "workers=0" in readme and "rate=5 burst=9" in readme and "retain=7200s" in readme


def mount8_runs_renderfs(tmp_path, mnt, cmd):
    """mount(8) runs mount.fuse3, which runs `renderfs SOURCE MOUNTPOINT -o ...`
    with a standard PATH: renderfs must be installed (cmake --install puts it in
    /usr/local/bin); the test links the built one there when none is."""
    link = "/usr/local/bin/renderfs"
    made = False
    if not os.path.exists(link):
        os.symlink(tool("renderfs"), link)
        made = True
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    finally:
        if made:
            os.unlink(link)
    assert r.returncode == 0, r.stderr
    try:
        assert os.path.ismount(mnt)
        (mnt / IMAGE / "new").write_text(json.dumps({"prompt": "fstab", **SMALL}))
        jobs = [p for p in os.listdir(mnt / IMAGE) if p not in ("new", "schema.json")]
        assert len(jobs) == 1
        deadline = time.monotonic() + 30
        while (mnt / IMAGE / jobs[0] / "status").read_text() != "complete\n":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mnt)


def test_mount_t_fuse_renderfs(tmp_path):
    mnt = tmp_path / "m"
    mnt.mkdir()
    mount8_runs_renderfs(tmp_path, mnt, ["mount", "-t", "fuse.renderfs", "renderfs", str(mnt),
                                         "-o", f"store={tmp_path}/s,workers=1"])


def test_contrib_fstab_line(tmp_path):
    """contrib/fstab's line, with this test's mountpoint and store, through
    mount -T (an alternative fstab)."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    lines = [x for x in (TOP / "contrib" / "fstab").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert len(lines) == 1 and "/mnt/render" in lines[0] and "/var/lib/renderfs" in lines[0]
    fstab = tmp_path / "fstab"
    fstab.write_text(lines[0].replace("/mnt/render", str(mnt))
                     .replace("/var/lib/renderfs", f"{tmp_path}/s") + "\n")
    mount8_runs_renderfs(tmp_path, mnt, ["mount", "-T", str(fstab), str(mnt)])


def test_seventy_routes_are_all_counted(mount_factory, tmp_path):
    """Jobs are counted per route in the index: a models file with 70
    routes gives every route directory its link count (2 + its jobs) and
    every route its line in `stats` (a 64-slot table reported 0 for the
    routes past it), and a remount counts nothing to know them."""
    m = mount_factory(name="first")
    schema = json.loads((m.route(IMAGE) / "schema.json").read_text())
    m.stop()
    routes = [f"image/fal/r{i:02d}/t2i" for i in range(70)]
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"routes": {
        r: {"backend": "fal", "model": f"fal-ai/{r}", "media_type": "image/png",
            "schema": schema} for r in routes}}))
    m = mount_factory([f"models={models}"], store=tmp_path / "s70")
    empty = os.stat(m.route(routes[0])).st_nlink
    jids = {r: m.submit(r, {"prompt": r, **SMALL}) for r in routes}
    ends = {r: m.wait(r, j) for r, j in jids.items()}  # no key: each ends at once
    # A route directory's attributes may be cached for a second, until the
    # notifier's announcement of a creation in it refreshes them.
    deadline = time.monotonic() + 20
    while "renderfs_notify_queued 0\n" not in (stats := (m.path / "stats").read_text()):
        assert time.monotonic() < deadline, "the notifier did not become idle"
        time.sleep(0.05)
    for r in routes:
        assert os.stat(m.route(r)).st_nlink == empty + 1, r
        assert f'renderfs_jobs{{route="{r}",status="{ends[r]}"}} 1\n' in stats, r
    m.stop()
    m = mount_factory([f"models={models}"], store=m.store, name="again")
    assert all(os.stat(m.route(r)).st_nlink == empty + 1 for r in routes)


def test_daemon_threads_are_named(mount_factory):
    """top -H, ps -L and debuggers show what each thread is."""
    m = mount_factory(["workers=2"])
    task = f"/proc/{m.proc.pid}/task"
    names = sorted(open(f"{task}/{t}/comm").read().strip() for t in os.listdir(task))
    assert {"rfs-cpu0", "rfs-cpu1", "rfs-notify", "rfs-http", "rfs-remote0"} <= set(names), names
