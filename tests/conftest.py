"""Fixtures: one real Kafka broker per test session, unique topics per test.

The broker comes from ``KAFKA_BOOTSTRAP_SERVERS`` if set, else testcontainers when a
Docker daemon answers, else the local KRaft broker started by deploy/kafka/kafka.sh.
If none can be had the session fails (it never turns integration tests into skips).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafka_service import LocalBroker, resolve_bootstrap, start_local_broker


@pytest.fixture(scope="session")
def kafka_workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="replicator-kafka-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_workdir: Path) -> Iterator[str]:
    """Bootstrap address of a real broker for the whole session."""
    bootstrap, stop = resolve_bootstrap(kafka_workdir / "shared")
    try:
        yield bootstrap
    finally:
        stop()


@pytest.fixture()
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private local broker (for tests that stop and restart it)."""
    broker = start_local_broker(tmp_path / "kafka")
    try:
        yield broker
    finally:
        broker.stop()
