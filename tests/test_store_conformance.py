"""One conformance suite for every store: the invariants of :mod:`replicator.storage.base`
checked with exact values against a local directory and a real S3 server (versitygw).

Each test runs once per backend (``local``, ``s3``); the S3 store gets a fresh bucket per
test. A few S3-only checks (credentials never in URLs or messages, the recorded SHA-256,
key prefixes) follow at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from replicator import naming
from replicator.errors import (
    ConfigError,
    InvalidNameError,
    ObjectExistsError,
    ObjectNotFoundError,
)
from replicator.storage import LocalStore, ObjectInfo, Store, open_store
from replicator.storage.s3 import S3Location, S3Store
from tests.s3_service import LOCAL_SECRET

MiB = 1024 * 1024
#: larger than the 5 MiB multipart threshold of ``Backend.multipart``: three parts (5+5+2)
BIG = 12 * MiB

BAD_NAMES = ["../x", "/abs", "", "a//b", "a/./b", "a/../../x", "a/", "a\\b", "a\x00b"]


@dataclass
class Backend:
    """One store under test, built through ``open_store`` from ``url``."""

    kind: str
    url: str
    store: Store
    #: the same backend configured to use multipart uploads from 5 MiB (S3), or ``store``
    multipart: Store
    #: the directory of a local store (None for S3)
    root: Path | None

    async def make_leftover(self, name: str) -> None:
        """Leave behind what a crash in the middle of a put of ``name`` leaves."""
        if isinstance(self.store, LocalStore):
            final = self.store.root / name
            final.parent.mkdir(parents=True, exist_ok=True)
            naming.temp_sibling(final, "dead0001").write_bytes(b"torn")
        else:
            assert isinstance(self.store, S3Store)
            c = await self.store._c()
            await c.create_multipart_upload(Bucket=self.store.location.bucket,
                                            Key=self.store.location.prefix + name)


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return f"file://{tmp_path / 'store'}"
    url = request.getfixturevalue("s3_bucket")
    assert isinstance(url, str)
    return url


@pytest.fixture()
async def backend(store_url: str) -> AsyncIterator[Backend]:
    store = open_store(store_url)
    multipart: Store = store
    if isinstance(store, S3Store):
        multipart = S3Store(location=S3Location.parse(store_url), part_size=5 * MiB,
                                   multipart_threshold=5 * MiB)
        b = Backend("s3", store_url, store, multipart, None)
    else:
        assert isinstance(store, LocalStore)
        b = Backend("local", store_url, store, store, store.root)
    try:
        yield b
    finally:
        await store.close()
        await multipart.close()


async def names_and_sizes(store: Store, prefix: str = "") -> list[tuple[str, int]]:
    return [(o.name, o.size) for o in await store.list(prefix)]


# -- construction ---------------------------------------------------------------------------


async def test_open_store_builds_the_backend(backend: Backend) -> None:
    assert isinstance(backend.store, Store)
    if backend.kind == "local":
        assert isinstance(backend.store, LocalStore)
        assert backend.store.url == backend.url
    else:
        assert isinstance(backend.store, S3Store)
        # the printable URL names the same place: it opens an equal store
        again = open_store(backend.store.url)
        assert isinstance(again, S3Store)
        assert again.location == backend.store.location == S3Location.parse(backend.url)
    assert LOCAL_SECRET not in backend.store.url
    assert await backend.store.list() == []


# -- put / get -----------------------------------------------------------------------------


async def test_put_bytes_get_bytes_round_trip_and_ranges(backend: Backend) -> None:
    s = backend.store
    data = bytes(range(256)) * 4  # 1024 bytes, every byte value at a known position
    await s.put_bytes("segments/t/000001/a.seg", data)
    assert await s.get_bytes("segments/t/000001/a.seg") == data
    assert await s.get_bytes("segments/t/000001/a.seg", 10) == data[10:]
    assert await s.get_bytes("segments/t/000001/a.seg", 10, 5) == bytes([10, 11, 12, 13, 14])
    assert await s.get_bytes("segments/t/000001/a.seg", 0, 1) == b"\x00"
    assert await s.get_bytes("segments/t/000001/a.seg", 1023, 1) == b"\xff"
    # a range running past the end is cut at the end
    assert await s.get_bytes("segments/t/000001/a.seg", 1020, 100) == b"\xfc\xfd\xfe\xff"
    assert await s.get_bytes("segments/t/000001/a.seg", 0, 5000) == data
    # a start at or past the end reads nothing
    assert await s.get_bytes("segments/t/000001/a.seg", 1024) == b""
    assert await s.get_bytes("segments/t/000001/a.seg", 1024, 10) == b""
    assert await s.get_bytes("segments/t/000001/a.seg", 5000) == b""
    assert await s.get_bytes("segments/t/000001/a.seg", 5000, 10) == b""
    assert await s.get_bytes("segments/t/000001/a.seg", 3, 0) == b""
    assert await names_and_sizes(s) == [("segments/t/000001/a.seg", 1024)]
    # the empty object
    await s.put_bytes("segments/t/000001/empty", b"")
    assert await s.get_bytes("segments/t/000001/empty") == b""
    assert await s.get_bytes("segments/t/000001/empty", 0, 10) == b""
    assert await names_and_sizes(s, "segments/t/000001/e") == [("segments/t/000001/empty", 0)]


async def test_put_file_small_round_trip(backend: Backend, tmp_path: Path) -> None:
    s = backend.store
    src = tmp_path / "small.bin"
    data = rand_bytes(4097, seed=1)
    src.write_bytes(data)
    await s.put_file("segments/t/000000/small.seg", src)
    assert await s.get_bytes("segments/t/000000/small.seg") == data
    assert await s.get_bytes("segments/t/000000/small.seg", 4000, 200) == data[4000:]
    assert await names_and_sizes(s) == [("segments/t/000000/small.seg", 4097)]
    assert src.read_bytes() == data  # the source is left as it was


async def test_put_file_multipart_round_trip(backend: Backend, tmp_path: Path) -> None:
    s = backend.multipart
    src = tmp_path / "big.bin"
    data = rand_bytes(BIG, seed=2)
    src.write_bytes(data)
    await s.put_file("snapshots/full/big.snap", src)
    assert await names_and_sizes(s) == [("snapshots/full/big.snap", BIG)]
    assert await s.get_bytes("snapshots/full/big.snap") == data
    # ranges across the part boundaries (5 MiB, 10 MiB)
    for start, n in ((5 * MiB - 3, 6), (10 * MiB - 1, 2)):
        assert await s.get_bytes("snapshots/full/big.snap", start, n) == data[start:start + n]
    assert await s.get_bytes("snapshots/full/big.snap", BIG - 7) == data[-7:]
    if isinstance(s, S3Store):
        head = await s.head("snapshots/full/big.snap")
        assert head["size"] == BIG
        assert head["etag"] == multipart_etag(data, 5 * MiB)  # really three parts, intact
        assert head["sha256"] is None  # recorded for single puts only (no second pass)
    # nothing left behind: no temp files, no pending multipart uploads
    assert await s.sweep(0) == 0


async def test_put_bytes_multipart_round_trip(backend: Backend) -> None:
    s = backend.multipart
    data = rand_bytes(5 * MiB + 1, seed=3)  # one byte over the threshold: a 1-byte last part
    await s.put_bytes("snapshots/full/two-parts.snap", data)
    assert await names_and_sizes(s) == [("snapshots/full/two-parts.snap", 5 * MiB + 1)]
    assert await s.get_bytes("snapshots/full/two-parts.snap") == data
    assert await s.get_bytes("snapshots/full/two-parts.snap", 5 * MiB) == data[-1:]
    if isinstance(s, S3Store):
        head = await s.head("snapshots/full/two-parts.snap")
        assert head["etag"] == multipart_etag(data, 5 * MiB)
        assert head["etag"].endswith("-2")


# -- create-only ------------------------------------------------------------------------------


async def test_create_only_refuses_and_keeps_the_original(backend: Backend, tmp_path: Path) -> None:
    s = backend.store
    await s.put_bytes("segments/t/000000/0-10.seg", b"original")
    with pytest.raises(ObjectExistsError) as e:
        await s.put_bytes("segments/t/000000/0-10.seg", b"replacement")
    assert e.value.name == "segments/t/000000/0-10.seg"
    src = tmp_path / "other.bin"
    src.write_bytes(b"from a file")
    with pytest.raises(ObjectExistsError):
        await s.put_file("segments/t/000000/0-10.seg", src)
    with pytest.raises(ObjectExistsError):  # the same bytes again: still refused
        await s.put_bytes("segments/t/000000/0-10.seg", b"original")
    assert await s.get_bytes("segments/t/000000/0-10.seg") == b"original"
    assert await names_and_sizes(s) == [("segments/t/000000/0-10.seg", 8)]
    assert await s.sweep(0) == 0


async def test_create_only_refuses_multipart_and_keeps_the_original(
    backend: Backend, tmp_path: Path
) -> None:
    s = backend.multipart
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    data = rand_bytes(BIG, seed=4)
    first.write_bytes(data)
    second.write_bytes(rand_bytes(BIG + 1, seed=5))
    await s.put_file("snapshots/full/x.snap", first)
    with pytest.raises(ObjectExistsError) as e:
        await s.put_file("snapshots/full/x.snap", second)
    assert e.value.name == "snapshots/full/x.snap"
    with pytest.raises(ObjectExistsError):
        await s.put_bytes("snapshots/full/x.snap", second.read_bytes())
    with pytest.raises(ObjectExistsError):  # a small put over a big object
        await s.put_bytes("snapshots/full/x.snap", b"tiny")
    assert await names_and_sizes(s) == [("snapshots/full/x.snap", BIG)]
    assert await s.get_bytes("snapshots/full/x.snap") == data
    assert await s.sweep(0) == 0  # refused uploads were aborted, not left pending


async def test_racing_create_only_puts_one_wins(backend: Backend, tmp_path: Path) -> None:
    """Two writers put the same name at once: exactly one succeeds, the other gets
    ObjectExistsError, and the object holds the winner's bytes in full (for S3 this reaches
    the conditional multipart completion, past the early existence check)."""
    s = backend.multipart
    datas = [rand_bytes(6 * MiB, seed=10), rand_bytes(6 * MiB + 5, seed=11)]
    srcs = []
    for i, d in enumerate(datas):
        srcs.append(tmp_path / f"w{i}.bin")
        srcs[-1].write_bytes(d)
    results = await asyncio.gather(*(s.put_file("race/obj", p) for p in srcs),
                                   return_exceptions=True)
    winners = [i for i, r in enumerate(results) if r is None]
    losers = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert len(losers) == 1 and isinstance(losers[0], ObjectExistsError), results
    won = datas[winners[0]]
    assert await names_and_sizes(s) == [("race/obj", len(won))]
    assert await s.get_bytes("race/obj") == won
    assert await s.sweep(0) == 0

    small = await asyncio.gather(*(s.put_bytes("race/small", b"w%d" % i) for i in range(4)),
                                 return_exceptions=True)
    assert sum(r is None for r in small) == 1, small
    assert all(isinstance(r, ObjectExistsError) for r in small if r is not None), small
    assert await s.get_bytes("race/small") == b"w%d" % small.index(None)


async def test_create_only_false_overwrites(backend: Backend, tmp_path: Path) -> None:
    s = backend.multipart
    await s.put_bytes("watermarks/t/000000", b"one")
    await s.put_bytes("watermarks/t/000000", b"second", create_only=False)
    assert await s.get_bytes("watermarks/t/000000") == b"second"
    src = tmp_path / "big.bin"
    data = rand_bytes(BIG, seed=6)
    src.write_bytes(data)
    await s.put_file("watermarks/t/000000", src, create_only=False)  # multipart overwrite
    assert await s.get_bytes("watermarks/t/000000") == data
    await s.put_bytes("watermarks/t/000000", b"3", create_only=False)  # and back to small
    assert await s.get_bytes("watermarks/t/000000") == b"3"
    assert await names_and_sizes(s) == [("watermarks/t/000000", 1)]
    # overwriting a name that does not exist yet simply creates it
    await s.put_bytes("watermarks/t/000001", b"new", create_only=False)
    assert await names_and_sizes(s, "watermarks/") == [("watermarks/t/000000", 1),
                                                       ("watermarks/t/000001", 3)]


# -- list -----------------------------------------------------------------------------------


LISTED = {
    "segments/abc/y": b"yyyy",
    "segments/abc/x": b"xxx",
    "segments/ab": b"a",
    "segments/b/0001": b"0123456789",
    "segmentsX": b"XX",
    "snapshots/full/1": b"fffff",
    "top": b"",
}


async def test_list_sorted_sizes_and_prefixes(backend: Backend) -> None:
    s = backend.store
    for name, data in LISTED.items():  # not in name order
        await s.put_bytes(name, data)
    everything = [("segments/ab", 1), ("segments/abc/x", 3), ("segments/abc/y", 4),
                  ("segments/b/0001", 10), ("segmentsX", 2), ("snapshots/full/1", 5),
                  ("top", 0)]
    assert await names_and_sizes(s) == everything
    assert await names_and_sizes(s, "") == everything
    assert all(isinstance(o, ObjectInfo) for o in await s.list())
    assert await names_and_sizes(s, "segments/") == everything[:4]
    assert await names_and_sizes(s, "segments") == everything[:5]
    # a prefix that ends in the middle of a name component
    assert await names_and_sizes(s, "segments/a") == everything[:3]
    assert await names_and_sizes(s, "segments/abc") == everything[1:3]
    assert await names_and_sizes(s, "segments/abc/") == everything[1:3]
    assert await names_and_sizes(s, "segments/abc/x") == [("segments/abc/x", 3)]
    assert await names_and_sizes(s, "segments/b/") == [("segments/b/0001", 10)]
    assert await names_and_sizes(s, "snap") == [("snapshots/full/1", 5)]
    assert await names_and_sizes(s, "t") == [("top", 0)]
    assert await names_and_sizes(s, "segments/c") == []
    assert await names_and_sizes(s, "nothing/here/") == []
    assert await names_and_sizes(s, "segments/abc/x/") == []


async def test_list_paginates_past_one_page(backend: Backend) -> None:
    """More objects than one S3 listing page (1000): all listed, in order, exactly once."""
    s = backend.store
    names = [naming_like(i) for i in range(1003)]
    sem = asyncio.Semaphore(32)

    async def put(n: str) -> None:
        async with sem:
            await s.put_bytes(n, n.encode())

    await asyncio.gather(*(put(n) for n in reversed(names)))
    listed = await names_and_sizes(s, "segments/p/")
    assert listed == [(n, len(n)) for n in names]


def naming_like(i: int) -> str:
    return f"segments/p/{i:020d}-{i + 1:020d}.seg"


async def test_temp_names_are_never_listed(backend: Backend) -> None:
    s = backend.store
    await s.put_bytes("segments/t/000000/0-10.seg", b"sealed")
    # a temp-named object (what a crash mid-put leaves on a local disk)
    await s.put_bytes(f"segments/t/000000/{naming.TEMP_PREFIX}abcd-10-20.seg", b"partial")
    await s.put_bytes(f"{naming.TEMP_PREFIX}top", b"partial")
    if backend.root is not None:
        d = backend.root / "segments" / "t" / "000000"
        (d / f"{naming.TEMP_PREFIX}0bad-20-30.seg").write_bytes(b"torn")
        (backend.root / f"{naming.TEMP_PREFIX}x").write_bytes(b"torn")
    expected = [("segments/t/000000/0-10.seg", 6)]
    assert await names_and_sizes(s) == expected
    assert await names_and_sizes(s, "segments/") == expected
    assert await names_and_sizes(s, "segments/t/000000/") == expected
    assert await names_and_sizes(s, f"segments/t/000000/{naming.TEMP_PREFIX}") == []
    assert await names_and_sizes(s, naming.TEMP_PREFIX) == []
    # a directory whose name starts like a temp name is not itself a temp object
    await s.put_bytes(f"{naming.TEMP_PREFIX}dir/real", b"r")
    assert await names_and_sizes(s, naming.TEMP_PREFIX) == [(f"{naming.TEMP_PREFIX}dir/real", 1)]


# -- fetch_to / missing objects ------------------------------------------------------------


async def test_fetch_to_gives_a_file_with_the_objects_bytes(
    backend: Backend, tmp_path: Path
) -> None:
    s = backend.multipart
    small = rand_bytes(1000, seed=7)
    big = rand_bytes(BIG, seed=8)
    await s.put_bytes("segments/t/000000/small.seg", small)
    await s.put_bytes("segments/t/000000/big.seg", big)
    p = await s.fetch_to("segments/t/000000/small.seg", tmp_path / "fetched" / "small.seg")
    assert p.read_bytes() == small
    q = await s.fetch_to("segments/t/000000/big.seg", tmp_path / "fetched" / "big.seg")
    assert q.stat().st_size == BIG
    assert q.read_bytes() == big
    if backend.kind == "s3":
        assert p == tmp_path / "fetched" / "small.seg"
        assert sorted(os.listdir(tmp_path / "fetched")) == ["big.seg", "small.seg"]
    # fetching leaves the object in place
    assert await names_and_sizes(s) == [("segments/t/000000/big.seg", BIG),
                                        ("segments/t/000000/small.seg", 1000)]


async def test_missing_objects_raise_not_found(backend: Backend, tmp_path: Path) -> None:
    s = backend.store
    await s.put_bytes("segments/t/000000/present", b"here")
    for name in ("missing", "segments/t/000000/absent", "segments/t/000000/present/below"):
        with pytest.raises(ObjectNotFoundError) as e:
            await s.get_bytes(name)
        assert e.value.name == name
        with pytest.raises(ObjectNotFoundError):
            await s.get_bytes(name, 1, 2)
        with pytest.raises(ObjectNotFoundError) as e2:
            await s.fetch_to(name, tmp_path / "out" / "f")
        assert e2.value.name == name
    assert not (tmp_path / "out" / "f").exists()
    if (tmp_path / "out").exists():  # no half-written temp file left beside the target
        assert os.listdir(tmp_path / "out") == []


# -- delete -----------------------------------------------------------------------------------


async def test_delete_is_idempotent(backend: Backend) -> None:
    s = backend.store
    await s.put_bytes("segments/t/000000/a", b"a")
    await s.put_bytes("segments/t/000000/b", b"bb")
    await s.delete("segments/t/000000/a")
    assert await names_and_sizes(s) == [("segments/t/000000/b", 2)]
    with pytest.raises(ObjectNotFoundError):
        await s.get_bytes("segments/t/000000/a")
    await s.delete("segments/t/000000/a")  # again: not an error
    await s.delete("never/existed")
    await s.delete("segments/t/000000")  # a "directory" name is not an object
    assert await names_and_sizes(s) == [("segments/t/000000/b", 2)]
    assert await s.get_bytes("segments/t/000000/b") == b"bb"
    # the name can be created again after a delete
    await s.put_bytes("segments/t/000000/a", b"again")
    assert await s.get_bytes("segments/t/000000/a") == b"again"
    # prune removes an empty local directory, never an object
    await s.prune("segments/t/000000")  # not empty: kept
    assert await names_and_sizes(s) == [("segments/t/000000/a", 5), ("segments/t/000000/b", 2)]
    await s.delete("segments/t/000000/a")
    await s.delete("segments/t/000000/b")
    await s.prune("segments/t/000000")
    await s.prune("segments/t/000000")  # gone already: still fine
    assert await s.list() == []
    if backend.root is not None:
        assert not (backend.root / "segments" / "t" / "000000").exists()
    await s.put_bytes("segments/t/000000/c", b"c")  # the directory comes back on a put
    assert await names_and_sizes(s) == [("segments/t/000000/c", 1)]


# -- names ------------------------------------------------------------------------------------


async def test_invalid_names_are_refused(backend: Backend, tmp_path: Path) -> None:
    s = backend.store
    src = tmp_path / "src.bin"
    src.write_bytes(b"data")
    for bad in BAD_NAMES:
        with pytest.raises(InvalidNameError):
            await s.put_bytes(bad, b"data")
        with pytest.raises(InvalidNameError):
            await s.put_bytes(bad, b"data", create_only=False)
        with pytest.raises(InvalidNameError):
            await s.put_file(bad, src)
        with pytest.raises(InvalidNameError):
            await s.get_bytes(bad)
        with pytest.raises(InvalidNameError):
            await s.get_bytes(bad, 1, 1)
        with pytest.raises(InvalidNameError):
            await s.fetch_to(bad, tmp_path / "out.bin")
        with pytest.raises(InvalidNameError):
            await s.delete(bad)
    assert await s.list() == []
    assert not (tmp_path / "out.bin").exists()
    if backend.root is not None:  # nothing was written outside (or inside) the store
        assert sorted(os.listdir(tmp_path)) == ["src.bin"]


# -- sweep ------------------------------------------------------------------------------------


async def test_sweep_removes_only_leftovers(backend: Backend) -> None:
    s = backend.store
    await s.put_bytes("segments/t/000000/0-10.seg", b"sealed")
    await s.put_bytes("snapshots/full/1.snap", b"snap")
    assert await s.sweep(0) == 0  # nothing to sweep: completed objects are not leftovers
    await backend.make_leftover("segments/t/000000/10-20.seg")
    await backend.make_leftover("snapshots/full/2.snap")
    # the age guard protects a put that may still be running
    assert await s.sweep(3600) == 0
    # scoped to a prefix: only the leftovers below it
    assert await s.sweep(0, "other/") == 0
    assert await s.sweep(0, "segments/") == 1
    assert await s.sweep(0) == 1
    assert await s.sweep(0) == 0
    assert await names_and_sizes(s) == [("segments/t/000000/0-10.seg", 6),
                                        ("snapshots/full/1.snap", 4)]
    assert await s.get_bytes("segments/t/000000/0-10.seg") == b"sealed"
    assert await s.get_bytes("snapshots/full/1.snap") == b"snap"
    # the name of a swept leftover can be put normally
    await s.put_bytes("segments/t/000000/10-20.seg", b"retried")
    assert await s.get_bytes("segments/t/000000/10-20.seg") == b"retried"
    if backend.root is not None:
        leftovers = [p for p in backend.root.rglob("*") if naming.is_temp(p.name)]
        assert leftovers == []


async def test_close_then_reuse(backend: Backend) -> None:
    s = backend.store
    await s.put_bytes("a", b"1")
    await s.close()
    assert await s.get_bytes("a") == b"1"
    await s.put_bytes("b", b"22")
    await s.close()
    await s.close()  # closing twice is fine
    assert await names_and_sizes(s) == [("a", 1), ("b", 2)]
    await s.delete("a")
    await s.close()
    assert await names_and_sizes(s) == [("b", 2)]


# -- S3 only -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "s3://AKIDEXAMPLE:wJalrXUtnFEMI-K7MDENG@bucket?endpoint=http://127.0.0.1:9",
    "s3://AKIDEXAMPLE:wJalrXUtnFEMI-K7MDENG@bucket/prefix",
    "s3://wJalrXUtnFEMI-K7MDENG@bucket",
    "s3://AKIDEXAMPLE:wJalrXUtnFEMI-K7MDENG@",
])
def test_s3_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError) as e:
        open_store(url)
    assert e.value.setting == "store.url"
    assert "wJalrXUtnFEMI-K7MDENG" not in str(e.value)
    assert "AKIDEXAMPLE" not in str(e.value)
    with pytest.raises(ConfigError) as e2:
        S3Location.parse(url)
    assert "wJalrXUtnFEMI-K7MDENG" not in str(e2.value)


def test_s3_url_never_contains_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LOCAL_SECRET)
    s = open_store("s3://bkt/some/prefix?endpoint=http://127.0.0.1:7070&region=eu-west-1")
    assert isinstance(s, S3Store)
    assert s.url == "s3://bkt/some/prefix?endpoint=http://127.0.0.1:7070"
    assert s.location == S3Location(bucket="bkt", prefix="some/prefix/",
                                     endpoint="http://127.0.0.1:7070", region="eu-west-1")
    assert repr(s) == f"S3Store({s.url})"
    for text in (s.url, repr(s), str(s.location)):
        assert LOCAL_SECRET not in text
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    assert S3Location.parse("s3://bkt").url == "s3://bkt"


async def test_s3_url_of_a_live_store_has_no_credentials(s3_bucket: str) -> None:
    s = open_store(s3_bucket)
    assert isinstance(s, S3Store)
    try:
        await s.put_bytes("x", b"1")
        bucket = s3_bucket.removeprefix("s3://").split("?")[0]
        endpoint = s3_bucket.split("endpoint=", 1)[1]
        assert s.url == f"s3://{bucket}?endpoint={endpoint}"
        assert "@" not in s.url
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in s.url
        assert os.environ["AWS_ACCESS_KEY_ID"] not in s.url
    finally:
        await s.close()


@pytest.mark.parametrize("bad", [
    "s3://bucket?endpoint=http://x&colour=blue",  # unknown option
    "s3://?endpoint=http://x",  # no bucket
    "gs://bucket",  # unsupported scheme
])
def test_s3_bad_urls_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        open_store(bad)
    assert e.value.setting == "store.url"


def test_s3_prefix_escaping_the_bucket_is_refused() -> None:
    with pytest.raises(InvalidNameError):
        open_store("s3://bucket/../up?endpoint=http://x")


def test_s3_part_size_below_minimum_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        S3Store(location=S3Location(bucket="b"), part_size=5 * MiB - 1)
    assert e.value.setting == "store.url"


def multipart_etag(data: bytes, part: int) -> str:
    """What S3 reports for a multipart object: MD5 of the parts' MD5s, dash, part count."""
    parts = [data[i:i + part] for i in range(0, len(data), part)]
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f"{hashlib.md5(joined).hexdigest()}-{len(parts)}"


async def test_s3_head_records_sha256(s3_bucket: str, tmp_path: Path) -> None:
    s = S3Store(location=S3Location.parse(s3_bucket), part_size=5 * MiB,
                multipart_threshold=5 * MiB)
    try:
        small = rand_bytes(777, seed=20)
        await s.put_bytes("h/small", small)
        head = await s.head("h/small")
        assert head == {"size": 777, "etag": hashlib.md5(small).hexdigest(),
                        "sha256": hashlib.sha256(small).hexdigest()}
        src = tmp_path / "big"
        big = rand_bytes(11 * MiB, seed=21)
        src.write_bytes(big)
        await s.put_file("h/big", src)
        head = await s.head("h/big")
        assert head["size"] == 11 * MiB
        assert head["sha256"] is None  # multipart: verified by the composite checksum instead
        assert head["etag"] == multipart_etag(big, 5 * MiB)
        await s.put_bytes("h/small", b"other", create_only=False)  # overwrite: new digest
        assert (await s.head("h/small"))["sha256"] == hashlib.sha256(b"other").hexdigest()
        await s.put_bytes("h/empty", b"")
        assert (await s.head("h/empty"))["sha256"] == hashlib.sha256(b"").hexdigest()
        with pytest.raises(ObjectNotFoundError):
            await s.head("h/missing")
    finally:
        await s.close()


async def test_s3_prefix_isolates_stores_in_one_bucket(s3_bucket: str) -> None:
    base, _, query = s3_bucket.partition("?")
    a = open_store(f"{base}/tenant-a?{query}")
    b = open_store(f"{base}/tenant-b?{query}")
    whole = open_store(s3_bucket)
    try:
        await a.put_bytes("segments/x", b"from a")
        await b.put_bytes("segments/x", b"from b!")
        assert await names_and_sizes(a) == [("segments/x", 6)]
        assert await names_and_sizes(b) == [("segments/x", 7)]
        assert await a.get_bytes("segments/x") == b"from a"
        assert await names_and_sizes(whole) == [("tenant-a/segments/x", 6),
                                                ("tenant-b/segments/x", 7)]
        await a.delete("segments/x")
        assert await names_and_sizes(whole) == [("tenant-b/segments/x", 7)]
    finally:
        for s in (a, b, whole):
            await s.close()
