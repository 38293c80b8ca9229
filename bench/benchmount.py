"""Starting and stopping a renderfs mount, for the benchmarks."""
import os
import subprocess
import sys
import time


def mount(build, mnt, opts, log_path, env=None, within_s=60):
    """renderfs of build on mnt (an existing directory) with `-o` opts (a
    list), its output appended to log_path: the process, once mounted."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(build / "tools" / "renderfs"), "-f", str(mnt), "-o",
                                 ",".join(opts)], stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + within_s
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            sys.exit(f"renderfs exited: see {log_path}")
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"renderfs did not mount within {within_s} s: see {log_path}")
        time.sleep(0.02)
    return proc


def unmount(mnt, proc, timeout=120):
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    proc.wait(timeout=timeout)
