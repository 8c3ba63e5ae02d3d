"""The admin HTTP API: bearer-token auth on every protected endpoint, the OpenAPI document,
status/backups documents and restore jobs (real child processes over a synthetic backup)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from openapi_spec_validator import validate

from replicator.auth import (
    GENERATED_NAME,
    TOKENS_ENV,
    Tokens,
    bearer,
    client_token,
    configured_tokens,
    server_tokens,
)
from replicator.config import load_config
from replicator.errors import ConfigError
from replicator.metrics import Metrics
from replicator.openapi import document
from replicator.ops.jobs import RestoreJobs, restore_argv
from replicator.ops.status import backups_document
from replicator.server import HealthServer
from tests.restore_history import History, Oracle, build_history
from tests.test_restore_cli import write_config

TOKEN = "t0ken-for-tests-0123456789"
TOKENS = Tokens((TOKEN.encode(),), "test")
PROTECTED = [("GET", "/metrics"), ("GET", "/v1/openapi.json"), ("GET", "/v1/status"),
             ("GET", "/v1/backups"), ("GET", "/v1/destinations"), ("POST", "/v1/restores"),
             ("GET", "/v1/restores/0123456789abcdef"), ("GET", "/v1/tail?p=a:0:0"),
             ("GET", "/v1/nothing-here")]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("api-hist"), events=1500, seed=5)


class Api:
    def __init__(self, server: HealthServer) -> None:
        self.server = server
        self.base = f"http://127.0.0.1:{server.port}"


async def _start(tmp_path: Path, history: History | None = None,
                 tokens: Tokens | None = TOKENS) -> Api:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    store = history.store_root if history is not None else tmp_path / "store"
    config = write_config(tmp_path / "replicator.toml", store, data)
    cfg = load_config(config, env={})

    async def status() -> dict[str, Any]:
        return {"ok": True, "store": cfg.store_url}

    server = HealthServer(
        metrics=Metrics(), host="127.0.0.1", port=0, healthy=lambda: True,
        ready=lambda: True, tail=lambda t, p, s: None, destinations=lambda: [],
        tokens=tokens, status=status, backups=lambda: backups_document(cfg),
        jobs=RestoreJobs(data_dir=data, config_path=config))
    await server.start()
    return Api(server)


async def test_every_protected_endpoint_needs_the_token(tmp_path: Path) -> None:
    api = await _start(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                            {"Authorization": f"Basic {TOKEN}"},
                            {"Authorization": f"Bearer {TOKEN}x"},
                            {"Authorization": f"Bearer {TOKEN[:-1]}"},
                            {"Authorization": "Bearer"}):
                for method, path in PROTECTED:
                    async with http.request(method, api.base + path, headers=headers,
                                            json={}) as r:
                        assert r.status == 401, (method, path, headers)
                        assert await r.json() == {"error": "unauthorized"}
                        assert r.headers["WWW-Authenticate"].startswith("Bearer")
            for path in ("/healthz", "/readyz"):  # open: probes carry no token
                async with http.get(api.base + path) as r:
                    assert r.status == 200
            ok = {"Authorization": f"Bearer {TOKEN}"}
            for method, path in PROTECTED:
                async with http.request(method, api.base + path, headers=ok,
                                        json={}) as r:
                    assert r.status != 401, (method, path)
            async with http.get(api.base + "/v1/status", headers=ok) as r:
                assert r.status == 200 and (await r.json())["ok"] is True
    finally:
        await api.server.stop()


async def test_without_tokens_everything_protected_is_refused(tmp_path: Path) -> None:
    api = await _start(tmp_path, tokens=None)
    try:
        async with aiohttp.ClientSession() as http, http.get(api.base + "/metrics",
                            headers={"Authorization": "Bearer anything-at-all-0000"}) as r:
            assert r.status == 401
    finally:
        await api.server.stop()


async def test_openapi_document_is_valid_and_matches_the_routes(tmp_path: Path) -> None:
    doc = document()
    validate(doc)  # a valid OpenAPI 3.0 document
    api = await _start(tmp_path)
    try:
        assert api.server._runner is not None
        app = api.server._runner.app
        routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
        described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == described
        for p, ops in doc["paths"].items():
            for op in ops.values():
                public = p in ("/healthz", "/readyz")
                assert (op["security"] == []) == public, p
                if not public:
                    assert "401" in op["responses"], p
        async with aiohttp.ClientSession() as http, http.get(api.base + "/v1/openapi.json",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200 and await r.json() == orjson.loads(orjson.dumps(doc))
    finally:
        await api.server.stop()


def test_tokens_from_file_and_environment(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# admin tokens\n\nfirst-token-abcdefghij\n  second-token-abcdefghij  \n")
    got = configured_tokens(f, env={TOKENS_ENV: "env-token-abcdefghijkl, "})
    assert got == [b"env-token-abcdefghijkl", b"first-token-abcdefghij",
                   b"second-token-abcdefghij"]
    t = Tokens(tuple(got), "x")
    assert t.check("second-token-abcdefghij") and t.check("env-token-abcdefghijkl")
    assert not t.check("second-token-abcdefghi") and not t.check("") and not t.check(None)
    assert "abcdefghij" not in repr(t)
    f.write_text("short\n")
    with pytest.raises(ConfigError) as exc:
        configured_tokens(f, env={})
    assert "short" not in str(exc.value)
    with pytest.raises(ConfigError):
        configured_tokens(tmp_path / "missing", env={})
    with pytest.raises(ConfigError) as exc:
        configured_tokens(None, env={TOKENS_ENV: "tiny"})
    assert "tiny" not in str(exc.value)
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None


def test_generated_token_is_private_and_stable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert client_token(None, data, env={}) is None
    t1 = server_tokens(None, data, env={})
    path = data / GENERATED_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    t2 = server_tokens(None, data, env={})
    assert t1.values == t2.values and len(t1.values[0]) >= 32
    assert client_token(None, data, env={}) == t1.first
    # configured tokens win over the generated one, for the server and for clients
    assert client_token(None, data, env={TOKENS_ENV: "configured-token-0123456"}) == \
        "configured-token-0123456"
    assert server_tokens(None, data, env={TOKENS_ENV: "configured-token-0123456"}).values == (
        b"configured-token-0123456",)


@pytest.mark.parametrize(("body", "message"), [
    ([], "JSON object"),
    ({}, "exactly one of 'at'"),
    ({"at": "latest", "offsets": "a:0:1"}, "exactly one of 'at'"),
    ({"at": "latest", "nope": 1}, "unknown field"),
    ({"at": 5}, "non-empty string"),
    ({"at": "latest", "entities": "../../etc"}, "entities"),
    ({"at": "latest", "replace": "yes"}, "replace: true or false"),
    ({"at": "latest", "swap_into": "public; drop"}, "swap_into"),
    ({"at": "latest", "target": "sqlite:///etc/replicator.db"}, "must lie inside"),
    ({"at": "latest", "target": "sqlite://relative.db"}, "must be absolute"),
    ({"at": "latest", "target": "jsonl:///DATA/restores/../../x"}, "must be absolute"),
    ({"at": "latest", "target": "sqlite:///DATA/restores"}, "must lie inside"),
    ({"at": "latest", "target": "file:///tmp/x"}, "target: postgresql://"),
    ({"at": "latest\x00"}, "control characters"),
    ({"at": "latest", "target": "postgresql://u@h/db\x00"}, "control characters"),
    ({"at": "latest", "keys": ["a\nb"]}, "control characters"),
    ({"at": "latest", "target": "sqlite:///DATA/restores/jobs/x.json"}, "job records"),
])
def test_bad_restore_requests_are_refused_before_anything_runs(
        tmp_path: Path, body: Any, message: str) -> None:
    from replicator.errors import BadRequestError

    data = tmp_path / "data"
    if isinstance(body, dict) and isinstance(body.get("target"), str):
        body = {**body, "target": body["target"].replace("/DATA", str(data))}
    with pytest.raises(BadRequestError) as exc:
        restore_argv(body, data, "0123456789abcdef")
    assert message in str(exc.value)
    assert not data.exists()


def test_restore_request_arguments(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args, target, shown = restore_argv(
        {"at": "-15m", "entities": ["config"], "keys": "a,b", "replace": True,
         "target": "postgresql://u:s3cret@127.0.0.1/db?schema=x"}, data, "0123456789abcdef")
    assert args == ["--json", "--at=-15m", "--entities=config", "--keys=a,b", "--replace"]
    assert target == "postgresql://u:s3cret@127.0.0.1/db?schema=x"
    assert "s3cret" not in shown and shown.startswith("postgresql://u:***@127.0.0.1/db")
    _args, target, _ = restore_argv({"at": "latest"}, data, "0123456789abcdef")
    assert target == f"sqlite://{(data / 'restores').resolve()}/api-0123456789abcdef.db"


async def _wait_job(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    for _ in range(600):
        async with http.get(url) as r:
            assert r.status == 200
            job: dict[str, Any] = await r.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job did not finish: {job}")


async def test_restore_jobs_run_and_report(tmp_path: Path, history: History) -> None:
    api = await _start(tmp_path, history)
    hdr = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=hdr) as http:
            async with http.get(api.base + "/v1/backups") as r:
                backups = await r.json()
            assert {e["entity"] for e in backups["entities"]} == {
                "attendance", "participant", "config"}
            async with http.post(api.base + "/v1/restores",
                                 json={"at": "latest", "entities": ["config"]}) as r:
                assert r.status == 202
                job = await r.json()
                assert r.headers["Location"] == f"/v1/restores/{job['id']}"
            done = await _wait_job(http, f"{api.base}/v1/restores/{job['id']}")
            assert done["state"] == "succeeded", done
            assert done["exit_code"] == 0
            [entity] = done["result"]["entities"]
            assert entity["entity"] == "config" and entity["ok"] is True
            expected_rows = len(Oracle(history).state("config"))
            assert entity["rows"] == expected_rows
            db = Path(done["result"]["target"].removeprefix("sqlite://"))
            assert db.is_file() and db.parent == (tmp_path / "data" / "restores").resolve()
            # a point outside the window: the job fails with restore's exit code and line
            async with http.post(api.base + "/v1/restores",
                                 json={"at": "2001-01-01T00:00:00Z"}) as r:
                bad = await r.json()
            failed = await _wait_job(http, f"{api.base}/v1/restores/{bad['id']}")
            assert failed["state"] == "failed" and failed["exit_code"] == 7
            assert "restorable" in failed["error"]
            async with http.post(api.base + "/v1/restores",
                                 json={"at": "latest", "target": "sqlite:///etc/x.db"}) as r:
                assert r.status == 400 and "inside" in (await r.json())["error"]
            async with http.post(api.base + "/v1/restores", data=b"{not json") as r:
                assert r.status == 400
            for jid in ("0000000000000000", "..%2F..%2Fetc%2Fpasswd", "ABC"):
                async with http.get(f"{api.base}/v1/restores/{jid}") as r:
                    assert r.status == 404
    finally:
        await api.server.stop()
    # finished jobs answer after a restart (kept as files)
    jobs = RestoreJobs(data_dir=tmp_path / "data", config_path=None)
    again = jobs.get(job["id"])
    assert again is not None and again.state == "succeeded"


async def test_stopping_the_service_records_running_and_queued_jobs_as_interrupted(
        tmp_path: Path, history: History) -> None:
    data = tmp_path / "data"
    config = write_config(tmp_path / "r.toml", history.store_root, data)
    jobs = RestoreJobs(data_dir=data, config_path=config)
    first = jobs.submit({"at": "latest"})
    second = jobs.submit({"at": "latest"})
    for _ in range(200):
        if first.state == "running":
            break
        await asyncio.sleep(0.01)
    await jobs.stop()
    again = RestoreJobs(data_dir=data, config_path=config)
    for job in (first, second):
        kept = again.get(job.id)
        assert kept is not None and kept.state in ("failed", "succeeded")
        if kept.state == "failed":
            assert kept.error is not None and "interrupted" in kept.error


def test_sweep_removes_only_unlocked_scratch_of_killed_restores(tmp_path: Path) -> None:
    import fcntl

    data = tmp_path / "data"
    root = (data / "restores").resolve()
    root.mkdir(parents=True)
    dead = root / ".api-0123456789abcdef.db.tmp-restore-r1"
    live = root / ".api-fedcba9876543210.db.tmp-restore-r2"
    done = root / "api-1111111111111111.db"
    for p in (dead, live, done):
        p.write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a restore running right now holds its scratch
    try:
        assert RestoreJobs(data_dir=data, config_path=None).sweep() == 1
    finally:
        os.close(fd)
    assert not dead.exists() and live.exists() and done.exists()
