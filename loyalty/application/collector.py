"""The cyclic garbage collector paused around code that allocates many objects and makes
no reference cycles (reference counting frees all it drops)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (reference counting still frees
    everything it drops). Each collection the block's allocations set off walks what is
    young, and a full one the process's whole heap (a worker's member cache, an API's
    modules and caches), to find nothing: a quarter of the pipeline's CPU, a fifth to a
    third of an export's, a quarter of a feed page's. Only for code that makes no
    reference cycles (tests/unit/test_feed_decoder.py checks the export's and the
    feed's). The collector resumes after the block; a block entered with it off leaves
    it off. Threads may overlap such blocks: the first to leave resumes the collector
    for the others (their blocks then run with it on: slower, never wrong)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
