"""When an execute may start: the execute window, executes per pool and a
total bandwidth budget.

Pure functions over tasks and a clock, read again on every scheduling pass,
so ``ceph config set mgr mgr/rbd_migration/...`` takes effect within a
second without a restart.  librbd's own execute cannot be throttled or
paused from outside (it ignores the progress callback's answer), so these
limits act where the module has a say: when a task starts, and for the
tasks that stop at a checkpoint (verify, the adapter engine), while they
run.
"""
import datetime
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

from .errors import InvalidArgument
from .settings import Settings
from .tasks import Task

#: Actions that read or copy a whole image, and so obey the limits.
HEAVY = ('execute', 'verify')

_RANGE = re.compile(r'^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$')


@dataclass(frozen=True)
class Window:
    """Daily time ranges in which executes may run, e.g. ``22:00-06:00``
    (a range may wrap midnight), several separated by commas, in the mgr
    host's local time unless followed by ``UTC``.  Empty: always open."""

    ranges: Tuple[Tuple[int, int], ...] = ()   # minutes since midnight, [start, end)
    utc: bool = False
    text: str = ''

    @classmethod
    def parse(cls, text: str, what: str = 'execute_window') -> 'Window':
        raw = (text or '').strip()
        if not raw:
            return cls()
        body, utc = raw, False
        if body.upper().endswith('UTC'):
            body, utc = body[:-3].strip(), True
        ranges = []
        for part in body.split(','):
            m = _RANGE.match(part.strip())
            if not m:
                raise InvalidArgument(
                    f"{what}: {part.strip()!r} is not HH:MM-HH:MM; e.g. "
                    "'22:00-06:00' or '22:00-06:00 UTC', several separated by commas")
            h1, m1, h2, m2 = (int(g) for g in m.groups())
            if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
                raise InvalidArgument(f'{what}: {part.strip()!r} is not a time of day '
                                      '(00:00..24:00)')
            start, end = h1 * 60 + m1, h2 * 60 + m2
            if start == end:
                raise InvalidArgument(f'{what}: {part.strip()!r} is empty; leave the '
                                      'option unset to allow executes at any time')
            ranges.append((start, end))
        return cls(tuple(ranges), utc, raw)

    def is_open(self, when: float) -> bool:
        """Whether the window is open at the epoch time ``when``."""
        if not self.ranges:
            return True
        if self.utc:
            t = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
        else:
            t = datetime.datetime.fromtimestamp(when)
        minute = t.hour * 60 + t.minute
        return any(start <= minute < end if start < end else
                   minute >= start or minute < end
                   for start, end in self.ranges)

    def __str__(self) -> str:
        return self.text or 'always'


@dataclass
class Limits:
    """The scheduling options as read at one pass; 0 means no limit."""

    executes_per_pool: int = 0
    bandwidth: float = 0.0          # bytes/s, all running executes together
    window: Window = field(default_factory=Window)

    @classmethod
    def of(cls, settings: Settings) -> 'Limits':
        """The limits ``settings`` set (a bad execute_window raises here)."""
        return cls(executes_per_pool=settings.max_concurrent_executes_per_pool,
                   bandwidth=settings.max_bandwidth_mbps * 1e6,
                   window=Window.parse(settings.execute_window))


def task_pools(task: Task) -> List[str]:
    """The pools a task loads: its target's and, when known, its source's."""
    pools = [task.pool]
    source = task.options.get('source_pool')
    if isinstance(source, str) and source and source != task.pool:
        pools.append(source)
    return pools


def wait_reason(task: Task, running: Iterable[Task], limits: Limits, now: float,
                rate: Callable[[Task], float] = lambda t: 0.0) -> Optional[str]:
    """Why ``task`` may not start now (None: it may).  ``running`` are the
    tasks already running; ``rate`` gives one's copy rate in bytes/s."""
    if task.action not in HEAVY:
        return None
    if not limits.window.is_open(now):
        return f'outside execute_window ({limits.window})'
    running = [t for t in running if t.action in HEAVY and t.id != task.id]
    if limits.executes_per_pool > 0:
        for pool in task_pools(task):
            busy = sum(1 for t in running if pool in task_pools(t))
            if busy >= limits.executes_per_pool:
                return (f'pool {pool} has {busy} execute(s) running '
                        f'(max_concurrent_executes_per_pool {limits.executes_per_pool})')
    if limits.bandwidth > 0 and running:
        total = sum(rate(t) for t in running)
        if total >= limits.bandwidth:
            return (f'running executes copy {total / 1e6:.1f} MB/s '
                    f'(max_bandwidth_mbps {limits.bandwidth / 1e6:g})')
    return None


def must_pause(task: Task, limits: Limits, now: float) -> bool:
    """A running task that should stop at its next checkpoint and wait in
    the queue: a heavy task outside the window."""
    return task.action in HEAVY and not limits.window.is_open(now)
