"""A lean fal queue service for benchmarks: the same protocol as
tests/fakefal.py (submit, status with logs, result, the result's file;
PROTOCOLS.md "fal.ai queue") and the same answers (but a file that differs
for every request), without its fault switches, served by one asyncio
thread with HTTP/1.1 keep-alive instead of a Python thread per
connection.

Why: on a small machine the service shares the cores with the daemon it
measures. tests/fakefal.py spends ~0.25 ms of CPU a request (http.server's
header parsing, one thread per connection contending for the GIL); with
1,000 jobs finishing together that is most of a core, and the benchmark
then measures the fake. This one spends a fraction of that, so what is
left is the daemon's. It answers only well-formed requests from the
daemon; anything else closes the connection.

Attributes read by bench_remote.py: base, work_s, queue_polls, hold,
submissions, requests (id -> {"t0", "polls", "done"}), http_requests,
outstanding, max_outstanding.
"""
import asyncio
import json
import struct
import sys
import pathlib
import threading
import time
import zlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from fakefal import png  # noqa: E402

KEY = "fal-test-key-0123456789"


def unique_png(n):
    """tests/fakefal.py's image for request n, with a text chunk naming the
    request: every request's file differs, as a real service's do (that
    image alone repeats every 256 requests, and a store that finds an
    output it has already stored writes nothing)."""
    img = png(n * 7)
    text = b"Comment\x00request %d" % n
    chunk = (struct.pack(">I", len(text)) + b"tEXt" + text
             + struct.pack(">I", zlib.crc32(b"tEXt" + text) & 0xFFFFFFFF))
    return img[:33] + chunk + img[33:]  # after the signature and IHDR


class LeanFal:
    KEY = KEY

    def __init__(self):
        self.work_s = 2
        self.queue_polls = 0
        self.hold = False
        self.submissions = []
        self.requests = {}
        self.http_requests = 0
        self.outstanding = 0
        self.max_outstanding = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()
        self.base = f"http://127.0.0.1:{self.port}"

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._conn, "127.0.0.1", 0, backlog=2048))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self):
        def stop():
            self.server.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join()

    def route(self, model="fal-ai/fake/image", **extra):
        entry = {"backend": "fal", "model": model, "base_url": self.base, "key": KEY,
                 "media_type": "image/png", "deterministic": False, "timeout_s": 60,
                 "schema": {"type": "object", "required": ["prompt"], "properties": {
                     "prompt": {"type": "string"}, "seed": {"type": "integer"}}}}
        entry.update(extra)
        return entry

    @staticmethod
    def _answer(w, code, body, ctype=b"application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        reason = {200: b"OK", 202: b"Accepted", 401: b"Unauthorized", 404: b"Not Found"}
        w.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                % (code, reason.get(code, b"X"), ctype, len(body)) + body)

    async def _conn(self, r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, target, _ = lines[0].split(b" ", 2)
                hdrs = {}
                for ln in lines[1:]:
                    k, sep, v = ln.partition(b":")
                    if sep:
                        hdrs[k.strip().lower()] = v.strip()
                body = b""
                if b"content-length" in hdrs:
                    body = await r.readexactly(int(hdrs[b"content-length"]))
                self.http_requests += 1
                self._handle(w, method, target.decode().split("?")[0], hdrs, body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError,
                asyncio.LimitOverrunError):
            pass
        finally:
            w.close()

    def _handle(self, w, method, path, hdrs, body):
        if path.startswith("/files/"):
            rid = path.split("/")[-1].split(".")[0]
            return self._answer(w, 200, unique_png(int(rid.split("-")[-1])), b"image/png")
        if hdrs.get(b"authorization") != b"Key " + KEY.encode():
            return self._answer(w, 401, {"detail": "Invalid key"})
        parts = path.strip("/").split("/")
        if method == b"POST":
            rid = f"req-{len(self.submissions) + 1}"
            self.submissions.append((rid, json.loads(body), None))
            self.requests[rid] = {"polls": 0, "done": False, "t0": time.monotonic()}
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            base = f"{self.base}/{'/'.join(parts[:2])}/requests/{rid}"
            return self._answer(w, 200, {"request_id": rid, "status": "IN_QUEUE",
                                         "queue_position": 1, "status_url": base + "/status",
                                         "response_url": base, "cancel_url": base + "/cancel"})
        if "requests" not in parts:
            return self._answer(w, 404, {"detail": "Not found"})
        req = self.requests.get(parts[parts.index("requests") + 1])
        if req is None:
            return self._answer(w, 404, {"detail": "Request not found"})
        if parts[-1] == "status":
            req["polls"] += 1
            logs = [{"message": "loading model", "level": "INFO"}]
            if req["polls"] <= self.queue_polls:
                return self._answer(w, 202, {"status": "IN_QUEUE",
                                             "queue_position": self.queue_polls - req["polls"]})
            logs.append({"message": "denoising 3/12", "level": "INFO"})
            if self.hold or time.monotonic() - req["t0"] < self.work_s:
                return self._answer(w, 202, {"status": "IN_PROGRESS", "logs": logs})
            logs.append({"message": "step 2 of 2", "level": "INFO"})
            return self._answer(w, 200, {"status": "COMPLETED", "logs": logs,
                                         "metrics": {"inference_time": 0.75}})
        if not req["done"]:
            req["done"] = True
            self.outstanding -= 1
        rid = parts[-1]
        return self._answer(w, 200, {"images": [{"url": f"{self.base}/files/{rid}.png",
                                                 "content_type": "image/png",
                                                 "width": 2, "height": 2}],
                                     "seed": 42, "has_nsfw_concepts": [False]})
