"""Batches: many migrations from one pool (or namespace) to another, planned
up front and driven image by image.

An image is prepared only when its execute may start (a free slot, the
execute window open, the per-pool and bandwidth limits met), so a batch of
a thousand images keeps a handful of migrations in flight: clients of the
others keep using their images untouched, and status stays fast.  Each
image then runs as ordinary tasks (execute, verify, commit), with their
retries, progress events and health checks.

Ordering: a clone whose parent is in the same batch starts only once its
parent's migration is committed, so that the clone's target links to the
parent's final place and two migrations never share one parent chain.  A
parent that has clones can only be committed with ``--force``; the batch
does that only when no clone is open by a client.
"""
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Protocol, Set, Tuple

from .errors import Busy, InvalidArgument, MigrationError, NotFound
from .records import NewerRecord, Record, Upgrade
from .store import Store
from .tasks import CANCELLED, COMPLETED, FAILED, Task, ValueEnum

log = logging.getLogger(__name__)

BATCH_PREFIX = 'batch/'
BATCH_SEQUENCE_KEY = 'batch_sequence'
KEEP_FINISHED = 20
#: The layouts of the batch header and item records this code writes.
BATCH_RECORD_VERSION = 1
ITEM_RECORD_VERSION = 2


class ItemState(ValueEnum):
    """Where one image of a batch is."""

    PENDING = 'pending'
    PREPARING = 'preparing'
    EXECUTING = 'executing'
    VERIFYING = 'verifying'
    COMMITTING = 'committing'
    EXECUTED = 'executed'
    DONE = 'done'
    SKIPPED = 'skipped'
    FAILED = 'failed'
    CANCELLED = 'cancelled'


PENDING, PREPARING = ItemState.PENDING, ItemState.PREPARING
EXECUTING, VERIFYING, COMMITTING = ItemState.EXECUTING, ItemState.VERIFYING, ItemState.COMMITTING
EXECUTED, DONE = ItemState.EXECUTED, ItemState.DONE
SKIPPED, ITEM_FAILED, ITEM_CANCELLED = ItemState.SKIPPED, ItemState.FAILED, ItemState.CANCELLED
IN_FLIGHT = (PREPARING, EXECUTING, VERIFYING, COMMITTING)
#: How an item's reason starts while a step waits to be tried again.
RETRYING = 'retrying: '
FINAL = (DONE, SKIPPED, ITEM_FAILED, ITEM_CANCELLED)


@dataclass
class ImageFacts:
    """What planning needs to know about one source image."""

    name: str
    size: int
    snapshots: int
    #: ``pool/[ns/]image@snap`` of the parent, for clones.
    parent: Optional[str] = None
    #: ``pool/[ns/]image`` of every clone of this image's snapshots.
    clones: List[str] = field(default_factory=list)
    #: Clients that have the image open (``client.N at addr``).
    watchers: List[str] = field(default_factory=list)
    #: Why it cannot be migrated at all (already migrating, target exists).
    blocked: Optional[str] = None


def _retrying_flag(data: Dict[str, Any]) -> None:
    """Version 1 items came before the retrying flag: their reason told."""
    if 'retrying' not in data:
        reason = data.get('reason')
        data['retrying'] = bool(reason and reason.startswith(RETRYING))


@dataclass
class BatchItem(Record):
    KIND: ClassVar[str] = 'batch item'
    VERSION: ClassVar[int] = ITEM_RECORD_VERSION
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {1: _retrying_flag}

    index: int
    name: str
    size: int
    snapshots: int
    parent: Optional[str] = None
    #: The name of the parent when the parent is in the same batch.
    parent_item: Optional[str] = None
    clones: int = 0
    state: ItemState = PENDING
    reason: Optional[str] = None
    #: The reason says the last pass's step failed transiently (it is tried
    #: again next pass).
    retrying: bool = False
    task_id: Optional[str] = None
    #: The target's ``pool_id/namespace/image_id`` once prepared.
    key: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    version: int = ITEM_RECORD_VERSION

    def __post_init__(self) -> None:
        self.state = ItemState(self.state)

    @property
    def needs_force(self) -> bool:
        return self.clones > 0

    def to_dict(self) -> Dict[str, Any]:
        """As batch status shows it: the record but its version."""
        d = self.__dict__.copy()
        del d['version']
        return d


@dataclass
class Batch(Record):
    """A batch; its header record holds everything but the items, which
    are records of their own."""

    KIND: ClassVar[str] = 'batch'
    VERSION: ClassVar[int] = BATCH_RECORD_VERSION

    id: str
    source_pool: str
    source_namespace: str
    dest_pool: str
    dest_namespace: str
    #: The layout options as given (re-parsed for each prepare).
    layout: Dict[str, Any] = field(default_factory=dict)
    auto_commit: bool = False
    verify: bool = False
    created: float = 0.0
    finished: Optional[float] = None
    cancelled: bool = False
    #: Its failures were acknowledged (batch cancel after it ended).
    acknowledged: bool = False
    items: List[BatchItem] = field(default_factory=list)
    version: int = BATCH_RECORD_VERSION

    def source_spec(self, name: str) -> str:
        return _spec(self.source_pool, self.source_namespace, name)

    def dest_spec(self, name: str) -> str:
        return _spec(self.dest_pool, self.dest_namespace, name)

    @property
    def source(self) -> str:
        return _spec(self.source_pool, self.source_namespace, '').rstrip('/')

    @property
    def dest(self) -> str:
        return _spec(self.dest_pool, self.dest_namespace, '').rstrip('/')

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for item in self.items:
            out[item.state] = out.get(item.state, 0) + 1
        return out

    def stored(self) -> Dict[str, Any]:
        d = super().stored()
        del d['items']
        return d

    def summary(self, progress: float) -> Dict[str, Any]:
        d = self.stored()
        del d['version']
        d.update(state=self.state, counts=self.counts(), images=len(self.items),
                 bytes_total=sum(i.size for i in self.items if i.state != SKIPPED),
                 progress=round(progress, 4))
        return d

    @property
    def state(self) -> str:
        if self.finished is not None:
            return 'cancelled' if self.cancelled else 'finished'
        if any(i.state == EXECUTED for i in self.items) and not any(
                i.state in (PENDING,) + IN_FLIGHT for i in self.items):
            return 'waiting for commit'
        return 'cancelling' if self.cancelled else 'running'


def _spec(pool: str, namespace: str, name: str) -> str:
    return f"{pool}/{namespace + '/' if namespace else ''}{name}"


def parse_pool_spec(text: str, what: str) -> Tuple[str, str]:
    """``pool[/namespace]``."""
    parts = (text or '').strip().split('/')
    if not 1 <= len(parts) <= 2 or not all(p and '@' not in p and p.isprintable()
                                           and not any(c.isspace() for c in p)
                                           for p in parts):
        raise InvalidArgument(f'{what}: {text!r} is not pool[/namespace]')
    return parts[0], parts[1] if len(parts) == 2 else ''


def select(names: Iterable[str], pattern: Optional[str],
           listed: Optional[str]) -> List[str]:
    """Image names matching ``pattern`` (a shell glob) and, when a list is
    given (one name per line, ``#`` comments), in that list.  Names the list
    gives that the pool lacks are an error, not silently dropped."""
    names = sorted(names)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if listed is not None:
        wanted = [line.split('#', 1)[0].strip() for line in listed.splitlines()]
        wanted = [w for w in wanted if w]
        if not wanted:
            raise InvalidArgument('-i: the image list is empty; give one image name a line')
        have = set(names)
        missing = [w for w in wanted if w not in have]
        if missing:
            more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
            raise NotFound(f"-i: image '{missing[0]}'{more} is not in the source pool"
                           + (' or does not match --pattern' if pattern else '')
                           + '; fix the list')
        names = sorted(set(wanted))
    return names


def plan(facts: List[ImageFacts], source_pool: str, source_namespace: str) -> List[BatchItem]:
    """The batch's items in the order they run: parents before their clones
    (when both are in the batch), otherwise by name; images in use or
    blocked are skipped with the reason."""
    by_name = {f.name: f for f in facts}
    prefix = _spec(source_pool, source_namespace, '')

    def parent_item(f: ImageFacts) -> Optional[str]:
        if not f.parent:
            return None
        image = f.parent.split('@', 1)[0]
        if image.startswith(prefix) and image[len(prefix):] in by_name:
            return image[len(prefix):]
        return None

    def depth(f: ImageFacts, seen: Tuple[str, ...] = ()) -> int:
        p = parent_item(f)
        if p is None or p in seen:
            return 0
        return 1 + depth(by_name[p], seen + (f.name,))

    ordered = sorted(facts, key=lambda f: (depth(f), f.name))
    items = []
    for index, f in enumerate(ordered):
        item = BatchItem(index=index, name=f.name, size=f.size, snapshots=f.snapshots,
                         parent=f.parent, parent_item=parent_item(f), clones=len(f.clones))
        if f.blocked:
            item.state, item.reason = SKIPPED, f.blocked
        elif f.watchers:
            item.state = SKIPPED
            item.reason = (f"in use by {', '.join(f.watchers)}; stop those clients "
                           '(e.g. shut the VM down) and migrate it in another batch')
        items.append(item)
    return items


class Actions(Protocol):
    """What the driver asks of the service; each call is one short step."""

    def start_reason(self, batch: Batch, item: BatchItem) -> Optional[str]: ...
    #: Prepares the migration; returns the target's image key.
    def prepare(self, batch: Batch, item: BatchItem) -> str: ...
    #: The target's image key if the item's migration is prepared, else None.
    def prepared(self, batch: Batch, item: BatchItem) -> Optional[str]: ...
    #: The execute task, or None when the migration is already executed.
    def execute(self, batch: Batch, item: BatchItem) -> Optional[Task]: ...
    def verify(self, batch: Batch, item: BatchItem) -> Task: ...
    def commit_blocker(self, batch: Batch, item: BatchItem) -> Optional[str]: ...
    def commit(self, batch: Batch, item: BatchItem) -> Task: ...
    #: Whether the item's commit already ran, as the cluster shows it:
    #: 'committed' (the target stands alone), 'commit' (librbd stopped
    #: half-way), else None.
    def committed(self, batch: Batch, item: BatchItem) -> Optional[str]: ...
    def task(self, task_id: str) -> Optional[Task]: ...
    def latest(self, key: str) -> Optional[Task]: ...
    def cancel(self, batch: Batch, item: BatchItem) -> None: ...


class BatchBook:
    """Batches in memory, each item under its own small key in the KV store
    (a change rewrites one item, and a key never grows with the batch)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.batches: Dict[str, Batch] = {}

    def load(self) -> None:
        """Restore the batches.  A batch with a record from a newer module
        is left alone whole: driving it without that record would end it
        wrongly."""
        headers: Dict[str, Batch] = {}
        items: Dict[str, List[BatchItem]] = {}
        newer: Set[str] = set()
        for key, text in self.store.get_store_prefix(BATCH_PREFIX).items():
            parts = key[len(BATCH_PREFIX):].split('/')
            try:
                if len(parts) == 1:
                    headers[parts[0]] = Batch.from_json(text)
                else:
                    items.setdefault(parts[0], []).append(BatchItem.from_json(text))
            except NewerRecord as e:
                log.error('leaving batch %s alone: %s: %s', parts[0], key, e)
                newer.add(parts[0])
            except (ValueError, TypeError) as e:
                log.error('dropping unreadable batch record %s: %s', key, e)
                self.store.set_store(key, None)
        for batch_id, batch in headers.items():
            if batch_id in newer:
                continue
            batch.items = sorted(items.get(batch_id, []), key=lambda i: i.index)
            self.batches[batch_id] = batch

    def create(self, batch: Batch) -> Batch:
        seq = int(self.store.get_store(BATCH_SEQUENCE_KEY) or 0) + 1
        self.store.set_store(BATCH_SEQUENCE_KEY, str(seq))
        batch.id, batch.created = f'b{seq}', self.clock()
        for item in batch.items:
            self.save_item(batch, item)
        self.save(batch)   # the header last: a batch without it is never loaded
        self.batches[batch.id] = batch
        self._prune()
        return batch

    def save(self, batch: Batch) -> None:
        self.store.set_store(BATCH_PREFIX + batch.id, batch.to_json())

    def save_item(self, batch: Batch, item: BatchItem) -> None:
        self.store.set_store(f'{BATCH_PREFIX}{batch.id}/{item.index:06d}', item.to_json())

    def get(self, batch_id: str) -> Batch:
        try:
            return self.batches[batch_id]
        except KeyError:
            raise NotFound(f"batch '{batch_id}' does not exist; list batches with "
                           'ceph rbd migration batch status') from None

    def list(self) -> List[Batch]:
        return sorted(self.batches.values(), key=lambda b: b.created)

    def _prune(self) -> None:
        done = [b for b in self.list() if b.finished is not None]
        for batch in done[:max(0, len(done) - KEEP_FINISHED)]:
            for item in batch.items:
                self.store.set_store(f'{BATCH_PREFIX}{batch.id}/{item.index:06d}', None)
            self.store.set_store(BATCH_PREFIX + batch.id, None)
            del self.batches[batch.id]


class BatchDriver:
    """Moves every batch forward one step at a time; called once a
    scheduling pass, and safe to call after a restart from any saved state."""

    def __init__(self, book: BatchBook, actions: Actions) -> None:
        self.book = book
        self.actions = actions
        #: Why each pending item waits, as of the last pass (not persisted).
        self.waiting: Dict[Tuple[str, int], str] = {}

    def advance(self) -> None:
        for batch in self.book.list():
            if batch.finished is None:
                self._advance(batch)

    def _advance(self, batch: Batch) -> None:
        states = {i.name: i.state for i in batch.items}
        for item in batch.items:
            before = (item.state, item.reason, item.task_id)
            if item.retrying:
                item.reason, item.retrying = None, False
            try:
                self._step(batch, item, states)
            except MigrationError as e:
                if e.transient:
                    # The cluster could not answer (a mgr being failed over
                    # finds its clients blocklisted): the same step next pass.
                    item.reason, item.retrying = f'{RETRYING}{e}', True
                else:
                    self._fail(item, str(e))
            if (item.state, item.reason, item.task_id) != before:
                log.info('batch %s %s: %s -> %s, task %s%s', batch.id, item.name, before[0],
                         item.state, item.task_id, f' ({item.reason})' if item.reason else '')
                if item.state in FINAL and item.finished is None:
                    item.finished = self.book.clock()
                self.book.save_item(batch, item)
            states[item.name] = item.state
        ended = FINAL + ((EXECUTED,) if batch.cancelled else ())
        if all(i.state in ended for i in batch.items):
            batch.finished = self.book.clock()
            self.book.save(batch)

    def _fail(self, item: BatchItem, reason: str) -> None:
        item.state, item.reason = ITEM_FAILED, reason

    def _step(self, batch: Batch, item: BatchItem, states: Dict[str, ItemState]) -> None:
        key = (batch.id, item.index)
        if item.state == PENDING:
            self.waiting.pop(key, None)
            if batch.cancelled:
                item.state, item.reason = ITEM_CANCELLED, 'the batch was cancelled'
                return
            skip = self._parent_ended_badly(item, states)
            if skip is not None:
                item.state, item.reason = SKIPPED, skip
                return
            reason = self._parent_wait(item, states) or self.actions.start_reason(batch, item)
            if reason is not None:
                self.waiting[key] = reason
                return
            self._start(batch, item)
        elif item.state == PREPARING:
            self._recover_prepare(batch, item)
        elif item.state in IN_FLIGHT:
            self._follow(batch, item)
        elif item.state == EXECUTED:
            self._executed(batch, item)

    def _executed(self, batch: Batch, item: BatchItem) -> None:
        """An executed image: committed or aborted by hand meanwhile, or
        committed now when the batch commits by itself."""
        latest = self.actions.latest(item.key) if item.key else None
        if latest is not None and latest.action in ('commit', 'abort'):
            if latest.active:
                if latest.action == 'commit':
                    item.state, item.reason, item.task_id = COMMITTING, None, latest.id
            elif latest.state == FAILED:
                self._fail(item, f'{latest.action} failed: {latest.last_error}')
            elif latest.state == COMPLETED:
                item.task_id = latest.id
                item.state, item.reason = ((DONE, None) if latest.action == 'commit'
                                           else (ITEM_CANCELLED, 'aborted'))
            return
        if batch.auto_commit and not batch.cancelled:
            self._commit(batch, item)

    @staticmethod
    def _parent_ended_badly(item: BatchItem, states: Dict[str, ItemState]) -> Optional[str]:
        """Why a clone is skipped: its parent in the batch failed or was
        cancelled, so the parent's migration is still open."""
        parent = states.get(item.parent_item) if item.parent_item else None
        if parent in (ITEM_FAILED, ITEM_CANCELLED):
            return (f'its parent {item.parent_item} was {parent}; its '
                    'migration must end (commit or abort) before the clone can move')
        return None

    @staticmethod
    def _parent_wait(item: BatchItem, states: Dict[str, ItemState]) -> Optional[str]:
        """Why a clone waits: its parent in the batch is not committed yet."""
        if item.parent_item is None or states.get(item.parent_item) in (DONE, SKIPPED):
            return None
        return f'waiting for its parent {item.parent_item} to be committed'

    def _start(self, batch: Batch, item: BatchItem) -> None:
        # Saved before librbd acts: a mgr that fails during prepare leaves
        # an item that says to look at the cluster, not to prepare again.
        item.started = self.book.clock()
        item.state, item.reason = PREPARING, None
        self.book.save_item(batch, item)
        try:
            item.key = self.actions.prepare(batch, item)
        except Busy as e:   # opened since the plan: skipped, as the plan would have
            item.state, item.reason = SKIPPED, str(e)
            return
        item.state = EXECUTING
        self._executed_or_follow(batch, item)

    def _recover_prepare(self, batch: Batch, item: BatchItem) -> None:
        key = self.actions.prepared(batch, item)
        if key is None:
            item.state = PENDING     # librbd never prepared it: start over
        else:
            item.key, item.state = key, EXECUTING
            if not self._committed_meanwhile(batch, item):
                self._executed_or_follow(batch, item)

    def _executed_or_follow(self, batch: Batch, item: BatchItem) -> None:
        task = self.actions.execute(batch, item)
        if task is None:
            self._after_execute(batch, item)
        else:
            item.task_id = task.id

    def _follow(self, batch: Batch, item: BatchItem) -> None:
        task = self.actions.task(item.task_id) if item.task_id else None
        if task is None:
            # Pruned, or lost with a mgr that failed mid-step: ask again,
            # which is idempotent (the same task, or "already done").
            self._resubmit(batch, item)
            return
        if task.active:
            return
        if task.state == FAILED:
            self._fail(item, f'{task.action} failed: {task.last_error}')
        elif task.state == CANCELLED:
            item.state, item.reason = ITEM_CANCELLED, f'{task.action} was cancelled'
        elif task.state == COMPLETED:
            if item.state == EXECUTING:
                self._after_execute(batch, item)
            elif item.state == VERIFYING:
                self._commit(batch, item)
            else:
                item.state, item.reason = DONE, None

    def _resubmit(self, batch: Batch, item: BatchItem) -> None:
        if item.state in (EXECUTING, VERIFYING) and self._committed_meanwhile(batch, item):
            return
        if item.state == EXECUTING:
            self._executed_or_follow(batch, item)
        elif item.state == VERIFYING:
            item.task_id = self.actions.verify(batch, item).id
        else:
            try:
                item.task_id = self.actions.commit(batch, item).id
            except NotFound:   # committed meanwhile: nothing migrates any more
                item.state, item.reason = DONE, None

    def _committed_meanwhile(self, batch: Batch, item: BatchItem) -> bool:
        """After the driver lost track of an item's task: whether a commit
        already ran, which a mgr that failed over before saving the item
        leaves behind.  Executing again would be refused; the commit is
        finished instead."""
        found = self.actions.committed(batch, item)
        if found == 'committed':
            item.state, item.reason = DONE, None
        elif found == 'commit':
            task = self.actions.commit(batch, item)
            item.state, item.reason, item.task_id = COMMITTING, None, task.id
        return found is not None

    def _after_execute(self, batch: Batch, item: BatchItem) -> None:
        # Each state is set once its task is queued: a step that fails
        # leaves the item as it was, to be tried again.
        if not batch.auto_commit or batch.cancelled:
            item.state, item.task_id = EXECUTED, None
            item.reason = ('executed; commit it (ceph rbd migration batch commit '
                           f'{batch.id}) or abort it')
        elif batch.verify:
            task = self.actions.verify(batch, item)
            item.state, item.reason, item.task_id = VERIFYING, None, task.id
        else:
            self._commit(batch, item)

    def _commit(self, batch: Batch, item: BatchItem) -> None:
        blocker = self.actions.commit_blocker(batch, item)
        if blocker:
            item.state, item.reason, item.task_id = EXECUTED, blocker, None
            return
        task = self.actions.commit(batch, item)
        item.state, item.reason, item.task_id = COMMITTING, None, task.id

    def commit_all(self, batch: Batch) -> List[str]:
        """Commit every executed item now (``batch commit``); returns what
        could not be committed, and why."""
        held = []
        for item in batch.items:
            if item.state != EXECUTED:
                continue
            try:
                self._commit(batch, item)
            except MigrationError as e:
                held.append(f'{item.name}: {e}')
                continue
            if item.state == EXECUTED:
                held.append(f'{item.name}: {item.reason}')
            self.book.save_item(batch, item)
        return held

    def cancel(self, batch: Batch) -> List[str]:
        """Stop the batch: pending images are not started, queued executes
        are cancelled and their migrations aborted; what runs in librbd
        cannot be interrupted and stays executed.  Returns those left."""
        batch.cancelled = True
        self.book.save(batch)
        left = []
        for item in batch.items:
            if item.state == PENDING:
                item.state, item.reason = ITEM_CANCELLED, 'the batch was cancelled'
                item.finished = self.book.clock()
                self.book.save_item(batch, item)
            elif item.state in IN_FLIGHT or item.state == EXECUTED:
                try:
                    self.actions.cancel(batch, item)
                except MigrationError as e:
                    left.append(f'{item.name} ({item.state}): {e}')
        return left

    def progress(self, batch: Batch) -> float:
        """Share of the batch's bytes copied: executed images count whole,
        the executing ones by their task's progress; skipped ones not at all."""
        total = done = 0.0
        for item in batch.items:
            if item.state in (SKIPPED,):
                continue
            size = float(max(item.size, 1))
            total += size
            if item.state in (EXECUTED, VERIFYING, COMMITTING, DONE):
                done += size
            elif item.state == EXECUTING and item.task_id:
                task = self.actions.task(item.task_id)
                done += size * (task.progress if task else 0.0)
        return done / total if total else 1.0
