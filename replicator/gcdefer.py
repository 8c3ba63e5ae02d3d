"""Deferring young garbage collections while a hot loop runs (ingest, follow)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def young_gc_deferred(threshold: int) -> Iterator[None]:
    """Raise the young-generation GC threshold while a hot loop runs (process-wide,
    refcounted).

    Every fetched batch allocates ~4 GC-tracked objects per record (aiokafka's
    ``ConsumerRecord`` and its headers tuples) that all die by refcount once the batch is
    processed. With the default threshold (700) they set off dozens of young collections
    per batch whose survivors get promoted and make full collections frequent: 10-20 % of
    ingest CPU. With a threshold above a batch's allocations young collections rarely run;
    cyclic garbage is still collected. The previous thresholds are restored when the last
    running ingest loop ends (unless someone else changed them meanwhile).
    """
    global _gc_users, _gc_saved
    if _gc_users == 0:
        saved = gc.get_threshold()
        if 0 < saved[0] < threshold:  # 0 means "automatic GC off": leave that alone
            gc.set_threshold(threshold, saved[1], saved[2])
            _gc_saved = saved
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0 and _gc_saved is not None:
            if gc.get_threshold()[0] == threshold:
                gc.set_threshold(*_gc_saved)
            _gc_saved = None
