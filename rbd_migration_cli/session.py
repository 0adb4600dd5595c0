"""Talking to the module, and waiting as the rbd CLI waits.

The module answers every command within about a second: one still running
answers EINPROGRESS and is repeated, with the same arguments, for its
answer; execute, commit and abort answer with a task, whose ``task get``
says EAGAIN until it ends.  This client repeats and polls, 20 ms at first
and doubling to a second, so a short task answers in tens of milliseconds
and a long one costs the mgr one command a second.
"""
import errno
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, TextIO

FIRST_WAIT, LONGEST_WAIT = 0.02, 1.0
#: How long the module may be away (a mgr failover, the module restarting)
#: while a task is waited on, or while it starts up before a command.
MODULE_PATIENCE = 120.0
#: The progress the module puts in a still-active task's message.
_PROGRESS = re.compile(r' is (?:queued|running|waiting to retry) \((\d+)%\)')


@dataclass(frozen=True)
class Reply:
    """A command's answer: 0 or a positive errno, the output, the message."""

    status: int
    out: str
    message: str


class Transport(Protocol):
    def command(self, cmd: Mapping[str, Any], inbuf: bytes) -> Reply: ...


class RadosTransport:
    """Module commands over one librados client, kept for the whole run:
    a command costs a few milliseconds, where each ``ceph`` CLI call would
    start Python and connect anew."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def command(self, cmd: Mapping[str, Any], inbuf: bytes) -> Reply:
        ret, out, message = self.cluster.mgr_command(json.dumps(dict(cmd)), inbuf)
        return Reply(abs(int(ret)), _text(out), _text(message))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    return str(value or '')


class Backoff:
    """20 ms, doubling, at most a second."""

    def __init__(self, first: float = FIRST_WAIT, longest: float = LONGEST_WAIT) -> None:
        self.next_wait = first
        self.longest = longest

    def __call__(self) -> float:
        wait = self.next_wait
        self.next_wait = min(self.longest, wait * 2)
        return wait


def module_away(reply: Reply, was_there: bool = False) -> bool:
    """The module is not there for a moment: not loaded yet after a mgr
    failover ("No handler"), starting ("starting; try again").  Once it
    answered, "not enabled/loaded" is a restart too; before, it means the
    module is off, which no waiting mends."""
    if reply.status == errno.EINVAL:
        return reply.message.startswith('No handler')
    if reply.status == errno.EAGAIN:
        return 'module is starting' in reply.message
    return was_there and reply.status == errno.EOPNOTSUPP \
        and 'not enabled/loaded' in reply.message


@dataclass
class Clock:
    """Time, injectable for tests."""

    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.monotonic


def ask(transport: Transport, cmd: Mapping[str, Any], inbuf: bytes = b'',
        clock: Optional[Clock] = None) -> Reply:
    """The module's answer to a command: repeated, with the same arguments
    (which is how the module recognises it), while it answers EINPROGRESS,
    and while the module starts up."""
    clock = clock or Clock()
    backoff = Backoff()
    away_since: Optional[float] = None
    while True:
        reply = transport.command(cmd, inbuf)
        if reply.status != errno.EINPROGRESS:
            if not module_away(reply):
                return reply
            away_since = away_since if away_since is not None else clock.now()
            if clock.now() - away_since > MODULE_PATIENCE:
                return reply
        clock.sleep(backoff())


def task_progress(message: str) -> Optional[float]:
    """A still-active task's progress from ``task get``'s message."""
    m = _PROGRESS.search(message)
    return int(m.group(1)) / 100 if m else None


def wait_task(transport: Transport, task_id: str, progress: Callable[[float], None],
              clock: Optional[Clock] = None) -> Reply:
    """``task get`` until the task ends: its final answer (0, the task's
    errno, or ECANCELED)."""
    clock = clock or Clock()
    backoff = Backoff()
    cmd = {'prefix': 'rbd migration task get', 'task_id': task_id, 'format': 'json'}
    away_since: Optional[float] = None
    while True:
        reply = transport.command(cmd, b'')
        if reply.status == errno.EAGAIN and not module_away(reply):
            fraction = task_progress(reply.message)
            if fraction is not None:
                progress(fraction)
            away_since = None
        elif module_away(reply, was_there=True):
            away_since = away_since if away_since is not None else clock.now()
            if clock.now() - away_since > MODULE_PATIENCE:
                return reply
        elif reply.status != errno.EINPROGRESS:
            return reply
        clock.sleep(backoff())


class Progress:
    """The rbd CLI's progress line on stderr (utils::ProgressContext):
    ``\\rImage migration: N% complete...`` each time the percentage changes,
    ``\\rImage migration: 100% complete...done.`` at the end, or
    ``...failed.`` with the last percentage shown."""

    def __init__(self, operation: str, enabled: bool = True,
                 stream: Optional[TextIO] = None) -> None:
        self.operation = operation
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.last = 0

    def update(self, fraction: float) -> None:
        pc = max(0, min(100, int(fraction * 100)))
        if pc != self.last and self.enabled:
            self.stream.write(f'\r{self.operation}: {pc}% complete...')
            self.stream.flush()
        self.last = pc

    def finish(self) -> None:
        self._end('100% complete...done.')

    def fail(self) -> None:
        self._end(f'{self.last}% complete...failed.')

    def _end(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f'\r{self.operation}: {text}\n')
            self.stream.flush()


def strerror(status: int) -> str:
    """``(22) Invalid argument``, as Ceph's cpp_strerror writes it."""
    return f'({status}) {os.strerror(status)}'


@dataclass(frozen=True)
class Wording:
    """What rbd prints for one command: its progress line's label, and the
    start of its failure line."""

    progress: str
    failed: str


WORDING: Dict[str, Wording] = {
    'prepare': Wording('', 'rbd: preparing migration failed'),
    'import': Wording('', 'rbd: preparing import migration failed'),
    'execute': Wording('Image migration', 'rbd: migration failed'),
    'commit': Wording('Commit image migration', 'rbd: committing migration failed'),
    'abort': Wording('Abort image migration', 'rbd: aborting migration failed'),
}
