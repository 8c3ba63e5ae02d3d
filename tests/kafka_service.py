"""Kafka broker for tests, benchmarks and the Makefile, without a pytest dependency.

Three sources, picked by :func:`resolve_bootstrap` in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (an already running cluster);
2. a testcontainers Kafka container, when a Docker daemon answers ``docker info``;
3. a local single-node KRaft broker started by ``deploy/kafka/kafka.sh`` from the
   official Apache Kafka jars (fetched from Maven Central on first use).

:func:`start_local_broker` starts (3) directly and returns a :class:`LocalBroker`
that can also be restarted on the same port and data directory, which is what a
"broker restarted mid-stream" test needs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_ROOT / "deploy" / "kafka" / "kafka.sh"

#: Environment variable naming an external cluster to use instead of starting one.
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
#: Image for the testcontainers path (only used where Docker is available).
CONTAINER_IMAGE_ENV = "KAFKA_TEST_IMAGE"
DEFAULT_CONTAINER_IMAGE = "confluentinc/cp-kafka:7.6.0"

# Fetching the jars the first time (Maven) plus a cold start fits well within this.
_START_TIMEOUT_S = 300.0
_STOP_TIMEOUT_S = 60.0

Stopper = Callable[[], None]


class KafkaServiceError(RuntimeError):
    """kafka.sh failed; the message carries its stderr (with the broker log tail)."""


def _kafka_sh(*args: str, timeout: float) -> str:
    """Run ``kafka.sh ARGS`` and return its stdout (stripped)."""
    try:
        proc = subprocess.run(
            ["bash", str(KAFKA_SH), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaServiceError(
            f"kafka.sh {' '.join(args)} timed out after {timeout:.0f}s"
        ) from exc
    if proc.returncode != 0:
        raise KafkaServiceError(
            f"kafka.sh {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout.strip()


def fetch_jars(timeout: float = _START_TIMEOUT_S) -> None:
    """Make sure ``deploy/kafka/lib`` holds the broker jars (no-op when it does)."""
    _kafka_sh("fetch", timeout=timeout)


@dataclass
class LocalBroker:
    """A broker started by ``kafka.sh`` whose state lives in ``workdir``."""

    workdir: Path
    bootstrap: str

    @property
    def port(self) -> int:
        return int(self.bootstrap.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM, or None when it is not running."""
        if not self.is_running():
            return None
        try:
            return int((self.workdir / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        try:
            _kafka_sh("status", "--dir", str(self.workdir), timeout=30)
        except KafkaServiceError:
            return False
        return True

    def stop(self) -> None:
        """SIGTERM the broker (SIGKILL after 20 s). Idempotent."""
        _kafka_sh("stop", "--dir", str(self.workdir), timeout=_STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL the broker JVM at once (a crash, no clean shutdown)."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.is_running():
            time.sleep(0.05)

    def start(self) -> None:
        """Start the stopped broker again: same ports, same data, no re-format."""
        bootstrap = _kafka_sh(
            "start-existing", "--dir", str(self.workdir), timeout=_START_TIMEOUT_S
        )
        if bootstrap != self.bootstrap:
            raise KafkaServiceError(f"broker came back on {bootstrap}, expected {self.bootstrap}")

    def restart(self) -> None:
        """Stop the broker process and start it again on the same port and data dir."""
        self.stop()
        self.start()

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_broker(workdir: Path, port: int | None = None) -> LocalBroker:
    """Start a single-node KRaft broker whose config, data and logs live in ``workdir``.

    Fetches the jars first if needed. Returns once the broker answers metadata
    requests. The broker is also stopped at interpreter exit as a safety net.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["start", "--dir", str(workdir)]
    if port is not None:
        args += ["--port", str(port)]
    bootstrap = _kafka_sh(*args, timeout=_START_TIMEOUT_S)
    broker = LocalBroker(workdir=workdir, bootstrap=bootstrap)
    atexit.register(_stop_quietly, broker)
    return broker


def _stop_quietly(broker: LocalBroker) -> None:
    with contextlib.suppress(Exception):
        broker.stop()


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker daemon answers ``docker info`` within ``timeout`` seconds."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        proc = subprocess.run(
            [docker, "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0


def _start_container() -> tuple[str, Stopper]:
    from testcontainers.community.kafka import KafkaContainer

    image = os.environ.get(CONTAINER_IMAGE_ENV, DEFAULT_CONTAINER_IMAGE)
    container: Any = KafkaContainer(image=image).with_kraft()
    for key, value in {
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_NUM_PARTITIONS": "3",
    }.items():
        container.with_env(key, value)
    container.start()
    bootstrap = str(container.get_bootstrap_server())

    def stop() -> None:
        container.stop()

    return bootstrap, stop


def resolve_bootstrap(workdir: Path) -> tuple[str, Stopper]:
    """Return ``(bootstrap_servers, stopper)`` for a usable Kafka.

    ``stopper()`` tears down whatever was started (a no-op for an external
    cluster). ``workdir`` is where a local broker keeps its data and logs.
    """
    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        return external, lambda: None
    if docker_available():
        try:
            return _start_container()
        except ImportError:
            pass  # testcontainers not installed: fall through to the local broker
    broker = start_local_broker(workdir)
    return broker.bootstrap, broker.stop


__all__ = [
    "BOOTSTRAP_ENV",
    "KAFKA_SH",
    "KafkaServiceError",
    "LocalBroker",
    "docker_available",
    "fetch_jars",
    "resolve_bootstrap",
    "start_local_broker",
]
