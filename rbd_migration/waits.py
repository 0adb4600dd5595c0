"""What threads wait on right now, so a late answer can name it.

A librados call to a frozen OSD blocks without a word.  Code about to wait
on a pool or a source says so with ``waits.on('pool rbd')``; whoever stops
waiting for that code (a command past its budget, status past its scan
bound) asks ``longest()`` what it is stuck on and tells the operator.
"""
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple


class Waits:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0
        #: token -> (what, since, thread ident)
        self._on: Dict[int, Tuple[str, float, int]] = {}

    @contextmanager
    def on(self, what: str) -> Iterator[None]:
        with self._lock:
            self._next += 1
            token = self._next
            self._on[token] = (what, self._clock(), threading.get_ident())
        try:
            yield
        finally:
            with self._lock:
                del self._on[token]

    def longer_than(self, seconds: float, thread: Optional[int] = None) -> List[str]:
        """What has been waited on for at least ``seconds`` (by ``thread``
        only, when given), longest first, each named once with how long:
        ``['pool rbd (12 s)']``."""
        now = self._clock()
        with self._lock:
            waits = sorted(self._on.values(), key=lambda w: w[1])
        named: Dict[str, float] = {}
        for what, since, ident in waits:
            if now - since >= seconds and what not in named and \
                    thread in (None, ident):
                named[what] = now - since
        return [f'{what} ({age:.0f} s)' for what, age in named.items()]
