"""renderctl render: the synth routes run in process, checked with ffprobe and b3sum."""
import json
import re
import subprocess

from conftest import need

IMAGE = "image/synth/default/t2i"
VIDEO = "video/synth/default/t2v"


def ffprobe(path, entry):
    out = subprocess.run(
        [need("ffprobe"), "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", f"stream={entry}", "-of", "default=noprint_wrappers=1:nokey=1",
         str(path)], check=True, capture_output=True, text=True).stdout
    return out.strip()


def b3(path):
    return subprocess.run([need("b3sum"), "--no-names", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


def request(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_image_png(renderctl, tmp_path):
    req = request(tmp_path, "r.json", {"prompt": "starry night over mountains",
                                       "width": 128, "height": 64, "seed": 3})
    out = tmp_path / "o.png"
    r = renderctl("render", IMAGE, req, "-o", out, check=0)
    assert "128x64" in r.stdout and "seed 3" in r.stdout and "image/png" in r.stdout
    assert ffprobe(out, "codec_name") == "png"
    assert ffprobe(out, "width") == "128" and ffprobe(out, "height") == "64"
    again = tmp_path / "again.png"
    renderctl("render", IMAGE, req, "-o", again, "--threads", "3", check=0)
    assert b3(out) == b3(again)


def test_seed_is_reported_and_reproduces(renderctl, tmp_path):
    req = request(tmp_path, "r.json", {"prompt": "pink clouds", "width": 64, "height": 64})
    a = tmp_path / "a.png"
    r = renderctl("render", IMAGE, req, "-o", a, check=0)
    seed = int(re.search(r"seed (\d+)", r.stdout).group(1))
    req2 = request(tmp_path, "r2.json", {"prompt": "pink clouds", "width": 64, "height": 64,
                                         "seed": seed})
    b = tmp_path / "b.png"
    renderctl("render", IMAGE, req2, "-o", b, check=0)
    assert b3(a) == b3(b)
    req3 = request(tmp_path, "r3.json", {"prompt": "pink clouds", "width": 64, "height": 64,
                                         "seed": seed ^ 1})
    c = tmp_path / "c.png"
    renderctl("render", IMAGE, req3, "-o", c, check=0)
    assert b3(a) != b3(c)


def test_video_mp4_and_y4m(renderctl, tmp_path):
    req = request(tmp_path, "v.json", {"prompt": "fire burning, flickering", "width": 96,
                                       "height": 64, "num_frames": 6, "fps": 6, "seed": 1})
    out = tmp_path / "v.mp4"
    r = renderctl("render", VIDEO, req, "-o", out, check=0)
    assert "6 frames" in r.stdout and "video/mp4" in r.stdout
    assert ffprobe(out, "codec_name") == "h264"
    assert ffprobe(out, "nb_read_frames") == "6"
    assert ffprobe(out, "r_frame_rate") == "6/1"
    y = request(tmp_path, "y.json", {"prompt": "fire", "width": 64, "height": 64,
                                     "num_frames": 2, "format": "y4m", "seed": 1})
    yout = tmp_path / "v.y4m"
    renderctl("render", VIDEO, y, "-o", yout, check=0)
    data = yout.read_bytes()
    assert data.startswith(b"YUV4MPEG2 W64 H64 F24:1")
    assert data.count(b"FRAME\n") == 2
    assert ffprobe(yout, "nb_read_frames") == "2"


def test_invalid_requests(renderctl, tmp_path):
    cases = [
        ({"prompt": "x", "width": 100}, "'width' must be a multiple of 8 from 64 to 4096"),
        ({"prompt": "x", "width": 8192}, "'width' must be an integer from 64 to 4096"),
        ({"width": 64}, "'prompt' is required"),
        ({"prompt": "x", "steps": 20}, "unknown field 'steps'"),
    ]
    for obj, msg in cases:
        req = request(tmp_path, "bad.json", obj)
        out = tmp_path / "bad.png"
        r = renderctl("render", IMAGE, req, "-o", out, check=1)
        assert msg in r.stderr, r.stderr
        assert not out.exists()
    req = request(tmp_path, "v.json", {"prompt": "x", "num_frames": 1001})
    r = renderctl("render", VIDEO, req, "-o", tmp_path / "v.mp4", check=1)
    assert "'num_frames' must be an integer from 1 to 1000" in r.stderr
    r = renderctl("render", "video/wan/default/t2v", req, "-o", tmp_path / "w.mp4", check=1)
    assert "not a synth route" in r.stderr


def test_force_cpu(renderctl, tmp_path):
    import os
    req = request(tmp_path, "r.json", {"prompt": "sea", "width": 64, "height": 64, "seed": 2})
    env = dict(os.environ, RENDERFS_FORCE_CPU="1")
    r = renderctl("render", IMAGE, req, "-o", tmp_path / "o.png", check=0, env=env)
    assert "on cpu" in r.stdout
