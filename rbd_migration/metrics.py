"""Bytes copied and copy rates of running tasks, and counts by state.

Rates live in memory only (a restarted mgr measures afresh): writing them
to the KV store on every progress step would cost more than they are worth.
Pacific's mgr gives modules no way to publish their own Prometheus metrics
(the prometheus module exports daemons' perf counters and health checks),
so these reach graphs through ``ceph rbd migration metrics -f json``; the
health checks reach Prometheus as ``ceph_health_detail``.
"""
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from .tasks import Task

#: Weight of the newest sample in the rate's moving average.
SMOOTHING = 0.3


@dataclass
class Sample:
    at: float
    done: int
    rate: float = 0.0


def task_bytes(task: Task) -> Optional[int]:
    """The bytes a task copies or reads, when known (recorded at submit)."""
    size = task.options.get('size')
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


class RateMeter:
    """Copy rate per task from its progress reports, as an exponentially
    weighted moving average over samples at least ``min_interval`` apart."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = 1.0) -> None:
        self.clock = clock
        self.min_interval = min_interval
        self._samples: Dict[str, Sample] = {}
        self._lock = threading.Lock()

    def observe(self, task: Task) -> None:
        total = task_bytes(task)
        if total is None:
            return
        done, now = int(task.progress * total), self.clock()
        with self._lock:
            last = self._samples.get(task.id)
            if last is None or done < last.done:
                self._samples[task.id] = Sample(now, done)
                return
            elapsed = now - last.at
            if elapsed < self.min_interval:
                return
            rate = (done - last.done) / elapsed
            if last.rate:
                rate = SMOOTHING * rate + (1 - SMOOTHING) * last.rate
            self._samples[task.id] = Sample(now, done, rate)

    def forget(self, task: Task) -> None:
        with self._lock:
            self._samples.pop(task.id, None)

    def rate(self, task: Task) -> float:
        with self._lock:
            sample = self._samples.get(task.id)
        return sample.rate if sample else 0.0


def task_metrics(task: Task, meter: RateMeter) -> Dict[str, Any]:
    total = task_bytes(task)
    return {'id': task.id, 'action': task.action, 'image_spec': task.image_spec,
            'state': task.state, 'batch': task.options.get('batch'),
            'bytes_total': total,
            'bytes_done': int(task.progress * total) if total is not None else None,
            'rate_bytes_per_sec': round(meter.rate(task), 1)}


def summary(tasks: List[Task], meter: RateMeter,
            waiting: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Counts by state (failed: those not superseded by a later task of the
    same image) and the running tasks' bytes and rates."""
    counts: Dict[str, int] = {}
    for task in tasks:
        if task.state == 'failed' and task.superseded:
            continue
        counts[task.state] = counts.get(task.state, 0) + 1
    running = [task_metrics(t, meter) for t in tasks if t.state == 'running']
    return {'counts': counts,
            'queued': counts.get('queued', 0) + counts.get('waiting to retry', 0),
            'running': counts.get('running', 0),
            'failed': counts.get('failed', 0),
            'rate_bytes_per_sec': round(sum(m['rate_bytes_per_sec'] for m in running), 1),
            'running_tasks': running,
            'waiting': dict(waiting or {})}


class MeteredEvents:
    """Task events passed on unchanged, measuring copy rates on the way."""

    def __init__(self, events: Any, meter: RateMeter) -> None:
        self.events = events
        self.meter = meter

    def started(self, task: Task) -> None:
        self.meter.observe(task)
        self.events.started(task)

    def progress(self, task: Task) -> None:
        self.meter.observe(task)
        self.events.progress(task)

    def finished(self, task: Task) -> None:
        self.meter.forget(task)
        self.events.finished(task)

    def changed(self, tasks: List[Task]) -> None:
        self.events.changed(tasks)
