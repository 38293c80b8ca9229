"""A ComfyUI server on 127.0.0.1, written from ComfyUI's server.py and
PROTOCOLS.md "ComfyUI": POST /prompt (validation with node_errors, the
client's prompt_id taken as current servers do), one prompt executed at a
time in number order, GET /history/{id}, GET /queue, POST /queue
{"delete"}, POST /api/jobs/{id}/cancel, POST /interrupt (global, as on
most servers), GET /view. Its nodes are a small stand-in for the stock
ones: a checkpoint loader, a text encoder, an empty latent, a sampler, a
decoder and SaveImage/PreviewImage, whose images are real PNGs of the
latent's size with pixels that depend on the text and the seed. A test
turns switches to hold prompts, fail a node, drop client ids (an older
server), lack the per-prompt cancel, or restart (losing every prompt, as
ComfyUI keeps them in memory)."""

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import urllib.parse
import uuid
import zlib

from fakefal import Handler, QuietServer

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CHECKPOINTS = ["sd15.safetensors", "sdxl.safetensors", "v1-5-pruned-emaonly.safetensors"]

# A workflow in API format, as ComfyUI's "Export (API)" writes it.
WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48,
                                                       "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "renderfs",
                                                "images": ["8", 0]}},
}


def png(width, height, key):
    """A real RGB PNG of width x height whose pixels depend on key."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    seed = hashlib.sha256(key.encode()).digest()
    rows = []
    for y in range(height):
        row = bytes((seed[(x + y) % 32] + x * 3 + y * 5) & 0xFF
                    for x in range(width * 3))
        rows.append(b"\x00" + row)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def node_error(node, cls, kind, message, details):
    return {"errors": [{"type": kind, "message": message, "details": details,
                        "extra_info": {}}],
            "dependent_outputs": ["9"], "class_type": cls}


def validate(prompt, files=None):
    """ComfyUI's validate_prompt, for the stand-in nodes: (error, node_errors)."""
    if not isinstance(prompt, dict) or not prompt:
        return {"type": "invalid_prompt", "message": "Cannot execute because the prompt "
                "is not an object", "details": "", "extra_info": {}}, {}
    errors = {}
    for nid, node in prompt.items():
        cls, inputs = node.get("class_type"), node.get("inputs", {})
        if cls == "CheckpointLoaderSimple" and inputs.get("ckpt_name") not in CHECKPOINTS:
            errors[nid] = node_error(nid, cls, "value_not_in_list", "Value not in list",
                                     f"ckpt_name: '{inputs.get('ckpt_name')}' not in "
                                     f"{CHECKPOINTS}")
        if cls == "EmptyLatentImage":
            for k in ("width", "height"):
                v = inputs.get(k)
                if not isinstance(v, int) or v < 16 or v > 512:
                    errors[nid] = node_error(nid, cls, "value_bigger_than_max" if
                                             isinstance(v, int) and v > 512 else
                                             "value_smaller_than_min",
                                             "Value out of range", f"{k}: {v}")
        if cls == "LoadImage" and ("", inputs.get("image"), "input") not in (files or {}) \
                and tuple(str(inputs.get("image")).rpartition("/")[::2]) + ("input",) \
                not in (files or {}):
            errors[nid] = node_error(nid, cls, "custom_validation_failed",
                                     "Custom validation failed for node",
                                     f"image - Invalid image file: {inputs.get('image')}")
        if cls == "CLIPTextEncode" and not isinstance(inputs.get("text"), str):
            errors[nid] = node_error(nid, cls, "invalid_input_type", "Invalid input type",
                                     "text: not a string")
    if errors:
        return {"type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation", "details": "",
                "extra_info": {}}, errors
    return None, {}


class WebSocket:
    """The server side of one /ws connection (RFC 6455): frames out
    unmasked, frames in masked, as the protocol says."""

    def __init__(self, conn, rfile):
        self.conn, self.rfile, self.lock = conn, rfile, threading.Lock()

    def send(self, op, payload):
        n = len(payload)
        head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else
                                     b"\x7e" + struct.pack(">H", n) if n < 65536 else
                                     b"\x7f" + struct.pack(">Q", n))
        try:
            with self.lock:
                self.conn.sendall(head + payload)
        except OSError:
            pass

    def text(self, obj, fragments=1):
        data = json.dumps(obj).encode()
        if fragments == 1:
            return self.send(0x1, data)
        # A message in several frames: text, continuation..., the last FIN.
        cut = len(data) // 2
        for k, (op, part) in enumerate(((0x1, data[:cut]), (0x0, data[cut:]))):
            fin = 0x80 if k == 1 else 0
            try:
                with self.lock:
                    self.conn.sendall(bytes([fin | op, len(part)]) + part)
            except OSError:
                pass

    def raw(self, data):
        try:
            with self.lock:
                self.conn.sendall(data)
        except OSError:
            pass

    def read(self):
        """(opcode, payload), or (None, b"") at the end."""
        head = self.rfile.read(2)
        if len(head) < 2:
            return None, b""
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.rfile.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.rfile.read(8))[0]
        if not head[1] & 0x80:
            raise AssertionError("a client frame that is not masked")
        mask = self.rfile.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
        return head[0] & 0x0F, data

    def close(self):
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeComfy:
    def __init__(self):
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.work_s = 0.2          # seconds each prompt runs
        self.hold = False          # prompts run until released
        self.fail_node = None      # (node id, message): the sampler raises
        self.takes_ids = True      # a current server: the client's prompt_id is used
        self.job_cancel = True     # POST /api/jobs/{id}/cancel exists
        self.submit_drop = 0       # submissions queued, then the connection dropped
        self.history_503 = 0       # history answers 503
        self.prompts = []          # (prompt_id, body) of each accepted POST /prompt
        self.rejected = []         # bodies refused with node_errors
        self.deletes = []          # ids in POST /queue {"delete"}
        self.cancels = []          # ids in POST /api/jobs/{id}/cancel
        self.interrupts = 0        # POST /interrupt (global)
        self.views = []            # query strings of GET /view
        self.uploads = []          # (form fields, filename, bytes) of POST /upload/image
        self.queue_gets = 0
        self.history_gets = 0
        self.number = 0
        self.pending = []          # [number, id, prompt, extra, outputs]
        self.running = None        # the same, while it runs
        self.interrupted = None    # the running id to interrupt
        self.history = {}
        self.files = {}            # (subfolder, filename, type) -> bytes
        self.generation = 0        # bumped by restart()
        self.sockets = {}          # clientId -> WebSocket (a new one replaces the old)
        self.ws_clients = []       # clientIds that connected, in order
        self.pongs = 0
        self.no_ws = False         # /ws is not there (an older proxy, say)
        self.ws_hostile = False    # the first sockets break the protocol
        self.garbage = False       # queue and history hold values of the wrong types
        self.stop = False
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.worker = threading.Thread(target=self._execute, daemon=True)
        self.worker.start()

    def close(self):
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def restart(self):
        """What a restarted ComfyUI knows: nothing (queue and history are
        in its memory). A prompt that was running is abandoned."""
        with self.cond:
            self.pending, self.running, self.history = [], None, {}
            self.generation += 1
            for ws in self.sockets.values():
                ws.close()
            self.cond.notify_all()

    def release(self):
        with self.cond:
            self.hold = False
            self.cond.notify_all()

    def route(self, workflow="workflow.json", **extra):
        entry = {"backend": "comfyui", "base_url": self.base, "workflow": workflow,
                 "media_type": "image/png", "deterministic": False, "timeout_s": 60,
                 "bindings": {"prompt": "6.inputs.text", "seed": "3.inputs.seed",
                              "width": "5.inputs.width", "height": "5.inputs.height"},
                 "output_node": "9",
                 "schema": {"type": "object", "required": ["prompt"],
                            "additionalProperties": False, "properties": {
                                "prompt": {"type": "string", "maxLength": 500},
                                "seed": {"type": "integer", "default": 7},
                                "width": {"type": "integer", "default": 64},
                                "height": {"type": "integer", "default": 48}}}}
        entry.update(extra)
        return entry

    def image(self, prompt, index=0):
        """The bytes SaveImage writes for batch item index of a prompt."""
        inputs = {n["class_type"]: n["inputs"] for n in prompt.values()}
        lat, text = inputs["EmptyLatentImage"], inputs["CLIPTextEncode"]["text"]
        seed = inputs["KSampler"]["seed"]
        return png(lat["width"], lat["height"], f"{text}|{seed}|{index}")

    def wait_running(self, pid, timeout=10):
        end = time.time() + timeout
        with self.cond:
            while not (self.running and self.running[1] == pid):
                left = end - time.time()
                assert left > 0, f"prompt {pid} never ran"
                self.cond.wait(left)

    # ---- the executor: one prompt at a time, lowest number first ----

    def _execute(self):
        while True:
            with self.cond:
                while not self.stop and (not self.pending or self.running):
                    self.cond.wait()
                if self.stop:
                    return
                self.pending.sort(key=lambda it: it[0])
                item = self.pending.pop(0)
                self.running = item
                gen = self.generation
                self.cond.notify_all()
                client, pid = item[3].get("client_id"), item[1]
                # A preview (binary, over 64 KiB) and the sampler's steps,
                # as ComfyUI sends them to the prompt's client.
                self._emit(client, None, b"\x00\x00\x00\x01" + bytes(100000))
                self._emit(client, {"type": "executing", "data": {"node": "3",
                                                                  "prompt_id": pid}})
                start = time.time()
                end = start + self.work_s
                while not self.stop and gen == self.generation and (
                        self.hold or time.time() < end) and self.interrupted != pid:
                    step = 2 if self.hold else min(4, 1 + int(4 * (time.time() - start) /
                                                          max(self.work_s, 0.01)))
                    self._emit(client, {"type": "progress", "data": {
                        "value": step, "max": 4, "prompt_id": pid, "node": "3"}})
                    self.cond.wait(0.05 if not self.hold else 0.2)
                if self.stop or gen != self.generation:
                    continue
                self._finish(item)
                self.running = None
                self.cond.notify_all()

    def _emit(self, client, obj, binary=None):
        """Send to the socket of client (under self.lock)."""
        ws = self.sockets.get(client)
        if ws is None:
            return
        if binary is not None:
            ws.send(0x2, binary)
        else:
            ws.text(obj, fragments=2 if self.ws_hostile else 1)

    def _finish(self, item):
        number, pid, prompt, extra, outs = item
        status = {"status_str": "success", "completed": True, "messages": [
            ["execution_start", {"prompt_id": pid, "timestamp": 1}],
            ["execution_cached", {"nodes": [], "prompt_id": pid, "timestamp": 1}]]}
        outputs = {}
        if self.interrupted == pid:
            self.interrupted = None
            status = {"status_str": "error", "completed": False, "messages": [
                ["execution_start", {"prompt_id": pid, "timestamp": 1}],
                ["execution_interrupted", {"prompt_id": pid, "node_id": "3",
                                           "node_type": "KSampler", "executed": ["4", "5"],
                                           "timestamp": 2}]]}
        elif self.garbage:
            status = {"status_str": "error", "completed": False,
                      "messages": {"not": "a list"}}
        elif self.fail_node:
            nid, msg = self.fail_node
            status = {"status_str": "error", "completed": False, "messages": [
                ["execution_start", {"prompt_id": pid, "timestamp": 1}],
                ["execution_error", {"prompt_id": pid, "node_id": nid,
                                     "node_type": prompt[nid]["class_type"],
                                     "executed": [], "exception_message": msg,
                                     "exception_type": "torch.OutOfMemoryError",
                                     "traceback": ["..."], "current_inputs": {},
                                     "current_outputs": {}, "timestamp": 2}]]}
        else:
            for nid, node in prompt.items():
                if node["class_type"] not in ("SaveImage", "PreviewImage"):
                    continue
                save = node["class_type"] == "SaveImage"
                prefix = node["inputs"].get("filename_prefix", "ComfyUI") if save \
                    else "ComfyUI_temp"
                loads = [n["inputs"]["image"] for n in prompt.values()
                         if n["class_type"] == "LoadImage"]
                batch = next((n["inputs"].get("batch_size", 1) for n in prompt.values()
                              if n["class_type"] == "EmptyLatentImage"), 1)
                images = []
                for k in range(batch):
                    name = f"{prefix}_{number:05d}_{k}_.png"
                    kind = "output" if save else "temp"
                    sub = "runs" if save else ""
                    # An image-to-image graph of this fake gives back its
                    # input unchanged: the bytes travelled exactly.
                    sub_in, _, base = loads[0].rpartition("/") if loads else ("", "", "")
                    self.files[(sub, name, kind)] = self.files[(sub_in, base, "input")] \
                        if loads else self.image(prompt, k)
                    images.append({"filename": name, "subfolder": sub, "type": kind})
                outputs[nid] = {"images": images}
        self.history[pid] = {"prompt": [number, pid, prompt, extra, outs],
                             "outputs": outputs, "status": status, "meta": {}}

    # ---- HTTP ----

    def _handler(fake):
        class H(Handler):
            def do_POST(self):
                data = self.body()
                path = self.path.split("?")[0]
                if path == "/prompt":
                    return self.post_prompt(json.loads(data))
                if path == "/upload/image":
                    return self.upload(data)
                if path == "/queue":
                    req = json.loads(data)
                    with fake.cond:
                        for pid in req.get("delete", []):
                            fake.deletes.append(pid)
                            fake.pending = [it for it in fake.pending if it[1] != pid]
                    return self.answer(200, body=b"", ctype="text/plain")
                if path == "/interrupt":
                    with fake.cond:
                        fake.interrupts += 1
                        if fake.running:
                            fake.interrupted = fake.running[1]
                        fake.cond.notify_all()
                    return self.answer(200, body=b"", ctype="text/plain")
                if path.startswith("/api/jobs/") and path.endswith("/cancel"):
                    if not fake.job_cancel:
                        return self.answer(404, body=b"404: Not Found", ctype="text/plain")
                    pid = path.split("/")[3]
                    with fake.cond:
                        fake.cancels.append(pid)
                        if fake.running and fake.running[1] == pid:
                            fake.interrupted = pid
                        fake.pending = [it for it in fake.pending if it[1] != pid]
                        fake.cond.notify_all()
                    return self.answer(200, {"id": pid, "status": "cancelled"})
                self.answer(404, body=b"404: Not Found", ctype="text/plain")

            def upload(self, data):
                """multipart/form-data as ComfyUI's image_upload reads it."""
                ctype = self.headers.get("Content-Type", "")
                if not ctype.startswith("multipart/form-data; boundary="):
                    return self.answer(400, body=b"", ctype="text/plain")
                boundary = ctype.split("boundary=", 1)[1].encode()
                fields, filename, content = {}, None, None
                for part in data.split(b"--" + boundary)[1:]:
                    if part.startswith(b"--"):
                        break
                    head, _, body = part[2:].partition(b"\r\n\r\n")
                    body = body[:-2]  # the CRLF before the next boundary
                    disp = head.decode().split("\r\n")[0]
                    name = disp.split('name="', 1)[1].split('"', 1)[0]
                    if 'filename="' in disp:
                        filename = disp.split('filename="', 1)[1].split('"', 1)[0]
                        content = body
                    else:
                        fields[name] = body.decode()
                if not filename or content is None:
                    return self.answer(400, body=b"", ctype="text/plain")
                with fake.lock:
                    fake.uploads.append((fields, filename, content))
                    fake.files[("", filename, fields.get("type", "input"))] = content
                self.answer(200, {"name": filename, "subfolder": "",
                                  "type": fields.get("type", "input")})

            def post_prompt(self, req):
                prompt = req.get("prompt")
                with fake.lock:
                    files = dict(fake.files)
                error, node_errors = validate(prompt, files)
                if error:
                    with fake.lock:
                        fake.rejected.append(req)
                    return self.answer(400, {"error": error, "node_errors": node_errors})
                pid = req["prompt_id"] if fake.takes_ids and "prompt_id" in req \
                    else str(uuid.uuid4())
                extra = {"client_id": req.get("client_id")}
                with fake.cond:
                    number = fake.number
                    fake.number += 1
                    fake.prompts.append((pid, req))
                    fake.pending.append([number, pid, prompt, extra, ["9"]])
                    fake.cond.notify_all()
                if self.fault("submit_drop"):
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.answer(200, {"prompt_id": pid, "number": number, "node_errors": {}})

            def websocket(self, sid):
                accept = base64.b64encode(hashlib.sha1(
                    (self.headers["Sec-WebSocket-Key"] + GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                ws = WebSocket(self.connection, self.rfile)
                n = len(fake.ws_clients)
                if fake.ws_hostile and n < 4:
                    with fake.lock:
                        fake.ws_clients.append(sid)
                    if n == 0:    # reserved bits no extension allows
                        ws.raw(b"\xf1\x05hello")
                    elif n == 1:  # a text frame claiming 2^62 bytes, then a hang-up
                        ws.raw(b"\x81\x7f" + struct.pack(">Q", 1 << 62) + bytes(100000))
                    elif n == 2:  # a ping longer than a control frame may be
                        ws.raw(b"\x89\x7e" + struct.pack(">H", 200) + bytes(200))
                    else:         # a length with its top bit set (2^64 - 1)
                        ws.raw(b"\x81\x7f" + b"\xff" * 8 + bytes(64))
                    time.sleep(0.2)
                    ws.close()
                    self.close_connection = True
                    return
                with fake.lock:
                    fake.sockets[sid] = ws
                    fake.ws_clients.append(sid)
                ws.text({"type": "status", "data": {"status": {"exec_info": {
                    "queue_remaining": len(fake.pending)}}, "sid": sid}})
                ws.send(0x9, b"ping")
                try:
                    while True:
                        op, _ = ws.read()
                        if op is None or op == 0x8:
                            break
                        if op == 0xA:
                            with fake.lock:
                                fake.pongs += 1
                except OSError:
                    pass
                finally:
                    with fake.lock:
                        if fake.sockets.get(sid) is ws:
                            del fake.sockets[sid]
                self.close_connection = True

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                path = url.path
                if path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket" \
                        and not fake.no_ws:
                    return self.websocket(dict(urllib.parse.parse_qsl(url.query)).get(
                        "clientId", ""))
                if path.startswith("/history/"):
                    if self.fault("history_503"):
                        return self.answer(503, body=b"busy", ctype="text/plain")
                    pid = path.split("/")[2]
                    with fake.lock:
                        fake.history_gets += 1
                        h = fake.history.get(pid)
                        return self.answer(200, {pid: h} if h else {})
                if path == "/queue":
                    with fake.lock:
                        fake.queue_gets += 1
                        running = [fake.running] if fake.running else []
                        pending = list(fake.pending)
                        if fake.garbage:
                            running = [7, "x", {"a": 1}, [None]] + running
                            pending = ["y", 3.5, [], [None, 5]] + pending
                        return self.answer(200, {"queue_running": running,
                                                 "queue_pending": pending})
                if path == "/view":
                    q = dict(urllib.parse.parse_qsl(url.query))
                    with fake.lock:
                        fake.views.append(url.query)
                        name = q.get("filename", "")
                        if name.startswith("/") or ".." in name:
                            return self.answer(400, body=b"", ctype="text/plain")
                        key = (q.get("subfolder", ""), name, q.get("type", "output"))
                        data = fake.files.get(key)
                    if data is None:
                        return self.answer(404, body=b"", ctype="text/plain")
                    return self.answer(200, body=data, ctype="image/png")
                self.answer(404, body=b"404: Not Found", ctype="text/plain")
        H.fake = fake
        return H
