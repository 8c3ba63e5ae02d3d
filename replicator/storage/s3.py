"""S3-compatible object storage (AWS S3, versitygw, Ceph RGW, ...) through aiobotocore.

URL: ``s3://bucket[/prefix]?endpoint=http://127.0.0.1:7070&region=us-east-1``. Credentials
come from botocore's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws/credentials``, instance roles); they are never part of the URL,
never logged and never in an error message (a URL with user info is refused).

Invariants (the conformance suite checks them on a real server):
- Create-only puts send ``If-None-Match: *`` (single PUT and multipart completion), so a
  sealed segment is never overwritten; the server's 412 becomes :class:`ObjectExistsError`.
- Every PUT and every part carries a checksum the server verifies before it accepts the
  body: ``x-amz-checksum-crc32`` by default (5x cheaper than MD5 on both sides), or
  ``Content-MD5`` with ``?checksum=md5`` for servers without flexible checksums. A
  multipart object's composite checksum (CRC32 of the parts' CRC32s, or the MD5-of-MD5s
  ETag) is compared with what was sent; a single-put object also records its SHA-256 in
  user metadata (``x-amz-meta-sha256``). ``mirror --verify`` compares SHA-256 of the
  contents on both sides.
- Objects of ``multipart_threshold`` bytes or more go up in parts of ``part_size``, a few in
  flight at once; a failed multipart upload is aborted, and :meth:`S3Store.sweep` aborts
  uploads a crash left behind (older than the age guard).
- 5xx, throttling and timeouts are retried with exponential backoff and jitter by
  botocore's ``standard`` retry mode (``max_attempts``); what still fails raises
  :class:`StoreError` naming the operation and the object.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from replicator import naming
from replicator.errors import ConfigError, ObjectExistsError, ObjectNotFoundError, StoreError
from replicator.storage.base import ObjectInfo

MiB = 1024 * 1024
_SESSION: Any = None


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where an S3 store points: parsed from its URL, safe to print."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str = "us-east-1"
    #: path-style addressing (``endpoint/bucket/key``): what local servers need
    path_style: bool = True
    #: per-request checksum: "crc32" (x-amz-checksum-crc32) or "md5" (Content-MD5)
    checksum: str = "crc32"

    @classmethod
    def parse(cls, url: str) -> S3Location:
        p = urlparse(url)
        if p.scheme != "s3":
            raise ConfigError("store.url", f"not an s3:// URL: {url!r}")
        if p.username or p.password or "@" in p.netloc:
            raise ConfigError(
                "store.url",
                "credentials do not belong in the store URL; use AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
            )
        if not p.netloc:
            raise ConfigError("store.url", f"no bucket in {url!r} (s3://bucket/prefix)")
        q = {k: v[-1] for k, v in parse_qs(p.query).items()}
        unknown = set(q) - {"endpoint", "region", "addressing", "checksum"}
        if unknown:
            raise ConfigError("store.url", f"unknown s3 URL option(s) {sorted(unknown)}")
        endpoint = (q.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint and "@" in (urlparse(endpoint).netloc or ""):
            raise ConfigError("store.url", "credentials do not belong in the endpoint; use "
                                           "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        checksum = q.get("checksum", "crc32")
        if checksum not in ("crc32", "md5"):
            raise ConfigError("store.url", f"checksum={checksum!r}: use crc32 or md5")
        prefix = p.path.strip("/")
        if prefix:
            naming.check_relative_name(prefix)
        return cls(
            bucket=p.netloc,
            prefix=f"{prefix}/" if prefix else "",
            endpoint=endpoint,
            region=q.get("region") or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            path_style=q.get("addressing", "path") != "virtual",
            checksum=checksum,
        )

    @property
    def url(self) -> str:
        q = {}
        if self.endpoint:
            q["endpoint"] = self.endpoint
        base = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{base}?{urlencode(q, safe=':/')}" if q else base


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def body_checksum(mode: str, body: bytes) -> tuple[dict[str, str], bytes]:
    """The request parameters that make the server verify ``body``, and the raw digest."""
    if mode == "md5":
        raw = hashlib.md5(body).digest()
        return {"ContentMD5": _b64(raw)}, raw
    raw = struct.pack(">I", zlib.crc32(body))
    return {"ChecksumCRC32": _b64(raw), "ChecksumAlgorithm": "CRC32"}, raw


def _code(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return "", 0
    err = resp.get("Error", {}) or {}
    status = int((resp.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    return str(err.get("Code", "")), status


def _is_precondition_failed(exc: BaseException) -> bool:
    code, status = _code(exc)
    return status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _is_not_found(exc: BaseException) -> bool:
    code, status = _code(exc)
    return status == 404 or code in ("NoSuchKey", "NotFound", "404")


class S3Store:
    """An S3 bucket (optionally under a key prefix) used as a store.

    One aiobotocore client per event loop, created on first use and closed by
    :meth:`close` (a client cannot cross event loops: the CLI runs several).
    """

    def __init__(
        self,
        *,
        location: S3Location,
        part_size: int = 8 * MiB,
        multipart_threshold: int = 16 * MiB,
        max_concurrency: int = 4,
        max_attempts: int = 4,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        if part_size < 5 * MiB:
            raise ConfigError("store.url", "S3 multipart parts must be at least 5 MiB")
        self.location = location
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.max_concurrency = max(1, max_concurrency)
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._client: Any = None
        self._client_cm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        return cls(location=S3Location.parse(url))

    @property
    def url(self) -> str:
        return self.location.url

    def __repr__(self) -> str:
        return f"S3Store({self.url})"

    # -- client ---------------------------------------------------------------------------

    async def _c(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return self._client
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        cfg = AioConfig(
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            s3={"addressing_style": "path" if self.location.path_style else "virtual"},
            # we send the checksums ourselves; no streaming checksum trailers (not every
            # S3-compatible server understands aws-chunked uploads)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max(10, self.max_concurrency * 2),
        )
        global _SESSION
        if _SESSION is None:
            _SESSION = get_session()  # loads botocore's S3 model once per process
        cm = _SESSION.create_client(
            "s3", endpoint_url=self.location.endpoint, region_name=self.location.region,
            config=cfg,
        )
        self._client = await cm.__aenter__()
        # botocore asks for "Expect: 100-continue" on PUTs and parts; aiohttp then waits for
        # the interim response with no timeout at all, so a server that accepts the
        # connection but never answers hangs the put forever. Without the header the read
        # timeout (and the bounded retries) apply.
        self._client.meta.events.register("before-send.s3", _drop_expect_header)
        self._client_cm = cm
        self._loop = loop
        return self._client

    async def close(self) -> None:
        cm, self._client, self._client_cm = self._client_cm, None, None
        if cm is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)
        self._loop = None

    def _key(self, name: str) -> str:
        naming.check_relative_name(name)
        return self.location.prefix + name

    def _fail(self, op: str, name: str, exc: BaseException) -> StoreError:
        code, status = _code(exc)
        what = f"{code} (HTTP {status})" if code or status else f"{type(exc).__name__}: {exc}"
        return StoreError(f"s3 {op} {name!r} in {self.url} failed: {what}")

    # -- writes ---------------------------------------------------------------------------

    async def put_bytes(self, name: str, data: bytes, *, create_only: bool = True) -> None:
        key = self._key(name)
        if len(data) >= self.multipart_threshold:
            await self._multipart(name, key, lambda off, n: data[off:off + n], len(data),
                                  create_only)
            return
        await self._put_single(name, key, data, create_only)

    async def put_file(self, name: str, source: Path, *, create_only: bool = True) -> None:
        key = self._key(name)
        size = source.stat().st_size
        if size < self.multipart_threshold:
            data = await asyncio.to_thread(source.read_bytes)
            await self._put_single(name, key, data, create_only)
            return

        def read(off: int, n: int) -> bytes:
            with source.open("rb") as f:
                f.seek(off)
                return f.read(n)

        await self._multipart(name, key, read, size, create_only)

    async def _put_single(self, name: str, key: str, data: bytes, create_only: bool) -> None:
        c = await self._c()
        mode = self.location.checksum
        (check, _raw), sha = await asyncio.to_thread(
            lambda: (body_checksum(mode, data), hashlib.sha256(data).hexdigest()))
        kw: dict[str, Any] = {"Bucket": self.location.bucket, "Key": key, "Body": data,
                              "Metadata": {"sha256": sha}, **check}
        if create_only:
            kw["IfNoneMatch"] = "*"
        try:
            await c.put_object(**kw)
        except Exception as exc:
            if create_only and _is_precondition_failed(exc):
                raise ObjectExistsError(name) from None
            raise self._fail("put", name, exc) from None

    async def _multipart(
        self, name: str, key: str, read: Any, size: int, create_only: bool
    ) -> None:
        """Parts of ``part_size``, ``max_concurrency`` in flight; each part is read and its
        checksum computed in a worker thread (hashing on the event loop halves the
        throughput). The completed object's composite checksum must equal the one derived
        from the parts sent: end to end, without a second pass over the file."""
        c = await self._c()
        bucket = self.location.bucket
        if create_only and await self._exists(key):
            raise ObjectExistsError(name)  # cheap early refusal; the completion re-checks
        try:
            up = await c.create_multipart_upload(
                Bucket=bucket, Key=key,
                **({"ChecksumAlgorithm": "CRC32"} if self.location.checksum == "crc32" else {}))
        except Exception as exc:
            raise self._fail("create multipart upload", name, exc) from None
        upload_id = up["UploadId"]
        n_parts = (size + self.part_size - 1) // self.part_size
        sem = asyncio.Semaphore(self.max_concurrency)
        etags: dict[int, str] = {}
        digests: dict[int, bytes] = {}
        mode = self.location.checksum

        def read_part(off: int, n: int) -> tuple[bytes, dict[str, str], bytes]:
            body = read(off, n)
            return body, *body_checksum(mode, body)

        async def one(i: int) -> None:
            async with sem:
                off = (i - 1) * self.part_size
                body, check, raw = await asyncio.to_thread(read_part, off,
                                                           min(self.part_size, size - off))
                r = await c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=i, Body=body, **check)
                etags[i] = r["ETag"]
                digests[i] = raw

        tasks = [asyncio.ensure_future(one(i)) for i in range(1, n_parts + 1)]
        try:
            try:
                await asyncio.gather(*tasks)
            finally:  # one part failed (or we were cancelled): stop the others first
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            kw: dict[str, Any] = {
                "Bucket": bucket, "Key": key, "UploadId": upload_id,
                "MultipartUpload": {"Parts": [
                    {"ETag": etags[i], "PartNumber": i,
                     **({"ChecksumCRC32": _b64(digests[i])} if mode == "crc32" else {})}
                    for i in range(1, n_parts + 1)]},
            }
            if create_only:
                kw["IfNoneMatch"] = "*"
            done = await c.complete_multipart_upload(**kw)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(c.abort_multipart_upload(Bucket=bucket, Key=key,
                                                              UploadId=upload_id))
            if isinstance(exc, Exception):
                if create_only and _is_precondition_failed(exc):
                    raise ObjectExistsError(name) from None
                raise self._fail("multipart upload", name, exc) from None
            raise
        joined = b"".join(digests[i] for i in range(1, n_parts + 1))
        if mode == "md5":
            got = str(done.get("ETag", "")).strip('"')
            want = f"{hashlib.md5(joined).hexdigest()}-{n_parts}"
        else:
            got = str(done.get("ChecksumCRC32") or "")
            want = f"{_b64(struct.pack('>I', zlib.crc32(joined)))}-{n_parts}"
        if "-" in got and got != want:
            raise StoreError(f"s3 multipart upload {name!r} in {self.url}: the server's "
                             f"composite checksum {got} is not the one of the parts sent "
                             f"({want})")

    async def _exists(self, key: str) -> bool:
        c = await self._c()
        try:
            await c.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise self._fail("head", key, exc) from None
        return True

    # -- reads ----------------------------------------------------------------------------

    async def get_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        c = await self._c()
        kw: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self._key(name)}
        if length is not None:
            if length <= 0:
                return b""
            kw["Range"] = f"bytes={start}-{start + length - 1}"
        elif start:
            kw["Range"] = f"bytes={start}-"
        try:
            r = await c.get_object(**kw)
            async with r["Body"] as body:
                return bytes(await body.read())
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFoundError(name) from None
            code, status = _code(exc)
            if status == 416 or code == "InvalidRange":
                return b""  # reading past the end, as a local file read would
            raise self._fail("get", name, exc) from None

    async def fetch_to(self, name: str, dest: Path) -> Path:
        key = self._key(name)  # outside the try: a bad name is InvalidNameError, not StoreError
        c = await self._c()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = naming.temp_sibling(dest, os.urandom(4).hex())
        try:
            r = await c.get_object(Bucket=self.location.bucket, Key=key)
            expected = int(r.get("ContentLength", -1))
            n = 0
            with tmp.open("wb") as f:
                async with r["Body"] as body:
                    while chunk := await body.read(MiB):
                        f.write(chunk)
                        n += len(chunk)
            if expected >= 0 and n != expected:
                raise StoreError(f"s3 get {name!r}: got {n} of {expected} bytes")
            tmp.replace(dest)
        except StoreError:
            raise
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFoundError(name) from None
            raise self._fail("get", name, exc) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        c = await self._c()
        full = self.location.prefix + prefix
        cut = len(self.location.prefix)
        out: list[ObjectInfo] = []
        try:
            pages = c.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=full)
            async for page in pages:
                for o in page.get("Contents", []) or []:
                    rel = o["Key"][cut:]
                    if rel and not naming.is_temp(rel):
                        out.append(ObjectInfo(rel, int(o["Size"])))
        except Exception as exc:
            if _code(exc)[0] == "NoSuchBucket":
                raise StoreError(f"s3 bucket {self.location.bucket!r} does not exist "
                                 f"({self.url})") from None
            raise self._fail("list", prefix or "/", exc) from None
        out.sort(key=lambda o: o.name)
        return out

    async def head(self, name: str) -> dict[str, Any]:
        """Size, ETag and recorded SHA-256 of ``name`` (``ObjectNotFoundError`` if absent)."""
        c = await self._c()
        try:
            r = await c.head_object(Bucket=self.location.bucket, Key=self._key(name))
        except Exception as exc:
            if _is_not_found(exc):
                raise ObjectNotFoundError(name) from None
            raise self._fail("head", name, exc) from None
        return {"size": int(r["ContentLength"]), "etag": str(r.get("ETag", "")).strip('"'),
                "sha256": (r.get("Metadata") or {}).get("sha256")}

    # -- removal --------------------------------------------------------------------------

    async def delete(self, name: str) -> None:
        key = self._key(name)  # outside the try: a bad name is InvalidNameError, not StoreError
        c = await self._c()
        try:
            await c.delete_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:
            if _is_not_found(exc):
                return
            raise self._fail("delete", name, exc) from None

    async def sweep(self, older_than_s: float, prefix: str = "") -> int:
        """Abort multipart uploads under ``prefix`` started more than ``older_than_s`` ago
        (a crash mid-upload leaves them; they are invisible but cost storage)."""
        c = await self._c()
        cutoff = time.time() - older_than_s
        n = 0
        try:
            pages = c.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.location.bucket, Prefix=self.location.prefix + prefix)
            async for page in pages:
                for u in page.get("Uploads", []) or []:
                    started = u.get("Initiated")
                    if started is not None and started.timestamp() > cutoff:
                        continue
                    with contextlib.suppress(Exception):
                        await c.abort_multipart_upload(Bucket=self.location.bucket,
                                                       Key=u["Key"], UploadId=u["UploadId"])
                        n += 1
        except Exception as exc:
            raise self._fail("list multipart uploads", prefix or "/", exc) from None
        return n

    async def prune(self, prefix: str) -> None:
        return None  # no directories in an object store

    async def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (``mirror``/tests; the service does
        not create buckets on its own)."""
        c = await self._c()
        try:
            await c.head_bucket(Bucket=self.location.bucket)
            return
        except Exception as exc:
            if not _is_not_found(exc):
                raise self._fail("head bucket", self.location.bucket, exc) from None
        try:
            await c.create_bucket(Bucket=self.location.bucket)
        except Exception as exc:
            if _code(exc)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._fail("create bucket", self.location.bucket, exc) from None


def _drop_expect_header(request: Any, **_: Any) -> None:
    """``before-send`` hook: remove ``Expect: 100-continue`` (see :meth:`S3Store._c`)."""
    request.headers.pop("Expect", None)
