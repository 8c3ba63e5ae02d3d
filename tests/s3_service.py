"""The S3-compatible server for tests: ``REPLICATOR_TEST_S3_ENDPOINT`` (with the usual
``AWS_*`` credentials) if set, else a versitygw started by deploy/s3/s3.sh on loopback.

Never skipped: when no server can be had, the fixture fails the session.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "s3" / "s3.sh"

#: credentials of the local scratch server (see deploy/s3/s3.sh)
LOCAL_ACCESS = "replicator"
LOCAL_SECRET = "replicator-secret"


@dataclass
class S3Server:
    """A running S3-compatible server; ``workdir`` is None for an external one."""

    endpoint: str
    workdir: Path | None = None

    def url(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint={self.endpoint}"

    def _script(self, cmd: str) -> subprocess.CompletedProcess[str]:
        assert self.workdir is not None, "an external S3 server cannot be controlled"
        proc = subprocess.run(["bash", str(SCRIPT), cmd, "--dir", str(self.workdir)],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"s3.sh {cmd} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def kill(self) -> None:
        """SIGKILL the server (a crash mid-request)."""
        self._script("kill")

    def stop(self) -> None:
        self._script("stop")

    def restart(self) -> None:
        """Start again on the same port with the same data."""
        assert self.workdir is not None
        port = (self.workdir / "port").read_text().strip()
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start", "--dir", str(self.workdir), "--port", port],
            capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"s3.sh start failed ({proc.returncode}):\n{proc.stderr}")


def use_local_credentials() -> None:
    os.environ["AWS_ACCESS_KEY_ID"] = LOCAL_ACCESS
    os.environ["AWS_SECRET_ACCESS_KEY"] = LOCAL_SECRET
    os.environ.setdefault("AWS_REGION", "us-east-1")


def start_local_s3(workdir: Path) -> S3Server:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["bash", str(SCRIPT), "start", "--dir", str(workdir)],
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"s3.sh start failed ({proc.returncode}):\n{proc.stderr}")
    use_local_credentials()
    return S3Server(endpoint=proc.stdout.strip().splitlines()[-1], workdir=workdir)


def resolve_s3(workdir: Path) -> S3Server:
    env = os.environ.get("REPLICATOR_TEST_S3_ENDPOINT")
    if env:
        return S3Server(endpoint=env)
    return start_local_s3(workdir)
