"""The execute child's end as the parent reports it, without a cluster: a
child that cannot start says why in the task's error (the last line of its
stderr), and is gone when the task lets it go."""
import re
import threading

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
