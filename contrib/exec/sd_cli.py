#!/usr/bin/python3
"""stable-diffusion.cpp's `sd` command-line program as a renderfs `exec`
program (an example: it needs `sd` and a model file; nothing is
downloaded).

usage (in a models file, see contrib/models/local-examples.json):
  ["/path/to/sd_cli.py", "/usr/local/bin/sd", "/opt/models/sd-v1-5.gguf"]

Maps {"prompt", "negative_prompt", "seed", "width", "height", "steps",
"cfg_scale"} to sd's options, writes the PNG to $RENDERFS_OUTPUT, and turns
sd's "N/M" step lines into progress.
"""
import json
import os
import re
import subprocess
import sys


def main():
    sd, model = sys.argv[1], sys.argv[2]
    req = json.load(sys.stdin)
    status = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
    argv = [sd, "-m", model, "-p", req["prompt"], "-o", os.environ["RENDERFS_OUTPUT"],
            "-W", str(int(req.get("width", 512))), "-H", str(int(req.get("height", 512))),
            "--steps", str(int(req.get("steps", 20))), "-s", str(int(req.get("seed", 42))),
            "--cfg-scale", str(float(req.get("cfg_scale", 7.0)))]
    if req.get("negative_prompt"):
        argv += ["-n", req["negative_prompt"]]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        m = re.search(r"(\d+)/(\d+)", line)
        if m and int(m.group(2)):
            status.write(f"progress {int(m.group(1)) / int(m.group(2)):.3f}\n")
        else:
            print(line.rstrip(), file=sys.stderr)
    return p.wait()


if __name__ == "__main__":
    sys.exit(main())
