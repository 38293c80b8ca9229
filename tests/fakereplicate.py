"""Replicate's predictions API on 127.0.0.1, written from Replicate's
documentation (PROTOCOLS.md "Replicate predictions"): create (by model or
by version), get, cancel, and the output's files, with switches a test
turns to make it fail, hold or end in each final status. It records what
it was asked."""

import json
import threading
import time

from fakefal import Handler, QuietServer, png


class FakeReplicate:
    KEY = "r8_test_token_0123456789"

    def __init__(self):
        self.lock = threading.Lock()
        self.fail_create = None   # an HTTP status every creation gets
        self.create_429 = 0       # creations answered 429 with Retry-After: 1
        self.poll_503 = 0         # gets answered 503
        self.reject = None        # a 422 detail for creations
        self.start_polls = 1      # gets that answer `starting`
        self.work_polls = 2       # then gets that answer `processing`
        self.hold = False         # stay `processing`
        self.final = "succeeded"  # or failed, canceled, aborted
        self.outputs = 1          # files; 1 gives a bare URL string
        self.as_list = False      # a list even for one file
        self.file_hang = 0        # seconds a file download takes before its body
        self.poll_hang = 0        # gets that answer after 5 s
        self.poll_garbled = 0     # gets answered with a proxy's HTML page
        self.files_cut = 0        # file downloads cut short of Content-Length
        self.file_type = "image/png"
        self.creates = []         # (id, path, body object, headers)
        self.gets = 0
        self.cancels = []
        self.preds = {}
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def route(self, model="acme/painter", **extra):
        entry = {"backend": "replicate", "model": model, "base_url": self.base,
                 "key": self.KEY, "media_type": "image/png", "deterministic": False,
                 "timeout_s": 60,
                 "schema": {"type": "object", "required": ["prompt"], "properties": {
                     "prompt": {"type": "string"}, "seed": {"type": "integer"}}}}
        entry.update(extra)
        return entry

    def output(self, pid, k=0):
        return png(1000 + int(pid.split("-")[-1]) * 7 + k)

    def prediction(self, pid):
        p = self.preds[pid]
        out = None
        if p["status"] == "succeeded":
            urls = [f"{self.host}/files/{pid}_{k}.png" for k in range(self.outputs)]
            out = urls if (self.outputs > 1 or self.as_list) else urls[0]
        return {"id": pid, "model": p["model"], "version": "v-abc123",
                "input": p["input"], "logs": p["logs"], "output": out,
                "error": "CUDA out of memory" if p["status"] == "failed" else None,
                "status": p["status"], "created_at": "2026-12-05T00:00:00Z",
                "metrics": {"predict_time": 1.25} if p["status"] == "succeeded" else {},
                "urls": {"get": f"{self.base}/predictions/{pid}",
                         "cancel": f"{self.base}/predictions/{pid}/cancel"}}

    def _handler(fake):
        class H(Handler):
            def authorized(self):
                if self.headers.get("Authorization") != "Bearer " + FakeReplicate.KEY:
                    self.answer(401, {"title": "Unauthenticated",
                                      "detail": "You did not pass a valid authentication token",
                                      "status": 401})
                    return False
                return True

            def do_POST(self):
                data = self.body()
                path = self.path.split("?")[0]
                if not self.authorized():
                    return
                if path.endswith("/cancel"):
                    pid = path.split("/")[-2]
                    with fake.lock:
                        fake.cancels.append(pid)
                        p = fake.preds.get(pid)
                        if p and p["status"] in ("starting", "processing"):
                            p["status"] = "canceled"
                    if not p:
                        return self.answer(404, {"detail": "Not found.", "status": 404})
                    return self.answer(200, fake.prediction(pid))
                if fake.fail_create:
                    return self.answer(fake.fail_create, {"detail": "unavailable"})
                if self.fault("create_429"):
                    return self.answer(429, {"title": "Too Many Requests",
                                             "detail": "Request was throttled.", "status": 429},
                                       headers=[("Retry-After", "1")])
                if fake.reject:
                    return self.answer(422, {"title": "Input validation failed",
                                             "detail": fake.reject, "status": 422})
                req = json.loads(data)
                if path == "/v1/predictions":
                    model = "acme/painter"
                elif path.startswith("/v1/models/") and path.endswith("/predictions"):
                    model = "/".join(path.split("/")[3:5])
                else:
                    return self.answer(404, {"detail": "Not found.", "status": 404})
                with fake.lock:
                    pid = f"pred-{len(fake.creates) + 1}"
                    fake.creates.append((pid, path, req, dict(self.headers)))
                    fake.preds[pid] = {"status": "starting", "model": model, "polls": 0,
                                       "input": req.get("input"), "logs": ""}
                self.answer(201, fake.prediction(pid))

            def do_GET(self):
                path = self.path.split("?")[0]
                if path.startswith("/files/"):
                    pid, _, k = path.split("/")[-1].split(".")[0].partition("_")
                    if fake.file_hang:
                        time.sleep(fake.file_hang)
                    return self.answer(200, body=fake.output(pid, int(k or 0)),
                                       ctype=fake.file_type, cut=self.fault("files_cut"))
                if not self.authorized():
                    return
                if self.fault("poll_hang"):
                    time.sleep(5)
                if self.fault("poll_garbled"):
                    return self.answer(200, body=b"<html>502 Bad Gateway</html>",
                                       ctype="text/html")
                if self.fault("poll_503"):
                    return self.answer(503, {"detail": "busy"}, headers=[("Retry-After", "1")])
                pid = path.split("/")[-1]
                with fake.lock:
                    fake.gets += 1
                    p = fake.preds.get(pid)
                    if not p:
                        return self.answer(404, {"detail": "Not found.", "status": 404})
                    if p["status"] in ("starting", "processing"):
                        p["polls"] += 1
                        n = p["polls"]
                        if n > fake.start_polls:
                            p["status"] = "processing"
                            p["logs"] = "loading weights\n"
                        if n > fake.start_polls + 1:
                            # tqdm redraws its line with \r
                            p["logs"] += "  0%|          | 0/4\r 50%|#####     | 2/4\n"
                        if n > fake.start_polls + fake.work_polls and not fake.hold:
                            p["logs"] += "100%|##########| 4/4\nsaving"
                            p["status"] = fake.final
                    body = fake.prediction(pid)
                self.answer(200, body)
        H.fake = fake
        return H
