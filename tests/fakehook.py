"""A webhook receiver on 127.0.0.1 for the tests: it keeps every request
(headers and the exact body bytes) and answers what the test says.

`answers` is a list of (status, headers) taken one per request; when it is
empty, `default` is answered. `down()` closes the listening socket (new
connections are refused) and `up()` listens again on the same port.
"""
import http.server
import threading
import time


class Hook:
    def __init__(self, default=200):
        self.requests = []          # dicts: path, headers (lower-case), body, at
        self.answers = []
        self.default = default
        self.cond = threading.Condition()
        self.server = None
        self.port = None
        self.up()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self):
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with hook.cond:
                    status, headers = (hook.answers.pop(0) if hook.answers
                                       else (hook.default, {}))
                    hook.requests.append({
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body, "at": time.time(), "status": status})
                    hook.cond.notify_all()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", self.port or 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self):
        self.server.shutdown()
        self.server.server_close()

    def close(self):
        self.down()

    def wait_for(self, pred, what, timeout=30):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not within {timeout} s: {what}; "
                                         f"got {len(self.requests)} requests")
                self.cond.wait(left)
            return list(self.requests)

