"""Realistic benchmark events, serialised once and cached on disk.

Events come from :func:`replicator.demo.iter_events` and are serialised exactly as
:class:`replicator.publish.ChangePublisher` would send them: value = ``orjson.dumps`` of the
envelope, key = the UTF-8 record key, headers ``entity`` and ``schema_version``. The demo
generator costs ~70 µs of CPU per event, so a million events are generated in parallel
(``workers`` independent streams with seeds ``seed, seed+1, ...``, concatenated) and cached
under ``bench/.cache/`` (lz4-framed pickle) keyed by the schemas' content (delete the
directory to regenerate after generator changes). A second run loads the cache in seconds.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lz4.frame
import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
_FORMAT = 1
#: Events generated (and cached) at least; smaller requests take a prefix of the pool.
POOL = 1_000_000


@dataclass(slots=True)
class EventSet:
    """Serialised events in publish order; ``entity_idx[i]`` indexes ``entities``."""

    entities: tuple[str, ...]
    schema_versions: tuple[int, ...]
    entity_idx: bytes
    keys: list[bytes]
    values: list[bytes]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def value_bytes(self) -> int:
        return sum(map(len, self.values))

    def headers(self, i: int) -> list[tuple[str, bytes]]:
        """Headers ChangePublisher puts on events of entity index ``i``."""
        return [("entity", self.entities[i].encode()), ("schema_version",
                                                       str(self.schema_versions[i]).encode())]

    def slice(self, n: int) -> EventSet:
        return EventSet(self.entities, self.schema_versions, self.entity_idx[:n], self.keys[:n],
                        self.values[:n])


def _cache_key(n: int, seed: int, workers: int) -> str:
    h = hashlib.sha256(f"{_FORMAT}:{n}:{seed}:{workers}".encode())
    # Keyed on the schemas (the events must stay valid), not on the generator's source: the
    # demo generator changes often and regenerating costs minutes on a busy 2-core machine.
    # Delete bench/.cache/ to pick up generator changes.
    files = sorted((REPO_ROOT / "schemas").glob("*.json"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _generate_chunk(args: tuple[int, int]) -> tuple[bytes, list[bytes], list[bytes]]:
    n, seed = args
    from replicator.demo import iter_events
    from replicator.schemas import SchemaRegistry

    registry = SchemaRegistry.load()
    index = {e: i for i, e in enumerate(registry.entities)}
    versions = {e: registry.schema_version(e) for e in registry.entities}
    validate = registry.validate
    idx = bytearray()
    keys: list[bytes] = []
    values: list[bytes] = []
    dumps = orjson.dumps
    for ev in iter_events(n, seed=seed):
        env = ev.envelope(schema_version=versions[ev.entity])
        if validate(env) is not None:  # cheap insurance: the demo promises valid events
            raise RuntimeError(f"demo produced an invalid event: {validate(env)}")
        idx.append(index[ev.entity])
        keys.append(ev.key.encode())
        values.append(dumps(env))
    return bytes(idx), keys, values


def load_events(n: int, *, seed: int = 1, workers: int | None = None,
                log: Callable[[str], object] = print) -> EventSet:
    """The first ``n`` of a pool of ``max(n, POOL)`` serialised demo events (cached)."""
    from replicator.schemas import SchemaRegistry

    want, n = n, max(n, POOL)

    registry = SchemaRegistry.load()
    entities = tuple(registry.entities)
    versions = tuple(registry.schema_version(e) for e in entities)
    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    key = _cache_key(n, seed, workers)
    path = CACHE_DIR / f"events-{n}-{key}.pickle.lz4"
    if path.exists():
        t0 = time.perf_counter()
        with lz4.frame.open(path, "rb") as f:
            idx, keys, values = pickle.load(f)
        log(f"loaded {n:,} cached events from {path.name} in {time.perf_counter() - t0:.1f}s")
        return EventSet(entities, versions, idx, keys, values).slice(want)
    t0 = time.perf_counter()
    sizes = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    jobs = [(sizes[i], seed + i) for i in range(workers)]
    log(f"generating {n:,} demo events in {workers} process(es) (cached afterwards)...")
    if workers == 1:
        parts = [_generate_chunk(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_generate_chunk, jobs)
    idx = b"".join(p[0] for p in parts)
    keys = [k for p in parts for k in p[1]]
    values = [v for p in parts for v in p[2]]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for old in CACHE_DIR.glob(f"events-{n}-*.pickle.lz4"):
        old.unlink()
    tmp = path.with_suffix(".tmp")
    with lz4.frame.open(tmp, "wb") as f:
        pickle.dump((idx, keys, values), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    log(f"generated {n:,} events in {time.perf_counter() - t0:.1f}s")
    return EventSet(entities, versions, idx, keys, values).slice(want)
