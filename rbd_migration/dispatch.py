"""Commands off the mgr's command thread, each answered in bounded time.

ceph-mgr hands this module one command at a time: while a handler runs, no
other command of the module is served.  A prepare whose source trickles, or
a status that waits on a frozen OSD, would then silence ``task list``,
``task cancel`` and ``abort`` -- when an operator needs them most.

So every command runs on a thread of its own, and the mgr's thread waits
for it at most ``budget`` seconds.  A command still running then goes on in
the background and the answer says so (EINPROGRESS); repeating the same
command returns its result once it has one, or says it is still running.
Two commands that would change the same image do not run at once: the
second is refused (EBUSY) while the first is under way.  The number of
commands left in the background is bounded, so a frozen cluster cannot pile
up threads without end.
"""
import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .waits import Waits

log = logging.getLogger(__name__)

HandlerResult = Tuple[int, str, str]

#: Commands that may be left running in the background at once.
MAX_BACKGROUND = 32
#: How long a background command's answer waits to be collected.
KEEP_ANSWER = 3600.0


@dataclass
class Call:
    """One command run: the mgr's thread waits for ``done`` a while."""

    key: str
    #: What the command does, for messages ("prepare of rbd/x").
    what: str
    #: The image (or other object) the command changes; None: changes none.
    subject: Optional[str]
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[HandlerResult] = None
    #: The mgr's thread stopped waiting: the answer is kept for a repeat.
    background: bool = False
    finished: Optional[float] = None
    #: The thread the command runs on, whose waits name what it waits on.
    thread: Optional[int] = None


class Dispatcher:
    def __init__(self, budget: Callable[[], float], waits: Optional[Waits] = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_background: int = MAX_BACKGROUND) -> None:
        self.budget = budget
        #: Where the commands' code announces what it waits on.
        self.waits = waits or Waits(clock)
        self.clock = clock
        self.max_background = max_background
        self._lock = threading.Lock()
        self._calls: Dict[str, Call] = {}

    def call(self, key: str, what: str, run: Callable[[Call], HandlerResult],
             subject: Optional[str] = None) -> HandlerResult:
        """``run(call)``'s answer if it comes within the budget; otherwise
        EINPROGRESS, with the answer kept for the same command repeated."""
        with self._lock:
            self._forget_old()
            earlier = self._calls.get(key)
            if earlier is not None and earlier.done.is_set():
                del self._calls[key]
                assert earlier.result is not None
                return earlier.result
            if earlier is not None:
                return self._still_running(earlier)
            clash = self._clash(subject)
            if clash is not None:
                return (-errno.EBUSY, '',
                        f'{clash.what} is still running ({self._age(clash)}); '
                        f'{what} waits until it has answered: repeat it then')
            if sum(1 for c in self._calls.values() if not c.done.is_set()) \
                    >= self.max_background:
                return (-errno.EBUSY, '',
                        f'{self.max_background} commands still wait on the cluster '
                        'or a source; try again once they answered '
                        '(ceph rbd migration status lists them)')
            call = Call(key, what, subject, self.clock())
            self._calls[key] = call
        thread = threading.Thread(target=self._run, args=(call, run), daemon=True,
                                  name=f'rbd_migration {what}'[:60])
        thread.start()
        call.thread = thread.ident
        if call.done.wait(max(0.0, self.budget())):
            with self._lock:
                self._calls.pop(key, None)
            assert call.result is not None
            return call.result
        with self._lock:
            if call.done.is_set():  # it ended just now
                self._calls.pop(key, None)
                assert call.result is not None
                return call.result
            call.background = True
        log.warning('%s did not answer within %.1f s; it goes on in the background%s',
                    what, self.budget(), self._waiting(call))
        return self._still_running(call)

    def running(self) -> List[Dict[str, object]]:
        """Commands under way in the background, for status."""
        with self._lock:
            calls = [c for c in self._calls.values()
                     if c.background and not c.done.is_set()]
        return [{'command': c.what, 'seconds': round(self.clock() - c.started, 1),
                 'waiting_on': self._waits_of(c)}
                for c in calls]

    def _run(self, call: Call, run: Callable[[Call], HandlerResult]) -> None:
        try:
            result = run(call)
        except BaseException as e:  # run() answers errors itself; a bug here
            log.exception('%s crashed', call.what)
            result = (-errno.EIO, '', f'internal error: {type(e).__name__}')
        with self._lock:
            call.result = result
            call.finished = self.clock()
            call.done.set()
        if call.background:
            log.info('%s answered in the background after %.1f s: %s', call.what,
                     call.finished - call.started,
                     'ok' if result[0] == 0 else result[2])

    def _waits_of(self, call: Call) -> str:
        """'pool rbd (5 s)', or '' when the command says nothing."""
        if call.thread is None:
            return ''
        return ', '.join(self.waits.longer_than(0.0, call.thread))

    def _waiting(self, call: Call) -> str:
        waits = self._waits_of(call)
        return f', waiting on {waits}' if waits else ''

    def _still_running(self, call: Call) -> HandlerResult:
        return (-errno.EINPROGRESS, '',
                f'{call.what} is still running ({self._age(call)}{self._waiting(call)}) and goes on '
                'in the background; repeat the same command for its answer')

    def _clash(self, subject: Optional[str]) -> Optional[Call]:
        if subject is None:
            return None
        for c in self._calls.values():
            if c.subject == subject and not c.done.is_set():
                return c
        return None

    def _age(self, call: Call) -> str:
        return f'for {self.clock() - call.started:.0f} s'

    def _forget_old(self) -> None:
        """Answers nobody came back for are dropped after KEEP_ANSWER."""
        now = self.clock()
        for key in [k for k, c in self._calls.items()
                    if c.finished is not None and now - c.finished > KEEP_ANSWER]:
            del self._calls[key]
