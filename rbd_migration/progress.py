"""Progress events through the mgr's progress module (``ceph progress``,
``ceph -s``, the dashboard): one event per task for the task's whole life.

The event opens when the task first runs and stays open while the task
waits to retry or waits in the queue to resume, saying so in its message;
it completes only when the task completes, and fails (with a text that
tells what, which image and why, since the dashboard shows nothing else for
a failed event of another module) when the task fails or is cancelled.
A restarted or failed-over mgr opens again, under the same id, the events
of the tasks it restores.  Messages carry no percentage: the event's
progress field is the one number every surface shows.
"""
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from .tasks import CANCELLED, COMPLETED, FAILED, QUEUED, RETRYING, RUNNING, Task

log = logging.getLogger(__name__)

#: ``MgrModule.remote``: (module, method, *args) -> result.
Remote = Callable[..., Any]

ENDED = (COMPLETED, FAILED, CANCELLED)


def event_id(task: Task) -> str:
    return f'rbd_migration/task/{task.id}'


def has_run(task: Task) -> bool:
    """Whether the task ever started, and so ever had an event."""
    return task.started is not None


def wants_event(task: Task) -> bool:
    """An open event: running, or waiting to run again after a run."""
    return task.state in (RUNNING, RETRYING) or (task.state == QUEUED and has_run(task))


def event_message(task: Task, max_attempts: int) -> str:
    """What the task is doing now, without a percentage."""
    if task.state == RETRYING:
        total = f'/{max_attempts}' if max_attempts > 0 else ''
        why = f': {task.last_error}' if task.last_error else ''
        return f'{task.message}: waiting to retry, attempt {task.attempts + 1}{total}{why}'
    if task.state == QUEUED:
        return f'{task.message}: queued to resume'
    if task.state == RUNNING and task.stalled:
        return f'{task.message}: stalled: {task.stalled}'
    return task.message


def failure_text(task: Task) -> str:
    """The whole story of a failed or cancelled task in one line: the
    dashboard titles another module's failed event only "Failed to"."""
    if task.state == CANCELLED:
        return f'{task.message}: cancelled by request (task {task.id})'
    error = task.last_error or 'unknown error'
    tries = f' after {task.attempts} attempts' if task.attempts > 1 else ''
    return f'{task.message}: failed{tries} (task {task.id}): {error}'


class ProgressEvents:
    """Keeps the progress module's events in step with the tasks.

    ``started``, ``progress`` and ``finished`` follow a task's runs;
    ``sync`` (from the queue's ``changed``) opens what should be open but is
    not (after a mgr restart) and ends what ended unreported.  Every call
    to the progress module is made under one lock, so that an update can
    never land after the end of its event and open it again."""

    def __init__(self, remote: Remote, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 max_attempts: Callable[[], int] = lambda: 0,
                 since: Optional[float] = None) -> None:
        self.remote = remote
        self.interval = interval
        self.clock = clock
        self.max_attempts = max_attempts
        #: Wall-clock time from which task ends are this mgr's to report.
        self.since = time.time() if since is None else since
        self._lock = threading.RLock()
        self._last: Dict[str, float] = {}
        #: Open events: their last message as the progress module has it.
        self._shown: Dict[str, str] = {}
        #: Events of tasks that started a run in this mgr.
        self._runs: Set[str] = set()
        #: Events this mgr ended (or that needed no end): never touched again.
        self._ended: Set[str] = set()

    @staticmethod
    def event_id(task: Task) -> str:
        return event_id(task)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """One call to the progress module; False if it did not take it."""
        try:
            self.remote('progress', method, *args, **kwargs)
            return True
        except ImportError:
            return False  # not loaded (yet: a mgr that just started)
        except RuntimeError as e:  # remote() wraps any error of the progress module
            log.warning('progress %s %s failed: %s', method, args[:1], e)
            return False

    def _message(self, task: Task) -> str:
        attempts = 0
        if task.state == RETRYING:  # the only message that names the limit
            try:
                attempts = int(self.max_attempts())
            except Exception as e:  # an option read is not worth a lost event
                log.warning('retry_max_attempts unreadable: %s', e)
        return event_message(task, attempts)

    def _update(self, task: Task, message: str, progress: float) -> bool:
        eid = event_id(task)
        if eid in self._ended:
            return True
        ok = self._call('update', eid, message, progress, refs=self._refs(task),
                        add_to_ceph_s=True)
        if ok:
            self._shown[eid] = message
        return ok

    @staticmethod
    def _refs(task: Task) -> Dict[str, Any]:
        return {'origin': 'rbd_migration', 'action': task.action, 'task_id': task.id,
                'pool_id': task.pool_id, 'pool_namespace': task.namespace,
                'image_id': task.image_id}

    # -- a task's runs -------------------------------------------------------
    def started(self, task: Task) -> None:
        """A run began: announced at once, throttled from here."""
        with self._lock:
            self._last[task.id] = self.clock()
            self._runs.add(event_id(task))
            self._update(task, self._message(task), task.progress)

    def progress(self, task: Task) -> None:
        now = self.clock()
        with self._lock:
            if now - self._last.get(task.id, 0.0) >= self.interval:
                self._last[task.id] = now
                self._update(task, self._message(task), task.progress)

    def finished(self, task: Task) -> None:
        """A run ended: the event ends only with the task; a task that
        waits to retry or to resume keeps it open, saying so."""
        with self._lock:
            self._last.pop(task.id, None)
            if task.state in ENDED:
                self._end(task)
            elif wants_event(task) or self._ran(task):
                self._update(task, self._message(task), task.progress)

    def _ran(self, task: Task) -> bool:
        """Whether the task has (or had) an event: it ran."""
        eid = event_id(task)
        return has_run(task) or eid in self._runs or eid in self._shown

    def _end(self, task: Task) -> bool:
        """Complete or fail the task's event, opening it first if this mgr
        has not (the progress module ignores the end of an unknown event)."""
        eid = event_id(task)
        if eid in self._ended:
            return True
        if not self._ran(task):  # cancelled before it ever ran: it had no event
            self._ended.add(eid)
            return True
        progress = 1.0 if task.state == COMPLETED else task.progress
        opened = self._update(task, task.message, progress)
        self._shown.pop(eid, None)
        self._runs.discard(eid)
        if task.state == COMPLETED:
            ended = self._call('complete', eid)
        else:
            ended = self._call('fail', eid, failure_text(task))
        if opened and ended:
            self._ended.add(eid)
        return opened and ended

    # -- the whole queue -----------------------------------------------------
    def sync(self, tasks: Iterable[Task]) -> bool:
        """Bring the events in step with the tasks; False if the progress
        module did not take every call (try again later)."""
        tasks = list(tasks)
        ok = True
        with self._lock:
            for task in tasks:
                ok = self._sync_one(task) and ok
            self._ended &= {event_id(t) for t in tasks}
        return ok

    def _sync_one(self, task: Task) -> bool:
        eid = event_id(task)
        if eid in self._ended:
            return True
        if task.state in ENDED:
            # Ended in this mgr's life without a report: cancelled while
            # the previous mgr went away, found so by the queue's load.
            if (task.finished or 0.0) >= self.since:
                return self._end(task)
            return True
        if not wants_event(task):
            return True
        message = self._message(task)
        if self._shown.get(eid) == message:
            return True
        return self._update(task, message, task.progress)

    def open_events(self) -> List[str]:
        """The ids of the events this mgr holds open (for tests and status)."""
        with self._lock:
            return sorted(self._shown)

    # -- batches -------------------------------------------------------------
    def batch(self, batch_id: str, fraction: Optional[float], message: str) -> None:
        """The batch as a whole: one event, completed when the batch ends."""
        event = f'rbd_migration/batch/{batch_id}'
        with self._lock:
            if fraction is None:
                self._call('update', event, message, 1.0, refs={'origin': 'rbd_migration'})
                self._call('complete', event)
            else:
                self._call('update', event, message, fraction,
                           refs={'origin': 'rbd_migration', 'batch': batch_id},
                           add_to_ceph_s=True)
