"""An S3 endpoint for the tests that checks every request's AWS Signature
Version 4 with botocore's own signer before anything else, then passes it
on to a real S3 server (s3rver, which does not check signatures itself).

A request whose signature is missing or differs from what botocore
computes for the same method, path, query, signed headers and credentials
is answered 403 SignatureDoesNotMatch and kept in `refused`; so is a body
whose SHA-256 differs from a signed x-amz-content-sha256. `verified`
counts the good ones. `down()` closes the listening socket (connections
are refused) and `up()` listens again on the same port.

Use: S3Verify(upstream_port, key_id, secret), .url, .down(), .up().
"""
import hashlib
import os
import re
import sys
import http.client
import http.server
import threading
import time
import urllib.parse

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

HOP = {"connection", "keep-alive", "transfer-encoding", "expect"}


def parse_auth(value):
    """'AWS4-HMAC-SHA256 Credential=K/D/R/S/aws4_request, SignedHeaders=a;b,
    Signature=hex' -> dict, or None."""
    if not value or not value.startswith("AWS4-HMAC-SHA256 "):
        return None
    out = {}
    for part in value[len("AWS4-HMAC-SHA256 "):].split(","):
        k, _, v = part.strip().partition("=")
        out[k] = v
    if not {"Credential", "SignedHeaders", "Signature"} <= out.keys():
        return None
    return out


def expected_signature(method, raw_path, headers, key_id, secret, auth):
    """What botocore signs for this request (headers: lower-case dict)."""
    cred = auth["Credential"].split("/")
    if len(cred) != 5 or cred[0] != key_id or cred[3] != "s3":
        return None
    signed = auth["SignedHeaders"].split(";")
    hdrs = {h: headers.get(h, "") for h in signed}
    req = AWSRequest(method=method, url="http://" + headers.get("host", "") + raw_path,
                     headers=hdrs)
    req.context["timestamp"] = headers.get("x-amz-date", "")
    signer = S3SigV4Auth(Credentials(key_id, secret), "s3", cred[2])
    # botocore reads the payload hash from this header when it is there.
    canonical = signer.canonical_request(req)
    sts = signer.string_to_sign(req, canonical)
    return signer.signature(sts, req)


class S3Verify:
    def __init__(self, upstream_port, key_id, secret):
        self.upstream = upstream_port
        self.key_id, self.secret = key_id, secret
        self.verified = 0
        self.refused = []      # (method, path, why)
        self.requests = []     # (method, path) of every request verified
        self.part_delay = 0.0  # seconds each multipart part waits before going on
        self.fail_parts = {}   # part number -> how many of its next attempts get a 500
        self.fail_if = None    # (method, path) -> True: answer 500
        self.lock = threading.Lock()
        self.server = None
        self.port = None
        self.up()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def up(self):
        v = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def refuse(self, why):
                with v.lock:
                    v.refused.append((self.command, self.path, why))
                body = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>"
                        b"SignatureDoesNotMatch</Code><Message>" + why.encode() +
                        b"</Message></Error>")
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_any(self):
                headers = {k.lower(): v for k, v in self.headers.items()}
                n = int(headers.get("content-length", "0") or 0)
                body = self.rfile.read(n) if n else b""
                auth = parse_auth(headers.get("authorization"))
                if auth is None:
                    return self.refuse("no AWS4-HMAC-SHA256 authorization")
                if "x-amz-content-sha256" not in auth["SignedHeaders"].split(";"):
                    return self.refuse("x-amz-content-sha256 is not signed")
                sha = headers.get("x-amz-content-sha256", "")
                if sha != "UNSIGNED-PAYLOAD" and sha != hashlib.sha256(body).hexdigest():
                    return self.refuse("the body's SHA-256 is not x-amz-content-sha256")
                want = expected_signature(self.command, self.path, headers, v.key_id,
                                          v.secret, auth)
                if want is None or want != auth["Signature"]:
                    if os.environ.get("S3VERIFY_DEBUG"):
                        print(self.command, self.path, headers, file=sys.stderr, flush=True)
                    return self.refuse("signature differs from botocore's")
                with v.lock:
                    v.verified += 1
                    v.requests.append((self.command, self.path))
                if v.part_delay and "partNumber=" in self.path:
                    time.sleep(v.part_delay)
                m = re.search(r"[?&]partNumber=(\d+)", self.path)
                with v.lock:
                    fail = m and v.fail_parts.get(int(m.group(1)), 0) > 0
                    if fail:
                        v.fail_parts[int(m.group(1))] -= 1
                if v.fail_if and v.fail_if(self.command, self.path):
                    fail = True
                if fail:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", v.upstream, timeout=120)
                fwd = {k: val for k, val in self.headers.items() if k.lower() not in HOP}
                try:
                    conn.request(self.command, self.path, body=body if n else None,
                                 headers=fwd)
                    r = conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException):
                    # The server behind went away (the test is over): say so.
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(r.status)
                for k, val in r.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, val)
                # A HEAD's answer says the length of the body a GET would get.
                self.send_header("Content-Length",
                                 r.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True
            request_queue_size = 128

            def handle_error(self, request, client_address):
                pass  # a client that went away (a daemon killed by the test)

        self.server = Server(("127.0.0.1", self.port or 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self):
        self.server.shutdown()
        self.server.server_close()

    def close(self):
        self.down()


if __name__ == "__main__":
    s = S3Verify(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    print(s.port, flush=True)
    while True:
        time.sleep(3600)
