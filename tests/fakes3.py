"""A bucket for the tests: the npm S3 server `s3rver` (installed by
install() into a folder with npm) behind s3verify.S3Verify, which checks
every request's SigV4 signature with botocore before passing it on.

S3(npm_dir, tmp) starts both; .endpoint is what replica_endpoint= takes,
.env the credentials, .data the folder s3rver keeps objects in
(<data>/<bucket>/<key>._S3rver_object), .down()/.up() take the endpoint
away and back on the same port, .close() ends both.
"""
import json
import subprocess

import pytest

from conftest import npm_install
from s3verify import S3Verify

BUCKET = "rfs"
KEY_ID = "S3RVER"     # the only key id s3rver knows
SECRET = "S3RVER"

RUN_JS = """
const S3rver = require('s3rver');
const s = new S3rver({port: 0, address: '127.0.0.1', directory: process.argv[2],
                      silent: true, configureBuckets: [{name: '%s', configs: []}]});
s.run().then((a) => { console.log(JSON.stringify(a)); });
""" % BUCKET


def install(d):
    """npm install s3rver into folder d (a pytest tmp folder)."""
    npm_install(d, "s3rver@3.7.1")
    (d / "run.js").write_text(RUN_JS)
    return d


class S3:
    def __init__(self, npm_dir, tmp):
        self.data = tmp / "s3data"
        self.data.mkdir()
        self.proc = subprocess.Popen(["node", str(npm_dir / "run.js"), str(self.data)],
                                     cwd=npm_dir, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            pytest.fail("s3rver did not start")
        self.port = json.loads(line)["port"]
        self.verify = S3Verify(self.port, KEY_ID, SECRET)

    @property
    def endpoint(self):
        return self.verify.url

    @property
    def env(self):
        return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_REGION": "us-east-1"}

    def opts(self, prefix="shared", extra=()):
        return [f"replica=s3://{BUCKET}/{prefix}", f"replica_endpoint={self.endpoint}",
                "replica_path_style", *extra]

    def object_path(self, key):
        return self.data / BUCKET / (key + "._S3rver_object")

    def down(self):
        self.verify.down()

    def up(self):
        self.verify.up()

    def close(self):
        try:
            self.verify.close()
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait()
