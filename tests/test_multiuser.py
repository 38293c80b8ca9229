"""SPEC §3 and §7: ownership, `private`, and another user's ctl/delete refused.
The second user is `nobody`, reached with setpriv; the mount has allow_other."""
import errno
import json
import os
import subprocess
import time

import pytest

from conftest import IMAGE, SMALL, need

NOBODY = 65534


def as_nobody(cmd, cwd):
    return subprocess.run([need("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "bash", "-c", cmd], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def submit_as_nobody_req(m, req):
    r = as_nobody("exec 3<>new; echo '%s' >&3; read id <&3; echo $id" % json.dumps(req),
                  m.route(IMAGE))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return r.stdout.strip()


def submit_as_nobody(m, prompt):
    return submit_as_nobody_req(m, {"prompt": prompt, **SMALL})


@pytest.fixture
def shared(mount_factory, tmp_path):
    os.chmod(tmp_path, 0o755)
    return mount_factory(["allow_other"])


def test_ownership_and_refusals(shared):
    m = shared
    mine = m.submit(IMAGE, {"prompt": "by root", **SMALL})
    theirs = submit_as_nobody(m, "by nobody")
    m.wait(IMAGE, mine)
    m.wait(IMAGE, theirs)
    st = os.stat(m.job(IMAGE, theirs))
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY) and st.st_mode & 0o777 == 0o755
    f = os.stat(m.job(IMAGE, theirs) / "status")
    assert f.st_uid == NOBODY and f.st_mode & 0o777 == 0o644
    assert os.stat(m.job(IMAGE, theirs) / "ctl").st_mode & 0o777 == 0o200
    assert m.status(IMAGE, theirs)["owner"] == NOBODY
    d = m.job(IMAGE, mine)
    # Relative paths: the second user cannot traverse pytest's 0700 tmp root.
    r = as_nobody(f"cat {mine}/status {mine}/request.json", m.route(IMAGE))
    assert r.returncode == 0 and r.stdout.startswith("complete\n"), r.stderr
    r = as_nobody(f"echo cancel > {mine}/ctl", m.route(IMAGE))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody(f"echo retry > {mine}/ctl", m.route(IMAGE))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody(f"rm -f {mine}/log", m.route(IMAGE))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody(f"rmdir {mine}", m.route(IMAGE))
    assert r.returncode != 0 and ("Operation not permitted" in r.stderr
                                  or "Permission denied" in r.stderr), r.stderr
    r = as_nobody(f"rm -rf {mine}", m.route(IMAGE))
    assert r.returncode != 0
    assert d.exists() and (d / "log").exists()
    # The owner may delete their own job; root may delete anyone's.
    r = as_nobody(f"rm -r {theirs}", m.route(IMAGE))
    assert r.returncode == 0, r.stderr
    assert not m.job(IMAGE, theirs).exists()
    other = submit_as_nobody(m, "again")
    m.wait(IMAGE, other)
    os.rmdir(m.job(IMAGE, other))


def test_private_hides_other_users_jobs(mount_factory, tmp_path):
    os.chmod(tmp_path, 0o755)
    m = mount_factory(["allow_other", "private"])
    mine = m.submit(IMAGE, {"prompt": "private root", **SMALL})
    theirs = submit_as_nobody(m, "private nobody")
    m.wait(IMAGE, theirs)
    r = as_nobody("ls; ls ../../../../jobs", m.route(IMAGE))
    assert r.returncode == 0, r.stderr
    assert theirs in r.stdout and mine not in r.stdout
    r = as_nobody(f"cat {mine}/status", m.route(IMAGE))
    assert r.returncode != 0 and "No such file or directory" in r.stderr
    names = os.listdir(m.route(IMAGE))
    assert mine in names and theirs in names  # root sees everything
    st = os.stat(m.job(IMAGE, theirs))
    assert st.st_mode & 0o777 == 0o700
    assert os.stat(m.job(IMAGE, theirs) / "status").st_mode & 0o777 == 0o600
    r = as_nobody(f"cat {theirs}/status", m.route(IMAGE))
    assert r.stdout == "complete\n"


def test_private_jobs_leave_no_trace_for_other_users(mount_factory, tmp_path):
    """With `private`, another user learns nothing about a job: no inotify
    event in the route directory or jobs/ names it, and a name the owner
    just looked up (so the kernel has it) is still unknown to others."""
    os.chmod(tmp_path, 0o755)
    m = mount_factory(["allow_other", "private"])
    route, jobs = m.route(IMAGE), m.path / "jobs"
    watcher = subprocess.Popen(
        [need("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         need("inotifywait"), "-m", "--format", "%w|%e|%f", str(route), str(jobs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in watcher.stderr:
        if "Watches established" in line:
            break
    ids = [m.submit(IMAGE, {"prompt": f"secret {i}", **SMALL}) for i in range(20)]
    for jid in ids:
        os.stat(m.job(IMAGE, jid))
        os.stat(jobs / jid)
    # Right away (the kernel would have cached these names for a second).
    r = as_nobody("for id in %s; do stat -c %%n $id ../../../../jobs/$id 2>/dev/null; done; "
                  "echo done" % " ".join(ids), route)
    assert r.stdout == "done\n", r.stdout
    for jid in ids:
        assert m.wait(IMAGE, jid) == "complete"
    mine = m.submit(IMAGE, {"prompt": "seen by its owner", **SMALL})
    assert m.wait(IMAGE, mine) == "complete"
    time.sleep(1)
    watcher.terminate()
    out, _ = watcher.communicate(timeout=10)
    assert not any(jid in out for jid in ids + [mine]), out


def test_private_outputs_by_hash_only_to_their_owners(mount_factory, tmp_path):
    """With `private`, cas/<hex> of an output is there for root and for
    uids that own a job whose output it is; for anyone else it does not
    exist, even when they know the hash."""
    os.chmod(tmp_path, 0o755)
    m = mount_factory(["allow_other", "private"])
    mine = m.submit(IMAGE, {"prompt": "a secret of root", **SMALL})
    theirs = submit_as_nobody(m, "made by nobody")
    m.wait(IMAGE, mine)
    m.wait(IMAGE, theirs)
    h_mine = m.status(IMAGE, mine)["output"]["blake3"]
    h_theirs = m.status(IMAGE, theirs)["output"]["blake3"]
    cas = m.path / "cas"
    for _ in range(2):  # the second time with the names in the kernel's cache
        assert os.stat(cas / h_mine).st_size > 0 and os.stat(cas / h_theirs).st_size > 0
        r = as_nobody(f"cat {h_mine} >/dev/null; echo $?; stat -c %s {h_mine}.minisig; "
                      f"cat {h_theirs} | b3sum --no-names; ls | wc -l", cas)
        lines = r.stdout.split("\n")
        assert lines[0] == "1" and "No such file or directory" in r.stderr, r
        assert lines[1] == h_theirs and lines[2] == "0", r.stdout
    assert h_mine in os.listdir(cas) and h_theirs in os.listdir(cas)


def test_private_names_are_per_owner(mount_factory, tmp_path):
    """With `private`, a name is the owner's own: another user may use the
    same name on the same route (before, EEXIST told them it was taken),
    each finds their own job by it, and nobody else's. Mounted shared
    later, the name leads to one job and the other is listed by id."""
    os.chmod(tmp_path, 0o755)
    m = mount_factory(["allow_other", "private"])
    mine = m.submit(IMAGE, {"input": {"prompt": "root's shot", **SMALL}, "name": "shot"})
    assert mine == "shot"
    req = json.dumps({"input": {"prompt": "the shot of nobody", "seed": 5, **SMALL}, "name": "shot"})
    r = as_nobody("exec 3<>new; echo '%s' >&3; read id <&3; echo $id; "
                  "exec 4<>new; echo '%s' >&4; read id <&4; echo $id" % (req, req),
                  m.route(IMAGE))
    assert r.returncode == 0 and r.stdout == "shot\nshot\n", (r.stdout, r.stderr)
    assert m.wait(IMAGE, "shot") == "complete"
    r = as_nobody("for i in $(seq 100); do [ \"$(cat shot/status)\" = complete ] && break; "
                  "sleep 0.1; done; cat shot/status.json", m.route(IMAGE))
    theirs = json.loads(r.stdout)
    assert theirs["status"] == "complete", r
    assert as_nobody("ls", m.route(IMAGE)).stdout == "new\nschema.json\nshot\n"
    root_view = m.status(IMAGE, "shot")
    assert root_view["id"] != theirs["id"]
    assert theirs["output"]["blake3"] != root_view["output"]["blake3"]
    # root sees both: its own by name, nobody's by id
    assert sorted(os.listdir(m.route(IMAGE))) == sorted(["new", "schema.json", "shot",
                                                         theirs["id"]])
    assert os.stat(m.job(IMAGE, theirs["id"])).st_uid == NOBODY
    m.stop()
    m2 = mount_factory(["allow_other"], store=m.store, name="mnt2")
    assert sorted(os.listdir(m2.route(IMAGE))) == sorted(["new", "schema.json", "shot",
                                                          theirs["id"]])
    assert m2.status(IMAGE, "shot")["id"] == root_view["id"]
    r = as_nobody("cat shot/status.json", m2.route(IMAGE))
    assert json.loads(r.stdout)["id"] == root_view["id"]
    err, line = m2.submit_err(IMAGE, json.dumps(
        {"input": {"prompt": "another", **SMALL}, "name": "shot"}).encode() + b"\n")
    assert err == errno.EEXIST and "shot" in line


def test_private_memoization_stays_within_one_owner(mount_factory, tmp_path):
    """With `private`, a request another user already made is rendered
    again, not served from their job: a cache hit would tell that they made
    it, and the log named their job. The owner's own repeat still hits."""
    os.chmod(tmp_path, 0o755)
    m = mount_factory(["allow_other", "private"])
    req = {"prompt": "asked twice", "seed": 11, **SMALL}
    first = m.submit(IMAGE, req)
    assert m.wait(IMAGE, first) == "complete"
    theirs = submit_as_nobody_req(m, req)
    assert m.wait(IMAGE, theirs) == "complete"
    st = m.status(IMAGE, theirs)
    assert st["cached"] is False
    assert first not in (m.job(IMAGE, theirs) / "log").read_text()
    assert st["output"]["blake3"] == m.status(IMAGE, first)["output"]["blake3"]
    again = m.submit(IMAGE, req)
    assert m.wait(IMAGE, again) == "complete" and m.status(IMAGE, again)["cached"] is True
