"""Commands answer within their budget, whatever they wait on."""
import errno
import threading
import time
from typing import List

from rbd_migration.dispatch import Call, Dispatcher, HandlerResult


def ok(text: str) -> HandlerResult:
    return 0, text, ''


def test_a_quick_command_answers_itself() -> None:
    d = Dispatcher(lambda: 1.0)
    assert d.call('k', 'status', lambda call: ok('fine')) == (0, 'fine', '')
    assert d.running() == []


def test_a_slow_command_goes_on_in_the_background_and_answers_when_repeated() -> None:
    release = threading.Event()

    def slow(call: Call) -> HandlerResult:
        with d.waits.on('pool rbd'):
            release.wait(10)
        return ok('prepared')

    d = Dispatcher(lambda: 0.2)
    began = time.monotonic()
    code, _, err = d.call('p', 'prepare rbd/x', slow, subject='rbd/x')
    assert time.monotonic() - began < 1.0
    assert code == -errno.EINPROGRESS
    assert 'prepare rbd/x is still running' in err and 'waiting on pool rbd' in err
    assert [c['command'] for c in d.running()] == ['prepare rbd/x']
    # Repeated while it runs: still running, no second run started.
    assert d.call('p', 'prepare rbd/x', slow, subject='rbd/x')[0] == -errno.EINPROGRESS
    release.set()
    deadline = time.monotonic() + 5
    while d.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.call('p', 'prepare rbd/x', slow, subject='rbd/x') == (0, 'prepared', '')


def test_other_commands_answer_while_one_waits() -> None:
    release = threading.Event()
    d = Dispatcher(lambda: 0.1)
    d.call('p', 'prepare rbd/x', lambda call: (release.wait(10), ok(''))[1], subject='rbd/x')
    began = time.monotonic()
    assert d.call('l', 'task list', lambda call: ok('no tasks')) == (0, 'no tasks', '')
    assert d.call('a', 'abort rbd/y', lambda call: ok('queued'), subject='rbd/y')[0] == 0
    assert time.monotonic() - began < 0.5
    release.set()


def test_a_second_change_of_the_same_image_is_refused_while_the_first_runs() -> None:
    release = threading.Event()
    d = Dispatcher(lambda: 0.1)
    d.call('p', 'prepare rbd/x', lambda call: (release.wait(10), ok(''))[1], subject='rbd/x')
    code, _, err = d.call('a', 'abort rbd/x', lambda call: ok(''), subject='rbd/x')
    assert code == -errno.EBUSY
    assert err.startswith('prepare rbd/x is still running') and 'abort rbd/x waits' in err
    release.set()


def test_commands_left_in_the_background_are_bounded() -> None:
    release = threading.Event()
    d = Dispatcher(lambda: 0.01, max_background=3)
    answers: List[int] = []
    for n in range(5):
        answers.append(d.call(f's{n}', 'status', lambda call: (release.wait(10), ok(''))[1])[0])
    assert answers[:3] == [-errno.EINPROGRESS] * 3
    assert answers[3:] == [-errno.EBUSY] * 2
    release.set()


def test_a_crash_is_one_line() -> None:
    def crash(call: Call) -> HandlerResult:
        raise RuntimeError('boom')

    d = Dispatcher(lambda: 1.0)
    assert d.call('c', 'status', crash) == (-errno.EIO, '', 'internal error: RuntimeError')
