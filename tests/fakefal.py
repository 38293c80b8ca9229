"""A fal queue service on 127.0.0.1, written from fal's documentation
(PROTOCOLS.md "fal.ai queue"): submit, status with logs, result, cancel,
and the result's files, with switches a test turns to make it fail, hold
or misbehave. It records what it was asked."""

import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def png(seed):
    """A real 2x2 RGB PNG whose pixels depend on seed."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    px = bytes((seed * 37 + i * 11) & 0xFF for i in range(12))
    raw = b"\x00" + px[:6] + b"\x00" + px[6:]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def mp4(seed):
    """The boxes an MP4 file starts with (ftyp, then mdat with bytes that
    depend on seed): what a video service's file looks like to a sniff."""
    import struct as st
    ftyp = b"ftyp" + b"isom" + st.pack(">I", 0x200) + b"isomiso2avc1mp41"
    data = bytes((seed * 53 + i * 7) & 0xFF for i in range(256))
    return (st.pack(">I", 8 + len(ftyp) - 4) + ftyp
            + st.pack(">I", 8 + len(data)) + b"mdat" + data)


class QuietServer(ThreadingHTTPServer):
    """A client that hangs up (a cancelled transfer, a daemon stopping)
    is part of every test here, not an error worth a traceback."""
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        import sys
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """What the fakes' request handlers share; `fake` is the service."""
    protocol_version = "HTTP/1.1"
    fake = None

    def log_message(self, *a):
        pass

    def answer(self, code, obj=None, body=None, ctype="application/json", headers=(),
               cut=False):
        data = body if body is not None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if cut:  # half the body, then the connection goes
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def fault(self, name):
        """Whether the next request of a kind gets fault `name` (a count
        the test set on the fake, taken down by one)."""
        with self.fake.lock:
            n = getattr(self.fake, name)
            if n:
                setattr(self.fake, name, n - 1)
            return n > 0

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""


class FakeFal:
    KEY = "fal-test-key-0123456789"

    def __init__(self):
        self.lock = threading.Lock()
        self.fail = None          # an HTTP status every request gets
        self.fail_submit = None   # the same for submissions only
        self.reject = None        # a 422 detail for submissions
        self.hold = False         # requests stay IN_PROGRESS
        self.submit_delay = 0     # seconds a submission's answer takes
        self.queue_polls = 1      # status polls that answer IN_QUEUE (positions count down)
        self.work_s = 0           # seconds of work before COMPLETED (else poll-driven)
        self.images = 1           # files in a result
        self.done_logs = ["step 2 of 2"]  # the lines a COMPLETED status adds
        # Faults, each for the next N requests of its kind:
        self.status_503 = 0       # status answers 503 with Retry-After: 1
        self.status_garbled = 0   # status answers that are not JSON
        self.result_429 = 0       # result answers 429 with Retry-After: 1
        self.files_cut = 0        # files whose body stops short of Content-Length
        self.status_hang = 0      # status answers that come after 5 s
        self.status_reset = 0     # status answers cut mid-body (the connection reset)
        self.deadline_504 = 0     # status answers 504 X-Fal-Request-Timeout-Type: user
        self.file_query = ""      # a query string on file URLs (a signed URL's)
        self.file_404 = 0         # file downloads answered 404
        self.file_size = None     # bytes of each file (default: the PNG)
        self.file_type = "image/png"
        self.video = False        # files are MP4 (video/mp4), not PNG
        self.submissions = []     # (request id, body object, headers)
        self.cancels = []
        self.cancel_gate = None   # a threading.Event cancels wait for (30 s at most)
        self.requests = {}        # id -> {"polls", "cancelled", "done"}
        self.outstanding = 0      # submitted, result not yet fetched
        self.max_outstanding = 0
        self.auth_seen = set()
        self.http_requests = 0    # every request, files included
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def route(self, model="fal-ai/fake/image", **extra):
        entry = {"backend": "fal", "model": model, "base_url": self.base, "key": self.KEY,
                 "media_type": "image/png", "deterministic": False, "timeout_s": 60,
                 "schema": {"type": "object", "required": ["prompt"], "properties": {
                     "prompt": {"type": "string"}, "seed": {"type": "integer"}}}}
        entry.update(extra)
        return entry

    def output(self, rid, k=0):
        seed = int(rid.split("-")[-1]) * 7 + k
        return mp4(seed) if self.video else png(seed)

    def _handler(fake):
        class H(Handler):
            def parse_request(self):
                with fake.lock:
                    fake.http_requests += 1
                return super().parse_request()

            def authorized(self):
                auth = self.headers.get("Authorization", "")
                with fake.lock:
                    fake.auth_seen.add(auth)
                if auth != "Key " + FakeFal.KEY:
                    self.answer(401, {"detail": "Invalid key"})
                    return False
                return True

            def do_POST(self):
                data = self.body()
                if fake.fail or fake.fail_submit:
                    return self.answer(fake.fail or fake.fail_submit,
                                       {"detail": "service unavailable"})
                if not self.authorized():
                    return
                if fake.reject:
                    return self.answer(422, {"detail": [{"loc": ["body", "prompt"],
                                                         "msg": fake.reject,
                                                         "type": "value_error"}]})
                model = self.path.strip("/")
                with fake.lock:
                    rid = f"req-{len(fake.submissions) + 1}"
                    fake.submissions.append((rid, json.loads(data), dict(self.headers)))
                    fake.requests[rid] = {"polls": 0, "cancelled": False, "done": False,
                                          "t0": time.monotonic()}
                    fake.outstanding += 1
                    fake.max_outstanding = max(fake.max_outstanding, fake.outstanding)
                if fake.submit_delay:
                    time.sleep(fake.submit_delay)
                app = "/".join(model.split("/")[:2])
                base = f"{fake.base}/{app}/requests/{rid}"
                self.answer(200, {"request_id": rid, "status": "IN_QUEUE",
                                  "queue_position": 1, "status_url": base + "/status",
                                  "response_url": base, "cancel_url": base + "/cancel"})

            def do_PUT(self):
                self.body()
                if not self.authorized():
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 2 or parts[-1] != "cancel":
                    return self.answer(404, {"detail": "Not found"})
                rid = parts[-2]
                with fake.lock:
                    fake.cancels.append(rid)
                    req = fake.requests.get(rid)
                    if req:
                        req["cancelled"] = True
                        if not req["done"]:
                            req["done"] = True
                            fake.outstanding -= 1
                if fake.cancel_gate:
                    fake.cancel_gate.wait(30)
                self.answer(202 if req else 404,
                            {"status": "CANCELLATION_REQUESTED" if req else "NOT_FOUND"})

            def do_GET(self):
                path = self.path.split("?")[0]
                if path.startswith("/files/"):
                    if self.fault("file_404"):
                        return self.answer(404, body=b"NoSuchKey", ctype="text/plain")
                    name = path.split("/")[-1].split(".")[0]  # req-N or req-N_k
                    rid, _, k = name.partition("_")
                    body = fake.output(rid, int(k or 0))
                    if fake.file_size:
                        body = (body * (fake.file_size // len(body) + 1))[:fake.file_size]
                    return self.answer(200, body=body,
                                       ctype="video/mp4" if fake.video else fake.file_type,
                                       cut=self.fault("files_cut"))
                if fake.fail:
                    return self.answer(fake.fail, {"detail": "service unavailable"})
                if not self.authorized():
                    return
                parts = path.strip("/").split("/")
                if "requests" not in parts:
                    return self.answer(404, {"detail": "Not found"})
                rid = parts[parts.index("requests") + 1]
                with fake.lock:
                    req = fake.requests.get(rid)
                    if req is None:
                        return self.answer(404, {"detail": "Request not found"})
                    if parts[-1] == "status":
                        req["polls"] += 1
                        polls = req["polls"]
                if parts[-1] == "status" and self.fault("status_hang"):
                    time.sleep(5)
                if parts[-1] == "status" and self.fault("status_reset"):
                    return self.answer(200, {"status": "IN_PROGRESS", "logs": []}, cut=True)
                if parts[-1] == "status" and self.fault("deadline_504"):
                    return self.answer(504, {"detail": "Request timed out"},
                                       headers=[("X-Fal-Request-Timeout-Type", "user")])
                if parts[-1] == "status" and self.fault("status_503"):
                    return self.answer(503, {"detail": "busy"}, headers=[("Retry-After", "1")])
                if parts[-1] == "status" and self.fault("status_garbled"):
                    return self.answer(200, body=b"<html>upstream error</html>",
                                       ctype="text/html")
                if parts[-1] != "status" and self.fault("result_429"):
                    return self.answer(429, {"detail": "slow down"},
                                       headers=[("Retry-After", "1")])
                if parts[-1] == "status":
                    logs = [{"message": "loading model", "level": "INFO"}]
                    if polls <= fake.queue_polls:
                        return self.answer(202, {"status": "IN_QUEUE",
                                                 "queue_position": fake.queue_polls - polls})
                    if fake.work_s:
                        busy = time.monotonic() - req["t0"] < fake.work_s
                    else:
                        busy = polls == fake.queue_polls + 1
                    if busy or fake.hold or req["cancelled"]:
                        logs.append({"message": "denoising 3/12", "level": "INFO"})
                        return self.answer(202, {"status": "IN_PROGRESS", "logs": logs})
                    logs.append({"message": "denoising 3/12", "level": "INFO"})
                    logs += [{"message": t, "level": "INFO"} for t in fake.done_logs]
                    return self.answer(200, {"status": "COMPLETED", "logs": logs,
                                             "metrics": {"inference_time": 0.75}})
                with fake.lock:
                    if not req["done"]:
                        req["done"] = True
                        fake.outstanding -= 1
                ext = "mp4" if fake.video else "png" if fake.file_type == "image/png" else "html"
                images = [{"url": f"{fake.base}/files/{rid}" + (f"_{k}" if k else "")
                           + f".{ext}" + fake.file_query,
                           "content_type": "video/mp4" if fake.video else fake.file_type,
                           "width": 2, "height": 2}
                          for k in range(fake.images)]
                if fake.video:  # as fal's video models answer
                    return self.answer(200, {"video": images[0], "seed": 42})
                return self.answer(200, {"images": images, "seed": 42,
                                         "has_nsfw_concepts": [False] * fake.images})
        H.fake = fake
        return H
