"""librbd's execute (and a live import's copy before it) in a process of
its own, so that stop means stop.

librbd's ``migration_execute`` calls our progress callback but ignores its
answer: once started, it runs to its end, and a source that stops answering
(or whose Content-Length lies, which sends librbd into an endless request
loop) holds it, and the task, for ever -- a cancel or an abort could only
wait.  So the module runs it in a child process with a librados client of
its own, reads its progress from the child's output, and kills the child
when the task must stop: librbd's execute resumes from the image's state
when run again, so a killed copy loses only what was in flight.

The child also keeps the copy buffers (librbd's, and the module's for a
live import: prefill.LiveExecute) out of the mgr's memory and its Python
off the mgr's interpreter lock.  Its client is registered with the mgr
like the mgr's own, so a mgr failover blocklists it; it dies with the
thread that started it (a mgr that fails over does not leave it copying
behind the new one's back).
"""
import ctypes
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Callable, Dict, Iterator, Optional

import rados

from .. import formats, streams
from ..errors import Cancelled, ChildFailed, MigrationError
from .librbd import LibrbdEngine
from .migration import ImageRef, ProgressFn
from .prefill import LiveExecute

log = logging.getLogger(__name__)

#: The interpreter ceph-mgr embeds (Debian's), which has python3-rados.
PYTHON = '/usr/bin/python3'
#: Seconds between two looks at whether the task must stop.
POLL = 0.25
#: A child that printed nothing for this long is killed (librbd reports
#: progress at least once per object copied).
SILENCE = 600.0
PR_SET_PDEATHSIG = 1
#: Objects librbd's object map rebuilds visit at once after the module's copy.
REBUILD_CONCURRENCY = 64
#: What the child runs (a spare waits in ``_child_main`` for its request).
CHILD_CODE = 'import sys; from rbd_migration.engine.isolated import _child_main; ' \
             'sys.exit(_child_main())'
#: Seconds a spare child is kept unused (after the last prepare or task
#: that asked for one), and at most its age: then it is let go.
SPARE_IDLE = 600.0
#: Seconds between two looks at whether the spare is still alive.
SPARE_CHECK = 5.0
#: Streams whose code a child imports while it waits for its request (the
#: first NBD open paid 0.06 s for it); S3's (boto3: 0.12 s, and memory an
#: idle spare would keep) waits for an import from S3.
STREAMS_AHEAD = ('file', 'http', 'nbd')


@dataclass
class ChildClient:
    """How the child connects: the mgr's own identity and configuration."""

    name: str
    conf: Dict[str, str] = field(default_factory=dict)


# -- the child ----------------------------------------------------------------

def _child_main() -> int:
    """Read how to connect from stdin and connect; then read the request
    (sent when the task has looked at the source, which the child's start
    overlaps), run it (a live import's copy, then librbd's execute), and
    print one JSON line per progress step, then the outcome."""
    hello = json.loads(sys.stdin.readline())
    _die_with_parent(int(hello['parent']))
    conf = dict(hello['client']['conf'])
    out = sys.stdout
    client = rados.Rados(name=hello['client']['name'], conffile=os.devnull, conf=conf)
    client.connect(timeout=30)
    try:
        _say(out, {'addrs': client.get_addrs()})
        _import_ahead()
        if 'ref' in hello:
            request = hello  # a mgr that loaded the module before it was upgraded
        else:
            line = sys.stdin.readline()
            if not line:
                return 0  # the task ended before it needed librbd's execute
            request = json.loads(line)
        last = [0.0]

        def progress(done: int, total: int) -> int:
            now = time.monotonic()
            if now - last[0] >= 0.2 or done >= total:
                last[0] = now
                _say(out, {'done': done, 'total': total})
            return 0

        engine = LibrbdEngine(client)
        ref = ImageRef(**request['ref'])
        result: Dict[str, Any] = {}
        if request.get('live') is not None:
            # After the module's copy, librbd's object map rebuilds send one
            # small operation per object and wait for nothing else: more at
            # once (no copy of librbd's uses this setting then).
            result = LiveExecute.rebuilt(request['live'], client).run(
                engine, ref, progress, after_copy=lambda: client.conf_set(
                    'rbd_concurrent_management_ops', str(REBUILD_CONCURRENCY)))
        else:
            engine.execute_live(ref, progress, bool(request.get('rebuild_object_maps')),
                                bool(request.get('resume_fast_diff')))
        _say(out, {'ok': True, 'result': result})
    except MigrationError as e:
        _say(out, {'error': str(e), 'errno': e.errno, 'transient': e.transient})
    except Exception as e:  # reported as one line; the parent logs it
        _say(out, {'error': f'internal error: {type(e).__name__}: {e}',
                   'errno': errno.EIO, 'transient': False})
    finally:
        client.shutdown()
    return 0


def _import_ahead() -> None:
    """The formats' and STREAMS_AHEAD's code imported before it is needed,
    while the child waits (a spare, for minutes; a task's own child, while
    the task looks at the source)."""
    for name in formats.REGISTRY:
        formats.format_class(name)
    for name in STREAMS_AHEAD:
        streams.stream_class(name)


def _say(out: IO[str], message: Dict[str, Any]) -> None:
    out.write(json.dumps(message) + '\n')
    out.flush()


# -- the parent ---------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """SIGKILL for the child when the thread that started it ends (a mgr
    that exits or re-executes itself ends every thread); set by the child
    itself, as the mgr's subinterpreters cannot run code between fork and
    exec, and checked against the parent it was started by, in case that
    one ended before."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class Child:
    """One task's child process, started before it is needed (as the spare
    ``Children`` keeps, or while the task looks at the source): it starts
    Python and connects, then waits to be told what to execute.  Killed,
    whatever it does, when the task leaves the ``with`` block."""

    def __init__(self, client: ChildClient, stop: threading.Event,
                 register: Callable[[str], None] = lambda addrs: None,
                 unregister: Callable[[str], None] = lambda addrs: None) -> None:
        self.stop = stop
        self.register = register
        self.unregister = unregister
        self.addrs: Optional[str] = None
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        #: What the child says outside its protocol (a traceback when it
        #: cannot start), in a file: a pipe nobody reads could fill and
        #: stop it.  Only its end is read, when the child said nothing.
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [PYTHON, '-c', CHILD_CODE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, env=dict(os.environ, PYTHONPATH=package_root), close_fds=True)
        try:
            self._send({'client': asdict(client), 'parent': os.getpid()})
        except BrokenPipeError:
            pass  # it died at once: execute reports how
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> 'Child':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, message: Dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + '\n')
        self.proc.stdin.flush()

    def execute(self, ref: ImageRef, progress: ProgressFn,
                live: Optional[LiveExecute] = None) -> Dict[str, Any]:
        """librbd's execute of ``ref`` (for a live import, ``live``'s: the
        module's copy first, see prefill.py); returns the task's result when
        it completed, raises what it reported, and kills the child (raising
        Cancelled) as soon as ``stop`` is set or ``progress`` answers
        non-zero."""
        try:
            self._send({'ref': asdict(ref),
                        'live': live.portable() if live is not None else None})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died: its output (or its silence) says how
        for message in _messages(self.proc, self.stop):
            if 'addrs' in message:
                self.addrs = str(message['addrs'])
                self.register(self.addrs)
            elif 'done' in message:
                if progress(int(message['done']), int(message['total'])) != 0:
                    raise Cancelled(f'execute of {ref} stopped')
            elif message.get('ok'):
                return dict(message.get('result') or {})
            elif 'error' in message:
                raise ChildFailed(str(message['error']), int(message['errno']),
                                  bool(message['transient']))
        status = self.proc.wait()
        said = self.last_words()
        raise ChildFailed(f'librbd\'s execute of {ref} ended without a word (exit '
                          f'status {status})' + (f': {said}' if said else ''), errno.EIO, True)

    def last_words(self) -> str:
        """The last line the child wrote to stderr, at most 300 characters."""
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - 4096))
        lines = self.stderr.read().decode(errors='replace').strip().splitlines()
        return lines[-1].strip()[:300] if lines else ''

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.stderr.close()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None and not pipe.closed:
                    pipe.close()
            except OSError:
                pass  # unsent bytes to a child that is gone
        if self.addrs is not None:
            self.unregister(self.addrs)
            self.addrs = None


class Children:
    """Where tasks get their child: the spare, started ahead of need, when
    there is one, else a new one.

    A child's start (Python, the imports, connecting: 0.1 to 0.15 s here)
    is most of what a live import's execute costs beyond the hidden path's
    at a few GiB.  So one spare is kept from a prepare on (``warm``) and
    after each task that had a child, and let go after SPARE_IDLE seconds
    unused: a cluster with no migration runs no such process, and an idle
    one costs about 28 MiB of memory of its own (its client, and the
    readers' code imported ahead: ``_import_ahead``).

    Spares are started by a thread of this class, which lives until
    ``close`` (nothing else ends it): a child dies with the thread that
    started it (PR_SET_PDEATHSIG), so it must not be a task's, which ends
    before the next task takes the child.  A spare is not registered with the mgr
    until its task reads its address (it writes nothing before)."""

    def __init__(self, client: ChildClient,
                 register: Callable[[str], None] = lambda addrs: None,
                 unregister: Callable[[str], None] = lambda addrs: None,
                 idle: float = SPARE_IDLE) -> None:
        self.client = client
        self.register = register
        self.unregister = unregister
        self.idle = idle
        self._cv = threading.Condition()
        self._spare: Optional[Child] = None
        self._born = 0.0
        self._until = 0.0  # monotonic time until which a spare is wanted
        self._closed = False
        self._keeper: Optional[threading.Thread] = None

    def warm(self) -> None:
        """Have a spare ready from now on (a prepare: its execute follows)."""
        with self._cv:
            if self._closed:
                return
            self._until = time.monotonic() + self.idle
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, daemon=True,
                                                name='rbd_migration spare child')
                self._keeper.start()
            self._cv.notify_all()

    @contextmanager
    def child(self, stop: threading.Event) -> Iterator[Child]:
        """A child for one task, stopped by ``stop`` and killed when the
        ``with`` block ends: the spare if it is alive, else a new one
        (started by the caller's thread).  The next spare is started then,
        not while this one copies: a child's start takes a core for 0.1 s,
        which the copy measurably lost on two."""
        with self._cv:
            spare, self._spare = self._spare, None
        if spare is not None and spare.proc.poll() is not None:
            spare.close()
            spare = None
        if spare is not None:
            spare.stop = stop
        try:
            with spare or Child(self.client, stop, self.register, self.unregister) as child:
                yield child
        finally:
            self.warm()

    def close(self) -> None:
        """Let the spare go and end the thread; call once no task runs a
        child it started."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            keeper = self._keeper
        if keeper is not None:
            keeper.join()

    def _keep(self) -> None:
        """Start the spare while one is wanted; let it go once it is stale."""
        while True:
            with self._cv:
                now = time.monotonic()
                spare = self._spare
                if spare is not None and self._stale(spare, now):
                    self._spare = None              # let go, below
                    if spare.proc.poll() is not None:
                        # Died waiting (a broken install, say): no other
                        # until the next warm, rather than one every check.
                        self._until = 0.0
                        log.warning('a spare execute child ended by itself (exit status '
                                    '%s): %s', spare.proc.returncode, spare.last_words())
                elif spare is None and not self._closed and now < self._until:
                    pass                            # start one, below
                elif self._closed:
                    return
                elif spare is None:
                    self._cv.wait()                 # until ``warm`` or ``close``
                    continue
                else:
                    self._cv.wait(min(SPARE_CHECK, self._until - now,
                                      self._born + self.idle - now))
                    continue
            try:
                if spare is not None:
                    spare.close()
                else:
                    self._start()
            except Exception:
                # The thread must outlive the children it started (they die
                # with it), whatever one of them did: said, and tried later.
                log.exception('spare execute child')
                with self._cv:
                    self._cv.wait(SPARE_CHECK)

    def _stale(self, spare: Child, now: float) -> bool:
        """Not wanted any more, too old, or dead."""
        return (self._closed or now >= self._until or now - self._born >= self.idle
                or spare.proc.poll() is not None)

    def _start(self) -> None:
        born = time.monotonic()
        try:
            made = Child(self.client, threading.Event(), self.register, self.unregister)
        except OSError as e:  # no process now; a task starts its own
            log.warning('could not start a spare execute child: %s', e)
            with self._cv:
                self._cv.wait(SPARE_CHECK)
            return
        with self._cv:
            if self._spare is None and not self._closed:
                self._spare, self._born = made, born
                return
        made.close()


def _messages(proc: 'subprocess.Popen[str]', stop: threading.Event) -> Any:
    """The child's JSON lines, as they come; Cancelled once ``stop`` is set,
    whatever the child is doing."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    pending = ''
    heard = time.monotonic()
    while True:
        if stop.is_set():
            raise Cancelled('stopped')
        ready, _, _ = select.select([fd], [], [], POLL)
        if not ready:
            if time.monotonic() - heard > SILENCE:
                raise ChildFailed(f'librbd\'s execute made no progress for {SILENCE:.0f} s',
                                  errno.ETIMEDOUT, True)
            continue
        chunk = os.read(fd, 65536).decode()
        if not chunk:
            return
        heard = time.monotonic()
        pending += chunk
        *lines, pending = pending.split('\n')
        for line in lines:
            if line.strip():
                yield json.loads(line)
