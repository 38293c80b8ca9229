"""Shared fixtures for the black-box tests: where the built tools are."""
import os
import pathlib
import shutil
import subprocess

import pytest

TOP = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(os.environ.get("RENDERFS_BUILD", TOP / "build"))


def tool(name):
    path = BUILD / "tools" / name
    if not path.exists():
        pytest.fail(f"{path} is not built: run tests/run (or cmake --build {BUILD})")
    return str(path)


@pytest.fixture
def renderctl():
    exe = tool("renderctl")

    def run(*args, check=None, **kw):
        r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True,
                           timeout=120, **kw)
        if check is not None:
            assert r.returncode == check, (
                f"renderctl {' '.join(map(str, args))}: exit {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        return r
    return run


def need(tool_name):
    if shutil.which(tool_name) is None:
        pytest.fail(f"{tool_name} is not installed (contrib/install-deps installs it)")
    return tool_name
