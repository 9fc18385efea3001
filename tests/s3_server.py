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
from pathlib import Path

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


# --------------------------------------------------------------------------- a test's view of the server

def client(endpoint: str):
    """The test's own s3fs view of the server (no instance or listing cache: it must see what Ray
    workers wrote)."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=FAKE_KEY, secret=FAKE_SECRET,
                             skip_instance_cache=True, use_listings_cache=False)


def upload(fs, local: Path, remote: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{remote}/{path.relative_to(local).as_posix()}")


def download(fs, remote: str, local: Path) -> Path:
    """Every object under ``remote`` (bucket/prefix) into the folder ``local``, keeping the layout
    (e.g. a build on S3, to compare it with tests/tables.py)."""
    for key in fs.find(remote):
        dest = local / Path(key).relative_to(remote)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(dest))
    return local


def demo_on_s3(fs, demo_dir: Path, run: str) -> list[str]:
    """Upload the demo's images, backbone and SAE (tests/conftest.py demo_dir) under fresh
    prefixes of ``run`` (local_copy's node cache is keyed by URL); the build config keys that
    point a demo build at them."""
    for name in ("demo-data", "demo-models", "builds"):
        if not fs.exists(name):
            fs.mkdir(name)
    upload(fs, demo_dir / "data", f"demo-data/{run}/data")
    upload(fs, demo_dir / "models" / "sae", f"demo-models/{run}/sae")
    upload(fs, demo_dir / "models" / "dinov2-tiny", f"demo-models/{run}/dinov2-tiny")
    return [f"source.root=s3://demo-data/{run}/data", f"backbone.model=s3://demo-models/{run}/dinov2-tiny",
            f"sae.checkpoint=s3://demo-models/{run}/sae"]


def storage_keys(endpoint: str) -> list[str]:
    """The build config keys for reaching ``endpoint`` with the fake credentials (Ray workers of
    the session Ray know no AWS variables set after it started)."""
    return [f"storage.endpoint_url={endpoint}", f"storage.options.key={FAKE_KEY}",
            f"storage.options.secret={FAKE_SECRET}"]
