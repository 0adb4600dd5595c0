"""What the HTTP and S3 streams share: retries, time limits, network errors.

Both streams read from servers the mgr must not trust (whoever prepares a
migration picks them), so every attempt of a request runs under a ``Guard``:
a limit in time for the whole answer, not per socket read (a server
trickling a byte at a time would defeat that), the context's deadline, and
its stop event.  A watchdog thread cuts off the sockets of an attempt that
overruns any of them.  ``with_retries`` repeats what another attempt may
cure, pausing through the context so that a stop ends the pause too.
Network errors become one-line reasons; validators (ETag, Last-Modified)
are compared as the servers mean them.
"""
import email.utils
import http.client
import random
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from typing import (Any, Callable, Iterator, List, Optional, Set, Tuple,
                    TypeVar)
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, PermissionDenied, SourceChanged,
                      SourceUnreachable)


#: The first pause between attempts, and the longest, in seconds.
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0
#: The most bytes one read from the socket asks for; the attempt's limits
#: are checked between two of them.
PIECE = 1 << 20
#: How often the watchdog looks at the attempts in flight, in seconds, and
#: how long it lingers without any before its thread ends.
WATCH_TICK = 0.1
WATCH_LINGER = 5.0

T = TypeVar('T')


class Transient(Exception):
    """A failure that another attempt may cure; ``str`` says what failed."""


def backoff_delay(attempt: int) -> float:
    """The pause after failed attempt number ``attempt`` (1-based): doubling
    up to BACKOFF_CAP, half of it random so that the copier's threads, which
    tend to fail together, do not retry in lockstep."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def after_attempts(attempts: int) -> str:
    return f"after {attempts} attempt{'' if attempts == 1 else 's'}"


def with_retries(ctx: SourceContext, what: str, attempt: Callable[[], T],
                 mask: Callable[[str], str] = str) -> T:
    """``attempt()``, repeated while it raises Transient, ``ctx.retries``
    times at most; then SourceUnreachable '<what>: <last failure> after N
    attempts', passed through ``mask``.  Any other exception (a
    MigrationError for a definite answer) passes through at once, Cancelled
    and TimedOut included: the pauses between attempts end (raising) as soon
    as ``ctx`` is stopped or past its deadline."""
    attempts = max(1, ctx.retries)
    for number in range(1, attempts + 1):
        ctx.check()
        try:
            return attempt()
        except Transient as e:
            failure = str(e)
        if number < attempts:
            ctx.pause(backoff_delay(number))
    raise SourceUnreachable(
        mask(f'{what}: {failure} {after_attempts(attempts)}'))


# -- The watchdog (also used by s3) ------------------------------------------


class Guard:
    """The limits of one attempt, enforced from outside its thread.

    A socket timeout bounds one ``recv``, not an answer: a server trickling
    its headers or body a byte a second never trips it.  So each attempt
    runs under a Guard, the sockets it uses are registered with it (by the
    connection classes below), and the watchdog shuts them down once the
    attempt has taken longer than ``ctx.timeout``, the deadline has passed,
    or ``ctx.stop`` is set; the blocked read then ends at once.
    """

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.started = time.monotonic()
        #: Set once the watchdog has cut the attempt's sockets off.
        self.cut = False
        self.sockets: List[socket.socket] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def overdue(self, now: float) -> bool:
        ctx = self.ctx
        return (now - self.started > ctx.timeout
                or (ctx.deadline is not None and now >= ctx.deadline)
                or (ctx.stop is not None and ctx.stop.is_set()))

    def pace(self, shown: str, got: int, want: int) -> None:
        """Between two pieces of a body: stop if asked to, or past the
        deadline, or past this attempt's time."""
        self.ctx.check()
        if self.elapsed() > self.ctx.timeout:
            raise self.overran(shown, got, want)

    def overran(self, shown: str, got: int, want: int) -> Exception:
        """The error for a body that took too long: Cancelled or TimedOut
        where the context says so, else Transient with how far it got."""
        self.ctx.check()
        return Transient(f'{shown}: only {got} of {want} bytes arrived in '
                         f'{self.elapsed():.1f}s (at most '
                         f'{self.ctx.timeout:g}s per request)')


def _shut(sock: socket.socket) -> None:
    """Wake whoever waits on ``sock``: shutdown, not close, so that its fd
    stays its own until its owner closes it; the plain socket's shutdown
    even for TLS, whose state belongs to the reading thread."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass     # closed or detached meanwhile: nothing waits on it


class _Watchdog:
    """One thread per process, running only while attempts are in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guards: Set[Guard] = set()
        self._running = False

    def add(self, guard: Guard) -> None:
        with self._lock:
            self._guards.add(guard)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, daemon=True,
                                 name='rbd_migration-watchdog').start()

    def remove(self, guard: Guard) -> None:
        with self._lock:
            self._guards.discard(guard)

    def watch(self, guard: Guard, sock: socket.socket) -> None:
        with self._lock:
            guard.sockets.append(sock)
            if guard.cut:
                _shut(sock)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(WATCH_TICK)
            now = time.monotonic()
            with self._lock:
                if self._guards:
                    idle_since = now
                elif now - idle_since > WATCH_LINGER:
                    self._running = False
                    return
                for guard in self._guards:
                    if not guard.cut and guard.overdue(now):
                        guard.cut = True
                        for sock in guard.sockets:
                            _shut(sock)


_WATCHDOG = _Watchdog()
_current = threading.local()


@contextmanager
def guarded(ctx: SourceContext) -> Iterator[Guard]:
    """Run one attempt under a Guard: the sockets its requests use in this
    thread are cut off when it overruns."""
    guard = Guard(ctx)
    outer = getattr(_current, 'guard', None)
    _current.guard = guard
    _WATCHDOG.add(guard)
    try:
        yield guard
    finally:
        _WATCHDOG.remove(guard)
        _current.guard = outer


def watch_socket(sock: Optional[socket.socket]) -> None:
    """Put ``sock`` under the current thread's Guard, if any."""
    guard: Optional[Guard] = getattr(_current, 'guard', None)
    if guard is not None and sock is not None:
        _WATCHDOG.watch(guard, sock)


class WatchedConnection:
    """Mixed into a urllib3 connection class: its socket is put under the
    current Guard once connected (covering the request and the headers of
    the answer; a TLS handshake is bounded by the socket timeout only, its
    socket being swapped for the TLS one while it runs) and again for each
    request a kept-alive connection carries."""

    sock: Optional[socket.socket]

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        watch_socket(sock)
        return sock

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        watch_socket(self.sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _watch_pools(manager: Any) -> None:
    """Make ``manager`` use the watched connections where it uses urllib3's
    own (a SOCKS proxy's pools are left alone: the checks between the pieces
    of a body still bound them)."""
    classes = dict(manager.pool_classes_by_scheme)
    if classes.get('http') is urllib3.HTTPConnectionPool:
        classes['http'] = _HTTPPool
    if classes.get('https') is urllib3.HTTPSConnectionPool:
        classes['https'] = _HTTPSPool
    manager.pool_classes_by_scheme = classes


class WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: Any, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        _watch_pools(manager)
        return manager


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: requests, urllib3 and botocore each
    nest the socket error differently (args, ``reason``, ``kwargs['error']``,
    ``__context__``)."""
    seen = set()
    todo: List[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        nested = [e.__cause__, e.__context__, getattr(e, 'reason', None),
                  getattr(e, 'kwargs', {}).get('error'), *e.args]
        todo.extend(n for n in nested if isinstance(n, BaseException))


_REASONS: Tuple[Tuple[type, str], ...] = (
    (ConnectionRefusedError, 'connection refused'),
    (ConnectionResetError, 'connection reset'),
    (ConnectionAbortedError, 'connection aborted'),
    (socket.gaierror, 'host name not resolved'),
    (TimeoutError, 'timed out'),
    (http.client.RemoteDisconnected, 'connection closed by the server'),
    (http.client.IncompleteRead, 'connection closed mid-answer'),
    (BrokenPipeError, 'connection closed by the server'),
)


def network_reason(exc: BaseException) -> str:
    """A few words for the network failure somewhere inside ``exc``."""
    found = list(causes(exc))
    for cls, text in _REASONS:
        if any(isinstance(e, cls) for e in found):
            return text
    for e in found:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    return type(exc).__name__


def timed_out(exc: BaseException) -> bool:
    """Whether a socket timeout is somewhere inside ``exc``."""
    return any(isinstance(e, TimeoutError) for e in causes(exc))


#: TLS errors that say the connection broke rather than that TLS failed.
_TLS_BROKEN = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError,
               ssl.SSLWantReadError, ssl.SSLWantWriteError)


def tls_error(exc: BaseException, what: str,
              where: str) -> Optional[MigrationError]:
    """The definite error for a TLS failure inside ``exc`` -- a rejected
    certificate, or no TLS spoken at all (https:// to a plain HTTP port) --
    which no retry cures; None otherwise, a handshake cut short included."""
    for e in causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return PermissionDenied(
                f'{what}: the TLS certificate of {where} is not trusted '
                f'({e.verify_message or e.reason}); give the server a '
                f'certificate the mgr host trusts, or add its CA to the '
                f'system trust store')
        if isinstance(e, ssl.SSLError) and not isinstance(e, _TLS_BROKEN):
            reason = str(e.reason or e).lower().replace('_', ' ')
            return InvalidArgument(
                f'{what}: TLS handshake with {where} failed ({reason}); if '
                f'the server speaks plain HTTP on that port, use http://')
    return None


def host_port(url: str) -> str:
    """``host:port`` of ``url``, the port spelled out, no userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or ''
    host = f'[{host}]' if ':' in host else host
    port = parts.port or (443 if parts.scheme == 'https' else 80)
    return f'{host}:{port}'


#: Validators as messages name them.
VALIDATOR_LABELS = {'size': 'size', 'etag': 'ETag', 'last_modified': 'Last-Modified'}


def same_validator(key: str, pinned: str, seen: str) -> bool:
    """Whether two values of validator ``key`` name one version: ETags
    compared weakly (a server may mark a range's ETag weak), dates as dates
    (however spelt)."""
    if key == 'etag':
        return pinned.removeprefix('W/') == seen.removeprefix('W/')
    if key == 'last_modified':
        try:
            return email.utils.parsedate_to_datetime(pinned) == \
                email.utils.parsedate_to_datetime(seen)
        except (TypeError, ValueError):
            pass
    return pinned == seen


def clip(value: str, most: int = 80) -> str:
    """A server's header value, short enough for a one-line message."""
    return value if len(value) <= most else value[:most] + '...'


def changed(what: str, shown: str, key: str, pinned: str, seen: str,
            mask: Callable[[str], str] = str) -> SourceChanged:
    """The error for a source that changed since it was opened (also used
    by s3); the values are the server's, so masked too."""
    return SourceChanged(mask(
        f'{what}: {shown} changed since it was opened '
        f'({VALIDATOR_LABELS.get(key, key)} {clip(pinned)} → '
        f'{clip(seen)}); do not change the image while it is imported'))
