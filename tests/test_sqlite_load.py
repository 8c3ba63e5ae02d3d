"""The native SQLite loader (``replicator.targets._sqlbulk`` behind ``sqlite_load``): the
same table as ``executemany`` for every kind of value, errors as ``TargetError`` without a
hang on either side of the two-thread pipeline, and the restore's SQLite target on it."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.errors import TargetError
from replicator.targets import sqlite_load
from replicator.targets.sqlite_load import load_native

native = sqlite_load.native
needs_native = pytest.mark.skipif(native is None and os.environ.get("CI") != "true",
                                  reason="native SQLite loader not built (no SQLite headers)")

CREATE = 'CREATE TABLE "t" ("key" TEXT PRIMARY KEY NOT NULL, "a" TEXT, "b" INTEGER, ' \
         '"c" REAL, "d" BLOB) WITHOUT ROWID'
INSERT = 'INSERT INTO "t" VALUES (?, ?, ?, ?, ?)'


def test_native_loader_is_built_in_ci() -> None:
    if os.environ.get("CI") == "true" and not os.environ.get("REPLICATOR_NO_NATIVE"):
        assert native is not None, "replicator.targets._sqlbulk was not built"


def _scratch(path: Path) -> Path:
    sqlite3.connect(path).close()
    return path


def _rows(n: int, start: int = 0) -> list[tuple[Any, ...]]:
    odd = ["", "plain", "ünïcödé ✓", "nul\x00inside", "emoji 🛰️", "x" * 5000, None]
    out: list[tuple[Any, ...]] = []
    for i in range(start, start + n):
        out.append((
            f"k{i:08d}",
            odd[i % len(odd)],
            [0, -1, 2**63 - 1, -(2**63), True, False, None, i][i % 8],
            [0.0, -1.5, 1e300, 5e-324, float("inf"), None, i / 7][i % 7],
            [b"", b"\x00\xff", None, bytes(range(256))][i % 4],
        ))
    return out


def _table(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as c:
        return c.execute('SELECT *, typeof("a"), typeof("b"), typeof("c"), typeof("d") '
                         'FROM "t" ORDER BY "key"').fetchall()


@needs_native
def test_same_table_as_executemany(tmp_path: Path) -> None:
    rows = _rows(2345)
    chunks = [rows[i:i + 500] for i in range(0, len(rows), 500)]
    fast = _scratch(tmp_path / "fast.db")
    n = load_native(fast, create_sql=CREATE, insert_sql=INSERT, chunks=iter(chunks),
                    location="sqlite://fast")
    assert n == len(rows)
    ref = tmp_path / "ref.db"
    with sqlite3.connect(ref) as c:
        c.execute(CREATE)
        c.executemany(INSERT, rows)
    got, want = _table(fast), _table(ref)
    assert len(got) == len(rows)
    assert got == want  # values and their storage classes


@needs_native
@pytest.mark.parametrize("bad, words", [
    ((("k1", "a", 1, 1.0, None), ("k1", "b", 2, 2.0, None)), "UNIQUE constraint failed"),
    ((("k1", "a", 2**64, 1.0, None),), "too large"),
    ((("k1", "a", 1, 1.0, {"no": "dicts"}),), "unsupported value type"),
    ((("k1", "a", 1),), "not a tuple of 5 values"),
    ((("k1", "\ud800", 1, 1.0, None),), "surrogates not allowed"),
])
def test_bad_rows_are_a_target_error(tmp_path: Path, bad: tuple[tuple[Any, ...], ...],
                                     words: str) -> None:
    path = _scratch(tmp_path / "x.db")
    with pytest.raises(TargetError, match=words) as err:
        load_native(path, create_sql=CREATE, insert_sql=INSERT, chunks=iter([list(bad)]),
                    location="sqlite:///x.db")
    assert str(err.value).startswith("sqlite:///x.db: ")


@needs_native
def test_an_insert_failure_stops_the_converting_side(tmp_path: Path) -> None:
    """A duplicate key in the second chunk: the producer is told to stop (it must not
    convert the whole remaining input) and the call neither hangs nor loses the error."""
    produced = 0

    def chunks() -> Iterator[list[tuple[Any, ...]]]:
        nonlocal produced
        yield _rows(100)
        for i in range(10_000):
            produced += 1
            yield _rows(100, start=50 if i == 0 else 1_000_000 + i * 100)

    path = _scratch(tmp_path / "x.db")
    done = threading.Event()
    box: list[BaseException] = []

    def run() -> None:
        try:
            load_native(path, create_sql=CREATE, insert_sql=INSERT, chunks=chunks(),
                        location="sqlite:///x.db")
        except BaseException as exc:
            box.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "the pipeline hung after an insert failure"
    assert isinstance(box[0], TargetError) and "UNIQUE" in str(box[0])
    assert produced < 100  # stopped soon after the failure, not at the end of the input


@needs_native
def test_a_conversion_failure_is_raised_as_it_was(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    def chunks() -> Iterator[list[tuple[Any, ...]]]:
        yield _rows(10)
        raise Boom("conversion failed")

    path = _scratch(tmp_path / "x.db")
    with pytest.raises(Boom, match="conversion failed"):
        load_native(path, create_sql=CREATE, insert_sql=INSERT, chunks=chunks(),
                    location="sqlite:///x.db")


@needs_native
def test_loader_refuses_use_after_close_and_a_missing_file(tmp_path: Path) -> None:
    loader = native.Loader(str(_scratch(tmp_path / "x.db")))
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(native.sqlite_error, match="closed"):
        loader.execute("SELECT 1")
    with pytest.raises(native.sqlite_error, match="open"):
        native.Loader(str(tmp_path / "absent" / "x.db"))
