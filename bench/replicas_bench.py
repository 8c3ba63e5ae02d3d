"""Section ``replicas``: S3 upload throughput vs a bare upload, and follow-mode lag.

Two measurements, each in fresh processes:

* **S3 upload** (``python -m bench.replicas_bench s3``): a real S3-compatible server on
  loopback (versitygw via ``tests/s3_service.py``), ``--files`` files of ``--file-mib`` MiB of
  random bytes (incompressible, like lz4-compressed segments). The replicator path is
  ``replicator.storage.s3.S3Store.put_file`` (create-only: HEAD + ``If-None-Match: *`` on the
  completion; a SHA-256 pass over the file for the ``x-amz-meta-sha256`` metadata;
  ``Content-MD5`` on every part; 8 MiB parts, 4 in flight). The bare path uses **the same
  aiobotocore client** (``await store._c()``) for create_multipart_upload / upload_part (same
  part size, same file reads in a worker thread, 4 in flight, no MD5, no checksum, no
  metadata, no HEAD) / complete_multipart_upload. Files go up one after the other; rounds
  alternate bare / replicator (``--rounds`` each, ``os.sync()`` before every round, the
  objects deleted after it). ``s3_upload_mb_per_s`` / ``bare_upload_mb_per_s`` are the best
  round of each (MiB/s, 2**20 bytes), medians alongside; ``s3_upload_ratio`` = best
  replicator / best bare (goal >= 0.8). The checksum headers each path actually sent on
  UploadPart are recorded (a botocore ``before-send`` hook) as a check of the method.

* **Follow lag** (driven by ``section``): a real broker, topics ``attendance``,
  ``participant``, ``config`` (follow maps topics to entities by name; created with 3
  partitions when missing), ``python -m replicator run`` as a child process (``seal_age_s =
  5``, compaction and retention off, its HTTP port serving the live tail). A warm-up of
  ``--warmup`` demo events (the *end* of the event pool, so the steady phase repeats none of
  them) is published first, and the follower starts once the store holds a sealed segment
  for every partition (it bootstraps from sealed segments). The follower
  (``python -m bench.replicas_bench follower``) is ``replicator.follow.Follower`` with a
  SQLite replica, ``live=[service]``, ``poll_s=0.2``; it records every lag sample of
  ``FollowStats.note_lag`` with the moment it was taken: wall-clock ms from a block
  becoming durable in the service (its fsync returned) to the follower's commit of the
  batch holding it, both clocks on this host. Then ``bench.rpo``'s publisher process
  (acks=all, a batch per partition every 5 ms) sends ``--rate`` events/s for ``--seconds``.
  Reported over the samples whose block became durable at least 3 s after the steady phase
  began (first ack): ``follow_lag_p50_ms`` / ``p99`` / ``max`` (goal p99 <= 1000 ms);
  ``follow_applied_eps``: events the follower applied over the same window (up to the last
  ack) / its length; ``catch_up_s``: last ack -> follower positions at the topics' end
  offsets. CPU seconds of the service and the follower and the machine's busy fraction
  (``/proc/stat``) over the steady phase show whether the 2 cores were saturated.

Run alone: ``python -m bench.replicas_bench section --workdir DIR --bootstrap HOST:PORT``
(or ``python -m bench.run --sections replicas``, which starts a broker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTITIES = ("attendance", "participant", "config")
PARTITIONS = 3
MiB = 1024 * 1024
#: lag samples of blocks that became durable in the first seconds of the steady phase are
#: left out (the publisher and the follower settle)
SKIP_S = 3.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return round(sorted_vals[k], 1)


def _proc_cpu_s(pid: int) -> float | None:
    """user + sys CPU seconds of a (child) process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


def _all_proc_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + sys) of every process on the machine, with a short name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            head, rest = (d / "stat").read_text().rsplit(")", 1)
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        f = rest.split()
        out[int(d.name)] = (cmd.strip()[:120] or head.split("(", 1)[1],
                            (int(f[11]) + int(f[12])) / tick)
    return out


def _top_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
             n: int = 8) -> list[dict[str, Any]]:
    """The processes that used the most CPU between two ``_all_proc_cpu`` samples (processes
    that started in between count from 0; those that ended are missing)."""
    rows: list[dict[str, Any]] = []
    for pid, (cmd, cpu) in after.items():
        d = cpu - before.get(pid, (cmd, 0.0))[1]
        if d > 0.05:
            rows.append({"pid": pid, "cpu_s": round(d, 2), "cmd": cmd})
    rows.sort(key=lambda r: -r["cpu_s"])
    return rows[:n]


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ============================================================================ S3 upload


def _write_files(d: Path, files: int, mib: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        p = d / f"segment-{i}.seg"
        with p.open("wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
        paths.append(p)
    return paths


async def _bare_put(c: Any, bucket: str, key: str, path: Path, part_size: int,
                    concurrency: int) -> None:
    """A plain multipart upload with the same client, part size, reads and concurrency."""
    size = path.stat().st_size
    up = await c.create_multipart_upload(Bucket=bucket, Key=key)
    upload_id = up["UploadId"]
    n_parts = (size + part_size - 1) // part_size
    sem = asyncio.Semaphore(concurrency)
    etags: dict[int, str] = {}

    def read(off: int, n: int) -> bytes:
        with path.open("rb") as f:
            f.seek(off)
            return f.read(n)

    async def one(i: int) -> None:
        async with sem:
            off = (i - 1) * part_size
            body = await asyncio.to_thread(read, off, min(part_size, size - off))
            r = await c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                    PartNumber=i, Body=body)
            etags[i] = r["ETag"]

    try:
        await asyncio.gather(*(one(i) for i in range(1, n_parts + 1)))
        await c.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"ETag": etags[i], "PartNumber": i}
                                       for i in range(1, n_parts + 1)]})
    except BaseException:
        with contextlib.suppress(Exception):
            await c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


async def _s3_rounds(endpoint: str, paths: list[Path], rounds: int, server_pid: int | None,
                     log: Callable[[str], None]) -> dict[str, Any]:
    from bench.common import unique
    from replicator.storage.s3 import S3Location, S3Store

    bucket = unique("bench-replicas")
    store = S3Store(location=S3Location(bucket=bucket, endpoint=endpoint))
    await store.ensure_bucket()
    c = await store._c()
    total = sum(p.stat().st_size for p in paths)
    # which checksum headers each path's UploadPart requests carry (a check of the method)
    seen: dict[str, set[str]] = {"bare": set(), "replicator": set()}
    current = ["bare"]

    def on_send(request: Any, **_: Any) -> None:
        for h in request.headers:
            name = h.decode() if isinstance(h, bytes) else str(h)
            low = name.lower()
            if low == "content-md5" or "checksum" in low:
                seen[current[0]].add(low)

    c.meta.events.register("before-send.s3.UploadPart", on_send)
    results: dict[str, list[dict[str, Any]]] = {"bare": [], "replicator": []}
    try:
        for r in range(rounds):
            for kind in ("bare", "replicator"):
                current[0] = kind
                names = [f"bench/{kind}/r{r}/{p.name}" for p in paths]
                await asyncio.to_thread(os.sync)
                srv0 = _proc_cpu_s(server_pid) if server_pid else None
                cpu0 = _self_cpu_s()
                t0 = time.perf_counter()
                for name, p in zip(names, paths, strict=True):
                    if kind == "bare":
                        await _bare_put(c, bucket, name, p, store.part_size,
                                        store.max_concurrency)
                    else:
                        await store.put_file(name, p)
                dt = time.perf_counter() - t0
                cpu = _self_cpu_s() - cpu0
                srv1 = _proc_cpu_s(server_pid) if server_pid else None
                for name in names:  # the objects must be complete: size check, then delete
                    info = await c.head_object(Bucket=bucket, Key=name)
                    if int(info["ContentLength"]) != total // len(paths):
                        raise RuntimeError(f"{name}: {info['ContentLength']} bytes stored")
                    await store.delete(name)
                row = {"seconds": round(dt, 3), "mb_per_s": round(total / MiB / dt, 1),
                       "client_cpu_s": round(cpu, 2),
                       "server_cpu_s": (round(srv1 - srv0, 2)
                                        if srv0 is not None and srv1 is not None else None)}
                results[kind].append(row)
                log(f"replicas: s3 round {r + 1} {kind:<10} {row['mb_per_s']:>7} MiB/s "
                    f"({dt:.2f}s; client CPU {row['client_cpu_s']}s, server CPU "
                    f"{row['server_cpu_s']}s)")
    finally:
        c.meta.events.unregister("before-send.s3.UploadPart", on_send)
        await store.close()
    bare_best = max(x["mb_per_s"] for x in results["bare"])
    repl_best = max(x["mb_per_s"] for x in results["replicator"])
    bare_med = statistics.median(x["mb_per_s"] for x in results["bare"])
    repl_med = statistics.median(x["mb_per_s"] for x in results["replicator"])
    return {
        "s3_upload_mb_per_s": repl_best,
        "bare_upload_mb_per_s": bare_best,
        "s3_upload_ratio": round(repl_best / bare_best, 3),
        "s3_upload_mb_per_s_median": round(repl_med, 1),
        "bare_upload_mb_per_s_median": round(bare_med, 1),
        "s3_upload_ratio_median": round(repl_med / bare_med, 3),
        "s3_files": len(paths),
        "s3_file_mib": total // len(paths) // MiB,
        "s3_part_mib": store.part_size // MiB,
        "s3_concurrency": store.max_concurrency,
        "s3_rounds": rounds,
        "s3_upload_part_headers": {k: sorted(v) for k, v in seen.items()},
        "s3_bare_rounds": results["bare"],
        "s3_replicator_rounds": results["replicator"],
    }


def s3_step(workdir: Path, *, files: int, mib: int, rounds: int) -> dict[str, Any]:
    """Start versitygw, write the files, alternate the rounds, stop the server."""
    from tests.s3_service import start_local_s3

    server_dir = workdir / "replicas-s3"
    data = workdir / "replicas-s3-files"
    log(f"replicas: writing {files} x {mib} MiB of random bytes; starting versitygw")
    paths = _write_files(data, files, mib)
    server = start_local_s3(server_dir)
    try:
        pid_file = server_dir / "versitygw.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
        out = asyncio.run(_s3_rounds(server.endpoint, paths, rounds, pid, log))
        out["s3_server"] = "versitygw (posix backend) on loopback, same disk"
        return out
    finally:
        server.stop()
        for p in paths:
            p.unlink(missing_ok=True)


# ============================================================================ follower process


async def _follower_main(args: argparse.Namespace) -> dict[str, Any]:
    from replicator.follow import Follower, open_replica
    from replicator.follow.runner import FollowStats
    from replicator.schemas import SchemaRegistry
    from replicator.storage.local import LocalStore

    class TimedStats(FollowStats):
        """``FollowStats`` that also keeps (wall ms when taken, lag ms) of every sample."""

        def __init__(self) -> None:
            super().__init__()
            self.timed: list[tuple[float, float]] = []

        def note_lag(self, ms: float) -> None:
            super().note_lag(ms)
            self.timed.append((time.time() * 1000, ms))

    stats = TimedStats()
    # per batch: (wall s, applied events so far, process CPU s)
    timeline: list[tuple[float, int, float]] = []

    def on_batch(f: Follower) -> None:
        timeline.append((time.time(), f.stats.applied_events, time.process_time()))

    f = Follower(store=LocalStore(root=Path(args.store)),
                 replica=open_replica(f"sqlite://{Path(args.db).resolve()}"),
                 registry=SchemaRegistry.load(), topics=list(ENTITIES), live=[args.live],
                 poll_s=args.poll_s, on_batch=on_batch)
    f.stats = stats
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, f.request_stop)
    status = Path(args.status)

    async def write_status() -> None:
        while True:
            doc = {"t": time.time(), "applied_events": stats.applied_events,
                   "batches": stats.batches, "bootstraps": stats.bootstraps,
                   "positions": {f"{t}/{p}": pos.next_offset
                                 for (t, p), pos in f.positions.items()}}
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, status)
            await asyncio.sleep(0.2)

    started = time.time()
    async with f:
        writer = asyncio.create_task(write_status())
        try:
            await f.run()
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
    return {"started": started, "ended": time.time(), "applied_events": stats.applied_events,
            "batches": stats.batches, "bootstraps": stats.bootstraps, "samples": stats.timed,
            "timeline": timeline, "cpu_s": round(time.process_time(), 3)}


def follower_cmd(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s follower %(levelname)s %(name)s: %(message)s")
    out = asyncio.run(_follower_main(args))
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, args.out)
    return 0


# ============================================================================ follow lag


def _service_config(path: Path, bootstrap: str, data_dir: Path, port: int, group: str) -> None:
    path.write_text(f"""[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
topics = {json.dumps(list(ENTITIES))}

[ingest]
data_dir = "{data_dir}"
seal_age_s = 5

[server]
port = {port}

[compaction]
enabled = false

[retention]
enabled = false
""")


def _clean_env() -> dict[str, str]:
    """This environment without REPLICATOR_CONFIG / REPLICATOR_<SECTION>_* overrides."""
    sections = ("KAFKA_", "STORE_", "INGEST_", "OBJECTIVES_", "SERVER_", "COMPACTION_",
                "RETENTION_")
    return {k: v for k, v in os.environ.items()
            if k != "REPLICATOR_CONFIG"
            and not (k.startswith("REPLICATOR_") and k[len("REPLICATOR_"):].startswith(sections))}


async def _ensure_topics(bootstrap: str) -> list[str]:
    """Create the entity-named topics that are missing; returns those that already existed."""
    from aiokafka.admin import AIOKafkaAdminClient

    from bench.common import create_topics

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    missing = [t for t in ENTITIES if t not in existing]
    if missing:
        await create_topics(bootstrap, missing, partitions=PARTITIONS)
    return [t for t in ENTITIES if t in existing]


def _warmup_events(n: int, pool: int, seed: int) -> Any:
    """The last ``n`` events of the pool (more if needed for every partition to get some)."""
    from bench.common import Partitioner
    from bench.events import EventSet, load_events

    ev = load_events(pool, seed=seed, log=lambda *_: None)
    part = Partitioner(PARTITIONS)
    need = {(e, p) for e in range(len(ev.entities)) for p in range(PARTITIONS)}
    start = len(ev) - n
    while True:
        have = {(ev.entity_idx[i], part(ev.keys[i])) for i in range(start, len(ev))}
        if need <= have or start == 0:
            break
        start = max(0, start - n)
    return EventSet(ev.entities, ev.schema_versions, ev.entity_idx[start:], ev.keys[start:],
                    ev.values[start:])


def _sealed_partitions(store_root: Path) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for t in ENTITIES:
        for p in range(PARTITIONS):
            d = store_root / "segments" / t / f"{p:06d}"
            if d.is_dir() and any(x.suffix == ".seg" for x in d.iterdir()):
                out.add((t, p))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    except (OSError, ValueError):
        return None


async def _wait(pred: Callable[[], bool], timeout: float, what: str,
                alive: Callable[[], str | None], interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        dead = alive()
        if dead:
            raise RuntimeError(f"{dead} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def follow_step(bootstrap: str, workdir: Path, *, rate: float, seconds: float,
                      events_n: int, seed: int, warmup: int, log: Callable[[str], None]
                      ) -> dict[str, Any]:
    import aiohttp

    from bench.common import end_offsets, prefill, unique
    from bench.rpo import _publish_process

    d = workdir / "replicas-follow"
    d.mkdir(parents=True, exist_ok=True)
    pre_existing = await _ensure_topics(bootstrap)
    if pre_existing:
        log(f"replicas: topics {pre_existing} already existed: their contents are consumed too")
    data_dir = d / "data"
    store_root = data_dir / "store"
    port = free_port()
    cfg = d / "replicator.toml"
    _service_config(cfg, bootstrap, data_dir, port, unique("bench-replicas"))
    warm = _warmup_events(warmup, events_n, seed)
    log(f"replicas: warm-up: publishing {len(warm):,} events (end of the pool)")
    await prefill(bootstrap, {e: e for e in ENTITIES}, warm, partitions=PARTITIONS)
    del warm

    env = _clean_env()
    svc_log = (d / "service.log").open("ab")
    fol_log = (d / "follower.log").open("ab")
    service = subprocess.Popen(
        [sys.executable, "-m", "replicator", "--config", str(cfg), "--log-level", "WARNING",
         "run", "--no-progress"],
        stdout=svc_log, stderr=svc_log, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT)
    follower: subprocess.Popen[bytes] | None = None
    status, out_path = d / "follower-status.json", d / "follower-out.json"

    def dead() -> str | None:
        if service.poll() is not None:
            return f"the replicator service exited {service.returncode} (see {d}/service.log)"
        if follower is not None and follower.poll() is not None:
            return f"the follower exited {follower.returncode} (see {d}/follower.log)"
        return None

    try:
        live = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{live}/readyz") as r:
                        return r.status == 200
                return False

            deadline = time.monotonic() + 60
            while not await ready():
                if (msg := dead()) or time.monotonic() > deadline:
                    raise RuntimeError(msg or "the service did not become ready in 60 s")
                await asyncio.sleep(0.2)
        t_seal = time.monotonic()
        await _wait(lambda: len(_sealed_partitions(store_root)) == len(ENTITIES) * PARTITIONS,
                    60, "a sealed segment of every partition in the store", dead)
        log(f"replicas: service ready, every partition sealed "
            f"({time.monotonic() - t_seal:.1f}s after ready); starting the follower")
        follower = subprocess.Popen(
            [sys.executable, "-m", "bench.replicas_bench", "follower", "--store",
             str(store_root), "--db", str(d / "standby.db"), "--live", live,
             "--status", str(status), "--out", str(out_path)],
            stdout=fol_log, stderr=fol_log, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT)
        follower_pid = follower.pid

        def bootstrapped() -> bool:
            s = _read_json(status)
            return bool(s and len(s["positions"]) == len(ENTITIES) * PARTITIONS)

        await _wait(bootstrapped, 60, "the follower's bootstrap", dead)
        await asyncio.sleep(1.0)  # settle: live tail polls running
        log(f"replicas: follower bootstrapped; publishing {rate:,.0f} events/s for "
            f"{seconds:.0f}s (bench.rpo publisher)")
        wall_minus_mono = time.time() - time.monotonic()
        # CPU of every process, every 0.5 s: the steady phase's window is known afterwards
        cpu_samples: list[tuple[float, tuple[int, int], dict[int, tuple[str, float]]]] = []

        async def sample_cpu() -> None:
            while True:
                cpu_samples.append((time.time(), _machine_ticks(), _all_proc_cpu()))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_cpu())
        try:
            pub, _topic_of, acks = await _publish_process(
                bootstrap, d, {e: e for e in ENTITIES}, rate=rate, seconds=seconds,
                events_n=events_n, seed=seed, tag="replicas")
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if not acks:
            raise RuntimeError("the publisher got no acks")
        steady_start = min(a[4] for a in acks) + wall_minus_mono
        last_ack = max(a[4] for a in acks) + wall_minus_mono
        ends = {f"{tp.topic}/{tp.partition}": e for tp, e in
                (await end_offsets(bootstrap, list(ENTITIES), PARTITIONS)).items()}

        def caught_up() -> bool:
            s = _read_json(status)
            return s is not None and all(s["positions"].get(k, -1) >= e
                                         for k, e in ends.items())

        await _wait(caught_up, 120, "the follower to reach the topics' end offsets", dead,
                    interval=0.05)
        t_caught = time.time()
        log(f"replicas: follower caught up {t_caught - last_ack:.2f}s after the last ack")
        follower.send_signal(signal.SIGTERM)
        await asyncio.to_thread(follower.wait, 60)
        if follower.returncode != 0:
            raise RuntimeError(f"the follower exited {follower.returncode} "
                               f"(see {d}/follower.log)")
        fo: dict[str, Any] = json.loads(out_path.read_text())
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait(30)
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(service.wait, 60)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait(30)
        svc_log.close()
        fol_log.close()

    from_ms = (steady_start + SKIP_S) * 1000
    until_ms = t_caught * 1000
    lag = sorted(ms for done, ms in fo["samples"] if from_ms <= done - ms <= until_ms)
    all_lag = sorted(ms for _, ms in fo["samples"])
    # p50 lag per 5 s of the steady phase (by durable time): growing = falling behind
    buckets: dict[int, list[float]] = {}
    for done, ms in fo["samples"]:
        k = int(((done - ms) / 1000 - steady_start) // 5)
        if k >= 0:
            buckets.setdefault(k, []).append(ms)
    by_5s = {f"{k * 5}-{k * 5 + 5}s": _percentile(sorted(v), 50)
             for k, v in sorted(buckets.items())}
    # per follower batch: (wall s, applied events so far, follower process CPU s)
    tl = [(float(t), int(n), float(c)) for t, n, c in fo["timeline"]]
    before = [x for x in tl if x[0] <= steady_start]
    steady = [x for x in tl if steady_start < x[0] <= t_caught]
    if not before and steady:  # no batch before the steady phase: count from its first one
        before, steady = steady[:1], steady[1:]
    applied0, cpu0 = (before[-1][1], before[-1][2]) if before else (0, 0.0)
    applied = (steady[-1][1] - applied0) if steady else 0
    applied_eps = round(applied / (t_caught - steady_start)) if applied else None
    fol_cpu = (steady[-1][2] - cpu0) if steady else None
    cpu_us = round(fol_cpu / applied * 1e6, 1) if applied and fol_cpu is not None else None
    sizes = sorted(b[1] - a[1] for a, b in itertools.pairwise([(0.0, applied0, 0.0), *steady]))
    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(steady))
    c0 = next((x for x in reversed(cpu_samples) if x[0] <= steady_start), cpu_samples[0])
    c1 = next((x for x in cpu_samples if x[0] >= last_ack), cpu_samples[-1])
    (busy0, total0), (busy1, total1) = c0[1], c1[1]

    def cpu_of(pid: int) -> float | None:
        if pid not in c0[2] or pid not in c1[2]:
            return None
        return round(c1[2][pid][1] - c0[2][pid][1], 2)

    return {
        "follow_lag_p50_ms": _percentile(lag, 50),
        "follow_lag_p90_ms": _percentile(lag, 90),
        "follow_lag_p99_ms": _percentile(lag, 99),
        "follow_lag_max_ms": round(lag[-1], 1) if lag else None,
        "follow_lag_mean_ms": round(sum(lag) / len(lag), 1) if lag else None,
        "follow_lag_p50_ms_by_5s": by_5s,
        "samples": len(lag),
        "samples_total": len(all_lag),
        "samples_skip_s": SKIP_S,
        "applied_events": fo["applied_events"],
        "follow_applied_eps": applied_eps,
        "follower_cpu_us_per_event": cpu_us,
        "follower_batches": fo["batches"],
        "follower_batches_steady": len(steady),
        "follower_batch_events_p50": int(statistics.median(sizes)) if sizes else None,
        "follower_batch_events_max": sizes[-1] if sizes else None,
        "follower_batch_interval_p50_s": round(statistics.median(gaps), 3) if gaps else None,
        "follower_batch_interval_max_s": round(gaps[-1], 3) if gaps else None,
        "follower_bootstraps": fo["bootstraps"],
        "catch_up_s": round(t_caught - last_ack, 2),
        "rate_target": rate,
        "rate_achieved": pub["achieved_rate"],
        "publish_seconds": pub["publish_seconds"],
        "events": pub["sent"],
        "acked": pub["acked"],
        "publish_errors": pub["errors"],
        "max_send_backlog": pub["max_send_backlog"],
        "warmup_events": warmup,
        "topics_preexisting": pre_existing,
        "cpu_steady": {
            "window": "first ack -> last ack, to the nearest 0.5 s sample",
            "seconds": round(c1[0] - c0[0], 2),
            "service_cpu_s": cpu_of(service.pid),
            "follower_cpu_s": cpu_of(follower_pid),
            "machine_busy_fraction": round((busy1 - busy0) / max(1, total1 - total0), 3),
            "cpus": os.cpu_count(),
            "top_processes": _top_cpu(c0[2], c1[2]),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "method": "lag = follower commit (wall ms) - block durable in the service (wall ms, "
                  "after its fsync), per live-tail block; samples of blocks durable >= "
                  f"{SKIP_S:g}s after the first ack of the steady phase",
    }


# ============================================================================ section


def run_child(*argv: str) -> dict[str, Any]:
    """``python -m bench.replicas_bench <argv>`` in a fresh process; its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", "bench.replicas_bench", *argv], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.replicas_bench {argv[0]} exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def replicas_section(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    if not args.no_s3:
        out.update(run_child("s3", "--workdir", str(workdir), "--files", str(args.files),
                             "--file-mib", str(args.file_mib), "--rounds", str(args.rounds)))
        log(f"replicas: s3 upload {out['s3_upload_mb_per_s']} MiB/s vs bare "
            f"{out['bare_upload_mb_per_s']} MiB/s -> ratio {out['s3_upload_ratio']}")
    if not args.no_follow:
        if not args.bootstrap:
            raise SystemExit("--bootstrap is needed for the follow measurement")
        fol = asyncio.run(follow_step(args.bootstrap, workdir, rate=args.rate,
                                      seconds=args.seconds, events_n=args.events,
                                      seed=args.seed, warmup=args.warmup, log=log))
        log(f"replicas: follow lag p50 {fol['follow_lag_p50_ms']} ms, p99 "
            f"{fol['follow_lag_p99_ms']} ms, max {fol['follow_lag_max_ms']} ms "
            f"({fol['samples']} samples); applied {fol['follow_applied_eps']} events/s")
        out.update(fol)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas_bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("section", help="the whole section; prints its JSON")
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--bootstrap", default=None)
    s.add_argument("--rate", type=float, default=10_000)
    s.add_argument("--seconds", type=float, default=22)
    s.add_argument("--events", type=int, default=1_000_000, help="event pool (bench/.cache)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--warmup", type=int, default=3000)
    s.add_argument("--files", type=int, default=4)
    s.add_argument("--file-mib", type=int, default=64)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--no-s3", action="store_true")
    s.add_argument("--no-follow", action="store_true")
    s3 = sub.add_parser("s3", help="the S3 upload rounds (starts versitygw)")
    s3.add_argument("--workdir", type=Path, required=True)
    s3.add_argument("--files", type=int, default=4)
    s3.add_argument("--file-mib", type=int, default=64)
    s3.add_argument("--rounds", type=int, default=3)
    f = sub.add_parser("follower", help="a Follower into SQLite until SIGTERM")
    f.add_argument("--store", required=True)
    f.add_argument("--db", required=True)
    f.add_argument("--live", required=True)
    f.add_argument("--status", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--poll-s", type=float, default=0.2)
    args = p.parse_args(argv)
    if args.cmd == "follower":
        return follower_cmd(args)
    out: dict[str, Any]
    if args.cmd == "s3":
        out = s3_step(args.workdir, files=args.files, mib=args.file_mib, rounds=args.rounds)
    else:
        out = replicas_section(args)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
