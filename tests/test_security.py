"""Hostile names and secrets: every path built from a topic, entity, key or file name stays
inside its store or target directory, and passwords and tokens never reach logs, errors or
status output."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
import orjson
import pytest

from replicator.auth import Tokens
from replicator.config import load_config
from replicator.errors import ConfigError, InvalidNameError, ReplicatorError, StoreError
from replicator.metrics import Metrics
from replicator.ops.jobs import RestoreJobs
from replicator.redact import redact_url
from replicator.server import HealthServer
from replicator.storage.local import LocalStore
from replicator.targets import open_target
from tests.restore_history import History, build_history
from tests.test_restore_cli import cli, write_config

TRAVERSALS = ["../escape", "../../etc/passwd", "/etc/passwd", "a/../../escape",
              "segments/../../escape", "a//b", "a\\..\\b", "nul\x00byte", "", ".", "a/./b"]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("sec-hist"), events=600, seed=9)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name", TRAVERSALS)
async def test_store_names_cannot_leave_the_store(tmp_path: Path, name: str) -> None:
    root = tmp_path / "store"
    store = LocalStore(root=root)
    await store.put_bytes("ok/object", b"x")
    before = _files(tmp_path)
    for op in (lambda: store.put_bytes(name, b"evil"), lambda: store.get_bytes(name),
               lambda: store.delete(name), lambda: store.fetch_to(name, tmp_path / "f")):
        with pytest.raises((InvalidNameError, StoreError)):
            await op()
    assert _files(tmp_path) == before


async def test_a_symlink_inside_the_store_cannot_lead_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not read")
    root = tmp_path / "store"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    store = LocalStore(root=root)
    with pytest.raises(StoreError, match="escapes the store"):
        await store.get_bytes("link/secret")
    with pytest.raises(StoreError, match="escapes the store"):
        await store.put_bytes("link/new", b"evil")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


@pytest.mark.parametrize("topic", ["../x", "/etc", "a/b", "..", ".", "a b", "x" * 250, ""])
def test_hostile_topic_names_are_refused_by_the_config(tmp_path: Path, topic: str) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text(f"[kafka]\ntopics = [{orjson.dumps(topic).decode()}]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, env={})
    assert exc.value.setting == "kafka.topics"


@pytest.mark.parametrize("url", ["sqlite://relative/x.db", "jsonl://../x", "sqlite://"])
def test_file_targets_need_absolute_paths(url: str) -> None:
    with pytest.raises(ReplicatorError, match="absolute"):
        open_target(url, restore_id="r", default_schema="s")


@pytest.mark.parametrize(("args", "needle"), [
    (["get", "../../etc/passwd", "k"], "unknown entity"),
    (["history", "../x", "k"], "unknown entity"),
    (["export", "--entity", "/etc/passwd"], "unknown entity"),
    (["restore", "--at", "latest", "--entities", "../x", "--target", "sqlite:///REL/r.db"],
     "unknown entity"),
    (["restore", "--offsets", "../x:0:1", "--target", "sqlite:///REL/r.db"],
     "unknown topic"),
])
def test_hostile_names_on_the_command_line_write_nothing(
        tmp_path: Path, history: History, args: list[str], needle: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(tmp_path / "r.toml", history.store_root, data)
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("/REL", str(out)) for a in args]
    before = _files(tmp_path) | _files(history.store_root)
    res = cli(config, *args)
    assert res.returncode != 0
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert _files(tmp_path) | _files(history.store_root) == before


async def test_a_manifest_naming_a_file_outside_its_snapshot_is_refused(
        tmp_path: Path, history: History) -> None:
    """A tampered manifest (file name ``../../..``) cannot make a restore read or write
    outside the store: the store refuses the name, the restore fails with a clear error."""
    import shutil

    store_root = tmp_path / "store"
    shutil.copytree(history.store_root, store_root)
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(tmp_path / "r.toml", store_root, data)
    res = cli(config, "compact", "--kind", "full", "--json")
    assert res.returncode == 0, res.stderr
    [manifest] = list(store_root.glob("snapshots/*/manifest.json"))
    doc = orjson.loads(manifest.read_bytes())
    doc["files"][0]["name"] = "../../../../../../etc/passwd"
    manifest.chmod(0o644)
    manifest.write_bytes(orjson.dumps(doc))
    res = cli(config, "restore", "--at", "latest", "--target",
              f"sqlite://{tmp_path / 'out.db'}")
    assert res.returncode != 0
    assert "invalid object name" in res.stderr or "escapes" in res.stderr, res.stderr
    assert not (tmp_path / "out.db").exists()


# -- secrets ------------------------------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("postgresql://app:hunter2@db:5432/x?schema=a") == \
        "postgresql://app:***@db:5432/x?schema=a"
    assert "hunter2" not in redact_url("postgresql://db/x?password=hunter2&sslmode=require")
    assert redact_url("sqlite:///abs/x.db") == "sqlite:///abs/x.db"
    assert redact_url("s3://bucket/p?endpoint=http://h:1") == "s3://bucket/p?endpoint=http://h:1"
    assert "hunter2" not in redact_url("kafka://u:hunter2@h:9092/pfx")


def test_an_unsupported_target_url_is_named_without_its_password() -> None:
    with pytest.raises(ReplicatorError) as exc:
        open_target("mysql://root:hunter2@db/x", restore_id="r", default_schema="s")
    assert "hunter2" not in str(exc.value) and "mysql://root:***@db/x" in str(exc.value)


def test_credentials_in_store_urls_are_refused_without_echo(tmp_path: Path) -> None:
    cfg = tmp_path / "r.toml"
    cfg.write_text('[[destinations]]\nname = "dr"\n'
                   'url = "s3://AKIAEXAMPLE:hunter2@bucket/p?endpoint=http://127.0.0.1:1"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, env={})
    assert "hunter2" not in str(exc.value)


def test_drill_plan_and_status_never_show_a_target_password(
        tmp_path: Path, history: History) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(tmp_path / "r.toml", history.store_root, data)
    with config.open("a") as f:
        f.write('\n[drill]\ntarget = "postgresql://drill:hunter2@127.0.0.1:1/db"\n')
    res = cli(config, "drill", "--json")
    assert res.returncode == 8, res.stderr  # target error: nothing listens on port 1
    for out in (res.stdout, res.stderr, *(p.read_text() for p in
                                          (data / "drills").glob("*.json"))):
        assert "hunter2" not in out
    for args in (["status", "--no-broker", "--json"], ["plan"], ["status", "--no-broker"]):
        res = cli(config, *args)
        assert "hunter2" not in res.stdout + res.stderr, args


async def test_tokens_and_restore_passwords_never_reach_logs_or_answers(
        tmp_path: Path, history: History, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(tmp_path / "r.toml", history.store_root, data)
    token = "super-secret-admin-token-0001"
    server = HealthServer(metrics=Metrics(), host="127.0.0.1", port=0, healthy=lambda: True,
                          ready=lambda: True, tokens=Tokens((token.encode(),), "test"),
                          jobs=RestoreJobs(data_dir=data, config_path=config))
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/metrics",
                                headers={"Authorization": "Bearer not-" + token}) as r:
                assert r.status == 401
                assert token not in await r.text()
            hdr = {"Authorization": f"Bearer {token}"}
            async with http.post(base + "/v1/restores", headers=hdr, json={
                    "at": "latest",
                    "target": "postgresql://app:hunter2@127.0.0.1:1/db"}) as r:
                job = await r.json()
                assert r.status == 202 and "hunter2" not in orjson.dumps(job).decode()
            for _ in range(300):
                async with http.get(f"{base}/v1/restores/{job['id']}", headers=hdr) as r:
                    got = await r.json()
                if got["state"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.1)
            assert got["state"] == "failed" and got["exit_code"] == 8, got
            assert "cannot connect" in got["error"]
            assert "hunter2" not in orjson.dumps(got).decode()
    finally:
        await server.stop()
    logged = caplog.text
    assert token not in logged and "hunter2" not in logged
    kept = "".join(p.read_text() for p in (data / "restores" / "jobs").glob("*.json"))
    assert "hunter2" not in kept and job["id"] in kept
    assert os.environ.get("REPLICATOR_RESTORE_TARGET") is None  # only the child had it
