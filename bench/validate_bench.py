"""Benchmark of the ingest validation hot path: ``orjson.loads`` + ``SchemaRegistry.validate``.

Usage::

    .venv/bin/python bench/validate_bench.py [--events 100000] [--seed 1] [--rounds 5] [--json]

Events come from :func:`replicator.demo.iter_events` (the realistic demo mix: ~81 %
attendance upserts of ~570 bytes, participants, config, ~3 % deletes) and are serialised
before timing starts, so only decoding and validation are measured. Each phase runs
``--rounds`` times and the best round is reported in µs per event, using process CPU time
(robust against other processes on a shared machine). The cyclic garbage collector is frozen
over the prepared input, as it would be for a long-running ingest process whose large state is
old. ``loads only`` is the floor any validation adds to; ``full envelope.json`` is the
pure-fastjsonschema reference path, for comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

import orjson

from replicator.demo import iter_events
from replicator.schemas import SchemaRegistry


def _best_us_per_event(
    fn: Callable[[Sequence[bytes]], int], raws: Sequence[bytes], rounds: int
) -> tuple[float, int]:
    best = float("inf")
    result = 0
    for _ in range(rounds):
        start = time.process_time()
        result = fn(raws)
        best = min(best, time.process_time() - start)
    return best / len(raws) * 1e6, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    registry = SchemaRegistry.load()
    raws: list[bytes] = []
    mix: Counter[str] = Counter()
    for event in iter_events(args.events, seed=args.seed):
        raws.append(
            orjson.dumps(event.envelope(schema_version=registry.schema_version(event.entity)))
        )
        mix[f"{event.entity}/{event.op}"] += 1
    mean_bytes = sum(map(len, raws)) / len(raws)

    loads = orjson.loads
    validate = registry.validate
    reference = registry.validate_with_jsonschema

    def loads_only(batch: Sequence[bytes]) -> int:
        n = 0
        for raw in batch:
            loads(raw)
            n += 1
        return n

    def loads_validate(batch: Sequence[bytes]) -> int:
        invalid = 0
        for raw in batch:
            if validate(loads(raw)) is not None:
                invalid += 1
        return invalid

    def loads_reference(batch: Sequence[bytes]) -> int:
        invalid = 0
        for raw in batch:
            if reference(loads(raw)) is not None:
                invalid += 1
        return invalid

    gc.collect()
    gc.freeze()
    floor, _ = _best_us_per_event(loads_only, raws, args.rounds)
    total, invalid = _best_us_per_event(loads_validate, raws, args.rounds)
    full, invalid_ref = _best_us_per_event(loads_reference, raws, args.rounds)

    result = {
        "benchmark": "validate",
        "events": len(raws),
        "mean_event_bytes": round(mean_bytes, 1),
        "mix": dict(sorted(mix.items())),
        "us_per_event": {
            "loads_only": round(floor, 2),
            "loads_validate": round(total, 2),
            "validate_only": round(total - floor, 2),
            "loads_full_envelope_jsonschema": round(full, 2),
        },
        "invalid": invalid,
        "invalid_reference": invalid_ref,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(raws):,} events, mean {mean_bytes:.0f} bytes; best of {args.rounds} rounds")
        print(f"  orjson.loads only                 {floor:6.2f} µs/event")
        print(f"  orjson.loads + validate           {total:6.2f} µs/event")
        print(f"    validate alone                  {total - floor:6.2f} µs/event")
        print(f"  orjson.loads + full envelope.json {full:6.2f} µs/event (fastjsonschema)")
        print(f"  invalid events: {invalid} (reference path: {invalid_ref})")
    return 0 if invalid == 0 and invalid_ref == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
