"""Read ahead: run a sequence of reads in a background thread, within a byte budget ahead of their consumer.

Why: a streamed export reads a tensor, quantizes it, writes its record, then reads the next one. When the
checkpoint is not in the page cache (an 8B model is 15 GiB; a laptop's cache rarely holds it after a previous
run), every read waits on the disk while the CPU idles, and every quantization leaves the disk idle: the wall
time is the *sum* of I/O and compute. With the reads in a second thread it approaches the larger of the two.
The reader's work releases the GIL (``readinto`` into a torch buffer, torch reductions), so one thread suffices.

Memory: each read declares its size up front; the reader starts a read only while the pieces read but not yet
taken by the consumer, plus this one, fit in ``budget`` bytes, or when nothing is waiting (so a piece larger
than the budget is read one at a time). The extra resident memory is therefore at most
``max(budget, largest piece)``.
Errors raised by a read (a truncated file, a NaN weight) are re-raised in the consumer at the position where
the failing piece would have been consumed; closing the consumer early stops the reader.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetched(reads: Iterable[tuple[int, Callable[[], T]]], budget: int) -> Iterator[T]:
    """Yield ``read()`` for each ``(nbytes, read)`` in order, the reads run ahead by a daemon thread
    (``budget <= 0``: inline, nothing ahead)."""
    if budget <= 0:
        for _, read in reads:
            yield read()
        return
    q: queue.SimpleQueue = queue.SimpleQueue()
    cond = threading.Condition()
    ahead = [0]                     # bytes read and not yet taken by the consumer
    stop = threading.Event()

    def work() -> None:
        try:
            for nbytes, read in reads:
                with cond:
                    cond.wait_for(lambda: stop.is_set() or ahead[0] == 0 or ahead[0] + nbytes <= budget)
                    if stop.is_set():
                        return
                    ahead[0] += nbytes
                q.put((read(), nbytes, None))
            q.put((_END, 0, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put((_END, 0, e))

    t = threading.Thread(target=work, name="macq-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x, nbytes, err = q.get()
            if x is _END:
                if err is not None:
                    raise err
                return
            with cond:
                ahead[0] -= nbytes
                cond.notify()
            yield x
    finally:
        with cond:
            stop.set()
            cond.notify()
        t.join()            # the reader finishes at most its current read
