"""The list of migrations that ``status`` shows, and how fresh it is.

Listing every migration reads each rbd pool's namespaces and trash and each
migration's headers: a few small reads per pool and per migration.  While
this mgr's own tasks copy, those reads wait behind the copies -- about
200 ms at p99 with four executes on a small cluster, where an answer from
memory takes under 10 ms.  So while tasks run, ``status`` may answer from
a listing up to ``max_age`` seconds old, which the mgr's tick refreshes in
the background.  The module's own changes show at once: a command or
task that changed a migration puts that one migration, read afresh, into
the listing before it answers or is seen to end (one image's reads, not a
whole listing's).  With no task running, every ``status`` lists afresh.

A scan never runs on the thread of the command that asked: ``within``
waits for one a bounded while and otherwise answers with the last listing
and the pools the scan still waits on (a frozen OSD, a PG that is not
readable), so ``status`` keeps answering during an incident.
"""
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import rados
import rbd

from .engine.migration import MigrationInfo
from .errors import MigrationError
from .waits import Waits

log = logging.getLogger(__name__)

#: A listing may be this many times as old as its scan took.
SCAN_SHARE = 8


@dataclass(frozen=True)
class Listed:
    infos: List[MigrationInfo] = field(default_factory=list)
    #: time.monotonic() when the scan began: nothing older is in it.
    began: float = 0.0
    #: time.time() then, for display.
    began_wall: float = 0.0
    #: The change count when the scan began (see ``Listing.changed``).
    changes: int = 0
    #: Seconds the scan took.
    took: float = 0.0

    def age(self, now: float) -> float:
        return max(0.0, now - self.began)


class Listing:
    def __init__(self, scan: Callable[[], List[MigrationInfo]],
                 clock: Callable[[], float] = time.monotonic,
                 waits: Optional[Waits] = None) -> None:
        self._scan = scan
        self._clock = clock
        #: Where the scan announces the pools it waits on.
        self.waits = waits or Waits(clock)
        self._scanning = threading.Lock()   # one scan at a time
        self._lock = threading.Lock()       # guards the fields below
        self._ended = threading.Condition(self._lock)  # a background scan ended
        self._last: Optional[Listed] = None
        self._changes = 0
        self._refreshing = False
        #: The last background scan's failure, and when that scan began.
        self._failed: Optional[Tuple[float, Exception]] = None

    def changed(self) -> None:
        """A migration changed in a way the last listing may not show."""
        with self._lock:
            self._changes += 1

    def replace(self, dest_id: str, info: Optional[MigrationInfo]) -> None:
        """Put the migration whose target is ``dest_id``, as it is now, in
        the listing; ``None`` when it is gone."""
        with self._lock:
            last = self._last
            if last is None:
                return
            infos = [i for i in last.infos if i.dest.id != dest_id]
            infos += [info] if info is not None else []
            infos.sort(key=lambda i: str(i.dest))
            # A scan under way began before this change: the count keeps it
            # from replacing this listing when it ends.
            self._changes += 1
            self._last = Listed(infos, last.began, last.began_wall, self._changes, last.took)

    def fresh(self) -> Listed:
        """A listing begun no earlier than this call."""
        asked = self._clock()
        with self._scanning:
            last = self._last
            if last is not None and last.began > asked and last.changes == self._changes:
                return last  # another caller scanned while this one waited
            with self._lock:
                began, changes = self._clock(), self._changes
            infos = self._scan()
            listed = Listed(infos, began, time.time(), changes, self._clock() - began)
            with self._lock:
                if self._last is None or (self._last.began < began
                                          and self._last.changes <= changes):
                    self._last = listed
            return listed

    def limit(self, max_age: float) -> float:
        """How old a listing may be: ``max_age``, or eight times as long as
        the last scan took when that is longer, so that a cluster with
        thousands of migrations is not scanned without pause."""
        last = self._last
        return max(max_age, SCAN_SHARE * last.took) if last is not None else max_age

    def recent(self, max_age: float) -> Listed:
        """A listing within ``limit(max_age)`` that shows every change
        reported through ``changed``, and a refresh begun if it is due."""
        with self._lock:
            last = self._last
            usable = (last is not None and last.changes == self._changes
                      and last.age(self._clock()) <= self.limit(max_age))
        if not usable or last is None:
            return self.fresh()
        self.warm(max_age)
        return last

    def within(self, seconds: float, max_age: float = 0.0) -> Tuple[Listed, Optional[List[str]]]:
        """A listing begun no earlier than this call (or within
        ``limit(max_age)`` when ``max_age`` is set) if a background scan
        gives one within ``seconds``, and None; otherwise the last listing
        (empty, never begun, if there is none yet), with what the scan still
        waits on.  Never more than one scan runs, however many callers give
        up on it."""
        asked = self._clock()
        if max_age > 0:
            asked -= self.limit(max_age)
        deadline = self._clock() + seconds
        with self._lock:
            while True:
                last = self._last
                if last is not None and last.began >= asked and \
                        last.changes == self._changes:
                    return last, None
                if self._failed is not None and self._failed[0] >= asked:
                    raise self._failed[1]
                if not self._refreshing:
                    self._start_refresh()
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._ended.wait(remaining)
        return (last or Listed()), self.waits.longer_than(0.0)

    def _start_refresh(self) -> None:
        """Begin a scan in the background; the caller holds ``_lock``."""
        self._refreshing = True
        threading.Thread(target=self._refresh, name='rbd_migration listing',
                         daemon=True).start()

    def warm(self, max_age: float) -> None:
        """Begin a refresh in the background once the listing is a quarter
        of its limit old: the mgr ticks every second, so the listing never
        grows too old while tasks run, whether or not status is asked."""
        with self._lock:
            last = self._last
            if self._refreshing or (last is not None and last.changes == self._changes
                                    and last.age(self._clock()) <= self.limit(max_age) / 4):
                return
            self._start_refresh()

    def _refresh(self) -> None:
        began = self._clock()
        failed: Optional[Exception] = None
        try:
            self.fresh()
        except (MigrationError, rados.Error, rbd.Error) as e:
            # ``within`` hands the error to the status that waits for it.
            log.warning('refreshing the migration listing failed: %s', e)
            failed = e
        finally:
            with self._lock:
                self._refreshing = False
                self._failed = (began, failed) if failed is not None else None
                self._ended.notify_all()
