"""An image server that speaks OpenAI's images API on 127.0.0.1, written
from the documentation of the three it stands for (PROTOCOLS.md "OpenAI
images"): OpenAI (`b64_json` or `url` as asked, `{"error": {...}}`),
stable-diffusion.cpp's sd-server (always `b64_json`, `{"error": "text"}`)
and LocalAI (`url` under /generated-images/ unless base64 is asked). It
records what it was asked."""

import base64
import json
import threading
import time

from fakefal import Handler, QuietServer, png


class FakeOpenAI:
    KEY = "sk-test-openai-0123456789"

    def __init__(self, flavour="openai"):
        self.flavour = flavour    # "openai", "sd-server" or "localai"
        self.lock = threading.Lock()
        self.key = self.KEY if flavour == "openai" else None
        self.fail = None          # (HTTP status, message) for every generation
        self.hang = 0             # seconds a generation takes before its answer
        self.payload = None       # bytes every image is instead of a PNG
        self.files_cut = 0        # image downloads cut short of Content-Length
        self.busy = 0             # generations answered 503 with Retry-After: 1
        self.garbled = False      # generations answered with a proxy's HTML page
        self.requests = []        # (body object, headers)
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def route(self, **extra):
        entry = {"backend": "openai-images", "base_url": self.base,
                 "media_type": "image/png", "deterministic": False, "timeout_s": 60,
                 "schema": {"type": "object", "required": ["prompt"], "properties": {
                     "prompt": {"type": "string"},
                     "n": {"type": "integer", "minimum": 1, "maximum": 4},
                     "size": {"type": "string", "enum": ["256x256", "512x512"]}}}}
        if self.key:
            entry["key"] = self.key
        entry.update(extra)
        return entry

    def image(self, i, k):
        return self.payload if self.payload is not None else png(2000 + i * 7 + k)

    def _handler(fake):
        class H(Handler):
            def error(self, code, message, param=None):
                if fake.flavour == "sd-server":
                    return self.answer(code, {"error": message})
                return self.answer(code, {"error": {"message": message, "type":
                                                    "invalid_request_error", "param": param,
                                                    "code": None}})

            def do_POST(self):
                data = self.body()
                if self.path != "/v1/images/generations":
                    return self.error(404, "not found")
                if fake.key and self.headers.get("Authorization") != "Bearer " + fake.key:
                    return self.error(401, "Incorrect API key provided")
                req = json.loads(data)
                with fake.lock:
                    fake.requests.append((req, dict(self.headers)))
                    i = len(fake.requests)
                if fake.hang:
                    time.sleep(fake.hang)
                if self.fault("busy"):
                    return self.answer(503, {"error": {"message": "overloaded"}},
                                       headers=[("Retry-After", "1")])
                if fake.garbled:
                    return self.answer(200, body=b"<html>upstream</html>", ctype="text/html")
                if fake.fail:
                    return self.error(fake.fail[0], fake.fail[1], "size")
                if fake.flavour == "localai" and not req.get("model"):
                    return self.error(400, "model is required")
                count = req.get("n", 1)
                b64 = (fake.flavour == "sd-server"
                       or req.get("response_format", "url" if fake.flavour == "localai"
                                  else "b64_json") == "b64_json")
                items = []
                for k in range(count):
                    if b64:
                        items.append({"b64_json": base64.b64encode(fake.image(i, k)).decode()})
                    else:
                        items.append({"url": f"{fake.base}/generated-images/{i}_{k}.png"})
                self.answer(200, {"created": 1764900000, "data": items})

            def do_GET(self):
                if not self.path.startswith("/generated-images/"):
                    return self.error(404, "not found")
                i, _, k = self.path.split("/")[-1].split(".")[0].partition("_")
                self.answer(200, body=fake.image(int(i), int(k)), ctype="image/png",
                            cut=self.fault("files_cut"))
        H.fake = fake
        return H
