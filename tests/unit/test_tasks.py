"""TaskQueue: persistence, idempotent submit, scheduling, retries, cancel,
restart and shutdown, pruning.

Runners are driven step by step from the test through an inbox, so every
test decides exactly when a task reports progress, returns or raises; no
test depends on how fast a thread happens to run.  ``schedule()`` is called
directly instead of the ``run()`` loop, and time is a fake clock.
"""
import errno
import json
import threading
import time
from typing import List

import pytest

from rbd_migration.errors import (Cancelled, InvalidArgument, NotFound,
                                  SourceUnreachable)
from rbd_migration.tasks import (CANCELLED, COMPLETED, FAILED, QUEUED,
                                 RETRYING, RUNNING, SEQUENCE_KEY, TASK_PREFIX,
                                 TASK_RECORD_VERSION, Task, TaskAction,
                                 TaskQueue, TaskState)
from rbd_migration.settings import RetryPolicy, Settings
from tests.queueharness import (TIMEOUT, ControlledRunner, FakeClock, Harness, MemStore,
                                Recorder, make_harness, new_harness)

def assert_persisted(h: Harness, task: Task) -> None:
    """What the store says equals what the queue holds."""
    stored = h.store.task(task.id)
    for key in ('state', 'attempts', 'last_error', 'errno', 'next_attempt',
                'superseded', 'finished', 'sequence', 'action', 'image_id'):
        assert stored[key] == getattr(task, key), key


# -- Task and RetryPolicy -------------------------------------------------------

def test_task_spec_key_and_dict() -> None:
    task = Task(id='7', action=TaskAction.EXECUTE, pool_id=3, pool='p', namespace='ns',
                image_id='abc', image_name='img', sequence=7, message='m')
    assert task.image_spec == 'p/ns/img'
    assert task.image_key == '3/ns/abc'
    assert task.active and task.state == QUEUED
    d = task.to_dict()
    assert d['image_spec'] == 'p/ns/img' and d['id'] == '7'
    task.namespace = ''
    assert task.image_spec == 'p/img'
    for state, active in ((RUNNING, True), (RETRYING, True), (COMPLETED, False),
                          (FAILED, False), (CANCELLED, False)):
        task.state = state
        assert task.active is active


def test_task_from_json_ignores_unknown_fields() -> None:
    data = {'id': '1', 'action': 'abort', 'pool_id': 1, 'pool': 'rbd',
            'namespace': '', 'image_id': 'x', 'image_name': 'a', 'sequence': 1,
            'message': 'm', 'state': FAILED, 'from_a_newer_version': True,
            'image_spec': 'rbd/a'}
    task = Task.from_json(json.dumps(data))
    assert task.state == FAILED and task.action == 'abort'


V1_RECORD = {'id': '4', 'action': 'execute', 'pool_id': 2, 'pool': 'rbd2', 'namespace': '',
             'image_id': 'abc', 'image_name': 'img', 'sequence': 4,
             'message': 'Migrating image rbd/img to rbd2/img', 'options': {},
             'state': 'running', 'attempts': 1, 'last_error': None, 'errno': None,
             'progress': 0.5, 'created': 1.0, 'started': 2.0, 'finished': None,
             'next_attempt': None, 'superseded': False, 'result': {}, 'moved': 2.5,
             'stalled': None}


def test_a_version_1_record_is_upgraded_as_it_is_read() -> None:
    """Records written before cancels were kept (no version, no
    cancel_requested) load as running and not asked to stop, and are
    written back in this layout."""
    task = Task.from_json(json.dumps(V1_RECORD))
    assert (task.version, task.cancel_requested) == (TASK_RECORD_VERSION, False)
    assert task.state is TaskState.RUNNING and task.action is TaskAction.EXECUTE
    again = json.loads(json.dumps(task.to_dict()))
    assert again['version'] == TASK_RECORD_VERSION and again['state'] == 'running'
    assert {k: again[k] for k in V1_RECORD} == V1_RECORD


def test_a_record_from_a_newer_layout_is_refused() -> None:
    with pytest.raises(ValueError, match='newer than this module knows'):
        Task.from_json(json.dumps(dict(V1_RECORD, version=TASK_RECORD_VERSION + 1)))


def test_states_are_stored_and_shown_as_their_values() -> None:
    assert json.dumps({'s': RETRYING}) == '{"s": "waiting to retry"}'
    assert f'{RETRYING}' == 'waiting to retry' and RETRYING == 'waiting to retry'
    with pytest.raises(ValueError):
        Task.from_json(json.dumps(dict(V1_RECORD, state='sleeping')))


@pytest.mark.parametrize('attempts, delay', [
    (0, 10.0), (1, 10.0), (2, 20.0), (3, 25.0), (10, 25.0)])
def test_retry_delay_doubles_and_is_capped(attempts: int, delay: float) -> None:
    assert RetryPolicy(max_attempts=5, backoff=10.0, max_backoff=25.0).delay(attempts) == delay


def test_retry_policy_defaults() -> None:
    p = RetryPolicy()
    assert (p.max_attempts, p.backoff, p.max_backoff) == (8, 5.0, 300.0)
    assert p.delay(1) == 5.0 and p.delay(7) == 300.0
    assert isinstance(RetryPolicy(backoff=1, max_backoff=100).delay(3), float)


# -- submit -------------------------------------------------------------------

def test_submit_persists_a_queued_task(h: Harness) -> None:
    task = h.submit('a')
    assert (task.id, task.sequence, task.state, task.attempts) == ('1', 1, QUEUED, 0)
    assert task.created == h.clock.now
    assert task.options == {'n': 1}
    assert h.store.task('1')['state'] == QUEUED
    assert h.store.task('1')['options'] == {'n': 1}
    assert h.store.get_store(SEQUENCE_KEY) == '1'
    assert h.events.snapshots[-1] == [('1', QUEUED)]
    assert h.queue.get('1') is task
    assert h.runner.started_ids() == []  # submit alone runs nothing


def test_submit_copies_options(h: Harness) -> None:
    options = {'force': True}
    task, _ = h.queue.submit('commit', 1, 'rbd', '', 'x', 'x', 'm', options)
    options['force'] = False
    assert task.options == {'force': True}


def test_submit_same_action_and_image_while_active_returns_same_task(h: Harness) -> None:
    first = h.submit('a')
    again, created = h.submit2('a')
    assert again is first and not created
    assert h.store.task_ids() == ['1']
    assert h.store.get_store(SEQUENCE_KEY) == '1'

    call = h.start(first)                      # running: still the same task
    again, created = h.submit2('a')
    assert again is first and not created
    call.fail(SourceUnreachable('flaky'))      # waiting to retry: still active
    assert first.state == RETRYING
    again, created = h.submit2('a')
    assert again is first and not created


def test_submit_other_action_namespace_or_pool_is_a_new_task(h: Harness) -> None:
    execute = h.submit('a')
    ids = {execute.id,
           h.submit('a', action='abort').id,
           h.submit('b').id,
           h.submit('a', namespace='ns').id,
           h.submit('a', pool_id=2).id}
    assert len(ids) == 5
    assert [t.sequence for t in h.queue.list()] == [1, 2, 3, 4, 5]


def test_submit_after_completion_is_a_new_task(h: Harness) -> None:
    first = h.submit('a')
    h.start(first).finish()
    assert first.state == COMPLETED
    second, created = h.submit2('a')
    assert created and second is not first
    assert (second.id, second.sequence, second.state) == ('2', 2, QUEUED)
    assert h.store.task('1')['state'] == COMPLETED


def test_sequence_survives_a_new_queue_on_the_same_store(harnesses: List[Harness]) -> None:
    store = MemStore()
    one = new_harness(harnesses, store=store)
    one.submit('a')
    one.submit('b')
    two = new_harness(harnesses, store=store)
    two.queue.load()
    assert [t.id for t in two.queue.list()] == ['1', '2']
    assert two.submit('c').sequence == 3
    # Even without load(), the sequence comes from the store, not memory.
    three = new_harness(harnesses, store=store)
    assert three.submit('d').id == '4'
    assert store.get_store(SEQUENCE_KEY) == '4'


# -- get / queries ----------------------------------------------------------------

def test_get_unknown_task_is_not_found(h: Harness) -> None:
    with pytest.raises(NotFound, match="task '42' does not exist"):
        h.queue.get('42')
    with pytest.raises(NotFound):
        h.queue.cancel('42')


def test_active_for_and_latest_for(h: Harness) -> None:
    first = h.submit('a')
    assert h.queue.active_for(first.image_key) is first
    h.start(first).fail(InvalidArgument('no'))
    assert h.queue.active_for(first.image_key) is None
    assert h.queue.latest_for(first.image_key) is first
    second = h.submit('a', action='abort')
    assert h.queue.active_for(first.image_key) is second
    assert h.queue.latest_for(first.image_key) is second
    assert h.queue.latest_for('9/x/y') is None


# -- load ---------------------------------------------------------------------

def test_load_requeues_running_tasks_and_keeps_attempts(harnesses: List[Harness]) -> None:
    store = MemStore()
    old = new_harness(harnesses, store=store)
    running = old.submit('a')
    retrying = old.submit('b')
    done = old.submit('c')
    old.start(running)
    old.start(retrying).fail(SourceUnreachable('503'))
    old.limit[0] = 3
    old.start(done).finish()
    assert (running.state, retrying.state, done.state) == (RUNNING, RETRYING, COMPLETED)
    # The mgr dies here: nothing more is written for the running task.

    new = new_harness(harnesses, store=store, clock=FakeClock(old.clock.now + 5))
    new.queue.load()
    by_id = {t.id: t for t in new.queue.list()}
    assert by_id['1'].state == QUEUED and by_id['1'].attempts == 1
    assert store.task('1')['state'] == QUEUED
    assert by_id['2'].state == RETRYING and by_id['2'].attempts == 1
    assert by_id['2'].next_attempt == retrying.next_attempt
    assert by_id['2'].last_error == '503' and by_id['2'].errno == errno.EIO
    assert by_id['3'].state == COMPLETED
    assert new.events.snapshots[-1] == [('1', QUEUED), ('2', RETRYING), ('3', COMPLETED)]

    call = new.start(by_id['1'])
    assert call.task.attempts == 2               # the interrupted one counted
    assert new.runner.started_ids() == ['1']     # '2' is not due for 5 more s
    call.finish()
    assert by_id['1'].state == COMPLETED


def test_load_drops_unreadable_tasks(h: Harness) -> None:
    good = Task(id='1', action=TaskAction.EXECUTE, pool_id=1, pool='rbd', namespace='',
                image_id='x', image_name='x', sequence=1, message='m')
    h.store.set_store(TASK_PREFIX + '1', json.dumps(good.to_dict()))
    h.store.set_store(TASK_PREFIX + '2', '{not json')
    h.store.set_store(TASK_PREFIX + '3', json.dumps({'id': '3'}))   # fields missing
    h.store.set_store(TASK_PREFIX + '4', json.dumps(['a', 'list']))
    h.store.set_store(TASK_PREFIX + '5', 'null')
    h.store.set_store('unrelated', 'kept')
    h.queue.load()
    assert [t.id for t in h.queue.list()] == ['1']
    assert h.store.task_ids() == ['1']
    assert h.store.get_store('unrelated') == 'kept'


def test_load_leaves_a_newer_modules_task_alone(h: Harness) -> None:
    """After a downgrade, a task a newer module wrote is neither run with
    fields this code does not know nor deleted."""
    newer = json.dumps(dict(V1_RECORD, version=TASK_RECORD_VERSION + 1, id='9'))
    h.store.set_store(TASK_PREFIX + '9', newer)
    h.queue.load()
    assert h.queue.list() == []
    assert h.store.get_store(TASK_PREFIX + '9') == newer


# -- scheduling -------------------------------------------------------------------

def test_runs_in_sequence_order(h: Harness) -> None:
    h.limit[0] = 1
    tasks = [h.submit(name) for name in ('c', 'a', 'b')]
    for task in tasks:
        h.start(task).finish()
    assert h.runner.started_ids() == ['1', '2', '3']
    assert all(t.state == COMPLETED for t in tasks)


def test_max_concurrent_is_respected(h: Harness) -> None:
    h.limit[0] = 2
    tasks = [h.submit(name) for name in 'abcde']
    h.queue.schedule()
    calls = [h.runner.call('1'), h.runner.call('2')]
    h.queue.schedule()                       # nothing more fits
    assert h.running_ids() == ['1', '2']
    assert sorted(h.runner.started_ids()) == ['1', '2']
    for i in range(3, 6):
        calls.pop(0).finish()
        calls.append(h.start(tasks[i - 1]))
        assert len(h.running_ids()) == 2
    for call in calls:
        call.finish()
    assert h.runner.max_active == 2
    assert all(t.state == COMPLETED for t in tasks)


def test_max_concurrent_is_read_at_each_schedule(h: Harness) -> None:
    h.limit[0] = 0
    task = h.submit('a')
    h.queue.schedule()
    assert task.state == QUEUED
    h.limit[0] = 1
    h.start(task).finish()
    assert task.state == COMPLETED


def test_one_task_per_image_others_proceed(h: Harness) -> None:
    h.limit[0] = 3
    execute = h.submit('a')
    abort = h.submit('a', action='abort')
    other = h.submit('b')
    h.queue.schedule()
    first, b_call = h.runner.call(execute.id), h.runner.call(other.id)
    h.queue.schedule()
    assert abort.state == QUEUED              # a free slot, but the image is busy
    assert sorted(h.runner.started_ids()) == ['1', '3']
    b_call.finish()
    h.queue.schedule()
    assert abort.state == QUEUED
    first.finish()
    h.start(abort).finish()
    started = h.runner.started_ids()           # 1 and 3 began together
    assert sorted(started[:2]) == ['1', '3'] and started[2:] == ['2']
    assert h.runner.max_active == 2


def test_progress_reports_reach_the_task_and_events(h: Harness) -> None:
    task = h.submit('a')
    call = h.start(task)
    assert task.state == RUNNING and task.attempts == 1
    assert task.started == h.clock.now
    assert_persisted(h, task)
    assert call.send_report(1, 4) is True
    assert task.progress == 0.25
    assert call.send_report(0, 0) is True     # no total yet
    assert task.progress == 0.0
    assert call.send_report(3, 4) is True
    call.finish()
    assert task.state == COMPLETED and task.progress == 1.0
    assert task.finished == h.clock.now and task.last_error is None
    assert_persisted(h, task)
    assert h.events.entries(task.id) == [
        ('started', RUNNING, 0.0), ('progress', RUNNING, 0.25),
        ('progress', RUNNING, 0.0), ('progress', RUNNING, 0.75),
        ('finished', COMPLETED, 1.0)]
    assert h.events.snapshots[-1] == [('1', COMPLETED)]


# -- failures and retries ---------------------------------------------------------

def test_transient_error_waits_to_retry_with_backoff(h: Harness) -> None:
    task = h.submit('a')
    h.start(task).fail(SourceUnreachable('HTTP 503 from the server'))
    assert task.state == RETRYING
    assert task.last_error == 'HTTP 503 from the server' and task.errno == errno.EIO
    assert task.next_attempt == h.clock.now + 10.0    # backoff * 2**0
    assert task.finished is None
    assert_persisted(h, task)
    assert h.events.kinds(task.id) == ['started', 'finished']

    h.clock.advance(9.9)
    h.queue.schedule()
    assert task.state == RETRYING and h.runner.started_ids() == ['1']
    h.clock.advance(0.1)
    call = h.start(task, attempt=2)
    assert task.attempts == 2 and task.next_attempt is None
    call.fail(SourceUnreachable('again'))
    assert task.next_attempt == h.clock.now + 20.0    # backoff * 2**1
    assert task.last_error == 'again'


def test_backoff_is_capped(harnesses: List[Harness]) -> None:
    h = new_harness(harnesses, policy=RetryPolicy(max_attempts=10, backoff=10.0,
                                                  max_backoff=25.0))
    task = h.submit('a')
    delays = []
    for attempt in range(1, 5):
        h.start(task, attempt).fail(SourceUnreachable('down'))
        assert task.next_attempt is not None
        delays.append(task.next_attempt - h.clock.now)
        h.clock.now = task.next_attempt
    assert delays == [10.0, 20.0, 25.0, 25.0]


def test_transient_error_fails_after_max_attempts(h: Harness) -> None:
    task = h.submit('a')
    for attempt in (1, 2, 3):                 # max_attempts=3
        h.start(task, attempt).fail(SourceUnreachable(f'down {attempt}'))
        if attempt < 3:
            assert task.state == RETRYING
            h.clock.now = task.next_attempt or 0.0
    assert task.state == FAILED and task.attempts == 3
    assert task.last_error == 'down 3' and task.errno == errno.EIO
    assert task.next_attempt is None and task.finished == h.clock.now
    assert_persisted(h, task)
    h.clock.advance(1000)
    h.queue.schedule()
    assert h.runner.started_ids() == ['1', '1', '1']


def test_permanent_error_fails_at_once(h: Harness) -> None:
    task = h.submit('a')
    h.start(task).fail(NotFound("image 'rbd/a' does not exist"))
    assert task.state == FAILED and task.attempts == 1
    assert task.last_error == "image 'rbd/a' does not exist"
    assert task.errno == errno.ENOENT
    assert_persisted(h, task)
    assert h.events.entries(task.id)[-1][:2] == ('finished', FAILED)


def test_a_crashing_runner_fails_the_task_and_the_queue_goes_on(h: Harness) -> None:
    h.limit[0] = 1
    crash = h.submit('a')
    after = h.submit('b')
    h.start(crash).fail(ZeroDivisionError('division by zero'))
    assert crash.state == FAILED
    assert crash.last_error == 'internal error: ZeroDivisionError: division by zero'
    assert crash.errno == errno.EINVAL
    h.start(after).finish()
    assert after.state == COMPLETED


def test_retry_waiting_keeps_the_image_order(h: Harness) -> None:
    h.limit[0] = 3
    execute = h.submit('a')
    h.start(execute).fail(SourceUnreachable('503'))
    abort = h.submit('a', action='abort')
    other = h.submit('b')
    h.start(other).finish()
    assert abort.state == QUEUED               # behind the retry of its image
    h.clock.now = execute.next_attempt or 0.0
    h.start(execute, attempt=2).finish()
    h.start(abort).finish()
    assert h.runner.started_ids() == ['1', '3', '1', '2']


def test_retry_policy_is_read_when_a_task_fails(harnesses: List[Harness]) -> None:
    settings = [Settings(max_concurrent_tasks=1, retry_max_attempts=5, retry_backoff=1.0)]
    store, runner, events, clock = MemStore(), ControlledRunner(), Recorder(), FakeClock()
    q = TaskQueue(store, runner, events, settings=lambda: settings[0], clock=clock)
    harnesses.append(Harness(store, runner, events, clock, q))
    task, _ = q.submit('execute', 1, 'rbd', '', 'x', 'x', 'm')
    q.schedule()
    settings[0] = Settings(max_concurrent_tasks=1, retry_max_attempts=1)
    runner.call(task.id).fail(SourceUnreachable('down'))
    assert task.state == FAILED


# -- cancel -------------------------------------------------------------------

def test_cancel_queued_task(h: Harness) -> None:
    task = h.submit('a')
    assert h.queue.cancel(task.id) is task
    assert task.state == CANCELLED and task.last_error == 'cancelled by request'
    assert task.finished == h.clock.now
    assert_persisted(h, task)
    assert h.events.snapshots[-1] == [('1', CANCELLED)]
    h.queue.schedule()
    assert h.runner.started_ids() == []
    assert h.submit2('a')[1]                   # no longer blocks a new task


def test_cancel_task_waiting_to_retry(h: Harness) -> None:
    task = h.submit('a')
    h.start(task).fail(SourceUnreachable('503'))
    h.queue.cancel(task.id)
    assert task.state == CANCELLED and task.next_attempt is None
    h.clock.advance(3600)
    h.queue.schedule()
    assert h.runner.started_ids() == ['1']


def test_cancel_running_task_stops_it_at_the_next_report(h: Harness) -> None:
    task = h.submit('a')
    call = h.start(task)
    assert call.send_report(1, 10) is True
    assert h.queue.cancel(task.id).state == RUNNING   # it stops later
    assert h.store.task(task.id)['state'] == RUNNING
    assert call.send_report(2, 10) is False
    call.fail(Cancelled('the progress callback asked to stop'))
    assert task.state == CANCELLED and task.last_error == 'cancelled by request'
    assert task.errno is None
    assert_persisted(h, task)
    # The cancel request does not outlive the task: a new one runs normally.
    again = h.submit('a')
    call = h.start(again)
    assert call.send_report(1, 2) is True
    call.finish()
    assert again.state == COMPLETED


def test_cancelled_running_task_is_not_retried(h: Harness) -> None:
    task = h.submit('a')
    call = h.start(task)
    h.queue.cancel(task.id)
    call.fail(SourceUnreachable('connection reset'))
    assert task.state == CANCELLED
    h.clock.advance(3600)
    h.queue.schedule()
    assert h.runner.started_ids() == ['1']


def test_cancel_finished_task_changes_nothing(h: Harness) -> None:
    task = h.submit('a')
    h.start(task).finish()
    assert h.queue.cancel(task.id).state == COMPLETED


# -- shutdown -------------------------------------------------------------------

def test_shutdown_hands_running_tasks_back_as_queued(harnesses: List[Harness]) -> None:
    store = MemStore()
    h = new_harness(harnesses, store=store)
    task = h.submit('a')
    queued = h.submit('b', action='commit')
    h.limit[0] = 1
    call = h.start(task)
    assert call.send_report(10, 100) is True
    call.report_until_stopped()
    h.queue.shutdown(timeout=TIMEOUT)
    call.join()
    assert task.state == QUEUED and task.attempts == 0
    assert task.last_error is None and task.finished is None
    assert_persisted(h, task)
    assert queued.state == QUEUED
    h.queue.schedule()                          # a stopping queue starts nothing
    assert h.runner.started_ids() == ['1']

    after = new_harness(harnesses, store=store)
    after.queue.load()
    restored = after.queue.get(task.id)
    assert restored.state == QUEUED and restored.attempts == 0
    after.start(restored).finish()
    assert restored.attempts == 1 and restored.state == COMPLETED


def test_run_loop_runs_tasks_until_stopped(h: Harness) -> None:
    stop = threading.Event()
    loop = threading.Thread(target=h.queue.run, args=(stop, 0.005), daemon=True)
    loop.start()
    try:
        task = h.submit('a')
        h.runner.call(task.id).finish()
        assert task.state == COMPLETED
        second = h.submit('b')
        call = h.runner.call(second.id)
        call.report_until_stopped()
    finally:
        stop.set()
        loop.join(TIMEOUT)
    assert not loop.is_alive()
    call.join()
    assert second.state == QUEUED and second.attempts == 0


# -- prune ----------------------------------------------------------------------

def test_prune_keeps_the_newest_finished_tasks(harnesses: List[Harness]) -> None:
    h = new_harness(harnesses, keep_finished=2, limit=1)
    tasks = [h.submit(name) for name in 'abcd']
    h.start(tasks[0]).finish()
    h.start(tasks[1]).fail(InvalidArgument('bad'))
    h.queue.cancel(tasks[2].id)
    assert [t.id for t in h.queue.list()] == ['1', '2', '3', '4']
    h.start(tasks[3]).finish()
    assert [t.id for t in h.queue.list()] == ['3', '4']
    assert h.store.task_ids() == ['3', '4']
    with pytest.raises(NotFound):
        h.queue.get('1')


def test_prune_never_drops_active_tasks(harnesses: List[Harness]) -> None:
    h = new_harness(harnesses, keep_finished=0, limit=1)
    done = h.submit('a')
    waiting = h.submit('b')
    h.start(done).finish()
    assert [t.id for t in h.queue.list()] == ['2']
    assert h.store.task_ids() == ['2']
    h.start(waiting).fail(SourceUnreachable('503'))
    assert [t.id for t in h.queue.list()] == ['2']
    h.submit('c')                              # submit prunes too
    assert h.store.task_ids() == ['2', '3']


# -- superseded failures ------------------------------------------------------

def test_a_new_task_for_a_failed_image_supersedes_the_failure(h: Harness) -> None:
    failed = h.submit('a')
    h.start(failed).fail(InvalidArgument('bad'))
    other = h.submit('b')
    h.queue.schedule()
    h.runner.call(other.id).fail(InvalidArgument('bad too'))
    assert not failed.superseded
    retry = h.submit('a')
    assert retry is not failed
    assert failed.superseded and h.store.task(failed.id)['superseded'] is True
    assert not other.superseded
    assert not retry.superseded


# -- known bugs -------------------------------------------------------------------

class BrokenStartEvents(Recorder):
    """Events whose ``started`` fails, as MgrModule.remote does (RuntimeError)
    when the progress module raises."""

    def started(self, task: Task) -> None:
        super().started(task)
        raise RuntimeError('progress module failed')


def test_a_failing_started_event_does_not_wedge_the_task(harnesses: List[Harness]) -> None:
    store, runner, events, clock = MemStore(), ControlledRunner(), BrokenStartEvents(), FakeClock()
    q = TaskQueue(store, runner, events, settings=lambda: Settings(max_concurrent_tasks=1),
                  clock=clock)
    harnesses.append(Harness(store, runner, events, clock, q))
    task, _ = q.submit('execute', 1, 'rbd', '', 'x', 'x', 'm')
    q.schedule()
    threads = [t for t in threading.enumerate() if t.name == f'rbd_migration task {task.id}']
    deadline = time.monotonic() + TIMEOUT
    while any(t.is_alive() for t in threads) and not runner.started_ids():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    if runner.started_ids():                # the queue carried on without the event
        runner.call(task.id).finish()
    for t in threads:
        t.join(TIMEOUT)
    assert task.state != RUNNING
    assert store.task(task.id)['state'] != RUNNING


# -- stalls -------------------------------------------------------------------

def _stall_harness(after: float, diagnosis: List[str]) -> Harness:
    h = make_harness()
    h.stall_after[0] = after
    h.queue.diagnose = lambda task: diagnosis[0]
    return h


def test_a_task_that_does_not_move_is_marked_stalled_with_the_reason() -> None:
    diagnosis = ['pool rbd2 reached its quota']
    h = _stall_harness(60.0, diagnosis)
    task = h.submit('a')
    call = h.start(task)
    assert call.send_report(1, 4) is True
    h.clock.advance(59)
    h.queue.check_stalls()
    assert task.stalled is None
    h.clock.advance(2)
    h.queue.check_stalls()
    assert task.stalled == 'pool rbd2 reached its quota'
    assert h.store.task(task.id)['stalled'] == task.stalled
    changes = len(h.events.snapshots)
    h.queue.check_stalls()                    # same reason: nothing written again
    assert len(h.events.snapshots) == changes
    diagnosis[0] = ''
    h.clock.advance(10)
    h.queue.check_stalls()
    assert task.stalled == 'no progress'
    assert call.send_report(1, 4) is True     # alive again: clears it
    assert task.stalled is None and h.store.task(task.id)['stalled'] is None
    h.clock.advance(59)
    h.queue.check_stalls()
    assert task.stalled is None               # the clock restarted at that report
    call.finish()
    assert task.stalled is None


def test_stall_detection_off_and_failing_diagnosis() -> None:
    h = _stall_harness(0.0, [''])
    task = h.submit('a')
    call = h.start(task)
    h.clock.advance(10_000)
    h.queue.check_stalls()
    assert task.stalled is None
    h.stall_after[0] = 5.0

    def broken(task: Task) -> str:
        raise RuntimeError('mon unreachable')
    h.queue.diagnose = broken
    h.queue.check_stalls()
    assert task.stalled == 'no progress'
    call.finish()
    assert task.stalled is None


def test_queued_tasks_never_stall() -> None:
    h = _stall_harness(1.0, ['x'])
    h.limit[0] = 1
    first, second = h.submit('a'), h.submit('b')
    call = h.start(first)
    h.clock.advance(5)
    h.queue.check_stalls()
    assert first.stalled == 'x' and second.stalled is None
    call.finish()


# -- what `task get` says about an active task --------------------------------

def test_an_active_task_says_what_it_waits_on() -> None:
    from rbd_migration.reports import _why_not_done
    task = Task(id='7', action=TaskAction.EXECUTE, pool_id=2, pool='rbd2', namespace='',
                image_id='abc', image_name='img', sequence=7, message='m')
    assert _why_not_done(task, None) == ''
    task.state, task.attempts = RETRYING, 3
    task.last_error = 'executing the migration of rbd2/img: connection timed out (ETIMEDOUT)'
    assert _why_not_done(task, None) == (
        '; attempt 3; last error: executing the migration of rbd2/img: '
        'connection timed out (ETIMEDOUT)')
    task.state, task.attempts, task.last_error = QUEUED, 0, None
    assert _why_not_done(task, '2 task(s) running (max_concurrent_tasks 2)') == (
        '; waiting: 2 task(s) running (max_concurrent_tasks 2)')
