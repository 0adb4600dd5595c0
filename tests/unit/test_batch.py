"""Batches: selecting images, the plan's order and skips, and the driver
moving items through fake tasks (no cluster): parents before clones,
commit only when asked, limits, failures, and a restart mid-way."""
import itertools
from typing import Dict, List, Optional, Set, Tuple

import pytest

from rbd_migration.batch import (DONE, EXECUTED, EXECUTING, ITEM_CANCELLED, ITEM_FAILED,
                                 PENDING, SKIPPED, Batch, BatchBook, BatchDriver, BatchItem,
                                 ImageFacts, ItemState, parse_pool_spec, plan, select)
from rbd_migration.errors import TransientClusterError
from rbd_migration.errors import Busy, InvalidArgument, NotFound
from rbd_migration.tasks import (ACTIVE, COMPLETED, FAILED, QUEUED, RUNNING, Task,
                                 TaskAction, TaskState)

from tests.queueharness import MemStore


# -- selection --------------------------------------------------------------------

def test_select_by_pattern_and_list() -> None:
    names = ['vm-1', 'vm-2', 'db-1', 'vm-10']
    assert select(names, None, None) == ['db-1', 'vm-1', 'vm-10', 'vm-2']
    assert select(names, 'vm-?', None) == ['vm-1', 'vm-2']
    assert select(names, None, 'vm-2\n# a comment\n\ndb-1  # trailing\n') == ['db-1', 'vm-2']


def test_select_list_names_what_is_missing() -> None:
    with pytest.raises(NotFound) as e:
        select(['a', 'b'], 'a*', 'a\nb\nc\n')
    assert "image 'b' and 1 more" in str(e.value) and '--pattern' in str(e.value)
    with pytest.raises(InvalidArgument, match='-i: the image list is empty'):
        select(['a'], None, '# nothing\n')


@pytest.mark.parametrize('text,parsed', [('rbd', ('rbd', '')), ('rbd/ns1', ('rbd', 'ns1'))])
def test_pool_spec(text: str, parsed: tuple) -> None:
    assert parse_pool_spec(text, 'source_pool_spec') == parsed


@pytest.mark.parametrize('text', ['', 'a/b/c', 'rbd@snap', 'r bd', 'rbd/'])
def test_bad_pool_spec_names_the_argument(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r'^dest_pool_spec: .* is not pool\[/namespace\]$'):
        parse_pool_spec(text, 'dest_pool_spec')


# -- plans --------------------------------------------------------------------------

def facts(name: str, parent: Optional[str] = None, clones: List[str] = (),  # type: ignore
          watchers: List[str] = (), blocked: Optional[str] = None) -> ImageFacts:  # type: ignore
    return ImageFacts(name, 1 << 20, 1, parent, list(clones), list(watchers), blocked)


def test_plan_puts_parents_before_their_clones_at_any_depth() -> None:
    items = plan([facts('a-grandchild', parent='rbd/m-child@s'),
                  facts('m-child', parent='rbd/z-parent@s', clones=['rbd/a-grandchild']),
                  facts('z-parent', clones=['rbd/m-child']),
                  facts('b-plain'),
                  facts('c-outside', parent='other/base@s')], 'rbd', '')
    names = [i.name for i in items]
    assert names.index('z-parent') < names.index('m-child') < names.index('a-grandchild')
    by = {i.name: i for i in items}
    assert by['m-child'].parent_item == 'z-parent'
    assert by['a-grandchild'].parent_item == 'm-child'
    assert by['c-outside'].parent_item is None    # its parent stays where it is
    assert by['z-parent'].needs_force and not by['b-plain'].needs_force
    assert [i.index for i in items] == list(range(5))


def test_plan_in_a_namespace_matches_parents_in_that_namespace_only() -> None:
    items = plan([facts('child', parent='rbd/ns1/base@s'), facts('base')], 'rbd', 'ns1')
    assert [i.name for i in items] == ['base', 'child']
    items = plan([facts('child', parent='rbd/base@s'), facts('base')], 'rbd', 'ns1')
    assert {i.name: i.parent_item for i in items} == {'base': None, 'child': None}


def test_plan_skips_images_in_use_and_blocked_with_reasons() -> None:
    items = plan([facts('busy', watchers=['client.4121 at 10.0.0.5:0/123']),
                  facts('taken', blocked="an image named 'taken' already exists in rbd2"),
                  facts('ok')], 'rbd', '')
    by = {i.name: i for i in items}
    assert by['busy'].state == SKIPPED and 'client.4121' in (by['busy'].reason or '')
    assert by['taken'].state == SKIPPED and 'already exists' in (by['taken'].reason or '')
    assert by['ok'].state == PENDING and by['ok'].reason is None


# -- the driver -----------------------------------------------------------------------

class FakeActions:
    """The service's steps over in-memory tasks the test completes."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self.tasks: Dict[str, Task] = {}
        self.ids = itertools.count(1)
        self.log: List[str] = []
        self.busy: Set[str] = set()       # prepare says the image is open
        self.blocked_commit: Dict[str, str] = {}
        self.max_executing = 0
        self.prepared_names: Set[str] = set()
        #: What the cluster shows of a commit that ran unseen, by image.
        self.commits_seen: Dict[str, str] = {}
        #: Steps that fail once with a passing error, e.g. 'verify a'.
        self.flaky: Set[str] = set()

    def _new(self, action: str, item: BatchItem) -> Task:
        if f'{action} {item.name}' in self.flaky:
            self.flaky.discard(f'{action} {item.name}')
            raise TransientClusterError(f'{action} {item.name}: cannot send after transport '
                                 'endpoint shutdown (ESHUTDOWN)')
        tid = str(next(self.ids))
        task = Task(id=tid, action=TaskAction(action), pool_id=2, pool='rbd2', namespace='',
                    image_id=f'id-{item.name}', image_name=item.name, sequence=int(tid),
                    message='', state=RUNNING)
        self.tasks[tid] = task
        self.log.append(f'{action} {item.name}')
        self.max_executing = max(self.max_executing, self.executing())
        return task

    def executing(self) -> int:
        return sum(1 for t in self.tasks.values() if t.action == 'execute' and t.active)

    def start_reason(self, batch: Batch, item: BatchItem) -> Optional[str]:
        return 'no slot' if self.executing() >= self.slots else None

    def prepare(self, batch: Batch, item: BatchItem) -> str:
        if item.name in self.busy:
            raise Busy(f"image 'rbd/{item.name}' is open by client.9")
        self.log.append(f'prepare {item.name}')
        self.prepared_names.add(item.name)
        return f'2//id-{item.name}'

    def prepared(self, batch: Batch, item: BatchItem) -> Optional[str]:
        return f'2//id-{item.name}' if item.name in self.prepared_names else None

    def execute(self, batch: Batch, item: BatchItem) -> Optional[Task]:
        return self._new('execute', item)

    def verify(self, batch: Batch, item: BatchItem) -> Task:
        return self._new('verify', item)

    def commit_blocker(self, batch: Batch, item: BatchItem) -> Optional[str]:
        return self.blocked_commit.get(item.name)

    def commit(self, batch: Batch, item: BatchItem) -> Task:
        return self._new('commit', item)

    def committed(self, batch: Batch, item: BatchItem) -> Optional[str]:
        return self.commits_seen.get(item.name)

    def task(self, task_id: str) -> Optional[Task]:
        return self.tasks.get(task_id)

    def latest(self, key: str) -> Optional[Task]:
        mine = [t for t in self.tasks.values() if key.endswith(t.image_id)]
        return max(mine, key=lambda t: t.sequence) if mine else None

    def cancel(self, batch: Batch, item: BatchItem) -> None:
        task = self.tasks.get(item.task_id or '')
        if task is not None and task.state == QUEUED:
            task.state = TaskState.CANCELLED

    def end(self, action: str, name: str, state: str = COMPLETED) -> None:
        [task] = [t for t in self.tasks.values() if t.action == action
                  and t.image_name == name and t.state in ACTIVE]
        task.state = TaskState(state)
        if state == FAILED:
            task.last_error = 'boom'


def new_batch(store: MemStore, actions: FakeActions, images: List[ImageFacts],
              auto_commit: bool = True, verify: bool = False) -> BatchDriver:
    book = BatchBook(store, clock=lambda: 1.0)
    batch = Batch(id='', source_pool='rbd', source_namespace='', dest_pool='rbd2',
                  dest_namespace='', auto_commit=auto_commit, verify=verify,
                  items=plan(images, 'rbd', ''))
    book.create(batch)
    return BatchDriver(book, actions)


def states(driver: BatchDriver) -> Dict[str, str]:
    [batch] = driver.book.list()
    return {i.name: i.state for i in batch.items}


def item(driver: BatchDriver, name: str) -> BatchItem:
    [found] = [i for i in driver.book.list()[0].items if i.name == name]
    return found


def test_clone_starts_only_after_its_parent_is_committed() -> None:
    actions = FakeActions(slots=4)
    d = new_batch(MemStore(), actions, [facts('p', clones=['rbd/c']),
                                        facts('c', parent='rbd/p@s')])
    d.advance()
    assert states(d) == {'p': EXECUTING, 'c': PENDING}
    assert d.waiting[('b1', 1)] == 'waiting for its parent p to be committed'
    actions.end('execute', 'p')
    d.advance()
    assert states(d) == {'p': 'committing', 'c': PENDING}
    actions.end('commit', 'p')
    d.advance()
    assert states(d) == {'p': DONE, 'c': EXECUTING}
    actions.end('execute', 'c')
    d.advance()
    actions.end('commit', 'c')
    d.advance()
    assert states(d) == {'p': DONE, 'c': DONE}
    assert d.book.list()[0].finished is not None
    assert actions.log == ['prepare p', 'execute p', 'commit p', 'prepare c',
                           'execute c', 'commit c']


def two_executed(auto_commit: bool, verify: bool = False) -> Tuple[FakeActions, BatchDriver]:
    """Images a and b, both executes completed and seen by the driver."""
    actions = FakeActions(slots=4)
    d = new_batch(MemStore(), actions, [facts('a'), facts('b')], auto_commit=auto_commit,
                  verify=verify)
    d.advance()
    actions.end('execute', 'a')
    actions.end('execute', 'b')
    d.advance()
    return actions, d


def test_without_auto_commit_images_stop_executed_until_committed_by_hand() -> None:
    actions, d = two_executed(auto_commit=False)
    d.advance()
    assert states(d) == {'a': EXECUTED, 'b': EXECUTED}
    assert not any(e.startswith('commit') for e in actions.log)
    assert d.book.list()[0].state == 'waiting for commit'
    # The operator commits a by hand: the batch notices.
    [item_a] = [i for i in d.book.list()[0].items if i.name == 'a']
    actions.tasks['99'] = Task(id='99', action=TaskAction.COMMIT, pool_id=2, pool='rbd2',
                               namespace='', image_id='id-a', image_name='a', sequence=99,
                               message='', state=COMPLETED)
    d.advance()
    assert states(d)['a'] == DONE and states(d)['b'] == EXECUTED
    # batch commit commits the rest.
    assert d.commit_all(d.book.list()[0]) == []
    actions.end('commit', 'b')
    d.advance()
    assert states(d) == {'a': DONE, 'b': DONE}
    assert item_a.finished is not None


def test_verify_before_commit_and_a_failed_verify_fails_the_image() -> None:
    actions, d = two_executed(auto_commit=True, verify=True)
    assert states(d) == {'a': 'verifying', 'b': 'verifying'}
    actions.end('verify', 'a')
    actions.end('verify', 'b', FAILED)
    d.advance()
    assert states(d) == {'a': 'committing', 'b': ITEM_FAILED}
    assert 'verify failed: boom' in (item(d, 'b').reason or '')
    assert 'commit b' not in actions.log


def test_never_more_executes_than_slots() -> None:
    actions = FakeActions(slots=2)
    d = new_batch(MemStore(), actions, [facts(f'i{n}') for n in range(6)])
    for _ in range(20):
        d.advance()
        for t in list(actions.tasks.values()):
            if t.active:
                t.state = COMPLETED
                break
    assert set(states(d).values()) == {DONE}
    assert actions.max_executing == 2


def test_failed_parent_skips_its_clones_and_busy_images_are_skipped() -> None:
    actions = FakeActions(slots=4)
    actions.busy.add('busy')
    d = new_batch(MemStore(), actions, [facts('p'), facts('c', parent='rbd/p@s'),
                                        facts('busy')])
    d.advance()
    assert states(d)['busy'] == SKIPPED
    actions.end('execute', 'p', FAILED)
    d.advance()
    assert states(d)['p'] == ITEM_FAILED
    d.advance()
    assert states(d)['c'] == SKIPPED
    assert 'parent p was failed' in (item(d, 'c').reason or '')


def test_commit_held_while_a_clone_is_open() -> None:
    actions = FakeActions(slots=4)
    actions.blocked_commit['p'] = 'waiting to commit: its clone rbd/x is open by client.7'
    d = new_batch(MemStore(), actions, [facts('p', clones=['rbd/x'])])
    d.advance()
    actions.end('execute', 'p')
    d.advance()
    d.advance()
    assert states(d) == {'p': EXECUTED}
    assert 'commit p' not in actions.log
    del actions.blocked_commit['p']
    d.advance()
    assert states(d) == {'p': 'committing'}


def test_a_restarted_mgr_goes_on_from_the_store() -> None:
    store, actions = MemStore(), FakeActions(slots=1)
    d = new_batch(store, actions, [facts('a'), facts('b')])
    d.advance()
    actions.end('execute', 'a')
    d.advance()                      # a: committing; b takes the execute slot
    book = BatchBook(store)
    book.load()
    d2 = BatchDriver(book, actions)
    assert states(d2) == {'a': 'committing', 'b': EXECUTING}
    assert item(d2, 'b').task_id == item(d, 'b').task_id
    actions.end('commit', 'a')
    actions.end('execute', 'b')
    d2.advance()
    assert states(d2) == {'a': DONE, 'b': 'committing'}
    # Every item is its own small key.
    keys = sorted(store.get_store_prefix('batch/'))
    assert keys == ['batch/b1', 'batch/b1/000000', 'batch/b1/000001']
    assert max(len(v) for v in store.get_store_prefix('batch/').values()) < 1024


def test_cancel_stops_pending_images_and_ends_the_batch() -> None:
    actions = FakeActions(slots=1)
    d = new_batch(MemStore(), actions, [facts('a'), facts('b'), facts('c')], auto_commit=True)
    d.advance()
    batch = d.book.list()[0]
    assert d.cancel(batch) == []
    assert states(d) == {'a': EXECUTING, 'b': ITEM_CANCELLED, 'c': ITEM_CANCELLED}
    actions.end('execute', 'a')       # librbd ran it to the end
    d.advance()
    assert states(d)['a'] == EXECUTED  # never committed by a cancelled batch
    assert batch.finished is not None and batch.state == 'cancelled'


def test_progress_counts_bytes_of_executed_and_running_images() -> None:
    actions = FakeActions(slots=1)
    d = new_batch(MemStore(), actions, [facts('a'), facts('b'), facts('busy', watchers=['x'])],
                  auto_commit=False)
    d.advance()
    batch = d.book.list()[0]
    actions.tasks['1'].progress = 0.5
    assert d.progress(batch) == pytest.approx(0.25)
    actions.end('execute', 'a')
    d.advance()
    assert d.progress(batch) == pytest.approx(0.5)


def test_a_mgr_failing_during_prepare_neither_prepares_twice_nor_loses_the_image() -> None:
    store, actions = MemStore(), FakeActions(slots=4)
    d = new_batch(store, actions, [facts('a'), facts('b')])
    batch = d.book.list()[0]
    a, b = batch.items
    # As saved just before librbd was asked: a was prepared, b was not.
    for it in (a, b):
        it.state = ItemState.PREPARING
        d.book.save_item(batch, it)
    actions.prepared_names.add('a')
    book = BatchBook(store)
    book.load()
    d2 = BatchDriver(book, actions)
    d2.advance()
    assert states(d2) == {'a': EXECUTING, 'b': PENDING}
    d2.advance()
    assert states(d2) == {'a': EXECUTING, 'b': EXECUTING}
    assert actions.log == ['execute a', 'prepare b', 'execute b']


def test_a_passing_error_retries_the_step_and_never_skips_one() -> None:
    """A mgr being failed over sees its clients blocklisted: the step is
    tried again on the next pass, and a verify that could not be queued is
    not taken for one that ran."""
    actions = FakeActions(slots=1)
    d = new_batch(MemStore(), actions, [facts('a')], verify=True)
    d.advance()
    actions.flaky.add('verify a')
    actions.end('execute', 'a')
    d.advance()
    assert states(d) == {'a': EXECUTING}
    assert (item(d, 'a').reason or '').startswith('retrying: verify a: cannot send')
    d.advance()
    assert states(d) == {'a': 'verifying'} and item(d, 'a').reason is None
    actions.flaky.add('commit a')
    actions.end('verify', 'a')
    d.advance()
    assert states(d) == {'a': 'verifying'}
    d.advance()
    actions.end('commit', 'a')
    d.advance()
    assert states(d) == {'a': DONE}
    assert actions.log == ['prepare a', 'execute a', 'verify a', 'commit a']


@pytest.mark.parametrize('seen,then', [('commit', 'committing'), ('committed', DONE)])
def test_a_commit_the_saved_item_does_not_know_of_is_finished(seen: str, then: str) -> None:
    """A mgr failed over after it queued a commit and before the item said
    so: the next mgr finds the item executing, its task gone, and the
    cluster showing the commit stopped half-way (or done)."""
    store, actions = MemStore(), FakeActions(slots=1)
    d = new_batch(store, actions, [facts('a')])
    d.advance()
    del actions.tasks[item(d, 'a').task_id or '']     # lost with the old mgr
    actions.commits_seen['a'] = seen
    book = BatchBook(store)
    book.load()
    d2 = BatchDriver(book, actions)
    d2.advance()
    assert states(d2) == {'a': then}
    assert actions.log == ['prepare a', 'execute a'] + (['commit a'] if seen == 'commit' else [])
    if seen == 'commit':
        actions.end('commit', 'a')
        d2.advance()
        assert states(d2) == {'a': DONE}


def test_acknowledged_flag_survives_a_restart() -> None:
    store, actions = MemStore(), FakeActions(slots=1)
    d = new_batch(store, actions, [facts('a')])
    batch = d.book.list()[0]
    batch.acknowledged = True
    d.book.save(batch)
    book = BatchBook(store)
    book.load()
    assert book.get('b1').acknowledged
    with pytest.raises(NotFound, match="batch 'b9' does not exist"):
        book.get('b9')


def test_an_item_record_from_before_the_retrying_flag_still_clears_its_note() -> None:
    old = {'index': 0, 'name': 'a', 'size': 1, 'snapshots': 0, 'state': 'pending',
           'reason': 'retrying: verify a: cannot send'}
    item = BatchItem.from_dict(old)
    assert item.retrying and item.state is ItemState.PENDING
    assert not BatchItem.from_dict(dict(old, reason='waiting for its parent p')).retrying

