"""Loading one table of the SQLite target: conversion and insertion on two threads.

With the native loader (``replicator.targets._sqlbulk``, built from ``_sqlbulk.c`` when
SQLite's headers are there) the rows are inserted through a connection of its own that binds
and steps with the GIL released, while the calling thread converts the next chunk (which
needs the GIL): the two overlap on two cores instead of taking turns. Without it, the
``sqlite3`` module's ``executemany`` inserts on the target's own connection.

Invariants:

* rows reach the table in the order the chunks give them (key order);
* at most ``QUEUE_CHUNKS`` converted chunks wait for the inserter (bounded memory);
* a failure on either side stops both and is raised in the calling thread (a conversion
  error as it was raised, an insert error as :class:`~replicator.errors.TargetError`); the
  scratch file is then the target's to drop;
* the loader's connection commits and closes before :func:`load_native` returns, so the
  target's own connection sees every row.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from replicator.errors import TargetError

#: converted chunks allowed to wait for the inserter
QUEUE_CHUNKS = 3


def _load_native() -> Any:
    if os.environ.get("REPLICATOR_NO_NATIVE"):
        return None
    try:
        from replicator.targets import _sqlbulk  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _sqlbulk


native: Any = _load_native()

_DONE = object()


def load_native(path: Path, *, create_sql: str, insert_sql: str,
                chunks: Iterable[list[tuple[Any, ...]]], location: str) -> int:
    """Create the table and insert every chunk's rows into the SQLite file ``path`` through
    the native loader (which must be built); returns the rows inserted."""
    loader = native.Loader(str(path))
    try:
        try:
            loader.execute(create_sql)
            loader.execute("BEGIN")
            loader.prepare(insert_sql)
        except native.sqlite_error as exc:
            raise TargetError(f"{location}: {exc}") from None
        inserted = _pipeline(loader, chunks, location)
        try:
            loader.execute("COMMIT")
        except native.sqlite_error as exc:
            raise TargetError(f"{location}: {exc}") from None
        return inserted
    finally:
        loader.close()


def _pipeline(loader: Any, chunks: Iterable[list[tuple[Any, ...]]], location: str) -> int:
    """Insert on a helper thread what this thread converts (the chunks' iteration)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
    stop = threading.Event()
    failure: list[BaseException] = []
    inserted = 0

    def insert() -> None:
        nonlocal inserted
        try:
            while (chunk := q.get()) is not _DONE:
                inserted += loader.insert(chunk)
        except BaseException as exc:  # handed to the converting thread
            failure.append(exc)
            stop.set()
            while q.get() is not _DONE:  # unblock the producer until it sees stop
                pass

    worker = threading.Thread(target=insert, name="sqlite-insert", daemon=True)
    worker.start()
    try:
        for chunk in chunks:
            if stop.is_set():
                break
            q.put(chunk)
    finally:
        q.put(_DONE)
        worker.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, native.sqlite_error):
            raise TargetError(f"{location}: {exc}") from None
        if isinstance(exc, (TypeError, ValueError, OverflowError, UnicodeError)):
            raise TargetError(f"{location}: a value cannot be stored ({exc})") from None
        raise exc
    return inserted
