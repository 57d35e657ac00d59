"""Batches made ahead in a background thread: planning the next global batch, receiving it from a
loader worker and copying it into pinned memory then overlap with the step the training thread is
launching on the GPU (those parts release the interpreter lock, or run while the training thread
waits for it)."""
from __future__ import annotations

import queue
import threading
from typing import Iterator

_END = object()


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items``, produced up to ``depth`` ahead in a daemon thread; an exception there is raised
    here, at the item where it happened; closing this generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name="dist_embed-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
