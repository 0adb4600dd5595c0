"""The task queue: execute, commit and abort run here, in the background.

Every change of a task is written to the mgr's KV store before anything acts
on it, so a restarted or failed-over mgr restores the queue as it was: tasks
that were running go back to the queue and librbd resumes them where the
image says they were.  Tasks run in sequence order, at most
``max_concurrent`` at once and at most one per image.  A transient failure
is retried with capped exponential backoff a bounded number of times; a
permanent one fails the task at once.
"""
import logging
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Protocol, Tuple

from .engine.migration import ImageRef
from .errors import Cancelled, MigrationError, NotFound
from .records import NewerRecord, Record, Upgrade
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)



class ValueEnum(str, Enum):
    """A ``str`` enum: stored, shown and compared as its value, which
    records and scripts already hold."""

    def __str__(self) -> str:
        return str(self.value)


class TaskState(ValueEnum):
    """Where a task is."""

    QUEUED = 'queued'
    RUNNING = 'running'
    RETRYING = 'waiting to retry'
    COMPLETED = 'completed'
    FAILED = 'failed'
    CANCELLED = 'cancelled'


class TaskAction(ValueEnum):
    EXECUTE = 'execute'
    COMMIT = 'commit'
    ABORT = 'abort'
    VERIFY = 'verify'


QUEUED, RUNNING, RETRYING = TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING
COMPLETED, FAILED, CANCELLED = TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED
ACTIVE = (QUEUED, RUNNING, RETRYING)

TASK_PREFIX = 'task/'
SEQUENCE_KEY = 'task_sequence'
#: The layout of the task records this code writes; ``Task.from_json``
#: upgrades older ones as it reads them.
TASK_RECORD_VERSION = 2


def _cancels_kept(data: Dict[str, Any]) -> None:
    """Version 1 came before cancels were kept in the record: a task it
    shows running was not asked to stop."""
    data.setdefault('cancel_requested', False)


@dataclass
class Task(Record):
    KIND: ClassVar[str] = 'task'
    VERSION: ClassVar[int] = TASK_RECORD_VERSION
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {1: _cancels_kept}

    id: str
    action: TaskAction
    pool_id: int
    pool: str
    namespace: str
    image_id: str
    image_name: str
    sequence: int
    message: str                # e.g. "Migrating image rbd/a to rbd2/b"
    options: Dict[str, Any] = field(default_factory=dict)
    state: TaskState = QUEUED
    attempts: int = 0
    last_error: Optional[str] = None
    errno: Optional[int] = None
    progress: float = 0.0
    created: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None
    next_attempt: Optional[float] = None
    #: A later task for the same image replaces this one in health reports.
    superseded: bool = False
    #: What the last run reported (e.g. bytes read, written, skipped).
    result: Dict[str, Any] = field(default_factory=dict)
    #: When the running task last moved forward.
    moved: Optional[float] = None
    #: Why a running task has not moved for a while; None while it moves.
    stalled: Optional[str] = None
    #: ``task cancel`` asked a running task to stop; kept in the store, so
    #: a task cancelled just before a failover is not run again after it.
    cancel_requested: bool = False
    version: int = TASK_RECORD_VERSION

    def __post_init__(self) -> None:
        self.action = TaskAction(self.action)
        self.state = TaskState(self.state)

    @property
    def ref(self) -> ImageRef:
        """The image the task acts on (the migration's target)."""
        return ImageRef(self.pool_id, self.pool, self.namespace, self.image_name,
                        self.image_id)

    @property
    def image_key(self) -> str:
        return self.ref.key

    @property
    def image_spec(self) -> str:
        ns = f'{self.namespace}/' if self.namespace else ''
        return f'{self.pool}/{ns}{self.image_name}'

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['image_spec'] = self.image_spec
        return d



class Events(Protocol):
    """Where the queue reports what happens (progress events, health)."""

    def started(self, task: Task) -> None: ...
    def progress(self, task: Task) -> None: ...
    def finished(self, task: Task) -> None: ...
    def changed(self, tasks: List[Task]) -> None: ...


#: Runs one task; calls ``report(done, total)``, which returns False when the
#: task must stop (cancelled, or the mgr is shutting down); may return a
#: small dict of results to keep with the task.
Runner = Callable[[Task, Callable[[int, int], bool]], Optional[Dict[str, Any]]]


#: Why a task may not start now beside the running ones, under one pass's
#: settings (scheduling limits); None: it may.
Gate = Callable[[Task, List[Task], Settings], Optional[str]]


class TaskQueue:
    def __init__(self, store: Store, runner: Runner, events: Events,
                 settings: Callable[[], Settings] = Settings,
                 keep_finished: int = 200,
                 clock: Callable[[], float] = time.time,
                 diagnose: Callable[[Task], str] = lambda task: '',
                 gate: Gate = lambda task, running, settings: None,
                 pause: Callable[[Task, Settings], bool] = lambda task, settings: False) -> None:
        self.store = store
        self.runner = runner
        self.events = events
        #: The options now; a scheduling pass reads them once and hands
        #: that snapshot to every step, so one pass sees one set of values.
        self.settings = settings
        self.keep_finished = keep_finished
        self.clock = clock
        self.diagnose = diagnose
        self.gate = gate
        #: Whether a running task must stop at its next step and wait.
        self.pause = pause
        #: Why each waiting task waits, as of the last scheduling pass.
        self.waiting: Dict[str, str] = {}
        self.tasks: Dict[str, Task] = {}
        self.cv = threading.Condition()
        self.stopping = False
        self._paused: set = set()
        #: Set to stop a running task's reads at once (cancel, pause,
        #: shutdown), not only at its next progress report.
        self._stops: Dict[str, threading.Event] = {}
        self._threads: Dict[str, threading.Thread] = {}

    # -- persistence -------------------------------------------------------
    def load(self) -> None:
        """Restore the queue; what was running when the mgr stopped runs again."""
        with self.cv:
            for key, text in self.store.get_store_prefix(TASK_PREFIX).items():
                try:
                    task = Task.from_json(text)
                except NewerRecord as e:
                    log.error('leaving task %s alone: %s', key, e)
                    continue
                except (ValueError, TypeError) as e:
                    log.error('dropping unreadable task %s: %s', key, e)
                    self.store.set_store(key, None)
                    continue
                if task.active and task.cancel_requested:
                    self._finish(task, CANCELLED, 'cancelled by request')
                elif task.state == RUNNING:
                    task.state = QUEUED
                    self._save(task)
                self.tasks[task.id] = task
            self.events.changed(self.list())

    def _save(self, task: Task) -> None:
        self.store.set_store(TASK_PREFIX + task.id, task.to_json())

    def _next_sequence(self) -> int:
        seq = int(self.store.get_store(SEQUENCE_KEY) or 0) + 1
        self.store.set_store(SEQUENCE_KEY, str(seq))
        return seq

    def _prune(self) -> None:
        done = sorted((t for t in self.tasks.values() if not t.active),
                      key=lambda t: t.sequence)
        for task in done[:max(0, len(done) - self.keep_finished)]:
            del self.tasks[task.id]
            self.store.set_store(TASK_PREFIX + task.id, None)

    # -- queries -----------------------------------------------------------
    def list(self) -> List[Task]:
        with self.cv:
            return sorted(self.tasks.values(), key=lambda t: t.sequence)

    def get(self, task_id: str) -> Task:
        with self.cv:
            try:
                return self.tasks[task_id]
            except KeyError:
                raise NotFound(f"task '{task_id}' does not exist; list tasks "
                               'with ceph rbd migration task list') from None

    def active_for(self, image_key: str) -> Optional[Task]:
        with self.cv:
            for task in self.list():
                if task.image_key == image_key and task.active:
                    return task
        return None

    def latest_for(self, image_key: str) -> Optional[Task]:
        with self.cv:
            tasks = [t for t in self.tasks.values() if t.image_key == image_key]
        return max(tasks, key=lambda t: t.sequence) if tasks else None

    # -- changes -----------------------------------------------------------
    def submit(self, action: str, pool_id: int, pool: str, namespace: str,
               image_id: str, image_name: str, message: str,
               options: Optional[Dict[str, Any]] = None) -> Tuple[Task, bool]:
        """Queue a task, or return the active one for the same action and
        image (False as second value), so that repeating a command is safe."""
        with self.cv:
            key = ImageRef(pool_id, pool, namespace, image_name, image_id).key
            for task in self.tasks.values():
                if task.image_key == key and task.active and task.action == action:
                    return task, False
            seq = self._next_sequence()
            task = Task(id=str(seq), action=TaskAction(action), pool_id=pool_id, pool=pool,
                        namespace=namespace, image_id=image_id,
                        image_name=image_name, sequence=seq, message=message,
                        options=dict(options or {}), created=self.clock())
            for old in self.tasks.values():
                if old.image_key == key and old.state == FAILED and not old.superseded:
                    old.superseded = True
                    self._save(old)
            self._save(task)
            self.tasks[task.id] = task
            self._prune()
            self.cv.notify_all()
        self.events.changed(self.list())
        return task, True

    def cancel(self, task_id: str) -> Task:
        ended = False
        with self.cv:
            task = self.get(task_id)
            if task.state in (QUEUED, RETRYING):
                self._finish(task, CANCELLED, 'cancelled by request')
                ended = True
            elif task.state == RUNNING:
                task.cancel_requested = True
                self._save(task)
                self.stop_event(task.id).set()
        if ended:  # a running task reports its own end
            self._emit(self.events.finished, task)
        self.events.changed(self.list())
        return task

    def stop_event(self, task_id: str) -> threading.Event:
        """The event that ends a running task's source reads when it must
        stop; the runner hands it to its streams."""
        with self.cv:
            return self._stops.setdefault(task_id, threading.Event())

    def _finish(self, task: Task, state: TaskState, error: Optional[str] = None,
                code: Optional[int] = None) -> None:
        task.state = state
        task.finished = self.clock()
        task.next_attempt = None
        task.stalled = None
        if error is not None:
            task.last_error, task.errno = error, code
        self._save(task)
        (log.info if state == COMPLETED else log.warning)(
            'task %s %s %s: %s%s', task.id, task.action, task.image_spec, state,
            f': {error}' if error else '')
        self.cv.notify_all()

    # -- scheduling --------------------------------------------------------
    def run(self, stop: threading.Event, tick: float = 1.0,
            before: Callable[[], None] = lambda: None) -> None:
        """The scheduler loop; returns when ``stop`` is set.  ``before``
        runs at the start of every pass (the batch driver)."""
        while not stop.is_set():
            self._emit(before)
            self.run_pass()
            with self.cv:
                self.cv.wait(tick)
        self.shutdown()

    def run_pass(self) -> None:
        """One scheduling pass: start, pause and watch tasks under one
        snapshot of the options, read once."""
        settings = self.settings()
        self.schedule(settings)
        self.check_pauses(settings)
        self.check_stalls(settings)

    def check_stalls(self, settings: Optional[Settings] = None) -> None:
        """Mark running tasks that have not moved for ``stall_warning_after``
        seconds as stalled, with the reason ``diagnose`` finds (a full
        target pool makes librbd's writes wait without a word).  A task is
        never stopped for it: it goes on by itself once the cause is gone."""
        limit = (settings or self.settings()).stall_warning_after
        if limit <= 0:
            return
        now = self.clock()
        with self.cv:
            idle = [t for t in self.tasks.values() if t.state == RUNNING
                    and now - (t.moved or t.started or now) >= limit]
        changed = False
        for task in idle:
            try:
                reason = self.diagnose(task) or 'no progress'
            except Exception:
                log.warning('diagnosing task %s failed: %s', task.id, traceback.format_exc())
                reason = 'no progress'
            with self.cv:
                if task.state == RUNNING and task.stalled != reason:
                    task.stalled = reason
                    self._save(task)
                    changed = True
        if changed:
            self._emit(self.events.changed, self.list())

    def schedule(self, settings: Optional[Settings] = None) -> None:
        """Start every task that may run now (under ``settings``, read now
        when not given)."""
        s = settings or self.settings()
        now = self.clock()
        with self.cv:
            if self.stopping:
                return
            running = [t for t in self.tasks.values() if t.state == RUNNING]
            busy = {t.image_key for t in running}
            slots = s.max_concurrent_tasks - len(running)
            waiting: Dict[str, str] = {}
            for task in self.list():
                if task.image_key in busy:
                    continue
                if task.state == RETRYING and (task.next_attempt or 0) > now:
                    busy.add(task.image_key)  # keep the image's order
                    continue
                if task.state not in (QUEUED, RETRYING):
                    continue
                if slots <= 0:
                    waiting[task.id] = (f'{len(running)} task(s) running '
                                        f'(max_concurrent_tasks {s.max_concurrent_tasks})')
                    continue
                reason = self._gate(task, running, s)
                if reason:
                    waiting[task.id] = reason
                    busy.add(task.image_key)
                    continue
                busy.add(task.image_key)
                slots -= 1
                self._start(task)
                running.append(task)
            self.waiting = waiting

    def _gate(self, task: Task, running: List[Task], settings: Settings) -> Optional[str]:
        try:
            return self.gate(task, running, settings)
        except MigrationError as e:  # a bad option value: say so, start nothing heavy
            return str(e)

    def running_tasks(self) -> List[Task]:
        with self.cv:
            return [t for t in self.tasks.values() if t.state == RUNNING]

    def check_pauses(self, settings: Optional[Settings] = None) -> None:
        """Ask running tasks that must pause (the execute window closed) to
        stop at their next step; they go back to the queue, not to failed."""
        s = settings or self.settings()
        with self.cv:
            for task in self.tasks.values():
                if task.state != RUNNING or task.id in self._paused:
                    continue
                try:
                    stop = self.pause(task, s)
                except MigrationError:
                    stop = False
                if stop:
                    self._paused.add(task.id)
                    self._stops.setdefault(task.id, threading.Event()).set()

    def _start(self, task: Task) -> None:
        task.state = RUNNING
        task.attempts += 1
        task.started = task.moved = self.clock()
        task.next_attempt = None
        task.stalled = None
        self._save(task)
        log.info('task %s %s %s: attempt %d started', task.id, task.action,
                 task.image_spec, task.attempts)
        thread = threading.Thread(target=self._work, args=(task,),
                                  name=f'rbd_migration task {task.id}', daemon=True)
        self._threads[task.id] = thread
        thread.start()

    def _emit(self, hook: Callable[..., None], *args: Any) -> None:
        """Progress and health are reports about tasks, never a reason for a
        task to stop or wedge: a failing hook is logged and ignored."""
        try:
            hook(*args)
        except Exception:
            log.warning('event hook %s failed: %s', getattr(hook, '__name__', hook),
                        traceback.format_exc())

    def _work(self, task: Task) -> None:
        self._emit(self.events.started, task)
        self._emit(self.events.changed, self.list())

        def report(done: int, total: int) -> bool:
            progress = done / total if total else 0.0
            if progress != task.progress or task.stalled:
                task.moved = self.clock()
            task.progress = progress
            if task.stalled:
                with self.cv:
                    task.stalled = None
                    self._save(task)
                self._emit(self.events.changed, self.list())
            self._emit(self.events.progress, task)
            return (not task.cancel_requested and task.id not in self._paused
                    and not self.stopping)

        try:
            result = self.runner(task, report)
        except MigrationError as e:
            self._failed(task, e)
        except Exception as e:  # a bug: fail this task, keep the queue alive
            log.error('task %s crashed: %s', task.id, traceback.format_exc())
            self._failed(task, MigrationError(f'internal error: {type(e).__name__}: {e}'))
        else:
            with self.cv:
                task.progress = 1.0
                task.last_error = None
                task.result = dict(result or {})
                self._finish(task, COMPLETED)
        finally:
            with self.cv:
                self._paused.discard(task.id)
                self._stops.pop(task.id, None)
                self._threads.pop(task.id, None)
                self._prune()
                self.cv.notify_all()
            self._emit(self.events.finished, task)
            self._emit(self.events.changed, self.list())

    def _failed(self, task: Task, e: MigrationError) -> None:
        policy = self.settings().retry_policy
        with self.cv:
            if task.cancel_requested:
                self._finish(task, CANCELLED, 'cancelled by request')
            elif (self.stopping or task.id in self._paused) and isinstance(e, Cancelled):
                # The mgr is going away, or the execute window closed: the
                # task waits in the queue and resumes from its checkpoint.
                task.state = QUEUED
                task.attempts -= 1
                self._save(task)
            elif e.transient and task.attempts < policy.max_attempts:
                task.state = RETRYING
                task.last_error, task.errno = str(e), e.errno
                task.next_attempt = self.clock() + policy.delay(task.attempts)
                self._save(task)
                log.info('task %s %s %s: attempt %d failed, retrying in %.0f s: %s',
                         task.id, task.action, task.image_spec, task.attempts,
                         task.next_attempt - self.clock(), e)
            else:
                self._finish(task, FAILED, str(e), e.errno)

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop running tasks at their next progress report, leaving them
        queued for the next mgr.  False if one still runs after ``timeout``
        (librbd's own execute does not stop half-way)."""
        with self.cv:
            self.stopping = True
            for event in self._stops.values():
                event.set()
            threads = list(self._threads.values())
            self.cv.notify_all()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)
