"""The execute child's end as the parent reports it, without a cluster: a
child that cannot start says why in the task's error (the last line of its
stderr), and is gone when the task lets it go; and the spare child, started
ahead of a task, handed out once, alive after the thread that took it ends,
and let go when unused, dead or closed."""
import os
import re
import subprocess
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest

from rbd_migration.engine import isolated
from rbd_migration.engine.migration import ImageRef
from rbd_migration.errors import ChildFailed

REF = ImageRef(pool_id=1, pool='rbd', namespace='', name='x', id='abc')


def test_a_child_that_cannot_start_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    # /bin/sh runs the child's Python command line as a shell command: it
    # fails at once, with a line on stderr, as a child whose interpreter or
    # package is broken would.
    monkeypatch.setattr(isolated, 'PYTHON', '/bin/sh')
    with isolated.Child(isolated.ChildClient('client.x'), threading.Event()) as child:
        with pytest.raises(ChildFailed) as failed:
            child.execute(REF, lambda done, total: 0)
        proc = child.proc
    message = str(failed.value)
    assert re.fullmatch(r"librbd's execute of rbd/x ended without a word "
                        r"\(exit status [1-9]\d*\): .*(error|not found).*", message), message
    assert failed.value.transient and '\n' not in message
    assert proc.poll() is not None and child.stderr.closed


def test_a_silent_child_is_reported_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, 'PYTHON', '/bin/true')
    with isolated.Child(isolated.ChildClient('client.x'), threading.Event()) as child:
        with pytest.raises(ChildFailed, match=r'ended without a word \(exit status 0\)$'):
            child.execute(REF, lambda done, total: 0)


#: A child that arms its death with the thread that started it, as the real
#: one does, then waits for its request (without connecting anywhere).
WAITING = ('import json, sys; from rbd_migration.engine import isolated; '
           'isolated._die_with_parent(json.loads(sys.stdin.readline())["parent"]); '
           'sys.stdin.readline()')


def _until(what: Callable[[], Optional[object]], limit: float = 10.0) -> object:
    ends = time.monotonic() + limit
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < ends, 'not within the limit'
        time.sleep(0.02)


def _spare(children: isolated.Children) -> Optional[isolated.Child]:
    return children._spare


def _warmed(idle: float) -> Tuple[isolated.Children, isolated.Child]:
    """Children asked for a spare, and the spare once it is there."""
    children = isolated.Children(isolated.ChildClient('client.x'), idle=idle)
    children.warm()
    spare = _until(lambda: _spare(children))
    assert isinstance(spare, isolated.Child)
    return children, spare


@pytest.fixture
def waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolated, 'CHILD_CODE', WAITING)


@pytest.mark.usefixtures('waiting')
def test_a_spare_is_handed_out_once_and_outlives_the_thread_that_took_it() -> None:
    assert _spare(isolated.Children(isolated.ChildClient('client.x'))) is None  # unasked
    children, first = _warmed(30)
    held = children.child(threading.Event())
    taken: List[isolated.Child] = []
    thread = threading.Thread(target=lambda: taken.append(held.__enter__()))
    thread.start()
    thread.join()
    assert taken[0] is first
    time.sleep(0.3)     # the taking thread ended: a child of its own would be dead
    assert first.proc.poll() is None
    assert _spare(children) is None             # none started while it copies
    held.__exit__(None, None, None)
    assert first.proc.poll() is not None
    second = _until(lambda: _spare(children))   # the next task's, once it is done
    assert second is not first
    children.close()
    assert isinstance(second, isolated.Child) and second.proc.poll() is not None
    assert children._keeper is not None and not children._keeper.is_alive()


@pytest.mark.usefixtures('waiting')
def test_an_unused_spare_is_let_go() -> None:
    children, spare = _warmed(0.5)
    _until(lambda: spare.proc.poll() is not None, limit=5)
    time.sleep(0.1)
    waits = []
    wait = children._cv.wait

    def counted(timeout: Optional[float] = None) -> bool:
        waits.append(timeout)
        return wait(timeout)
    children._cv.wait = counted  # type: ignore[method-assign]
    time.sleep(0.5)
    assert _spare(children) is None             # and no other started
    assert len(waits) <= 1, waits               # its thread waits for a warm, not spins
    children.close()


@pytest.mark.usefixtures('waiting')
def test_a_dead_spare_is_not_handed_out() -> None:
    children, spare = _warmed(30)
    spare.proc.kill()
    spare.proc.wait()
    with children.child(threading.Event()) as child:
        assert child.proc.pid != spare.proc.pid and child.proc.poll() is None
    children.close()


def test_a_spare_that_dies_by_itself_is_not_started_again_until_asked(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A broken install kills every child at its start: one try per warm,
    said in the log, not one every check for as long as spares are wanted."""
    monkeypatch.setattr(isolated, 'CHILD_CODE', 'import sys; sys.stdin.readline(); '
                                                'sys.exit("cannot import rbd_migration")')
    monkeypatch.setattr(isolated, 'SPARE_CHECK', 0.05)
    started: List[isolated.Child] = []

    class Counted(isolated.Child):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)
    monkeypatch.setattr(isolated, 'Child', Counted)
    children = isolated.Children(isolated.ChildClient('client.x'), idle=30)
    children.warm()
    _until(lambda: started and started[0].proc.poll() is not None)
    _until(lambda: 'cannot import rbd_migration' in caplog.text)
    time.sleep(0.5)                             # ten checks
    assert len(started) == 1 and _spare(children) is None
    children.warm()
    _until(lambda: len(started) == 2)
    children.close()


def test_a_child_imports_the_readers_ahead_but_not_boto3() -> None:
    """What a spare has ready when a task takes it: every format's code and
    the file, HTTP and NBD streams' (the first NBD open paid 0.06 s for its
    import); S3's boto3 stays out of an idle spare's memory."""
    code = ('import sys; from rbd_migration.engine import isolated; '
            'isolated._import_ahead(); '
            "print(' '.join(m for m in ('nbd', 'requests', 'boto3', 'rbd_migration.formats.vmdk', "
            "'rbd_migration.streams.s3') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([isolated.PYTHON, '-c', code], cwd=root, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.split() == ['nbd', 'requests', 'rbd_migration.formats.vmdk']
