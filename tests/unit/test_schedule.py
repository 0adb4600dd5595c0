"""Scheduling limits: the execute window, executes per pool, the bandwidth
budget, and how the task queue holds and pauses tasks by them."""
import calendar
from dataclasses import fields
from typing import Any, Dict, List

import pytest

from rbd_migration.errors import InvalidArgument
from rbd_migration.schedule import Limits, Window, must_pause, task_pools, wait_reason
from rbd_migration.settings import Settings
from rbd_migration.tasks import QUEUED, RUNNING, Task, TaskAction

from tests.queueharness import Harness, new_harness


def at(hhmm: str) -> float:
    """Epoch seconds of 2026-01-05 at HH:MM UTC."""
    h, m = (int(x) for x in hhmm.split(':'))
    return float(calendar.timegm((2026, 1, 5, h, m, 0, 0, 0, 0)))


def task(tid: str, action: str = 'execute', pool: str = 'rbd2',
         source: str = 'rbd') -> Task:
    return Task(id=tid, action=TaskAction(action), pool_id=2, pool=pool, namespace='',
                image_id=f'id{tid}', image_name=f'img{tid}', sequence=int(tid),
                message='', options={'source_pool': source})


# -- windows ------------------------------------------------------------------

def test_empty_window_is_always_open() -> None:
    w = Window.parse('')
    assert w.is_open(at('03:00')) and w.is_open(at('15:00'))
    assert str(w) == 'always'


@pytest.mark.parametrize('when,open_', [('21:59', False), ('22:00', True), ('23:59', True),
                                        ('00:00', True), ('05:59', True), ('06:00', False),
                                        ('12:00', False)])
def test_window_wrapping_midnight(when: str, open_: bool) -> None:
    assert Window.parse('22:00-06:00 UTC').is_open(at(when)) is open_


def test_several_ranges_and_end_of_day() -> None:
    w = Window.parse('01:00-02:30, 12:00-24:00 utc')
    assert w.utc
    assert [w.is_open(at(t)) for t in ('00:59', '01:00', '02:29', '02:30', '11:59',
                                       '12:00', '23:59')] == \
        [False, True, True, False, False, True, True]


def test_local_time_window_uses_the_host_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    monkeypatch.setenv('TZ', 'Etc/GMT-2')   # UTC+2
    time.tzset()
    try:
        w = Window.parse('10:00-11:00')
        assert w.is_open(at('08:30')) and not w.is_open(at('10:30'))
    finally:
        monkeypatch.delenv('TZ')
        time.tzset()


@pytest.mark.parametrize('text', ['22-06', '22:00', '25:00-01:00', '10:60-11:00',
                                  '10:00-10:00', '24:30-01:00', 'nightly', '22:00-06:00 CET'])
def test_bad_windows_name_the_option_and_the_form(text: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        Window.parse(text)
    msg = str(e.value)
    assert msg.startswith('execute_window: ') and '\n' not in msg


# -- limits -------------------------------------------------------------------

def test_task_pools_are_target_and_source() -> None:
    assert task_pools(task('1')) == ['rbd2', 'rbd']
    assert task_pools(task('1', pool='rbd', source='rbd')) == ['rbd']


def test_light_actions_never_wait() -> None:
    limits = Limits(executes_per_pool=1, window=Window.parse('01:00-02:00 UTC'))
    for action in ('commit', 'abort'):
        assert wait_reason(task('9', action), [task('1')], limits, at('12:00')) is None
        assert not must_pause(task('9', action), limits, at('12:00'))


def test_window_closed_holds_and_pauses_heavy_tasks() -> None:
    limits = Limits(window=Window.parse('01:00-02:00 UTC'))
    reason = wait_reason(task('1', 'verify'), [], limits, at('12:00'))
    assert reason == 'outside execute_window (01:00-02:00 UTC)'
    assert must_pause(task('1'), limits, at('12:00'))
    assert wait_reason(task('1'), [], limits, at('01:30')) is None
    assert not must_pause(task('1'), limits, at('01:30'))


def test_executes_per_pool_counts_source_and_target_pools() -> None:
    limits = Limits(executes_per_pool=2)
    running = [task('1'), task('2', pool='other', source='rbd')]
    # Both running tasks read from rbd: a third one touching rbd waits.
    reason = wait_reason(task('3'), running, limits, at('12:00'))
    assert reason is not None and 'pool rbd has 2' in reason
    # A task between two other pools does not.
    assert wait_reason(task('4', pool='p1', source='p2'), running, limits, at('12:00')) is None
    # Commits running do not count.
    assert wait_reason(task('3'), [task('1'), task('2', 'commit')], limits, at('12:00')) is None


def test_bandwidth_budget_holds_new_executes_while_spent() -> None:
    limits = Limits(bandwidth=100e6)
    running = [task('1'), task('2')]
    rates = {'1': 60e6, '2': 50e6}
    reason = wait_reason(task('3'), running, limits, at('12:00'), lambda t: rates[t.id])
    assert reason is not None and '110.0 MB/s' in reason and 'max_bandwidth_mbps 100' in reason
    rates['2'] = 30e6
    assert wait_reason(task('3'), running, limits, at('12:00'), lambda t: rates[t.id]) is None
    # Nothing running: the first execute always starts.
    assert wait_reason(task('3'), [], limits, at('12:00'), lambda t: 1e12) is None


# -- the queue under limits -----------------------------------------------------

def gated(harnesses: List[Harness], limits: List[Limits], now: List[float]) -> Harness:
    h = new_harness(harnesses, limit=8)
    h.queue.gate = lambda t, running, settings: wait_reason(t, running, limits[0], now[0])
    h.queue.pause = lambda t, settings: must_pause(t, limits[0], now[0])
    return h


def test_queue_never_runs_more_per_pool_than_allowed(harnesses: List[Harness]) -> None:
    h = gated(harnesses, [Limits(executes_per_pool=2)], [at('12:00')])
    tasks = [h.submit(f'img{i}') for i in range(5)]
    h.queue.schedule()
    first = [h.runner.call(t.id) for t in tasks[:2]]
    assert h.running_ids() == [tasks[0].id, tasks[1].id]
    assert set(h.queue.waiting) == {t.id for t in tasks[2:]}
    assert 'max_concurrent_executes_per_pool 2' in h.queue.waiting[tasks[2].id]
    first[0].finish()
    h.queue.schedule()
    h.runner.call(tasks[2].id).finish()
    assert len(h.running_ids()) <= 2
    assert h.runner.max_active <= 2


def test_window_closing_pauses_and_opening_resumes(harnesses: List[Harness]) -> None:
    now = [at('01:30')]
    h = gated(harnesses, [Limits(window=Window.parse('01:00-02:00 UTC'))], now)
    t = h.submit('a')
    call = h.start(t)
    assert call.send_report(10, 100) is True
    now[0] = at('02:00')
    h.queue.check_pauses()
    call.report_until_stopped()
    call.join()
    assert t.state == QUEUED and t.attempts == 0, t
    assert h.store.task(t.id)['state'] == QUEUED
    h.queue.schedule()
    assert t.state == QUEUED and 'outside execute_window' in h.queue.waiting[t.id]
    now[0] = at('01:00') + 86400
    again = h.start(t, attempt=2)
    assert t.state == RUNNING and t.attempts == 1
    again.finish()


def test_a_bad_option_value_holds_heavy_tasks_with_the_message(harnesses: List[Harness]) -> None:
    h = new_harness(harnesses)

    def gate(t: Task, running: List[Task], settings: Settings) -> None:
        Window.parse('tonight')

    h.queue.gate = gate
    t = h.submit('a')
    h.queue.schedule()
    assert t.state == QUEUED
    assert h.queue.waiting[t.id].startswith('execute_window: ')


def test_a_pass_reads_every_option_once_and_hands_that_snapshot_down(
        harnesses: List[Harness]) -> None:
    h = new_harness(harnesses)
    reads: Dict[str, int] = {}

    def option(name: str) -> Any:
        reads[name] = reads.get(name, 0) + 1
        return {'max_concurrent_tasks': 2, 'stall_warning_after': 60.0}.get(name)

    seen: List[Settings] = []

    def gate(t: Task, running: List[Task], settings: Settings) -> None:
        seen.append(settings)

    def pause(t: Task, settings: Settings) -> bool:
        seen.append(settings)
        return False

    h.queue.settings = lambda: Settings.read(option)
    h.queue.gate, h.queue.pause = gate, pause
    h.start(h.submit('a'))
    waiting = [h.submit(name) for name in 'bcd']
    reads.clear()
    seen.clear()
    h.queue.run_pass()
    assert reads == {f.name: 1 for f in fields(Settings)}
    assert len(seen) == 3 and all(s is seen[0] for s in seen)   # b's gate; a's and b's pause
    assert [t.state for t in waiting] == [RUNNING, QUEUED, QUEUED]
    assert h.queue.waiting[waiting[1].id] == '2 task(s) running (max_concurrent_tasks 2)'
