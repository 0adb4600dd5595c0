"""Progress events through the mgr's progress module (``ceph progress``,
``ceph -s``, the dashboard), one per running task, at most about once a
second each."""
import logging
import time
from typing import Any, Callable, Dict, Optional

from .tasks import FAILED, Task

log = logging.getLogger(__name__)

#: ``MgrModule.remote``: (module, method, *args) -> result.
Remote = Callable[..., Any]


class ProgressEvents:
    def __init__(self, remote: Remote, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.remote = remote
        self.interval = interval
        self.clock = clock
        self._last: Dict[str, float] = {}

    @staticmethod
    def event_id(task: Task) -> str:
        return f'rbd_migration/task/{task.id}'

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        try:
            self.remote('progress', method, *args, **kwargs)
        except ImportError:
            pass  # the progress module is disabled
        except RuntimeError as e:  # remote() wraps any error of the progress module
            log.warning('progress %s %s failed: %s', method, args[:1], e)

    def started(self, task: Task) -> None:
        self._last[task.id] = self.clock()
        self._update(task)

    def progress(self, task: Task) -> None:
        now = self.clock()
        if now - self._last.get(task.id, 0.0) >= self.interval:
            self._last[task.id] = now
            self._update(task)

    def _update(self, task: Task) -> None:
        self._call('update', self.event_id(task),
                   f'{task.message} ({task.progress:.0%})', task.progress,
                   refs=self._refs(task), add_to_ceph_s=True)

    @staticmethod
    def _refs(task: Task) -> Dict[str, Any]:
        return {'origin': 'rbd_migration', 'action': task.action,
                'pool_id': task.pool_id, 'pool_namespace': task.namespace,
                'image_id': task.image_id}

    def finished(self, task: Task) -> None:
        self._last.pop(task.id, None)
        if task.state == FAILED:
            self._call('fail', self.event_id(task),
                       f'{task.message}: {task.last_error}')
        else:  # done, cancelled, or back in the queue to retry or resume
            # The event keeps its last message: drop the stale percentage.
            self._call('update', self.event_id(task), task.message, task.progress,
                       refs=self._refs(task))
            self._call('complete', self.event_id(task))

    def batch(self, batch_id: str, fraction: Optional[float], message: str) -> None:
        """The batch as a whole: one event, completed when the batch ends."""
        event = f'rbd_migration/batch/{batch_id}'
        if fraction is None:
            self._call('update', event, message, 1.0, refs={'origin': 'rbd_migration'})
            self._call('complete', event)
        else:
            self._call('update', event, f'{message} ({fraction:.0%})', fraction,
                       refs={'origin': 'rbd_migration', 'batch': batch_id},
                       add_to_ceph_s=True)
