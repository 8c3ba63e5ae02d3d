"""The S3 store when its server fails: SIGKILL in the middle of a multipart upload, a server
that is down or frozen, and a create-only put retried after its acknowledgement was lost.

Each test that breaks the server runs its own versitygw (``own_s3``). What must hold: a put that
did not complete raises :class:`StoreError` in bounded time, naming the object and never a
credential; no partial object is ever visible; a retried put converges; ``sweep`` cleans up
the multipart uploads a crash left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from replicator.errors import ObjectExistsError, ObjectNotFoundError, StoreError
from replicator.storage.s3 import S3Location, S3Store
from tests.s3_service import LOCAL_SECRET, S3Server

MiB = 1024 * 1024
BUCKET = "faults"
NAME = "segments/attendance/000000/00000000000000000000-00000000000000100000.seg"


def fast_store(url: str, *, read_timeout_s: float = 5.0) -> S3Store:
    """Small parts and short timeouts/retries, so failures surface within seconds."""
    return S3Store(location=S3Location.parse(url), part_size=5 * MiB,
                   multipart_threshold=5 * MiB, max_attempts=2, connect_timeout_s=1,
                   read_timeout_s=read_timeout_s)


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture()
async def store(own_s3: S3Server) -> AsyncIterator[S3Store]:
    s = fast_store(own_s3.url(BUCKET))
    await s.ensure_bucket()
    try:
        yield s
    finally:
        await s.close()


async def pending_uploads(store: S3Store) -> list[str]:
    """Keys of multipart uploads started and neither completed nor aborted."""
    c = await store._c()
    r = await c.list_multipart_uploads(Bucket=store.location.bucket)
    return sorted(u["Key"] for u in r.get("Uploads", []) or [])


def assert_no_secret(text: str) -> None:
    assert LOCAL_SECRET not in text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text


async def assert_complete_or_absent(store: S3Store, name: str, data: bytes) -> bool:
    """The object is either not visible at all or complete and byte-identical; return
    whether it is there."""
    listed = [(o.name, o.size) for o in await store.list()]
    if listed == []:
        with pytest.raises(ObjectNotFoundError):
            await store.get_bytes(name)
        return False
    assert listed == [(name, len(data))]
    assert await store.get_bytes(name) == data
    head = await store.head(name)
    # single puts record their SHA-256; multipart objects carry the parts' composite ETag
    assert head["sha256"] in (None, hashlib.sha256(data).hexdigest())
    assert head["size"] == len(data)
    return True


# -- (a) SIGKILL during a multipart upload ---------------------------------------------------


async def test_kill_after_first_part_leaves_nothing_visible_and_retry_converges(
    own_s3: S3Server, store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the server dies once part 1 has landed and before the other parts
    are sent, so the put cannot have completed."""
    data = rand_bytes(17 * MiB, seed=1)  # four parts: 5 + 5 + 5 + 2 MiB
    src = tmp_path / "big.seg"
    src.write_bytes(data)
    c = await store._c()
    original = c.upload_part
    first_landed, killed = asyncio.Event(), asyncio.Event()
    parts_sent: list[int] = []

    async def gated_upload_part(**kw: Any) -> Any:
        if kw["PartNumber"] != 1:
            await killed.wait()
        parts_sent.append(kw["PartNumber"])
        r = await original(**kw)
        if kw["PartNumber"] == 1:
            first_landed.set()
        return r

    monkeypatch.setattr(c, "upload_part", gated_upload_part)
    put = asyncio.create_task(store.put_file(NAME, src))
    await asyncio.wait_for(first_landed.wait(), 10)
    await asyncio.to_thread(own_s3.kill)
    killed.set()
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        await asyncio.wait_for(put, 30)
    elapsed = time.monotonic() - t0
    assert type(e.value) is StoreError
    assert elapsed < 15, f"the failed put took {elapsed:.1f}s"
    msg = str(e.value)
    assert NAME in msg and "multipart upload" in msg
    assert_no_secret(msg)
    assert sorted(set(parts_sent)) == [1, 2, 3, 4]

    await asyncio.to_thread(own_s3.restart)
    # no partial object: nothing listed, nothing readable
    assert await assert_complete_or_absent(store, NAME, data) is False
    with pytest.raises(ObjectNotFoundError):
        await store.head(NAME)
    # the abort could not reach the dead server: the upload is left pending
    assert await pending_uploads(store) == [NAME]

    await store.put_file(NAME, src)  # the retried put (same client, reconnecting)
    assert await assert_complete_or_absent(store, NAME, data) is True
    assert (await store.head(NAME))["etag"].endswith("-4")

    # the age guard spares the fresh leftover; sweep(0) aborts it, and only it
    assert await store.sweep(3600) == 0
    assert await store.sweep(0) == 1
    assert await store.sweep(0) == 0
    assert await pending_uploads(store) == []
    assert await assert_complete_or_absent(store, NAME, data) is True


async def test_kill_while_parts_are_in_flight(
    own_s3: S3Server, store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Racy on purpose: SIGKILL lands wherever the upload is when the first part has been
    acknowledged (bodies mid-stream, the completion, or after it). Whatever the outcome,
    nothing partial is ever visible and a retried put converges."""
    data = rand_bytes(26 * MiB, seed=2)  # six parts, four in flight at once
    src = tmp_path / "big.seg"
    src.write_bytes(data)
    c = await store._c()
    original = c.upload_part
    first_landed = asyncio.Event()

    async def signalling_upload_part(**kw: Any) -> Any:
        r = await original(**kw)
        first_landed.set()
        return r

    monkeypatch.setattr(c, "upload_part", signalling_upload_part)
    put = asyncio.create_task(store.put_file(NAME, src))
    await asyncio.wait_for(first_landed.wait(), 10)
    await asyncio.to_thread(own_s3.kill)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(put, 30)
        failed = False
    except StoreError as exc:
        failed = True
        assert type(exc) is StoreError
        assert NAME in str(exc)
        assert_no_secret(str(exc))
    assert time.monotonic() - t0 < 15

    await asyncio.to_thread(own_s3.restart)
    present = await assert_complete_or_absent(store, NAME, data)
    assert present or failed  # a put that returned normally is visible after the restart
    if present:
        with pytest.raises(ObjectExistsError):
            await store.put_file(NAME, src)
    else:
        await store.put_file(NAME, src)
    assert await assert_complete_or_absent(store, NAME, data) is True

    swept = await store.sweep(0)
    assert isinstance(swept, int)
    # a failed put may leave its upload (the abort could not reach the dead server) unless
    # the server finished the completion just before it died; a successful put leaves none
    assert swept in ((0, 1) if failed else (0,))
    assert await store.sweep(0) == 0
    assert await pending_uploads(store) == []
    assert await assert_complete_or_absent(store, NAME, data) is True


# -- (b) server down or frozen -----------------------------------------------------------------


async def test_operations_against_a_dead_server_fail_fast_and_name_the_object(
    own_s3: S3Server, store: S3Store, tmp_path: Path
) -> None:
    await store.put_bytes("before", b"stored before the crash")
    await asyncio.to_thread(own_s3.kill)
    src = tmp_path / "big.seg"
    src.write_bytes(rand_bytes(6 * MiB, seed=3))

    async def fails(op: str, name: str, call: Any) -> None:
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            await call
        elapsed = time.monotonic() - t0
        assert type(e.value) is StoreError, repr(e.value)  # not "exists" / "not found"
        msg = str(e.value)
        assert f"s3 {op} {name!r}" in msg, msg
        assert store.url in msg
        assert_no_secret(msg)
        assert_no_secret(repr(e.value))
        assert elapsed < 10, f"{op} took {elapsed:.1f}s against a dead server"

    # all at once (each timed on its own): retries with backoff take a second or two each
    await asyncio.gather(
        fails("put", NAME, store.put_bytes(NAME, b"payload")),
        fails("put", NAME, store.put_bytes(NAME, b"payload", create_only=False)),
        fails("head", NAME, store.put_file(NAME, src)),  # create-only multipart: head first
        fails("create multipart upload", NAME, store.put_file(NAME, src, create_only=False)),
        fails("get", "before", store.get_bytes("before")),
        fails("get", "before", store.fetch_to("before", tmp_path / "out" / "before")),
        fails("list", "segments/", store.list("segments/")),
        fails("delete", "before", store.delete("before")),
        fails("list multipart uploads", "/", store.sweep(0)),
    )
    assert not (tmp_path / "out" / "before").exists()
    assert os.listdir(tmp_path / "out") == []  # no temp file left by the failed fetch

    await asyncio.to_thread(own_s3.restart)
    # nothing was lost or created while the server was down; the same store recovers
    assert [(o.name, o.size) for o in await store.list()] == [("before", 23)]
    assert await store.get_bytes("before") == b"stored before the crash"
    await store.put_bytes(NAME, b"payload")
    assert await store.get_bytes(NAME) == b"payload"


async def test_put_to_a_frozen_server_times_out(own_s3: S3Server, tmp_path: Path) -> None:
    """A server that accepts connections but never answers (SIGSTOP) must not hang a put:
    the read timeout and the bounded retries turn it into a StoreError."""
    s = fast_store(own_s3.url(BUCKET), read_timeout_s=1)
    await s.ensure_bucket()
    assert own_s3.workdir is not None
    pid = int((own_s3.workdir / "versitygw.pid").read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            await s.put_bytes(NAME, b"never acknowledged")
        elapsed = time.monotonic() - t0
        assert type(e.value) is StoreError
        assert NAME in str(e.value)
        assert_no_secret(str(e.value))
        assert elapsed < 10, f"the put took {elapsed:.1f}s against a frozen server"
    finally:
        os.kill(pid, signal.SIGCONT)
    # the server resumes: whatever the frozen server did with the request, the object is
    # whole or absent, and a create-only retry converges on the same bytes
    await s.close()
    if await assert_complete_or_absent(s, NAME, b"never acknowledged"):
        with pytest.raises(ObjectExistsError):
            await s.put_bytes(NAME, b"never acknowledged")
    else:
        await s.put_bytes(NAME, b"never acknowledged")
    assert await s.get_bytes(NAME) == b"never acknowledged"
    await s.close()


# -- (c) lost acknowledgement ------------------------------------------------------------------


async def test_create_only_retry_after_lost_ack_is_refused_and_changes_nothing(
    s3_bucket: str, tmp_path: Path
) -> None:
    """The put succeeded but its caller never saw the answer and puts again. Nothing is
    killed here, so the session's server does (a fresh bucket)."""
    store = fast_store(s3_bucket)
    try:
        await lost_ack_checks(store, tmp_path)
    finally:
        await store.close()


async def lost_ack_checks(store: S3Store, tmp_path: Path) -> None:
    small = rand_bytes(1000, seed=4)
    await store.put_bytes(NAME, small)  # stored; pretend the caller never saw the 200
    etag = (await store.head(NAME))["etag"]
    for retry in (store.put_bytes(NAME, small), store.put_bytes(NAME, b"different bytes")):
        with pytest.raises(ObjectExistsError) as e:
            await retry
        assert e.value.name == NAME
    assert await store.get_bytes(NAME) == small
    assert await store.head(NAME) == {"size": 1000, "etag": etag,
                                      "sha256": hashlib.sha256(small).hexdigest()}

    big_name = NAME.replace(".seg", ".big.seg")
    big = rand_bytes(11 * MiB, seed=5)
    src = tmp_path / "big.seg"
    src.write_bytes(big)
    await store.put_file(big_name, src)
    big_etag = (await store.head(big_name))["etag"]
    with pytest.raises(ObjectExistsError):
        await store.put_file(big_name, src)
    src.write_bytes(rand_bytes(11 * MiB, seed=6))
    with pytest.raises(ObjectExistsError):
        await store.put_file(big_name, src)
    assert await store.get_bytes(big_name) == big
    assert await store.head(big_name) == {"size": 11 * MiB, "etag": big_etag,
                                          "sha256": None}
    assert [(o.name, o.size) for o in await store.list()] == [(big_name, 11 * MiB),
                                                              (NAME, 1000)]
    assert await pending_uploads(store) == []  # refused retries left no upload behind
