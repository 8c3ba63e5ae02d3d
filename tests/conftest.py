"""Fixtures: one real Kafka broker per test session, unique topics per test.

The broker comes from ``KAFKA_BOOTSTRAP_SERVERS`` if set, else testcontainers when a
Docker daemon answers, else the local KRaft broker started by deploy/kafka/kafka.sh.
If none can be had the session fails (it never turns integration tests into skips).
PostgreSQL likewise: ``REPLICATOR_TEST_PG_DSN``, testcontainers, or deploy/postgres/pg.sh;
S3: ``REPLICATOR_TEST_S3_ENDPOINT`` or versitygw started by deploy/s3/s3.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kafka_service import (
    LocalBroker,
    docker_available,
    resolve_bootstrap,
    start_local_broker,
)
from tests.s3_service import S3Server, resolve_s3, start_local_s3


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


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL: ``REPLICATOR_TEST_PG_DSN``; else a testcontainers PostgreSQL when a
    Docker daemon answers; else a private cluster started by ``deploy/postgres/pg.sh``
    (installs the Debian package when absent). Never skipped: failing to get one fails."""
    env = os.environ.get("REPLICATOR_TEST_PG_DSN")
    if env:
        yield env
        return
    if docker_available():
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError:
            pass  # testcontainers' postgres module missing: fall through to pg.sh
        else:
            with PostgresContainer("postgres:16-alpine", driver=None) as pg:
                yield pg.get_connection_url()
            return
    d = Path(tempfile.mkdtemp(prefix="replicator-pg-"))
    script = Path(__file__).resolve().parent.parent / "deploy" / "postgres" / "pg.sh"
    proc = subprocess.run(["bash", str(script), "start", "--dir", str(d)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pg.sh start failed ({proc.returncode}):\n{proc.stderr}")
    try:
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", "--dir", str(d)], capture_output=True,
                       timeout=120, check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server for the whole session (see tests/s3_service.py)."""
    d = Path(tempfile.mkdtemp(prefix="replicator-s3-"))
    server = resolve_s3(d)
    try:
        yield server
    finally:
        if server.workdir is not None:
            server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A private S3 server (for tests that kill and restart it)."""
    server = start_local_s3(tmp_path / "s3")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
async def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the session's S3 server; returns its store URL."""
    from replicator.storage.s3 import S3Store

    name = "t-" + uuid.uuid4().hex[:20]
    url = s3_server.url(name)
    store = S3Store.from_url(url)
    await store.ensure_bucket()
    await store.close()
    return url
