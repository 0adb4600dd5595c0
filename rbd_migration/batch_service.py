"""The batch service: the batch commands and the batch driver's steps, a
peer of ``MigrationService`` that uses only its public methods.

Each step a batch takes is the same command an operator could type
(prepare, execute, verify, commit), with the same checks, so a batch never
does what a single command would refuse.
"""
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import rbd

from .batch import (EXECUTED, ITEM_CANCELLED, Batch, BatchBook, BatchDriver, BatchItem,
                    ImageFacts, parse_pool_spec, plan, select)
from .errors import InvalidArgument, MigrationError, NotFound, NotMigrating
from .images import ImageSpec, Layout
from .inventory import describe as describe_image
from .inventory import image_names
from .schedule import HEAVY
from .service import NAMESPACED_PARENT, MigrationService, Queued
from .settings import Settings
from .tasks import RUNNING, Task, TaskAction

log = logging.getLogger(__name__)

#: (batch id, fraction, message) to the progress module; None when finished.
BatchProgress = Callable[[Batch, Optional[float], str], None]


class BatchService:
    def __init__(self, service: MigrationService,
                 progress: BatchProgress = lambda b, f, m: None) -> None:
        self.service = service
        self.book = BatchBook(service.store)
        self.driver = BatchDriver(self.book, self)
        self.report_progress = progress
        self._reported: Dict[str, float] = {}
        #: Serialises changes to batches: the driver's passes and commands.
        self.lock = threading.RLock()
        #: Whether the driver is in a tick, and the options as that tick
        #: read them at its first check (None until then).
        self._ticking = False
        self._tick_settings: Optional[Settings] = None

    def load(self) -> None:
        self.book.load()

    def tick(self) -> None:
        """One pass of the batch driver, then the batches' progress events."""
        with self.lock:
            self._ticking, self._tick_settings = True, None
            try:
                self.driver.advance()
            finally:
                self._ticking, self._tick_settings = False, None
        now = time.monotonic()
        for batch in self.book.list():
            if batch.id not in self._reported and batch.finished is not None:
                continue
            if batch.finished is not None:
                self._reported.pop(batch.id, None)
                self.report_progress(batch, None, self._message(batch))
            elif now - self._reported.get(batch.id, 0.0) >= 1.0:
                self._reported[batch.id] = now
                self.report_progress(batch, self.driver.progress(batch), self._message(batch))

    def progress(self, batch: Batch) -> float:
        """How far the batch is, 0 to 1."""
        return self.driver.progress(batch)

    @staticmethod
    def _message(batch: Batch) -> str:
        counts = batch.counts()
        done = counts.get('done', 0) + counts.get(EXECUTED, 0)
        return (f'Migrating batch {batch.id} from {batch.source} to {batch.dest} '
                f'({done}/{len(batch.items)} images)')

    # -- commands ------------------------------------------------------------
    def batch_prepare(self, source: str, dest: str, layout_args: Dict[str, Any],
                      pattern: Optional[str] = None, listed: Optional[str] = None,
                      dry_run: bool = False, auto_commit: bool = False,
                      verify: bool = False) -> Dict[str, Any]:
        src_pool, src_ns = parse_pool_spec(source, 'source_pool_spec')
        dst_pool, dst_ns = parse_pool_spec(dest, 'dest_pool_spec')
        if (src_pool, src_ns) == (dst_pool, dst_ns):
            raise InvalidArgument('dest_pool_spec: the same as the source; a batch moves '
                                  'images to another pool or namespace')
        if verify and not auto_commit:
            raise InvalidArgument('--verify-before-commit goes with --auto-commit '
                                  '(without it, verify each image before you commit it)')
        Layout.parse(**layout_args)    # refuse bad layout options before anything
        with self.service.ioctx(src_pool, src_ns, 'source_pool_spec') as src_io, \
                self.service.ioctx(dst_pool, dst_ns, 'dest_pool_spec') as dst_io:
            names = select(image_names(src_io), pattern, listed)
            if not names:
                raise NotFound(f'no image in {source} matches'
                               + (f' --pattern {pattern!r}' if pattern else ''))
            taken = set(image_names(dst_io))
            facts = [describe_image(src_io, n, taken, dest) for n in names]
        for f in facts:
            if f.clones and src_ns and not f.blocked:
                f.blocked = NAMESPACED_PARENT.format(image=f'{source}/{f.name}',
                                                     clones=len(f.clones))
        batch = Batch(id='', source_pool=src_pool, source_namespace=src_ns,
                      dest_pool=dst_pool, dest_namespace=dst_ns, layout=layout_args,
                      auto_commit=auto_commit, verify=verify,
                      items=plan(facts, src_pool, src_ns))
        result = self._plan_result(batch, facts)
        if dry_run:
            result['message'] = 'dry run: nothing was changed'
            return result
        with self.lock:
            self.book.create(batch)
        result['batch'] = batch.summary(0.0)
        result['message'] = (f'batch {batch.id}: {len(batch.items)} image(s) from '
                             f'{batch.source} to {batch.dest}; follow it with '
                             f'ceph rbd migration batch status {batch.id}')
        return result

    @staticmethod
    def _plan_result(batch: Batch, facts: List[ImageFacts]) -> Dict[str, Any]:
        by_name = {f.name: f for f in facts}
        images = []
        for item in batch.items:
            f = by_name[item.name]
            images.append({
                'order': item.index + 1, 'image': batch.source_spec(item.name),
                'target': batch.dest_spec(item.name), 'size': item.size,
                'snapshots': item.snapshots, 'parent': item.parent,
                'after': item.parent_item, 'clones': f.clones, 'in_use': f.watchers,
                'action': 'skip' if item.state == 'skipped' else 'migrate',
                'reason': item.reason,
                'commit': ('with --force (it has clones)' if item.needs_force
                           else 'plain') if batch.auto_commit else 'by the operator'})
        migrate = [i for i in images if i['action'] == 'migrate']
        return {'plan': images, 'source': batch.source, 'dest': batch.dest,
                'auto_commit': batch.auto_commit, 'verify_before_commit': batch.verify,
                'to_migrate': len(migrate), 'to_skip': len(images) - len(migrate),
                'bytes': sum(i['size'] for i in migrate)}

    def batch_status(self, batch_id: Optional[str]) -> Dict[str, Any]:
        if not batch_id:
            return {'batches': [b.summary(self.driver.progress(b)) for b in self.book.list()]}
        batch = self.book.get(batch_id)
        items = []
        for item in batch.items:
            d = item.to_dict()
            d['image'], d['target'] = batch.source_spec(item.name), batch.dest_spec(item.name)
            task = self.task(item.task_id) if item.task_id else None
            d['task'] = ({'id': task.id, 'action': task.action, 'state': task.state,
                          'progress': task.progress} if task else None)
            waiting = self.driver.waiting.get((batch.id, item.index))
            if task is not None and task.active and task.state != RUNNING:
                waiting = self.service.waiting_reason(task.id) or waiting
            d['waiting'] = waiting
            items.append(d)
        return {'batch': batch.summary(self.driver.progress(batch)), 'items': items}

    def batch_cancel(self, batch_id: str) -> Dict[str, Any]:
        batch = self.book.get(batch_id)
        if batch.finished is not None:
            # Acknowledges its failures: they leave RBD_MIGRATION_FAILED.
            with self.lock:
                batch.acknowledged = True
                self.book.save(batch)
            return {'message': f'batch {batch.id} had already ended; its failures are '
                               'no longer reported in health',
                    'batch': batch.summary(1.0)}
        with self.lock:
            left = self.driver.cancel(batch)
        running = [i.name for i in batch.items if i.state in ('executing', 'committing')]
        message = f'batch {batch.id} cancelled: no image starts any more'
        if running:
            message += ('; librbd cannot interrupt what it runs, so these end on their own '
                        f"and stay executed (commit or abort them): {', '.join(running)}")
        if left:
            message += '; not cancelled: ' + '; '.join(left)
        return {'message': message, 'batch': batch.summary(self.driver.progress(batch))}

    def batch_commit(self, batch_id: str) -> Dict[str, Any]:
        batch = self.book.get(batch_id)
        executed = [i for i in batch.items if i.state == EXECUTED]
        if not executed:
            raise InvalidArgument(f'batch {batch.id} has no executed image to commit '
                                  f'(states: {batch.counts()})')
        with self.lock:
            held = self.driver.commit_all(batch)
        message = f'batch {batch.id}: commit queued for {len(executed) - len(held)} image(s)'
        if held:
            message += '; held: ' + '; '.join(held)
        return {'message': message, 'batch': batch.summary(self.driver.progress(batch))}

    # -- the driver's steps (batch.Actions) --------------------------------------
    def _settings(self) -> Settings:
        """The options for this tick's checks: read once, at the first, so
        every item of one tick is weighed against the same values (an
        operator may change them meanwhile); afresh outside a tick."""
        if not self._ticking:
            return self.service.settings()
        if self._tick_settings is None:
            self._tick_settings = self.service.settings()
        return self._tick_settings

    def start_reason(self, batch: Batch, item: BatchItem) -> Optional[str]:
        """Why the item's execute could not start now.  Prepared only when it
        can, so the queue never holds a heap of prepared, idle migrations."""
        settings = self._settings()
        active = [t for t in self.service.tasks() if t.active]
        running = [t for t in active if t.state == RUNNING]
        probe = Task(id='', action=TaskAction.EXECUTE, pool_id=-1, pool=batch.dest_pool,
                     namespace=batch.dest_namespace, image_id='', image_name=item.name,
                     sequence=0, message='', options={'source_pool': batch.source_pool})
        try:
            reason = self.service.wait_reason(probe, running, settings)
        except MigrationError as e:
            reason = str(e)
        if reason:
            return reason
        if any(t.action in HEAVY and t.state != RUNNING for t in active):
            return 'waiting for queued tasks to start first'
        limit = settings.max_concurrent_tasks
        if len(running) >= limit:
            return f'{len(running)} task(s) running (max_concurrent_tasks {limit})'
        return None

    def prepare(self, batch: Batch, item: BatchItem) -> str:
        layout = Layout.parse(**batch.layout)
        prepared = self.service.prepare(batch.source_spec(item.name),
                                        batch.dest_spec(item.name), layout)
        return prepared.info.dest.key

    def prepared(self, batch: Batch, item: BatchItem) -> Optional[str]:
        try:
            info = self.service.find(batch.dest_spec(item.name))
        except MigrationError:
            return None      # not migrating (NotMigrating is a MigrationError)
        src = info.source
        if src is None or (src.pool, src.namespace, src.name) != (
                batch.source_pool, batch.source_namespace, item.name):
            return None
        if info.interrupted == 'prepare':
            # The old mgr stopped inside librbd's prepare: undone here (the
            # target holds no data yet), and prepared afresh.
            self.service.abort_prepare(info)
            return None
        return info.dest.key

    def execute(self, batch: Batch, item: BatchItem) -> Optional[Task]:
        return self.service.execute(batch.dest_spec(item.name), batch.id).task

    def verify(self, batch: Batch, item: BatchItem) -> Task:
        return self._required(self.service.verify(batch.dest_spec(item.name), batch.id))

    def commit_blocker(self, batch: Batch, item: BatchItem) -> Optional[str]:
        """A clone open by a client: committing its parent with --force would
        pull the parent from under that client."""
        for child, watchers in self._descendants(batch, item):
            if watchers:
                return f"waiting to commit: its clone {child} is open by {', '.join(watchers)}"
        return None

    def _descendants(self, batch: Batch, item: BatchItem) -> List[Tuple[str, List[str]]]:
        """The target's descendants outside the trash, with their watchers.
        Trashed ones (a clone's own migration source) are never opened:
        librbd 16.2 can abort the whole process opening a migration source
        whose parent moved."""
        info = self.service.find(batch.dest_spec(item.name))
        with self.service.ioctx_by_id(info.dest.pool_id, info.dest.namespace) as io, \
                rbd.Image(io, image_id=info.dest.id, read_only=True) as img:
            found = [d for d in img.list_descendants() if not d.get('trash')]
        out = []
        for d in found:
            spec = ImageSpec(d['pool'], d['pool_namespace'], d['image'])
            try:
                with self.service.ioctx(spec.pool, spec.namespace) as cio, \
                        rbd.Image(cio, image_id=d['id'], read_only=True) as child:
                    watchers = [f"client.{w['id']} at {w['addr']}"
                                for w in child.watchers_list()]
            except rbd.ImageNotFound:
                continue
            except rbd.Error as e:
                raise MigrationError(f'reading the clone {spec}: {e}') from None
            out.append((str(spec), watchers))
        return out

    def commit(self, batch: Batch, item: BatchItem) -> Task:
        spec = batch.dest_spec(item.name)
        info = self.service.find(spec)
        force = bool(self.service.descendants(info.dest))   # trashed ones too
        return self._required(self.service.commit(spec, force=force, verified=batch.verify,
                                                  batch=batch.id))

    def committed(self, batch: Batch, item: BatchItem) -> Optional[str]:
        spec = batch.dest_spec(item.name)
        try:
            info = self.service.find(spec)
        except NotMigrating:
            # Committed, if the image standing there is the target prepared.
            try:
                ref = self.service.image_ref(batch.dest_pool, batch.dest_namespace, item.name)
                return 'committed' if item.key == ref.key else None
            except NotFound:
                return None
        except NotFound:
            return None
        return 'commit' if info.interrupted == 'commit' else None

    def task(self, task_id: str) -> Optional[Task]:
        return self.service.task(task_id)

    def latest(self, key: str) -> Optional[Task]:
        return self.service.latest_task(key)

    def cancel(self, batch: Batch, item: BatchItem) -> None:
        """Queued (not yet running) executes are cancelled and their
        migrations aborted, so the source is as it was; a running verify
        stops; what librbd runs ends on its own."""
        task = self.task(item.task_id) if item.task_id else None
        if task is None or not task.active:
            return
        if task.state == RUNNING and task.action != 'verify':
            return
        self.service.task_cancel(task.id)
        if task.action == 'execute':
            self.service.abort(batch.dest_spec(item.name))
            item.state, item.reason = ITEM_CANCELLED, 'the batch was cancelled; aborted'
            item.finished = time.time()
            self.book.save_item(batch, item)

    @staticmethod
    def _required(queued: Queued) -> Task:
        if queued.task is None:
            raise MigrationError(queued.message or 'no task was queued')
        return queued.task
