"""An S3-compatible server for tests: moto in server mode, in its own process, on 127.0.0.1 and
a free port — a real HTTP endpoint, so Ray worker processes reach it exactly as they would reach
MinIO or AWS. Any key/secret is accepted (moto checks none); requests must be signed.

    with MotoS3Server() as server:
        fs = s3fs.S3FileSystem(endpoint_url=server.url, key="testing", secret="testing")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

FAKE_KEY = "testing"
FAKE_SECRET = "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3Server:
    def __init__(self, start_timeout_s: float = 30.0):
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        for _ in range(3):  # the port may be taken between choosing it and binding it: try another
            port = free_port()
            # The server must not pick up (or need) the tests' AWS settings.
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/moto-api/", timeout=1):
                        return self.url
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError("the moto S3 server did not start")

    def reset(self) -> None:
        """Forget every bucket and object."""
        urllib.request.urlopen(urllib.request.Request(self.url + "/moto-api/reset", method="POST"), timeout=10).close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> MotoS3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
