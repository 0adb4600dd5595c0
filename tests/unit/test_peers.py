"""The batch service and the read side over a stand-in that has only the
migration service's public methods: a step that reached into the service's
engine or queue would fail here with an AttributeError."""
import errno
import time
from dataclasses import fields
from typing import Any, Dict, List, Optional

import pytest

from rbd_migration.batch import ITEM_FAILED, Batch, BatchBook, ImageFacts, plan
from rbd_migration.batch_service import BatchService
from rbd_migration.engine.migration import ImageRef, MigrationInfo
from rbd_migration.errors import MigrationError, StillActive
from rbd_migration.listing import Listing
from rbd_migration.metrics import RateMeter
from rbd_migration.reports import Reports
from rbd_migration.schedule import Limits, wait_reason
from rbd_migration.service import Queued
from rbd_migration.settings import Settings
from rbd_migration.tasks import COMPLETED, FAILED, RUNNING, Task
from tests.queueharness import Harness, make_harness


class PublicService:
    """The public methods of MigrationService the batch service calls, over
    a real task queue (which the read side reads, as it reads the service's)."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.store = harness.store
        self.queue = harness.queue
        self.listing = Listing(lambda: [])
        self.meter = RateMeter()
        self.children: List[str] = []
        self.aborted: List[str] = []
        #: The module's options by name (absent: the default), how often
        #: each was read, and the snapshots wait_reason was handed.
        self.options: Dict[str, Any] = {}
        self.reads: Dict[str, int] = {}
        self.weighed: List[Settings] = []

    def find(self, image: str) -> MigrationInfo:
        pool, name = image.split('/')
        return MigrationInfo(ImageRef(1, pool, '', name, f'id-{name}'), 'executed', '',
                             source=ImageRef(0, 'rbd', '', name, f'src-{name}'))

    def _queue(self, action: str, image: str) -> Queued:
        task, created = self.harness.submit2(image.split('/')[1], action)
        return Queued(task, f'{action} of {image} queued as task {task.id}')

    def execute(self, image: str, batch: Optional[str] = None) -> Queued:
        return self._queue('execute', image)

    def verify(self, image: str, batch: Optional[str] = None) -> Queued:
        return Queued(None, f'nothing to verify for {image}')

    def commit(self, image: str, force: bool = False, verified: bool = False,
               batch: Optional[str] = None) -> Queued:
        queued = self._queue('commit', image)
        assert queued.task is not None
        queued.task.options['force'] = force
        return queued

    def abort(self, image: str) -> Queued:
        self.aborted.append(image)
        return self._queue('abort', image)

    def descendants(self, ref: ImageRef) -> List[str]:
        return self.children

    def task(self, task_id: str) -> Optional[Task]:
        return self.queue.tasks.get(task_id)

    def task_cancel(self, task_id: str) -> Task:
        return self.queue.cancel(task_id)

    def waiting_reason(self, task_id: str) -> Optional[str]:
        return self.queue.waiting.get(task_id)

    def _option(self, name: str) -> Any:
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.options.get(name)

    def settings(self) -> Settings:
        return Settings.read(self._option)

    def tasks(self) -> List[Task]:
        return self.queue.list()

    def wait_reason(self, task: Task, running: List[Task],
                    settings: Settings) -> Optional[str]:
        self.weighed.append(settings)
        return wait_reason(task, running, Limits.of(settings), time.time(), self.meter.rate)


def _batch(book: BatchBook, *names: str) -> Batch:
    batch = Batch(id='', source_pool='rbd', source_namespace='', dest_pool='rbd2',
                  dest_namespace='', items=plan([ImageFacts(n, 1 << 20, 0) for n in names],
                                                'rbd', ''))
    return book.create(batch)


def _peers() -> Any:
    service = PublicService(make_harness())
    batches = BatchService(service)  # type: ignore[arg-type]
    return service, batches, Reports(service, batches)  # type: ignore[arg-type]


def test_the_batch_steps_take_the_tasks_the_service_queued() -> None:
    service, batches, _ = _peers()
    batch = _batch(batches.book, 'a')
    [item] = batch.items
    task = batches.execute(batch, item)
    assert task is service.queue.get(task.id) and task.action == 'execute'
    service.children = ['rbd2/a-clone']
    assert batches.commit(batch, item).options['force'] is True
    with pytest.raises(MigrationError, match='nothing to verify for rbd2/a'):
        batches.verify(batch, item)


def test_cancelling_a_batch_cancels_its_queued_execute_and_aborts_it() -> None:
    service, batches, _ = _peers()
    batch = _batch(batches.book, 'a')
    [item] = batch.items
    task = batches.execute(batch, item)
    item.task_id = task.id
    batches.cancel(batch, item)
    assert task.state == 'cancelled' and service.aborted == ['rbd2/a']
    assert item.state == 'cancelled'


def test_task_get_says_where_a_task_is() -> None:
    service, _, reports = _peers()
    task = service.harness.submit('a')
    service.queue.waiting[task.id] = 'outside the execute window'
    with pytest.raises(StillActive, match='; waiting: outside the execute window$'):
        reports.task_get(task.id)
    task.state = COMPLETED
    assert reports.task_get(task.id)['message'] == f'task {task.id} (execute of rbd/a) completed'
    task.state, task.last_error, task.errno = FAILED, 'boom', errno.ENOSPC
    with pytest.raises(MigrationError, match='failed: boom') as e:
        reports.task_get(task.id)
    assert e.value.errno == errno.ENOSPC
    assert reports.task_list() == {'tasks': [task.to_dict()]}


def test_batch_failures_outside_tasks_are_reported_until_acknowledged() -> None:
    _, batches, reports = _peers()
    batch = _batch(batches.book, 'a', 'b')
    first = batch.items[0]
    first.state, first.reason = ITEM_FAILED, "image 'rbd/a' is open by client.9"
    assert reports.failures() == [
        f"batch {batch.id}: rbd/a failed: image 'rbd/a' is open by client.9; once "
        f'handled, acknowledge with ceph rbd migration batch cancel {batch.id}']
    assert [b['id'] for b in reports.metrics()['batches']] == [batch.id]
    batch.acknowledged = True
    assert reports.failures() == []


def test_a_batch_tick_reads_the_options_once_and_weighs_every_item_by_that_snapshot() -> None:
    service, batches, _ = _peers()
    service.harness.submit('x').state = RUNNING
    service.options['max_concurrent_tasks'] = 1
    batch = _batch(batches.book, 'a', 'b', 'c')
    weigh = service.wait_reason

    def changed_meanwhile(task: Task, running: List[Task], settings: Settings) -> Optional[str]:
        service.options['max_concurrent_tasks'] = 0    # an operator, mid-tick
        return weigh(task, running, settings)

    service.wait_reason = changed_meanwhile
    for limit in (1, 0):
        service.reads.clear()
        service.weighed.clear()
        batches.tick()
        assert service.reads == {f.name: 1 for f in fields(Settings)}
        assert len(service.weighed) == 3 and all(s is service.weighed[0]
                                                 for s in service.weighed)
        assert [batches.driver.waiting[(batch.id, i.index)] for i in batch.items] == \
            [f'1 task(s) running (max_concurrent_tasks {limit})'] * 3
    service.reads.clear()
    for item in batch.items:    # outside a tick, each check reads afresh
        batches.start_reason(batch, item)
    assert service.reads['max_concurrent_tasks'] == 3
