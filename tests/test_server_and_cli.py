"""The metrics/health endpoint and the inspection commands (no broker needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from replicator.auth import Tokens
from replicator.metrics import Metrics
from replicator.server import HealthServer
from replicator.spool import Spool, SpoolSettings
from replicator.storage import LocalStore

REPO = Path(__file__).resolve().parent.parent


async def test_metrics_health_and_readiness() -> None:
    metrics = Metrics()
    metrics.events_ingested.labels("attendance").inc(7)
    metrics.fsync_seconds.observe(0.003)
    state = {"ready": False}
    server = HealthServer(metrics=metrics, host="127.0.0.1", port=0, healthy=lambda: True,
                          ready=lambda: state["ready"],
                          tokens=Tokens((b"metrics-scraper-token-0001",), "test"))
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession(
                headers={"Authorization": "Bearer metrics-scraper-token-0001"}) as http:
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
                assert r.status == 200
            assert 'replicator_events_ingested_total{topic="attendance"} 7.0' in text
            assert "replicator_fsync_seconds_bucket" in text
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200 and (await r.json()) == {"status": "ok"}
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 503
            state["ready"] = True
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
    finally:
        await server.stop()


async def _make_segments(data_dir: Path) -> None:
    store = LocalStore(root=data_dir / "store")
    spool = Spool(settings=SpoolSettings(data_dir=data_dir, block_bytes=4096), store=store,
                  metrics=Metrics())
    plog = await spool.open_partition("attendance", 0)
    plog.start_at(100)
    assert plog.builder is not None
    for off in range(100, 600):
        plog.builder.append(off, 1_700_000_000_000 + off, 0, b"k%d" % off,
                            b'{"n": %d, "pad": "%s"}' % (off, b"x" * 200), [("entity", b"a")])
        if off % 100 == 0:
            await spool.flush()
    await spool.stop()


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "REPLICATOR_INGEST_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "replicator", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60, check=False)


async def test_segments_list_inspect_verify_json(tmp_path: Path) -> None:
    await _make_segments(tmp_path)
    out = _cli(tmp_path, "segments", "list", "--json")
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    (seg,) = doc["segments"]
    assert (seg["topic"], seg["partition"], seg["start"], seg["end"]) == ("attendance", 0, 100,
                                                                          600)
    assert seg["records"] == 500 and seg["sealed"] and seg["location"] == "store"
    assert seg["min_ts"] == 1_700_000_000_100 and seg["max_ts"] == 1_700_000_000_599
    assert 0 < seg["compression_ratio"] < 0.5  # repetitive payload compresses well
    name = seg["name"]
    assert name == ("segments/attendance/000000/"
                    "00000000000000000100-00000000000000000600.seg")
    out = _cli(tmp_path, "segments", "inspect", name, "--json")
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert sum(b["records"] for b in doc["blocks"]) == 500
    assert doc["blocks"][0]["start"] == 100 and doc["blocks"][-1]["end"] == 600
    human = _cli(tmp_path, "segments", "list")
    assert "attendance" in human.stdout and "1 segments, 500 records" in human.stdout
    ok = _cli(tmp_path, "segments", "verify", "--json")
    assert ok.returncode == 0 and orjson.loads(ok.stdout)["problems"] == []


def test_help_explains_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "replicator", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=60, check=False)
    assert out.returncode == 0
    for word in ("run", "segments", "quarantine", "topics", "demo"):
        assert word in out.stdout
