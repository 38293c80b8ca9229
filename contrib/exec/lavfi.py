#!/usr/bin/python3
"""One of ffmpeg's generator sources as a renderfs `exec` program.

usage (in a models file): ["../exec/lavfi.py", GENERATOR, "image"|"video"]

Reads the request (JSON) on stdin and writes $RENDERFS_OUTPUT: a PNG of the
first frame, or an H.264 MP4 of `duration` seconds at `rate` frames per
second. Request fields map to the generator's options: width and height
(size), rate, seed (life, cellauto, gradients), and for video duration.
Progress goes to $RENDERFS_STATUS_FD as ffmpeg reports frames.
"""
import json
import os
import subprocess
import sys

SEEDED = {"life", "cellauto", "gradients"}


def main():
    gen, kind = sys.argv[1], sys.argv[2]
    req = json.load(sys.stdin)
    w, h = int(req.get("width", 320)), int(req.get("height", 240))
    rate = int(req.get("rate", 25))
    opts = [f"size={w}x{h}", f"rate={rate}"]
    if gen in SEEDED and "seed" in req:
        opts.append(f"seed={int(req['seed'])}")
    if gen == "cellauto" and "rule" in req:
        opts.append(f"rule={int(req['rule'])}")
    source = f"{gen}=" + ":".join(opts)
    out = os.environ["RENDERFS_OUTPUT"]
    status = os.fdopen(int(os.environ["RENDERFS_STATUS_FD"]), "w", buffering=1)
    if kind == "image":
        frames = 1
        codec = ["-frames:v", "1", "-f", "image2", "-c:v", "png"]
    else:
        frames = max(1, round(float(req.get("duration", 2)) * rate))
        codec = ["-frames:v", str(frames), "-c:v", "libx264", "-preset", "veryfast",
                 "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4"]
    status.write(f"log {source}, {frames} frame{'s' if frames > 1 else ''}\n")
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
           "-i", source] + codec + ["-progress", "pipe:1", "-y", out]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("frame="):
            done = int(line.split("=", 1)[1] or 0)
            status.write(f"progress {min(done / frames, 1):.3f}\n")
    return p.wait()


if __name__ == "__main__":
    sys.exit(main())
