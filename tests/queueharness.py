"""A TaskQueue driven step by step: an in-memory store, a fake clock, a
recorder of events and a runner whose calls the test releases one at a
time, so that no test depends on how fast a thread happens to run.  Shared
by the queue's tests and those of what schedules on it."""
import json
import queue as queue_mod
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from rbd_migration.errors import Cancelled
from rbd_migration.settings import RetryPolicy, Settings
from rbd_migration.tasks import RUNNING, TASK_PREFIX, Task, TaskQueue

#: Upper bound for anything a test waits for; only reached when a test fails.
TIMEOUT = 5.0

Report = Callable[[int, int], bool]


# -- doubles ------------------------------------------------------------------

class MemStore:
    """MgrModule's KV store API over a dict; ``None`` deletes."""

    def __init__(self) -> None:
        self.data: Dict[str, str] = {}
        self.lock = threading.Lock()

    def get_store(self, key: str, default: Optional[str] = None) -> Optional[str]:
        with self.lock:
            return self.data.get(key, default)

    def set_store(self, key: str, val: Optional[str]) -> None:
        with self.lock:
            if val is None:
                self.data.pop(key, None)
            else:
                assert isinstance(val, str)
                self.data[key] = val

    def get_store_prefix(self, prefix: str) -> Dict[str, str]:
        with self.lock:
            return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    def task(self, task_id: str) -> Dict[str, Any]:
        text = self.get_store(TASK_PREFIX + task_id)
        assert text is not None, f'task {task_id} is not in the store'
        data: Dict[str, Any] = json.loads(text)
        return data

    def task_ids(self) -> List[str]:
        return sorted((k[len(TASK_PREFIX):] for k in self.get_store_prefix(TASK_PREFIX)),
                      key=int)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """The queue's Events: what happened, in order, as (kind, id, state)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: List[Tuple[str, str, str, float]] = []
        self.snapshots: List[List[Tuple[str, str]]] = []

    def _add(self, kind: str, task: Task) -> None:
        with self.lock:
            self.log.append((kind, task.id, task.state, task.progress))

    def started(self, task: Task) -> None:
        self._add('started', task)

    def progress(self, task: Task) -> None:
        self._add('progress', task)

    def finished(self, task: Task) -> None:
        self._add('finished', task)

    def changed(self, tasks: List[Task]) -> None:
        with self.lock:
            self.snapshots.append([(t.id, t.state) for t in tasks])

    def kinds(self, task_id: str) -> List[str]:
        with self.lock:
            return [kind for kind, tid, _, _ in self.log if tid == task_id]

    def entries(self, task_id: str) -> List[Tuple[str, str, float]]:
        with self.lock:
            return [(k, s, p) for k, tid, s, p in self.log if tid == task_id]


class Call:
    """One invocation of the runner, executing commands sent by the test in
    the task's own thread."""

    def __init__(self, task: Task, report: Report) -> None:
        self.task = task
        self.report = report
        self.thread = threading.current_thread()
        self.inbox: 'queue_mod.Queue[Tuple[str, Any, Optional[queue_mod.Queue[Any]]]]' = \
            queue_mod.Queue()

    # -- test side --
    def send_report(self, done: int, total: int) -> bool:
        """Have the runner report progress; the queue's answer."""
        reply: 'queue_mod.Queue[Any]' = queue_mod.Queue()
        self.inbox.put(('report', (done, total), reply))
        answer = reply.get(timeout=TIMEOUT)
        assert isinstance(answer, bool)
        return answer

    def finish(self) -> None:
        self.inbox.put(('return', None, None))
        self.join()

    def fail(self, exc: BaseException) -> None:
        self.inbox.put(('raise', exc, None))
        self.join()

    def report_until_stopped(self) -> None:
        """Report progress until the queue says stop, then raise Cancelled,
        as the librbd engine does (without waiting for it)."""
        self.inbox.put(('loop', None, None))

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), f'task {self.task.id} did not end'

    # -- runner side --
    def serve(self) -> None:
        while True:
            kind, arg, reply = self.inbox.get(timeout=TIMEOUT)
            if kind == 'report':
                assert reply is not None
                reply.put(self.report(*arg))
            elif kind == 'return':
                return
            elif kind == 'raise':
                raise arg
            elif kind == 'loop':
                deadline = time.monotonic() + TIMEOUT
                done = 0
                while self.report(done, 100):
                    assert time.monotonic() < deadline, 'never told to stop'
                    done = min(99, done + 1)
                    time.sleep(0.001)
                raise Cancelled('stopped at the queue\'s request')


class ControlledRunner:
    """The queue's runner: each call waits for the test's commands."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.calls: List[Call] = []
        self.active = 0
        self.max_active = 0

    def __call__(self, task: Task, report: Report) -> None:
        call = Call(task, report)
        with self.cv:
            self.calls.append(call)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.cv.notify_all()
        try:
            call.serve()
        finally:
            with self.cv:
                self.active -= 1

    def call(self, task_id: str, attempt: int = 1) -> Call:
        """The ``attempt``-th call for the task, once the runner has it."""
        deadline = time.monotonic() + TIMEOUT
        with self.cv:
            while True:
                calls = [c for c in self.calls if c.task.id == task_id]
                if len(calls) >= attempt:
                    return calls[attempt - 1]
                left = deadline - time.monotonic()
                assert left > 0, f'task {task_id} attempt {attempt} never ran'
                self.cv.wait(left)

    def started_ids(self) -> List[str]:
        with self.cv:
            return [c.task.id for c in self.calls]

    def release_all(self) -> None:
        with self.cv:
            calls = list(self.calls)
        for call in calls:
            if call.thread.is_alive():
                call.inbox.put(('raise', Cancelled('test teardown'), None))
        for call in calls:
            call.thread.join(TIMEOUT)


@dataclass
class Harness:
    store: MemStore
    runner: ControlledRunner
    events: Recorder
    clock: FakeClock
    queue: TaskQueue
    limit: List[int] = field(default_factory=lambda: [2])
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    stall_after: List[float] = field(default_factory=lambda: [0.0])

    def settings(self) -> Settings:
        """The queue's options: ``limit``, ``policy`` and ``stall_after``."""
        return Settings(max_concurrent_tasks=self.limit[0],
                        retry_max_attempts=self.policy.max_attempts,
                        retry_backoff=self.policy.backoff,
                        retry_max_backoff=self.policy.max_backoff,
                        stall_warning_after=self.stall_after[0])

    def submit(self, image: str = 'img', action: str = 'execute',
               namespace: str = '', pool_id: int = 1) -> Task:
        task, created = self.submit2(image, action, namespace, pool_id)
        assert created
        return task

    def submit2(self, image: str = 'img', action: str = 'execute',
                namespace: str = '', pool_id: int = 1) -> Tuple[Task, bool]:
        return self.queue.submit(action, pool_id, 'rbd', namespace, f'id-{image}',
                                 image, f'{action} {image}', {'n': 1})

    def start(self, task: Task, attempt: int = 1) -> Call:
        """Schedule and return the runner call that ``task`` got."""
        self.queue.schedule()
        return self.runner.call(task.id, attempt)

    def running_ids(self) -> List[str]:
        return [t.id for t in self.queue.list() if t.state == RUNNING]


def make_harness(store: Optional[MemStore] = None, limit: int = 2,
                 policy: Optional[RetryPolicy] = None, keep_finished: int = 200,
                 clock: Optional[FakeClock] = None) -> Harness:
    store = store if store is not None else MemStore()
    runner, events = ControlledRunner(), Recorder()
    clock = clock or FakeClock()
    pol = policy or RetryPolicy(max_attempts=3, backoff=10.0, max_backoff=25.0)
    q = TaskQueue(store, runner, events, keep_finished=keep_finished, clock=clock)
    harness = Harness(store, runner, events, clock, q, [limit], pol)
    q.settings = harness.settings
    return harness


def new_harness(harnesses: List[Harness], **kwargs: Any) -> Harness:
    harness = make_harness(**kwargs)
    harnesses.append(harness)
    return harness
