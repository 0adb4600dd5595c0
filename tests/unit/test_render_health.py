"""Plain-text rendering, the RBD_MIGRATION_FAILED health check and progress
events to the mgr's progress module."""
import errno
import json
from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import pytest

from rbd_migration.engine.migration import ImageRef, MigrationInfo
from rbd_migration.health import FAILED_CHECK, STALLED_CHECK, health_checks
from rbd_migration.progress import ProgressEvents
from rbd_migration import render
from rbd_migration.settings import Settings
from rbd_migration.tasks import (CANCELLED, COMPLETED, FAILED, QUEUED,
                                 RETRYING, RUNNING, Task, TaskAction, TaskQueue,
                                 TaskState)


def task(id: str = '1', action: str = 'execute', state: str = QUEUED,
         image: str = 'img', namespace: str = '', pool: str = 'rbd',
         **kwargs: Any) -> Task:
    return Task(id=id, action=TaskAction(action), pool_id=1, pool=pool, namespace=namespace,
                image_id=f'id-{image}', image_name=image, sequence=int(id),
                message=f'Migrating image src/{image} to {pool}/{image}',
                state=TaskState(state), **kwargs)


# -- health -------------------------------------------------------------------

def test_no_failures_no_health_check() -> None:
    tasks = [task('1', state=COMPLETED), task('2', state=CANCELLED),
             task('3', state=RUNNING), task('4', state=RETRYING, last_error='503'),
             task('5', state=QUEUED)]
    assert health_checks(tasks) == {}
    assert health_checks([]) == {}


def test_failed_tasks_raise_rbd_migration_failed() -> None:
    tasks = [task('1', state=FAILED, image='a', last_error="pool 'x' does not exist",
                  errno=errno.ENOENT),
             task('2', state=COMPLETED, image='b'),
             task('3', action='commit', state=FAILED, image='c', namespace='ns',
                  last_error='internal error: KeyError: 1')]
    checks = health_checks(tasks)
    assert FAILED_CHECK == 'RBD_MIGRATION_FAILED'
    assert list(checks) == [FAILED_CHECK]
    check = checks[FAILED_CHECK]
    assert check['severity'] == 'warning'
    assert check['count'] == 2
    assert check['summary'] == '2 rbd migration task(s) failed'
    assert check['detail'] == [
        "execute of rbd/a failed (task 1): pool 'x' does not exist; "
        'retry it or abort the migration',
        'commit of rbd/ns/c failed (task 3): internal error: KeyError: 1; '
        'retry it or abort the migration']
    json.dumps(checks)  # what set_health_checks gets must serialise


def test_stalled_running_tasks_raise_rbd_migration_stalled() -> None:
    tasks = [task('1', state=RUNNING, image='a', progress=0.41,
                  stalled='pool rbd2 reached its quota (max_bytes 1000)'),
             task('2', state=RUNNING, image='b', progress=0.5),
             task('3', state=FAILED, image='c', last_error='x'),
             task('4', state=QUEUED, image='d', stalled='stale')]
    checks = health_checks(tasks)
    assert STALLED_CHECK == 'RBD_MIGRATION_STALLED'
    assert sorted(checks) == [FAILED_CHECK, STALLED_CHECK]
    check = checks[STALLED_CHECK]
    assert check['count'] == 1 and check['severity'] == 'warning'
    assert check['detail'] == ['execute of rbd/a (task 1) is stalled at 41%: '
                               'pool rbd2 reached its quota (max_bytes 1000)']
    rendered = render.task_list({'tasks': [tasks[0].to_dict()]})
    assert 'stalled: pool rbd2 reached its quota' in rendered


def test_superseded_failures_are_not_reported() -> None:
    tasks = [task('1', state=FAILED, image='a', last_error='x', superseded=True),
             task('2', state=FAILED, image='b', last_error='y')]
    check = health_checks(tasks)[FAILED_CHECK]
    assert check['count'] == 1
    assert check['detail'][0].startswith('execute of rbd/b failed (task 2): y;')
    assert health_checks(tasks[:1]) == {}


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


class HealthEvents:
    """Events that keep the health checks, as the module's do."""

    def __init__(self) -> None:
        self.checks: Dict[str, Dict[str, Any]] = {}

    def started(self, task: Task) -> None: ...
    def progress(self, task: Task) -> None: ...
    def finished(self, task: Task) -> None: ...

    def changed(self, tasks: List[Task]) -> None:
        self.checks = health_checks(tasks)


def never_run(task: Task, report: Any) -> None:
    raise AssertionError('nothing is scheduled in these tests')


def test_a_later_submit_for_the_image_supersedes_a_failure() -> None:
    """A failure restored from the store raises the check at load(); any new
    task for that image (a retry, commit or abort) clears it, others don't."""
    store = MemStore()
    for t in (task('1', state=FAILED, image='a', last_error='boom'),
              task('2', state=FAILED, image='b', last_error='bang')):
        store.set_store(f'task/{t.id}', json.dumps(t.to_dict()))
    store.set_store('task_sequence', '2')
    events = HealthEvents()
    queue = TaskQueue(store, never_run, events, settings=lambda: Settings(max_concurrent_tasks=0))
    queue.load()
    assert events.checks[FAILED_CHECK]['count'] == 2

    queue.submit('abort', 1, 'rbd', '', 'id-a', 'a', 'Aborting migration of rbd/a')
    check = events.checks[FAILED_CHECK]
    assert check['count'] == 1 and 'rbd/b' in check['detail'][0]
    assert json.loads(store.data['task/1'])['superseded'] is True
    assert json.loads(store.data['task/2'])['superseded'] is False

    queue.submit('execute', 1, 'rbd', '', 'id-b', 'b', 'Migrating image rbd/b')
    assert events.checks == {}


# -- progress events ---------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


Remote = Tuple[str, str, Tuple[Any, ...], Dict[str, Any]]


class RemoteRecorder:
    def __init__(self, fail_with: Optional[BaseException] = None) -> None:
        self.calls: List[Remote] = []
        self.fail_with = fail_with

    def __call__(self, module: str, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((module, method, args, kwargs))
        if self.fail_with is not None:
            raise self.fail_with

    def methods(self) -> List[str]:
        return [method for _, method, _, _ in self.calls]


def progress_events(interval: float = 1.0) -> Tuple[ProgressEvents, RemoteRecorder, Clock]:
    remote, clock = RemoteRecorder(), Clock()
    return ProgressEvents(remote, interval=interval, clock=clock), remote, clock


def test_progress_is_throttled_per_task() -> None:
    events, remote, clock = progress_events(interval=1.0)
    a, b = task('1', state=RUNNING, image='a'), task('2', state=RUNNING, image='b')
    events.started(a)
    clock.now += 0.5
    events.started(b)
    for step in range(1, 9):                   # 0.25 s apart, 2 s in all
        clock.now += 0.25
        a.progress = b.progress = step / 8
        events.progress(a)
        events.progress(b)
    updates = [(args[0], args[2]) for _, m, args, _ in remote.calls if m == 'update']
    # each task: at start, then once per whole second after its own start
    assert updates == [
        ('rbd_migration/task/1', 0.0), ('rbd_migration/task/2', 0.0),
        ('rbd_migration/task/1', 0.25), ('rbd_migration/task/2', 0.5),
        ('rbd_migration/task/1', 0.75), ('rbd_migration/task/2', 1.0)]


# -- render -----------------------------------------------------------------------

SRC = ImageRef(pool_id=1, pool='rbd', namespace='', name='old', id='1a2b')
DST = ImageRef(pool_id=2, pool='fast', namespace='ns', name='new', id='3c4d')


def migration(info: MigrationInfo, t: Optional[Task] = None,
              state_text: Optional[str] = None) -> Dict[str, Any]:
    """A migration as the service describes it."""
    d = info.to_dict()
    d['task'] = t.to_dict() if t else None
    d['state_text'] = state_text or info.state
    return d


def test_render_prepare_of_a_migration() -> None:
    text = render.migration(migration(MigrationInfo(DST, 'prepared', '', source=SRC)))
    assert text == ('fast/ns/new (id 3c4d)\n'
                    '  source: rbd/old (id 1a2b)\n'
                    '  state: prepared\n'
                    '  path: librbd')


def test_render_prepare_of_an_import() -> None:
    spec = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': '/mnt/disk.qcow2'},
            'snapshots': [{'type': 'qcow', 'name': 's1',
                           'stream': {'type': 'file', 'file_path': '/mnt/s1.qcow2'}}]}
    text = render.migration(migration(MigrationInfo(DST, 'prepared', '', source_spec=spec)))
    lines = text.splitlines()
    assert lines[0] == 'fast/ns/new (id 3c4d)'
    assert lines[1] == '  source: import of qcow over file /mnt/disk.qcow2 with 1 snapshot'
    assert lines[2] == '  state: prepared'


def test_render_import_without_a_spec() -> None:
    text = render.migration(migration(MigrationInfo(DST, 'prepared', '')))
    assert '  source: import of an external source' in text.splitlines()


def test_render_status_with_a_running_task() -> None:
    t = task('12', state=RUNNING, image='new', pool='fast', namespace='ns',
             attempts=2, progress=0.42, last_error='HTTP 503')
    result = {'migrations': [migration(MigrationInfo(DST, 'executing', '', source=SRC),
                                       t, 'executing (42% complete)')],
              'tasks': [t.to_dict()]}
    text = render.status(result)
    block, tasks = text.split('\n\n')
    assert block.splitlines() == [
        'fast/ns/new (id 3c4d)',
        '  source: rbd/old (id 1a2b)',
        '  state: executing (42% complete)',
        '  path: librbd',
        '  task: 12 execute fast/ns/new: running, attempt 2, 42%, last error: HTTP 503']
    assert tasks.splitlines() == [
        'tasks:',
        '  12 execute fast/ns/new: running, attempt 2, 42%, last error: HTTP 503']


def test_render_status_of_several_migrations() -> None:
    other = replace(DST, name='other', id='5e6f')
    result = {'migrations': [migration(MigrationInfo(DST, 'prepared', '', source=SRC)),
                             migration(MigrationInfo(other, 'executed', '', source=SRC))],
              'tasks': []}
    text = render.status(result)
    blocks = text.split('\n\n')
    assert len(blocks) == 2                     # no tasks section when empty
    assert 'fast/ns/new (id 3c4d)' in blocks[0] and 'state: prepared' in blocks[0]
    assert 'fast/ns/other (id 5e6f)' in blocks[1] and 'state: executed' in blocks[1]


def test_render_status_with_nothing() -> None:
    assert render.status({'migrations': [], 'tasks': []}) == 'no migrations'


def test_render_status_without_migrations_but_tasks() -> None:
    t = task('3', state=COMPLETED, attempts=1, progress=1.0)
    text = render.status({'migrations': [], 'tasks': [t.to_dict()]})
    assert text == 'no migrations\n\ntasks:\n  3 execute rbd/img: completed, attempt 1'


def test_render_task_list() -> None:
    tasks = [task('1', state=COMPLETED, attempts=1, progress=1.0, last_error=None),
             task('2', state=FAILED, attempts=8, last_error='source down'),
             task('3', action='abort', state=QUEUED, image='b'),
             task('4', state=RETRYING, attempts=1, image='c', last_error='HTTP 503'),
             task('5', action='commit', state=CANCELLED, image='d', attempts=1,
                  last_error='cancelled by request')]
    text = render.task_list({'tasks': [t.to_dict() for t in tasks]})
    assert text.splitlines() == [
        '  1 execute rbd/img: completed, attempt 1',
        '  2 execute rbd/img: failed, attempt 8, last error: source down',
        '  3 abort rbd/b: queued, attempt 0',
        '  4 execute rbd/c: waiting to retry, attempt 1, last error: HTTP 503',
        '  5 commit rbd/d: cancelled, attempt 1, last error: cancelled by request']


def test_render_completed_task_hides_a_stale_error() -> None:
    t = task('1', state=COMPLETED, attempts=2, last_error='earlier 503')
    text = render.task_list({'tasks': [t.to_dict()]})
    assert 'earlier 503' not in text and 'completed, attempt 2' in text


def test_render_empty_task_list() -> None:
    assert render.task_list({'tasks': []}) == 'no tasks'


def test_render_other_commands_show_the_message() -> None:
    result = {'message': 'execute of rbd/img queued as task 3', 'task': task('3').to_dict()}
    assert render.message(result) == 'execute of rbd/img queued as task 3'
    assert render.message({'message': 'task 3 is cancelled'}) \
        == 'task 3 is cancelled'
    assert render.message({}) == ''


def test_a_failing_progress_module_does_not_break_the_task() -> None:
    """MgrModule.remote turns any error of the progress module into a
    RuntimeError; a progress event is not worth failing a migration for."""
    remote, clock = RemoteRecorder(RuntimeError('KeyError in progress')), Clock()
    events = ProgressEvents(remote, clock=clock)
    t = task('9', state=RUNNING)
    events.started(t)
    clock.now += 5
    events.progress(t)
    t.state = COMPLETED
    events.finished(t)
    assert remote.methods() == ['update', 'update', 'update', 'complete']


def test_other_errors_of_remote_are_not_hidden() -> None:
    events = ProgressEvents(RemoteRecorder(TypeError('a bug of ours')), clock=Clock())
    with pytest.raises(TypeError):
        events.started(task('10', state=RUNNING))
