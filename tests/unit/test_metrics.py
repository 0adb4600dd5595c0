"""Copy rates from progress reports, and the metrics summary."""
from rbd_migration.metrics import RateMeter, summary, task_metrics
from rbd_migration.tasks import Task, TaskAction, TaskState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def task(tid: str, state: str = 'running', size: object = 100 << 20,
         superseded: bool = False) -> Task:
    return Task(id=tid, action=TaskAction.EXECUTE, pool_id=1, pool='rbd2', namespace='',
                image_id='x' + tid, image_name='img' + tid, sequence=int(tid), message='',
                options={'size': size, 'batch': 'b1'}, state=TaskState(state), superseded=superseded)


def test_rate_is_a_smoothed_bytes_per_second() -> None:
    clock = Clock()
    meter = RateMeter(clock, min_interval=1.0)
    t = task('1')
    meter.observe(t)
    t.progress = 0.1                 # 10 MiB in 2 s
    clock.now += 2
    meter.observe(t)
    assert meter.rate(t) == (10 << 20) / 2
    t.progress = 0.1001              # too soon for another sample
    clock.now += 0.5
    meter.observe(t)
    assert meter.rate(t) == (10 << 20) / 2
    t.progress = 0.2                 # 10 MiB more in 1.5 s, smoothed
    clock.now += 1.0
    meter.observe(t)
    expected = 0.3 * (10 << 20) / 1.5 + 0.7 * (10 << 20) / 2
    assert abs(meter.rate(t) - expected) < 1
    meter.forget(t)
    assert meter.rate(t) == 0.0


def test_unknown_size_has_no_bytes_and_no_rate() -> None:
    meter = RateMeter(Clock())
    t = task('1', size=None)
    meter.observe(t)
    m = task_metrics(t, meter)
    assert m['bytes_total'] is None and m['bytes_done'] is None
    assert m['rate_bytes_per_sec'] == 0.0


def test_summary_counts_by_state_and_leaves_out_superseded_failures() -> None:
    meter = RateMeter(Clock())
    running = task('1')
    running.progress = 0.5
    tasks = [running, task('2', 'queued'), task('3', 'waiting to retry'),
             task('4', 'failed'), task('5', 'failed', superseded=True), task('6', 'completed')]
    s = summary(tasks, meter, {'2': 'outside execute_window (01:00-02:00)'})
    assert (s['running'], s['queued'], s['failed']) == (1, 2, 1)
    assert s['counts'] == {'running': 1, 'queued': 1, 'waiting to retry': 1,
                           'failed': 1, 'completed': 1}
    [r] = s['running_tasks']
    assert r['bytes_done'] == 50 << 20 and r['batch'] == 'b1'
    assert s['waiting'] == {'2': 'outside execute_window (01:00-02:00)'}
