"""Operators' commands: ``drill`` (a real restore into scratch, measured, reported, cleaned
up; a corrupted backup must fail it), ``status`` (objectives judged from real figures,
including the broker's view of what is not yet durable) and the drill schedule."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from replicator.config import load_config
from replicator.metrics import Metrics
from replicator.ops.drill import (
    extrapolate,
    load_history,
    pick_point,
    render,
    run_drill,
    save_report,
    scratch_pg_url,
    sparkline,
)
from replicator.ops.drill_schedule import FIRST_DELAY_S, DrillScheduler, drill_due
from replicator.ops.status import assess, collect_status, verdict
from replicator.restore.point import AtTime, Latest
from tests.helpers import REPO_ROOT, create_topics, publish_demo, unique
from tests.restore_history import History, Oracle, build_history
from tests.test_restore_cli import cli, write_config


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("ops-hist"), events=3000, seed=11)


def _config(tmp_path: Path, store: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return write_config(tmp_path / "replicator.toml", store, data)


def _scratch_leftovers(data_dir: Path) -> list[Path]:
    root = data_dir / "drills" / "scratch"
    return sorted(root.iterdir()) if root.is_dir() else []


# -- pure parts --------------------------------------------------------------------------


def test_objective_states_and_exit_code() -> None:
    assert assess(None, 3600)["state"] == "unknown"
    assert assess(2700, 3600)["state"] == "met"  # 75 % is still met
    assert assess(2701, 3600)["state"] == "at risk"
    assert assess(3600, 3600)["state"] == "at risk"
    assert assess(3601, 3600)["state"] == "missed"

    def doc(*states: str, up: bool = True) -> dict[str, Any]:
        return {"objectives": {str(i): {"state": s} for i, s in enumerate(states)},
                "store": {"up": up}, "destinations": [{"up": True}]}

    assert verdict(doc("met", "met")) == 0
    assert verdict(doc("met", "at risk")) == 11
    assert verdict(doc("met", "unknown")) == 11
    assert verdict(doc("at risk", "missed")) == 10
    assert verdict(doc("met", up=False)) == 10


def test_drill_point_and_extrapolation() -> None:
    rng = random.Random(1)
    assert isinstance(pick_point("latest", 1000, 2000, rng), Latest)
    pts = [pick_point("random", 1000, 2000, rng) for _ in range(200)]
    assert all(isinstance(p, AtTime) and 1000 <= p.ts_ms <= 2000 for p in pts)
    assert len({p.ts_ms for p in pts if isinstance(p, AtTime)}) > 100
    assert isinstance(pick_point("random", None, 2000, rng), Latest)  # no window: latest
    def ex(seconds: float, replay: float, load: float, b: tuple[int, int],
           r: tuple[int, int]) -> float:
        return extrapolate(seconds, replay_s=replay, load_s=load, drill_bytes=b[0],
                           full_bytes=b[1], drill_rows=r[0], full_rows=r[1])

    # 1 s of other work, 2 s replay over a quarter of the bytes, 3 s load of half the rows
    assert ex(6.0, 2.0, 3.0, (100, 400), (50, 100)) == 1.0 + 8.0 + 6.0
    assert ex(6.0, 2.0, 3.0, (400, 100), (100, 50)) == 6.0  # never below the measured time
    assert ex(6.0, 2.0, 3.0, (0, 100), (0, 100)) == 6.0
    url = scratch_pg_url("postgresql://u@h:5/db?schema=prod&sslmode=disable", "drill_x")
    assert url == "postgresql://u@h:5/db?sslmode=disable&schema=drill_x"
    assert sparkline([1.0, 2.0, None, 4.0]) == "▂▄×█"


def test_drill_schedule_is_due() -> None:
    start = 1_000_000
    assert not drill_due(start + 1000, None, 86400, start)
    assert drill_due(start + int(FIRST_DELAY_S * 1000), None, 86400, start)
    assert drill_due(start + 30_000, None, 30, start)  # a short interval comes first
    assert not drill_due(start + 3_600_000, start, 86400, start)
    assert drill_due(start + 86_400_000, start, 86400, start)


# -- drills over a real (synthetic) backup ------------------------------------------------


async def test_drill_restores_verifies_measures_and_cleans_up(
        tmp_path: Path, history: History) -> None:
    cfg = load_config(_config(tmp_path, history.store_root), env={})
    report = await run_drill(cfg, at="latest")
    assert report["ok"] is True, report
    oracle = Oracle(history)
    assert report["rows"] == {e: len(oracle.state(e)) for e in
                              ("attendance", "participant", "config")}
    assert report["rto_s"] > 0 and report["rto_extrapolated_s"] == report["rto_s"]
    assert report["bytes_read"] == report["full_bytes"] > 0
    assert report["rpo_s"] == pytest.approx((report["time_ms"] - history.newest_ms) / 1e3,
                                            abs=0.01)
    assert report["rto_met"] is True and report["rpo_met"] is False  # an old history
    assert _scratch_leftovers(cfg.ingest.data_dir) == []  # the scratch database is gone
    rnd = await run_drill(cfg, at="random", seed=4)
    assert rnd["ok"] is True and rnd["at"] != report["at"]
    assert rnd["bytes_read"] <= rnd["full_bytes"]
    assert rnd["rto_extrapolated_s"] >= rnd["rto_s"]
    for r in (report, rnd):
        save_report(cfg.ingest.data_dir, r, keep=1)
    kept = load_history(cfg.ingest.data_dir)
    assert [r["id"] for r in kept] == [rnd["id"]]  # keep=1 pruned the older one
    drills = cfg.ingest.data_dir / "drills"
    assert sorted(p.name for p in drills.iterdir() if p.is_file()) == [
        f"{rnd['id']}.json", f"{rnd['id']}.txt"]
    assert "RTO" in (drills / f"{rnd['id']}.txt").read_text()
    text = render(rnd, kept)
    assert "attendance:" in text and "RTO" in text and "last 1 drills" in text


def test_drill_command_detects_a_corrupted_backup(tmp_path: Path, history: History) -> None:
    store = tmp_path / "store"
    shutil.copytree(history.store_root, store)
    config = _config(tmp_path, store)
    ok = cli(config, "drill", "--json")
    assert ok.returncode == 12, ok.stderr  # restored and verified, but the RPO is missed
    assert orjson.loads(ok.stdout)["ok"] is True
    victim = sorted(store.rglob("*.seg"))[len(list(store.rglob("*.seg"))) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0x5A
    victim.write_bytes(bytes(raw))
    bad = cli(config, "drill", "--json")
    assert bad.returncode == 4, (bad.returncode, bad.stderr)  # corrupt backup
    report = orjson.loads(bad.stdout)
    assert report["ok"] is False and victim.name in report["error"]
    human = cli(config, "drill")
    assert human.returncode == 4 and "FAILED" in human.stdout and "×" in human.stdout
    # status turns the failed drill into a missed RTO objective
    st = cli(config, "status", "--no-broker", "--json")
    doc = orjson.loads(st.stdout)
    assert doc["objectives"]["rto"]["state"] == "missed" and st.returncode == 10
    assert doc["last_drill"]["ok"] is False


async def test_drill_into_a_postgres_scratch_schema_is_dropped(
        tmp_path: Path, history: History, pg_dsn: str) -> None:
    cfg = load_config(_config(tmp_path, history.store_root), env={})
    report = await run_drill(cfg, target=pg_dsn + "?schema=must_not_be_used")
    assert report["ok"] is True, report
    schema = report["target"].rsplit("schema ", 1)[1].rstrip(")")
    assert schema.startswith("drill_")
    conn = await asyncpg.connect(pg_dsn)
    try:
        left = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'drill_%'"
                                " OR nspname = 'must_not_be_used'")
    finally:
        await conn.close()
    assert left == []
    assert "password" not in orjson.dumps(report).decode()


async def test_scheduled_drill_runs_the_command_and_exports_metrics(
        tmp_path: Path, history: History) -> None:
    config = _config(tmp_path, history.store_root)
    metrics = Metrics()
    sched = DrillScheduler(settings=load_config(config, env={}).drill,
                           data_dir=tmp_path / "data", metrics=metrics, config_path=config)
    report = await sched.run_one()
    assert report is not None and report["ok"] is True
    assert metrics.drill_ok._value.get() == 1
    assert metrics.drill_rto._value.get() == report["rto_extrapolated_s"]
    assert metrics.drill_rpo._value.get() == report["rpo_s"]
    # the report was kept: a restarted scheduler starts from it instead of drilling at once
    again = DrillScheduler(settings=load_config(config, env={}).drill,
                           data_dir=tmp_path / "data", metrics=Metrics(), config_path=config)
    assert again.last is not None and again.last["id"] == report["id"]


# -- status against a real broker -------------------------------------------------------


async def test_status_reports_lag_and_the_rpo_of_events_not_yet_durable(
        tmp_path: Path, kafka_bootstrap: str) -> None:
    entities = ("attendance", "participant", "config")
    topics = {e: unique(e) for e in entities}
    await create_topics(kafka_bootstrap, list(topics.values()), partitions=2)
    config = _config(tmp_path, tmp_path / "store")
    cfg = load_config(config, env={})
    cfg = replace(cfg, kafka=replace(cfg.kafka, bootstrap_servers=kafka_bootstrap,
                                     topics=tuple(topics.values())))
    t0 = int(time.time() * 1000)
    await publish_demo(kafka_bootstrap, topics, 300, seed=2)
    time.sleep(0.2)
    doc = await collect_status(cfg)
    assert doc["broker"]["up"] is True
    assert len(doc["partitions"]) == 6
    assert sum(p["lag"] for p in doc["partitions"]) == 300  # nothing durable yet
    assert all(p["durable_offset"] == 0 for p in doc["partitions"])
    rpo = doc["objectives"]["rpo_local"]["value_s"]
    now = int(time.time() * 1000)
    assert 0.2 <= rpo <= (now - t0) / 1e3 + 1  # age of the oldest pending event
    assert doc["objectives"]["rpo_local"]["state"] == "met"
    assert doc["objectives"]["rto"]["state"] == "unknown"  # no drill yet
    assert doc["exit_code"] == 11
    # an unreachable broker is a figure we do not have, never "met"
    down = replace(cfg, kafka=replace(cfg.kafka, bootstrap_servers="127.0.0.1:1"))
    doc = await collect_status(down)
    assert doc["broker"]["up"] is False and "unreachable" in doc["broker"]["error"]
    assert doc["objectives"]["rpo_local"]["state"] == "unknown"


def test_plan_estimates_from_the_last_good_drill_and_lists_every_scenario(
        tmp_path: Path, history: History) -> None:
    from replicator.ops.plan import build_plan, render_plan

    cfg = load_config(_config(tmp_path, history.store_root), env={})
    drills = [{"id": "a", "ok": True, "rto_s": 10.0, "bytes_read": 50_000_000},
              {"id": "b", "ok": False, "error": "corrupt segment x"}]
    doc = build_plan(cfg, drills, restore_bytes=200_000_000, static_estimate_s=3.0,
                     config_arg="--config /etc/r.toml")
    est = doc["restore_estimate"]
    assert est["seconds"] == 40.0 and "drill a" in est["basis"] and est["meets_rto"] is True
    assert any("last drill failed: corrupt segment x" in w for w in doc["warnings"])
    assert any("no [[destinations]]" in w for w in doc["warnings"])
    assert [s["scenario"] for s in doc["scenarios"]] == [
        "total loss", "data corruption", "partial loss (one entity or some keys)",
        "the replicator lost its disk", "a destination was lost"]
    text = render_plan(doc)
    assert "replicator --config /etc/r.toml restore --at latest" in text
    assert "--swap-into public" in text and "40.0s" in text
    none = build_plan(cfg, [], restore_bytes=None, static_estimate_s=None)
    assert none["restore_estimate"]["seconds"] is None
    assert "no drill on record" in " ".join(none["warnings"])
    res = cli(_config(tmp_path, history.store_root), "plan", "--json")
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["restore_estimate"]["restore_bytes"] > 0


async def test_drill_sweeps_scratch_left_by_drills_killed_hard(
        tmp_path: Path, history: History, pg_dsn: str) -> None:
    import os

    from replicator.ops.drill import schema_time_ms, scratch_root

    cfg = load_config(_config(tmp_path, history.store_root), env={})
    root = scratch_root(cfg.ingest.data_dir)
    import fcntl

    old = root / "20200101T000000000Z-abcdef-x"
    live = root / "drill-still-running"
    for d in (old, live):
        d.mkdir(parents=True)
        (d / "drill.db").write_bytes(b"left behind")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a drill running right now holds its scratch
    try:
        report = await run_drill(cfg)
    finally:
        os.close(fd)
    assert report["ok"] is True
    assert _scratch_leftovers(cfg.ingest.data_dir) == [live]
    assert schema_time_ms("drill_20200101t000000123z_abcdef") == 1577836800123
    assert schema_time_ms("drill_nope") is None and schema_time_ms("public") is None
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute('CREATE SCHEMA IF NOT EXISTS "drill_20200101t000000000z_abcdef"')
        await conn.execute('CREATE SCHEMA IF NOT EXISTS "drill_keep_me"')
        report = await run_drill(cfg, target=pg_dsn)
        assert report["ok"] is True, report
        left = {r["nspname"] for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'drill%'")}
        assert left == {"drill_keep_me"}  # not a drill's name: never touched
        await conn.execute('DROP SCHEMA "drill_keep_me"')
    finally:
        await conn.close()


def test_sigterm_stops_a_drill_and_removes_its_scratch(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    big = build_history(tmp_path / "big", events=40_000, seed=3, per_segment=2000)
    config = _config(tmp_path, big.store_root)
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "replicator", "--config", str(config),
                             "drill", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _scratch_leftovers(data):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert _scratch_leftovers(data) == []


async def test_status_calls_offsets_kafka_removed_before_they_were_durable_lost(
        tmp_path: Path, kafka_bootstrap: str) -> None:
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.records_to_delete import RecordsToDelete

    topics = {e: unique(e) for e in ("attendance", "participant", "config")}
    await create_topics(kafka_bootstrap, list(topics.values()), partitions=1)
    cfg = load_config(_config(tmp_path, tmp_path / "store"), env={})
    cfg = replace(cfg, kafka=replace(cfg.kafka, bootstrap_servers=kafka_bootstrap,
                                     topics=tuple(topics.values())))
    await publish_demo(kafka_bootstrap, topics, 200, seed=6)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:  # as Kafka's retention would: the first offsets are gone, never made durable
        await admin.delete_records(
            {TopicPartition(topics["attendance"], 0): RecordsToDelete(before_offset=5)})
    finally:
        await admin.close()
    doc = await collect_status(cfg)
    rows = {p["topic"]: p for p in doc["partitions"]}
    assert rows[topics["attendance"]]["pending"] == "lost"
    assert rows[topics["attendance"]]["rpo_s"] is None
    assert rows[topics["config"]]["pending"] == "ts"
    assert doc["objectives"]["rpo_local"]["state"] == "missed"
    assert doc["exit_code"] == 10


async def test_drill_with_a_relative_data_dir(tmp_path: Path, history: History,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config (data_dir = ./var/replicator) is relative: the scratch database
    still needs an absolute sqlite:// path (found by hand with make run)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_config(tmp_path, history.store_root), env={})
    cfg = replace(cfg, ingest=replace(cfg.ingest, data_dir=Path("rel/data")))
    report = await run_drill(cfg)
    assert report["ok"] is True, report
    assert _scratch_leftovers(tmp_path / "rel" / "data") == []


def test_status_shows_window_snapshots_quarantine_and_destinations(
        tmp_path: Path, history: History) -> None:
    """Every part of the status document beside the broker's, from a known store: the
    restorable window per entity, the newest snapshot of each kind, quarantine counts and a
    destination that lags behind the primary; then ``--watch --json`` keeps refreshing."""
    store = tmp_path / "store"
    shutil.copytree(history.store_root, store)
    dr = tmp_path / "dr"
    shutil.copytree(history.store_root, dr)
    newest = sorted((dr / "segments" / "attendance" / "000000").glob("*.seg"))[-1]
    config = _config(tmp_path, store)
    config.write_text(config.read_text() + f'\n[[destinations]]\nname = "dr"\nurl = "{dr}"\n')
    # a destination that lost one segment is behind the primary
    newest.unlink()
    qdir = tmp_path / "data" / "quarantine"
    qdir.mkdir(parents=True)
    (qdir / "participant.jsonl").write_bytes(b'{"offset": 1}\n{"offset": 7}\n')
    res = cli(config, "compact", "--kind", "full", "--json")
    assert res.returncode == 0, res.stderr
    res = cli(config, "status", "--no-broker", "--json")
    assert res.returncode in (10, 11), res.stderr
    doc = orjson.loads(res.stdout)
    oracle_events = {e: sum(1 for ev in history.events if ev.topic == e)
                     for e in ("attendance", "participant", "config")}
    windows = {w["entity"]: w for w in doc["restorable"]}
    assert set(windows) == set(oracle_events)
    for e, w in windows.items():
        assert w["events"] == oracle_events[e]
        assert w["newest_ms"] == history.newest_ms
        assert w["oldest_ms"] is not None and w["oldest_ms"] <= w["newest_ms"]
        assert w["holes"] == []
    assert set(doc["snapshots"]) == {"full"}
    assert doc["snapshots"]["full"]["time_ms"] <= history.newest_ms
    assert doc["quarantine"] == {"attendance": 0, "participant": 2, "config": 0}
    rows = {d["name"]: d for d in doc["destinations"]}
    assert set(rows) == {"primary", "dr"} and rows["dr"]["up"] is True
    assert rows["primary"]["rpo_s"] is not None
    assert rows["dr"]["rpo_s"] is not None and rows["dr"]["rpo_s"] >= rows["primary"]["rpo_s"]
    assert rows["primary"]["backlog_objects"] == 0
    assert rows["dr"]["backlog_objects"] >= 2  # the lost segment and the new snapshot
    assert rows["dr"]["behind_offsets"]  # the partition whose newest segment it lost
    assert doc["store"]["up"] is True
    # --watch: a fresh document per refresh until interrupted
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator", "--config", str(config), "status", "--no-broker",
         "--watch", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        docs: list[Any] = []
        buf = ""
        deadline = time.monotonic() + 60
        dec = json.JSONDecoder()
        while len(docs) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                break
            buf += line
            try:
                obj, _ = dec.raw_decode(buf.strip())
            except json.JSONDecodeError:
                continue
            docs.append(obj)
            buf = ""
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert len(docs) == 3, proc.stderr.read() if proc.stderr else ""
    assert len({d["time"] for d in docs}) == 3  # three refreshes, not one document repeated
    assert all(d["quarantine"]["participant"] == 2 for d in docs)
