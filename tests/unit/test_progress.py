"""Progress events: one per task for its whole life, as ``ceph progress``,
``ceph -s`` and the dashboard show them.

The remote records every call and replays it the way the mgr's progress
module (``/usr/share/ceph/mgr/progress/module.py``) treats it: ``update``
opens an event or changes it, ``complete`` and ``fail`` move an open event
to the completed list and ignore an unknown one.  So each test can say both
which calls were made and what an operator would see.
"""
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from rbd_migration.errors import InvalidArgument, SourceUnreachable
from rbd_migration.progress import ProgressEvents, event_message, failure_text
from rbd_migration.settings import Settings
from rbd_migration.tasks import (CANCELLED, COMPLETED, FAILED, QUEUED, RETRYING,
                                 RUNNING, Task, TaskAction, TaskQueue,
                                 TaskState)

Call = Tuple[str, Tuple[Any, ...], Dict[str, Any]]
MESSAGE = 'Importing raw over http http://127.0.0.1:8080/disk.raw into rbd/x'


class ProgressRemote:
    """``MgrModule.remote`` for the progress module: records, and replays."""

    def __init__(self, fail_with: Optional[BaseException] = None) -> None:
        self.calls: List[Call] = []
        self.fail_with = fail_with
        self.events: Dict[str, Dict[str, Any]] = {}
        self.completed: List[Dict[str, Any]] = []

    def __call__(self, module: str, method: str, *args: Any, **kwargs: Any) -> None:
        assert module == 'progress'
        self.calls.append((method, args, kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        getattr(self, '_' + method)(*args, **kwargs)

    def _update(self, ev_id: str, message: str, progress: float,
                refs: Optional[Dict[str, Any]] = None, add_to_ceph_s: bool = False) -> None:
        event = self.events.setdefault(ev_id, {'id': ev_id, 'refs': refs,
                                               'add_to_ceph_s': add_to_ceph_s})
        event.update(message=message, progress=progress)

    def _complete(self, ev_id: str) -> None:
        event = self.events.pop(ev_id, None)
        if event is not None:
            self.completed.append(dict(event, progress=1.0))

    def _fail(self, ev_id: str, message: str) -> None:
        event = self.events.pop(ev_id, None)
        if event is not None:
            self.completed.append(dict(event, progress=1.0, failed=True,
                                       failure_message=message))

    def methods(self) -> List[str]:
        return [method for method, _, _ in self.calls]

    def messages(self) -> List[str]:
        return [args[1] for method, args, _ in self.calls if method in ('update', 'fail')]


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def task(id: str = '7', state: str = QUEUED, namespace: str = '', **kwargs: Any) -> Task:
    return Task(id=id, action=TaskAction.EXECUTE, pool_id=1, pool='rbd', namespace=namespace,
                image_id=f'id-{id}', image_name='x', sequence=int(id),
                message=MESSAGE, state=TaskState(state), **kwargs)


def run(t: Task, clock: Clock, progress: float = 0.1) -> None:
    """What the queue does to a task that starts a run."""
    t.state, t.attempts, t.started = RUNNING, t.attempts + 1, clock.now
    t.progress = progress


def events(max_attempts: int = 8, since: float = 0.0,
           remote: Optional[ProgressRemote] = None) -> Tuple[ProgressEvents, ProgressRemote, Clock]:
    remote = remote or ProgressRemote()
    clock = Clock()
    return (ProgressEvents(remote, clock=clock, max_attempts=lambda: max_attempts,
                           since=since), remote, clock)


# -- one task's life ------------------------------------------------------------

def test_a_run_opens_the_event_without_a_percentage() -> None:
    ev, remote, clock = events()
    t = task(namespace='ns')
    run(t, clock, 0.27)
    ev.started(t)
    assert remote.calls == [('update', ('rbd_migration/task/7', MESSAGE, 0.27),
                             {'refs': {'origin': 'rbd_migration', 'action': 'execute',
                                       'task_id': '7', 'pool_id': 1, 'pool_namespace': 'ns',
                                       'image_id': 'id-7'},
                              'add_to_ceph_s': True})]
    assert ProgressEvents.event_id(t) == 'rbd_migration/task/7'


def test_progress_is_throttled_per_task_and_carries_the_fraction_only() -> None:
    ev, remote, clock = events()
    a, b = task('1'), task('2')
    run(a, clock, 0.0)
    ev.started(a)
    clock.now += 0.5
    run(b, clock, 0.0)
    ev.started(b)
    for step in range(1, 9):                   # 0.25 s apart, 2 s in all
        clock.now += 0.25
        a.progress = b.progress = step / 8
        ev.progress(a)
        ev.progress(b)
    updates = [(args[0], args[2]) for m, args, _ in remote.calls if m == 'update']
    assert updates == [
        ('rbd_migration/task/1', 0.0), ('rbd_migration/task/2', 0.0),
        ('rbd_migration/task/1', 0.25), ('rbd_migration/task/2', 0.5),
        ('rbd_migration/task/1', 0.75), ('rbd_migration/task/2', 1.0)]
    assert set(remote.messages()) == {MESSAGE}


def test_waiting_to_retry_keeps_the_event_open_and_says_so() -> None:
    """The operator saw green completions while the task waited at 10%."""
    ev, remote, clock = events(max_attempts=8)
    t = task()
    for attempt in (1, 2):
        run(t, clock, 0.1)
        ev.started(t)
        t.state, t.last_error = RETRYING, 'connection refused'
        ev.finished(t)
        assert remote.completed == []
        assert remote.events['rbd_migration/task/7'] == {
            'id': 'rbd_migration/task/7', 'refs': ev._refs(t), 'add_to_ceph_s': True,
            'message': f'{MESSAGE}: waiting to retry, attempt {attempt + 1}/8: '
                       'connection refused',
            'progress': 0.1}
    run(t, clock, 0.5)
    ev.started(t)
    assert remote.events['rbd_migration/task/7']['message'] == MESSAGE
    t.state, t.progress, t.last_error = COMPLETED, 1.0, None
    ev.finished(t)
    assert remote.events == {}
    assert remote.completed == [{'id': 'rbd_migration/task/7', 'refs': ev._refs(t),
                                 'add_to_ceph_s': True, 'message': MESSAGE,
                                 'progress': 1.0}]
    assert 'complete' == remote.methods()[-1] and remote.methods().count('complete') == 1


def test_an_unknown_retry_limit_leaves_the_total_out() -> None:
    t = task(state=RETRYING, attempts=2, last_error='HTTP 503')
    assert event_message(t, 0) == f'{MESSAGE}: waiting to retry, attempt 3: HTTP 503'
    assert event_message(t, 8) == f'{MESSAGE}: waiting to retry, attempt 3/8: HTTP 503'


def test_a_failure_fails_the_event_with_the_whole_story() -> None:
    ev, remote, clock = events()
    t = task()
    run(t, clock, 0.27)
    ev.started(t)
    t.state, t.last_error = FAILED, 'HTTP 404 Not Found from http://127.0.0.1:8080/disk.raw'
    ev.finished(t)
    assert remote.methods() == ['update', 'update', 'fail']
    [done] = remote.completed
    assert done['failed'] and done['message'] == MESSAGE
    assert done['failure_message'] == (
        f'{MESSAGE}: failed (task 7): HTTP 404 Not Found from http://127.0.0.1:8080/disk.raw')
    assert '%' not in done['message'] + done['failure_message']


def test_a_failure_after_retries_counts_them() -> None:
    t = task(state=FAILED, attempts=8, last_error='connection refused')
    assert failure_text(t) == f'{MESSAGE}: failed after 8 attempts (task 7): connection refused'


@pytest.mark.parametrize('before', [RUNNING, RETRYING, QUEUED])
def test_a_cancel_fails_the_event_saying_cancelled(before: str) -> None:
    """Running, waiting to retry, or queued to resume after a pause."""
    ev, remote, clock = events()
    t = task()
    run(t, clock, 0.4)
    ev.started(t)
    if before != RUNNING:
        t.state, t.last_error = TaskState(before), 'HTTP 503'
        ev.finished(t)
    t.state, t.last_error = CANCELLED, 'cancelled by request'
    ev.finished(t)
    assert remote.events == {}
    [done] = remote.completed
    assert done['failed'] and done['message'] == MESSAGE
    assert done['failure_message'] == f'{MESSAGE}: cancelled by request (task 7)'


def test_a_task_cancelled_before_it_ever_ran_has_no_event() -> None:
    ev, remote, _ = events()
    t = task(state=CANCELLED, last_error='cancelled by request')
    ev.finished(t)
    ev.sync([t])
    assert remote.calls == []


def test_a_pause_keeps_the_event_open_as_queued() -> None:
    ev, remote, clock = events()
    t = task()
    run(t, clock, 0.6)
    ev.started(t)
    t.state, t.attempts = QUEUED, 0          # the queue takes the paused attempt back
    ev.finished(t)
    assert remote.events['rbd_migration/task/7']['message'] == f'{MESSAGE}: queued to resume'
    assert remote.completed == []


def test_no_update_after_the_end_opens_the_event_again() -> None:
    ev, remote, clock = events()
    t = task()
    run(t, clock)
    ev.started(t)
    t.state = COMPLETED
    ev.finished(t)
    clock.now += 5
    ev.progress(t)
    ev.finished(t)
    ev.sync([t])
    assert remote.events == {} and len(remote.completed) == 1


def test_a_stalled_run_says_why_once() -> None:
    ev, remote, clock = events()
    t = task()
    run(t, clock, 0.41)
    ev.started(t)
    t.stalled = 'pool rbd2 reached its quota'
    ev.sync([t])
    ev.sync([t])
    assert remote.messages() == [MESSAGE, f'{MESSAGE}: stalled: pool rbd2 reached its quota']
    t.stalled = None
    clock.now += 1
    ev.progress(t)
    assert remote.events['rbd_migration/task/7']['message'] == MESSAGE


# -- a restarted mgr ---------------------------------------------------------------

def test_a_restarted_mgr_opens_the_same_events_again() -> None:
    """The progress module forgets open events with its mgr; the queue's
    load hands every task to ``changed``."""
    ev, remote, _ = events(max_attempts=8, since=500.0)
    waiting = task('1', state=RETRYING, attempts=2, started=400.0, progress=0.1,
                   last_error='connection refused')
    resumed = task('2', state=QUEUED, attempts=1, started=450.0, progress=0.3)
    fresh = task('3', state=QUEUED)
    done = task('4', state=COMPLETED, attempts=1, started=10.0, finished=20.0)
    failed = task('5', state=FAILED, attempts=1, started=10.0, finished=30.0,
                  last_error='gone')
    assert ev.sync([waiting, resumed, fresh, done, failed])
    assert remote.events == {
        'rbd_migration/task/1': {
            'id': 'rbd_migration/task/1', 'refs': ev._refs(waiting), 'add_to_ceph_s': True,
            'message': f'{MESSAGE}: waiting to retry, attempt 3/8: connection refused',
            'progress': 0.1},
        'rbd_migration/task/2': {
            'id': 'rbd_migration/task/2', 'refs': ev._refs(resumed), 'add_to_ceph_s': True,
            'message': f'{MESSAGE}: queued to resume', 'progress': 0.3}}
    assert remote.completed == []
    assert ev.open_events() == ['rbd_migration/task/1', 'rbd_migration/task/2']
    calls = len(remote.calls)
    assert ev.sync([waiting, resumed, fresh, done, failed])   # nothing new: no call
    assert len(remote.calls) == calls


def test_a_task_cancelled_across_a_failover_ends_its_event() -> None:
    """Cancelled just before the mgr went away: the queue's load ends it,
    and ``changed`` reports the end the old mgr never did."""
    ev, remote, _ = events(since=500.0)
    t = task(state=CANCELLED, attempts=1, started=400.0, finished=501.0,
             last_error='cancelled by request', progress=0.2)
    ev.sync([t])
    ev.sync([t])
    [done] = remote.completed
    assert done['failed'] and 'cancelled' in done['failure_message']


def test_the_progress_module_not_ready_yet_is_tried_again() -> None:
    remote = ProgressRemote(fail_with=ImportError('progress is not loaded'))
    ev, _, _ = events(remote=remote, since=500.0)
    t = task(state=RETRYING, attempts=1, started=400.0, last_error='HTTP 503')
    assert not ev.sync([t])
    remote.fail_with = None
    assert ev.sync([t])
    assert list(remote.events) == ['rbd_migration/task/7']


def test_a_failing_progress_module_does_not_break_the_task() -> None:
    """MgrModule.remote turns any error of the progress module into a
    RuntimeError; a progress event is not worth failing a migration for."""
    ev, remote, clock = events(remote=ProgressRemote(RuntimeError('KeyError in progress')))
    t = task()
    run(t, clock)
    ev.started(t)
    clock.now += 5
    ev.progress(t)
    t.state = COMPLETED
    ev.finished(t)
    assert remote.methods() == ['update', 'update', 'update', 'complete']


def test_other_errors_of_remote_are_not_hidden() -> None:
    ev, _, clock = events(remote=ProgressRemote(TypeError('a bug of ours')))
    t = task()
    run(t, clock)
    with pytest.raises(TypeError):
        ev.started(t)


def test_a_batch_event_carries_its_fraction_only_in_the_progress_field() -> None:
    ev, remote, _ = events()
    ev.batch('b1', 0.5, 'Migrating batch b1 from rbd to rbd2 (1/2 images)')
    ev.batch('b1', None, 'Migrating batch b1 from rbd to rbd2 (2/2 images)')
    assert remote.calls[0][1] == ('rbd_migration/batch/b1',
                                  'Migrating batch b1 from rbd to rbd2 (1/2 images)', 0.5)
    assert remote.completed[0]['message'] == 'Migrating batch b1 from rbd to rbd2 (2/2 images)'


# -- through the real queue ------------------------------------------------------------

class MemStore:
    def __init__(self) -> None:
        self.data: Dict[str, str] = {}

    def get_store(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.data.get(key, default)

    def set_store(self, key: str, val: Optional[str]) -> None:
        if val is None:
            self.data.pop(key, None)
        else:
            self.data[key] = val

    def get_store_prefix(self, prefix: str) -> Dict[str, str]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}


class QueueEvents:
    """The queue's Events, as ModuleEvents passes them on; each run's end
    is signalled so that the test waits for it, never for a time."""

    def __init__(self, progress: ProgressEvents) -> None:
        self.p = progress
        self.ends = threading.Semaphore(0)

    def started(self, task: Task) -> None:
        self.p.started(task)

    def progress(self, task: Task) -> None:
        self.p.progress(task)

    def finished(self, task: Task) -> None:
        self.p.finished(task)
        self.ends.release()

    def changed(self, tasks: List[Task]) -> None:
        self.p.sync(tasks)


Outcome = Callable[[Task], None]


def _queue(outcomes: List[Outcome], store: Optional[MemStore] = None,
           since: float = 0.0) -> Tuple[TaskQueue, QueueEvents, ProgressRemote]:
    remote = ProgressRemote()
    progress = ProgressEvents(remote, max_attempts=lambda: 4, since=since)
    qe = QueueEvents(progress)

    def runner(t: Task, report: Callable[[int, int], bool]) -> Optional[Dict[str, Any]]:
        report(1, 10)
        outcomes.pop(0)(t)
        return None
    q = TaskQueue(store or MemStore(), runner, qe, settings=lambda: Settings(
        max_concurrent_tasks=1, retry_max_attempts=4, retry_backoff=0.0, retry_max_backoff=0.0))
    return q, qe, remote


def _one_run(q: TaskQueue, qe: QueueEvents) -> None:
    q.schedule()
    assert qe.ends.acquire(timeout=5), 'the run did not end'


def refuse(t: Task) -> None:
    raise SourceUnreachable('connection refused')


def succeed(t: Task) -> None:
    pass


def test_retries_then_success_through_the_queue() -> None:
    q, qe, remote = _queue([refuse, refuse, succeed])
    t, _ = q.submit('execute', 1, 'rbd', '', 'id-x', 'x', MESSAGE)
    for attempt in (1, 2):
        _one_run(q, qe)
        assert t.state == RETRYING and remote.completed == []
        assert remote.events[f'rbd_migration/task/{t.id}']['message'] == \
            f'{MESSAGE}: waiting to retry, attempt {attempt + 1}/4: connection refused'
    _one_run(q, qe)
    assert t.state == COMPLETED and remote.events == {}
    assert [(e['id'], e.get('failed', False)) for e in remote.completed] == \
        [(f'rbd_migration/task/{t.id}', False)]
    assert not any('%' in m for m in remote.messages())


def test_cancel_while_waiting_to_retry_through_the_queue() -> None:
    q, qe, remote = _queue([refuse])
    t, _ = q.submit('execute', 1, 'rbd', '', 'id-x', 'x', MESSAGE)
    _one_run(q, qe)
    q.cancel(t.id)
    assert t.state == CANCELLED
    [done] = remote.completed
    assert done['failed'] and done['failure_message'] == \
        f'{MESSAGE}: cancelled by request (task {t.id})'


def test_a_permanent_failure_through_the_queue() -> None:
    def bad(t: Task) -> None:
        raise InvalidArgument('the source is 3 bytes, not a whole sector')
    q, qe, remote = _queue([refuse, bad])
    t, _ = q.submit('execute', 1, 'rbd', '', 'id-x', 'x', MESSAGE)
    _one_run(q, qe)
    _one_run(q, qe)
    [done] = remote.completed
    assert done['failed'] and done['failure_message'] == (
        f'{MESSAGE}: failed after 2 attempts (task {t.id}): '
        'the source is 3 bytes, not a whole sector')


def test_the_queue_loaded_by_a_new_mgr_opens_the_events_again() -> None:
    store = MemStore()
    q, qe, _ = _queue([refuse], store)
    waiting, _ = q.submit('execute', 1, 'rbd', '', 'id-x', 'x', MESSAGE)
    _one_run(q, qe)
    cancelled, _ = q.submit('execute', 1, 'rbd', '', 'id-y', 'y', MESSAGE)
    running = q.tasks[cancelled.id]
    running.state, running.attempts, running.started = RUNNING, 1, time.time()
    running.cancel_requested = True           # asked to stop; the mgr died first
    q._save(running)
    again, qe2, remote2 = _queue([], store, since=time.time())
    again.load()
    assert list(remote2.events) == [f'rbd_migration/task/{waiting.id}']
    assert 'waiting to retry, attempt 2/4' in \
        remote2.events[f'rbd_migration/task/{waiting.id}']['message']
    [done] = remote2.completed
    assert done['id'] == f'rbd_migration/task/{cancelled.id}' and done['failed']

