"""Profiling helper for the ingest path (not part of ``make bench``).

Pre-fill once, then profile consumption as often as needed::

    .venv/bin/python -m bench.profile_ingest prefill --bootstrap HOST:PORT --events 1000000 \\
        --state /tmp/prof-topics.json
    .venv/bin/py-spy record -r 250 -f raw -o /tmp/ingest.txt -- \\
        .venv/bin/python -m bench.profile_ingest consume --bootstrap HOST:PORT \\
        --state /tmp/prof-topics.json [--baseline]
    .venv/bin/python -m bench.profile_ingest top /tmp/ingest.txt    # self/total time tables

``consume --pyinstrument out.html`` profiles with pyinstrument instead.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
from pathlib import Path

from aiokafka import TopicPartition

from bench.common import create_topics, prefill, unique
from bench.events import load_events
from bench.ingest_bench import baseline_round, replicator_round


async def _prefill(args: argparse.Namespace) -> None:
    events = load_events(args.events)
    names = {e: unique(f"prof-{e}") for e in ("attendance", "participant", "config")}
    await create_topics(args.bootstrap, list(names.values()))
    ends = await prefill(args.bootstrap, names, events)
    Path(args.state).write_text(json.dumps({
        "topics": list(names.values()),
        "ends": [[tp.topic, tp.partition, e] for tp, e in ends.items()],
    }))
    print(f"prefilled {sum(ends.values()):,} events -> {args.state}")


async def _consume(args: argparse.Namespace) -> None:
    state = json.loads(Path(args.state).read_text())
    ends = {TopicPartition(t, p): e for t, p, e in state["ends"]}
    prof = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0005, async_mode="disabled")
        prof.start()
    if args.baseline:
        out = await baseline_round(args.bootstrap, state["topics"], ends)
    else:
        with tempfile.TemporaryDirectory(prefix="prof-ingest-") as d:
            out = await replicator_round(args.bootstrap, state["topics"], ends, Path(d))
    if prof is not None:
        prof.stop()
        Path(args.pyinstrument).write_text(prof.output_html())
        print(prof.output_text(unicode=False, color=False, show_all=False))
    print(json.dumps(out))


def _top(path: str, n: int) -> None:
    """Self and inclusive sample counts per function from a py-spy ``raw`` (collapsed) file."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        frames = [f.split(" (", 1)[0] + " (" + f.split(" (", 1)[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        total += c
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    print(f"{total} samples")
    print("-- self --")
    for f, c in self_c.most_common(n):
        print(f"{100 * c / total:6.1f}%  {f}")
    print("-- inclusive --")
    for f, c in incl.most_common(n):
        print(f"{100 * c / total:6.1f}%  {f}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prefill")
    a.add_argument("--bootstrap", required=True)
    a.add_argument("--events", type=int, default=1_000_000)
    a.add_argument("--state", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--bootstrap", required=True)
    c.add_argument("--state", required=True)
    c.add_argument("--baseline", action="store_true")
    c.add_argument("--pyinstrument", default=None)
    t = sub.add_parser("top")
    t.add_argument("path")
    t.add_argument("-n", type=int, default=30)
    args = p.parse_args(argv)
    if args.cmd == "prefill":
        asyncio.run(_prefill(args))
    elif args.cmd == "consume":
        asyncio.run(_consume(args))
    else:
        _top(args.path, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
