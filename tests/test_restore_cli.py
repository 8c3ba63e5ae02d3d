"""``replicator restore`` through the real command line (a subprocess) against a synthetic
backup: every bad input of issue 3 gets one clear line on stderr, its own exit code, and
nothing is written; ``--dry-run`` prints the plan and writes nothing."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from replicator.restore.point import format_ms
from tests.helpers import REPO_ROOT
from tests.restore_history import ENTITIES, History, Oracle, build_history

EXIT_BAD_REQUEST = 2
EXIT_CORRUPT = 4
EXIT_MISSING = 6
EXIT_NOT_RESTORABLE = 7
EXIT_TARGET = 8


def write_config(path: Path, store_root: Path, data_dir: Path) -> Path:
    topics = ", ".join(f'"{t}"' for t in ENTITIES)
    path.write_text(
        f"""[kafka]
bootstrap_servers = "127.0.0.1:1"
topics = [{topics}]

[store]
url = "{store_root}"

[ingest]
data_dir = "{data_dir}"

[server]
port = 0
"""
    )
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    return subprocess.run(
        [sys.executable, "-m", "replicator", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env,
        stdin=subprocess.DEVNULL, check=False,
    )


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single line a failing command writes on stderr (and nothing on stdout)."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    assert lines[0].startswith("replicator: error: "), lines[0]
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


class Env:
    """A synthetic backup, a config pointing at it, and an empty output directory."""

    def __init__(self, root: Path, history: History) -> None:
        self.h = history
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.out = root / "out"
        self.out.mkdir(exist_ok=True)
        self.config = write_config(root / "replicator.toml", history.store_root, self.data)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(self.config, *args)

    def assert_nothing_written(self) -> None:
        assert list(self.out.iterdir()) == [], list(self.out.iterdir())
        assert not (self.data / "restores").exists()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("cli-hist"), events=3000, seed=21)


@pytest.fixture()
def env(history: History, tmp_path: Path) -> Env:
    return Env(tmp_path, history)


# -- bad input: one line, a distinct code, nothing written ----------------------------------


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--at", "2026-11-26T10:42:17"], EXIT_BAD_REQUEST,
     "malformed time '2026-11-26T10:42:17' (no time zone: add Z for UTC"),
    (["--at", "yesterday"], EXIT_BAD_REQUEST, "accepted: RFC 3339 with a zone"),
    (["--at", "2026-02-30T00:00:00Z"], EXIT_BAD_REQUEST, "malformed time"),
    (["--at", "@\u00b2"], EXIT_BAD_REQUEST, "malformed time"),
    (["--at", "latest", "--entities", "attendance,nope"], EXIT_BAD_REQUEST,
     "unknown entity 'nope'; known: attendance, config, participant"),
    (["--offsets", "nope:0:1"], EXIT_BAD_REQUEST, "unknown topic 'nope' in --offsets"),
    (["--offsets", "config:0"], EXIT_BAD_REQUEST, "malformed offset 'config:0'"),
    (["--offsets", "config:0:1"], EXIT_BAD_REQUEST,
     "--offsets must name every partition of the topics it restores; missing config:1, "
     "config:2"),
    (["--offsets", "config:0:1,config:1:1,config:2:1,config:9:1"], EXIT_BAD_REQUEST,
     "no backup of partition(s) config:9"),
    (["--offsets", "config:0:1000000,config:1:1,config:2:1"], EXIT_BAD_REQUEST,
     "offset 1000000 for config:0 is beyond what is stored (covered [0, "),
    (["--at", "latest", "--target", "mysql://u@h/db"], EXIT_BAD_REQUEST,
     "unsupported target 'mysql://u@h/db'"),
    (["--at", "latest", "--target", "sqlite://relative.db"], EXIT_BAD_REQUEST,
     "the path must be absolute"),
    (["--at", "latest", "--target", "postgresql://x@127.0.0.1:1/db"], EXIT_TARGET,
     "cannot connect to postgresql://x@127.0.0.1:1/db"),
    (["--at", "latest", "--target", "postgresql://x:secret@127.0.0.1:1/db"], EXIT_TARGET,
     "cannot connect to postgresql://x@127.0.0.1:1/db"),  # no password in the message
    (["--at", "latest", "--target", "postgresql://x@127.0.0.1:1/db?schema=Bad-Name"],
     EXIT_TARGET, "schema name 'Bad-Name'"),
])
def test_bad_input_is_one_line_and_a_distinct_exit_code(
        env: Env, args: list[str], code: int, message: str) -> None:
    if "--target" not in args:
        args = [*args, "--target", f"sqlite://{env.out / 'r.db'}"]
    res = env.run("restore", *args)
    assert res.returncode == code, res.stderr
    line = error_line(res)
    assert message in line
    assert "secret" not in res.stderr
    env.assert_nothing_written()


def test_points_outside_the_window_name_it(env: Env) -> None:
    h = env.h
    target = f"sqlite://{env.out / 'r.db'}"
    before = env.run("restore", "--at", f"@{h.oldest_ms - 1}", "--target", target)
    assert before.returncode == EXIT_NOT_RESTORABLE
    line = error_line(before)
    assert "before the oldest retained data" in line
    assert f"restorable window: {format_ms(h.oldest_ms)} .. {format_ms(h.newest_ms)}" in line
    after = env.run("restore", "--at", f"@{h.newest_ms + 1}", "--target", target)
    assert after.returncode == EXIT_NOT_RESTORABLE
    line = error_line(after)
    assert f"after the newest restorable time {format_ms(h.newest_ms)}" in line
    # relative times resolve against now: far after the synthetic window
    assert env.run("restore", "--at", "-1s", "--target", target).returncode == \
        EXIT_NOT_RESTORABLE
    env.assert_nothing_written()


@pytest.mark.parametrize("args", [
    ["--at", "latest", "--offsets", "config:0:1,config:1:1,config:2:1"],
    [],
])
def test_exactly_one_of_at_or_offsets(env: Env, args: list[str]) -> None:
    res = env.run("restore", *args, "--target", f"sqlite://{env.out / 'r.db'}")
    assert res.returncode == EXIT_BAD_REQUEST
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "replicator: error: give exactly one of --at"), res.stderr
    env.assert_nothing_written()


def test_no_backups_at_all(tmp_path: Path) -> None:
    store = tmp_path / "empty-store"
    store.mkdir()
    env = Env(tmp_path, History(store_root=store))
    res = env.run("restore", "--at", "latest", "--target", f"sqlite://{env.out / 'r.db'}")
    assert res.returncode == EXIT_NOT_RESTORABLE
    assert "no backups at all for attendance, config, participant" in error_line(res)
    env.assert_nothing_written()
    # the listing says so too, without failing
    ls = env.run("backups", "list", "--json")
    assert ls.returncode == 0, ls.stderr
    doc = orjson.loads(ls.stdout)
    assert [e["oldest_restorable"] for e in doc["entities"]] == [None, None, None]


def test_target_already_holding_data_is_refused_and_left_alone(env: Env) -> None:
    db = env.out / "r.db"
    first = env.run("restore", "--at", "latest", "--target", f"sqlite://{db}")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1].endswith("digest ok")
    before = db.read_bytes()
    again = env.run("restore", "--at", f"@{env.h.oldest_ms}", "--target", f"sqlite://{db}")
    assert again.returncode == EXIT_TARGET
    assert "already holds data; choose another file or pass --replace" in error_line(again)
    assert db.read_bytes() == before
    assert [p.name for p in env.out.iterdir()] == ["r.db"]  # no temp file left behind
    # a foreign, non-database file is not overwritten either
    other = env.out / "notes.db"
    other.write_bytes(b"my precious notes, not a database")
    res = env.run("restore", "--at", "latest", "--target", f"sqlite://{other}")
    assert res.returncode == EXIT_TARGET and "already holds data" in error_line(res)
    assert other.read_bytes() == b"my precious notes, not a database"
    # --replace replaces it, atomically, with the earlier point
    rep = env.run("restore", "--at", f"@{env.h.oldest_ms}", "--target", f"sqlite://{db}",
                  "--replace", "--json")
    assert rep.returncode == 0, rep.stderr
    with sqlite3.connect(db) as conn:
        n = conn.execute("SELECT count(*) FROM attendance").fetchone()[0]
    assert n == len(Oracle(env.h).state("attendance", env.h.oldest_ms))
    assert db.read_bytes() != before
    assert sorted(p.name for p in env.out.iterdir()) == ["notes.db", "r.db"]


def test_missing_and_corrupt_segments(tmp_path: Path) -> None:
    h = build_history(tmp_path / "h", events=900, seed=4, per_segment=60)
    env = Env(tmp_path, h)
    segs = sorted((h.store_root / "segments" / "attendance" / "000000").glob("*.seg"))
    assert len(segs) >= 3
    segs[1].unlink()
    res = env.run("restore", "--at", "latest", "--target", f"sqlite://{env.out / 'm.db'}")
    assert res.returncode == EXIT_MISSING
    line = error_line(res)
    assert "attendance:0: offsets [" in line and "missing from the backup" in line
    env.assert_nothing_written()
    # the other entities do not need the missing file
    ok = env.run("restore", "--at", "latest", "--entities", "config,participant",
                 "--target", f"sqlite://{env.out / 'ok.db'}")
    assert ok.returncode == 0, ok.stderr
    (env.out / "ok.db").unlink()
    # corrupt a byte inside a block of a participant segment
    seg = sorted((h.store_root / "segments" / "participant").rglob("*.seg"))[0]
    data = bytearray(seg.read_bytes())
    data[200] ^= 0xFF
    seg.write_bytes(bytes(data))
    bad = env.run("restore", "--at", "latest", "--entities", "participant",
                  "--target", f"sqlite://{env.out / 'c.db'}")
    assert bad.returncode == EXIT_CORRUPT
    line = error_line(bad)
    assert seg.name in line and "at byte" in line
    env.assert_nothing_written()


def test_look_ups_refuse_bad_input_too(env: Env) -> None:
    res = env.run("get", "nope", "k1")
    assert res.returncode == EXIT_BAD_REQUEST and "unknown entity 'nope'" in error_line(res)
    res = env.run("get", "participant", "k1", "--at", "2026-01-01 10:00")
    assert res.returncode == EXIT_BAD_REQUEST and "no time zone" in error_line(res)
    res = env.run("history", "nope", "k1")
    assert res.returncode == EXIT_BAD_REQUEST and "unknown entity" in error_line(res)
    res = env.run("export", "--entity", "attendance", "--from", "noon")
    assert res.returncode == EXIT_BAD_REQUEST and "malformed time 'noon'" in error_line(res)
    env.assert_nothing_written()


# -- dry run --------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(env: Env) -> None:
    before = tree(env.data.parent)
    t = env.h.oldest_ms + (env.h.newest_ms - env.h.oldest_ms) // 2
    res = env.run("restore", "--at", format_ms(t), "--dry-run", "--entities", "config",
                  "--target", f"sqlite://{env.out / 'r.db'}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"restore plan: config at {format_ms(t)}\n")
    oldest = min(e.ts_ms for e in env.h.events if e.topic == "config")  # config's own window
    assert f"restorable window: {format_ms(oldest)} .. {format_ms(env.h.newest_ms)}" in out
    assert "events to replay" in out
    for p in range(env.h.partitions):
        assert f"config[{p}]:" in out
    assert out.count(f"cut: records <= {format_ms(t)}") == env.h.partitions
    assert "store: segments/config/" in out
    assert tree(env.data.parent) == before
    env.assert_nothing_written()


def test_dry_run_json(env: Env) -> None:
    h = env.h
    res = env.run("restore", "--at", "latest", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    doc = orjson.loads(res.stdout)
    assert doc["dry_run"] is True
    plan = doc["plan"]
    assert plan["at_ms"] == h.newest_ms and plan["at"] == format_ms(h.newest_ms)
    assert plan["window"] == {"oldest": format_ms(h.oldest_ms), "newest": format_ms(h.newest_ms)}
    assert plan["entities"] == sorted(ENTITIES)
    assert plan["events_estimate"] == len(h.events)  # latest reads every stored event
    store_files = sorted((h.store_root / "segments").rglob("*.seg"))
    assert plan["files"] == len(store_files)
    assert plan["bytes"] == sum(p.stat().st_size for p in store_files)
    assert isinstance(plan["seconds_estimate"], float)
    parts = {(p["topic"], p["partition"]): p for p in plan["partitions"]}
    assert set(parts) == set(h.by_partition())
    for tp, evs in h.by_partition().items():
        p = parts[tp]
        assert p["cut_time"] == format_ms(h.newest_ms) and p["cut_offset"] is None
        assert p["covered"][0] == 0 and p["covered"][1] > evs[-1].offset
        assert p["events_estimate"] == len(evs)
        names = [f["name"] for f in p["files"]]
        assert names == sorted(names) and all(f["location"] == "store" for f in p["files"])
    # offsets in dry-run: the cut per partition is the given end offset
    ends = {tp: evs[len(evs) // 2].offset for tp, evs in h.by_partition().items()
            if tp[0] == "participant"}
    res = env.run("restore", "--offsets", ",".join(f"{t}:{p}:{o}" for (t, p), o in ends.items()),
                  "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    plan = orjson.loads(res.stdout)["plan"]
    assert plan["at"] is None and plan["entities"] == ["participant"]
    assert {(p["topic"], p["partition"]): p["cut_offset"] for p in plan["partitions"]} == ends
    for p in plan["partitions"]:
        assert all(f["to"] <= ends[(p["topic"], p["partition"])] for f in p["files"])
    env.assert_nothing_written()
