"""The read side: what ``status``, ``metrics``, ``task list`` and ``task get``
answer, and the batch failures health reports.

Kept apart from the services that change things, so that a read never
queues or refuses anything: it only looks at the task queue, the migration
listing, the batch book and the migrations' records.
"""
import errno
import time
from typing import Any, Dict, List, Optional

from .engine.migration import MigrationInfo
from .errors import MigrationError, StillActive
from .batch_service import BatchService
from .metrics import summary as metrics_summary
from .secrets import mask_spec
from .service import MigrationService, Prepared
from .tasks import COMPLETED, FAILED, RUNNING, Task

#: The share of ``command_wait`` status waits for a fresh listing before it
#: answers from the last one.
STATUS_SCAN_SHARE = 0.75


class Reports:
    """Answers over the migration service's queue and listing and the
    batches' book; it changes nothing but how warm the listing is."""

    def __init__(self, service: MigrationService, batches: BatchService) -> None:
        self.service = service
        self.queue = service.queue
        self.listing = service.listing
        self.batches = batches

    # -- status ------------------------------------------------------------
    def status(self, image: Optional[str] = None) -> Dict[str, Any]:
        """One migration with its tasks, or every migration, every task,
        how old the listing is and the metrics."""
        if image:
            info = self.service.find(image)
            tasks = [t for t in self.queue.list() if t.image_key == info.dest.key]
            return {'migrations': [self.describe(info)],
                    'tasks': [t.to_dict() for t in tasks]}
        # Tasks first: one seen ended has put its change in the listing.
        tasks = self.queue.list()
        settings = self.service.settings()
        max_age = settings.status_max_age
        running = max_age > 0 and any(t.state == RUNNING for t in tasks)
        wait = STATUS_SCAN_SHARE * settings.command_wait
        listed, unanswered = self.listing.within(wait, max_age if running else 0.0)
        if running:
            self.listing.warm(max_age)
        infos = listed.infos + self.service.imports()
        latest: Dict[str, Task] = {}
        for t in tasks:  # one pass, not one per migration: queues run long
            if t.image_key not in latest or t.sequence > latest[t.image_key].sequence:
                latest[t.image_key] = t
        shown: Dict[str, Any] = {'at': listed.began_wall,
                                 'age': round(listed.age(time.monotonic()), 3)}
        if unanswered is not None:
            # The scan did not end in time: this is the last listing, and
            # what the scan still waits on.
            shown['stale'] = True
            shown['waiting_on'] = unanswered
        return {'migrations': [self.describe(i, latest) for i in infos],
                'tasks': [t.to_dict() for t in tasks], 'listed': shown,
                'metrics': self.metrics(), 'live_endpoint': self.service.live.counters()}

    def keep_listing_warm(self) -> None:
        """While tasks run, keep the listing young enough for status to
        answer from it, even when nobody has asked for a while."""
        max_age = self.service.settings().status_max_age
        if max_age > 0 and any(t.state == RUNNING for t in self.queue.list()):
            self.listing.warm(max_age)

    def describe(self, info: MigrationInfo,
                 latest: Optional[Dict[str, Task]] = None) -> Dict[str, Any]:
        """A migration as status shows it, with its latest task (from
        ``latest``, each image's latest task, when given)."""
        d = info.to_dict()
        if d['source_spec'] is not None:
            d['source_spec'] = mask_spec(d['source_spec'])
        key = info.dest.key
        task = latest.get(key) if latest is not None else self.queue.latest_for(key)
        d['task'] = task.to_dict() if task else None
        d['layout'] = self.service.layout_of(info.dest)
        d['state_text'] = _state_text(info, task)
        return d

    def prepared(self, prepared: Prepared) -> Dict[str, Any]:
        """What prepare answers: the migration as status shows it, and for
        an import what its probe found."""
        result = self.describe(prepared.info)
        if prepared.probe is not None:
            result['probe'] = prepared.probe
        return result

    # -- metrics and health ----------------------------------------------------
    def metrics(self) -> Dict[str, Any]:
        out = metrics_summary(self.queue.list(), self.service.meter, self.queue.waiting)
        out['batches'] = [{'id': b.id, 'state': b.state, 'counts': b.counts(),
                           'progress': round(self.batches.progress(b), 4)}
                          for b in self.batches.book.list()]
        return out

    def failures(self) -> List[str]:
        """Batch images that failed outside any task (e.g. prepare), for
        RBD_MIGRATION_FAILED; failed tasks are reported by themselves."""
        out = []
        for batch in self.batches.book.list():
            if batch.acknowledged:
                continue    # with batch cancel, after it ended
            for item in batch.items:
                if item.state == 'failed' and item.task_id is None:
                    out.append(f'batch {batch.id}: {batch.source_spec(item.name)} '
                               f'failed: {item.reason}; once handled, acknowledge '
                               f'with ceph rbd migration batch cancel {batch.id}')
        return out

    # -- tasks -------------------------------------------------------------
    def task_list(self) -> Dict[str, Any]:
        return {'tasks': [t.to_dict() for t in self.queue.list()]}

    def task_get(self, task_id: str) -> Dict[str, Any]:
        """One task, answered at once: the mgr serves module commands one at
        a time, so a command that blocked until a task ended would stall
        every other command.  The errno tells scripts where the task is
        (``tools/rbd-migration-wait`` loops on it with a timeout)."""
        task = self.queue.get(task_id)
        what = f'task {task.id} ({task.action} of {task.image_spec})'
        if task.active:
            raise StillActive(f'{what} is {task.state} ({task.progress:.0%})'
                              + _why_not_done(task, self.queue.waiting.get(task.id)))
        if task.state == FAILED:
            err = MigrationError(f'{what} failed: {task.last_error}')
            err.errno = task.errno or errno.EIO
            raise err
        if task.state != COMPLETED:
            err = MigrationError(f'{what} was {task.state}')
            err.errno = errno.ECANCELED
            raise err
        return {'message': f'{what} completed', 'task': task.to_dict()}


def _why_not_done(task: Task, waiting: Optional[str]) -> str:
    """What an active task waits on, for scripts that poll it and for
    the operator reading their log."""
    why = [f'attempt {task.attempts}'] if task.attempts > 1 else []
    why += [f'waiting: {waiting}'] if waiting else []
    why += [f'stalled: {task.stalled}'] if task.stalled else []
    why += [f'last error: {task.last_error}'] if task.last_error else []
    return f"; {'; '.join(why)}" if why else ''


def _state_text(info: MigrationInfo, task: Optional[Task]) -> str:
    if info.interrupted and not (task and task.active):
        return f'interrupted: {info.state_description}'
    if info.state == 'error':
        return f'error: {info.state_description or "librbd reports an error"}'
    if task is not None and task.state == FAILED and not task.superseded:
        return f'error: {task.action} failed: {task.last_error}'
    if info.state == 'executing' or (task and task.active and task.action == 'execute'):
        if task is not None and task.action == 'execute' and task.active:
            if task.state == RUNNING:
                stalled = f', stalled: {task.stalled}' if task.stalled else ''
                return f'executing ({task.progress:.0%} complete{stalled})'
            return f'executing ({task.state})'
        return 'executing (interrupted; run execute to resume)'
    return info.state
