"""The HTTP endpoint librbd reads a live view from: ``GET`` and ``HEAD`` of
``/<token>``, one byte range per request, nothing else.

A live import prepares librbd's import-only migration on ``{"type":
"qcow", "stream": {"type": "http", "url": "http://<endpoint>/<token>"}}``;
:class:`ViewServer` answers that URL from a registered view (a
:class:`~rbd_migration.live.view.QcowView`, or any Stream).

Deployment.  The caller picks the address.  It must be reachable from every
host that opens the target before commit (every client of the image, and
wherever the execute runs), not only from the mgr's: librbd reads the
source through it on each of those hosts.  The token in the path (256
random bits) is what limits access: librbd keeps the source-spec, URL
included, in the target image's header, so only clients that can read the
header learn it; an unknown token gets a bare 404, and tokens are logged
masked (first 4 characters).  The traffic is plain HTTP, as RBD's own
messenger is without secure mode: whoever sees the network sees the data
and the token.  librbd 16.2 parses the URL's host with a pattern that
refuses an IPv6 literal (``[::1]``): give it a name or an IPv4 address.

What librbd 16.2's HttpClient needs (``src/librbd/migration/HttpClient.cc``):
``HEAD`` answered 2xx with a ``Content-Length`` (its size; nothing else is
read); each read extent its own ``GET`` with ``Range: bytes=a-b``, answered
``206`` with a body of exactly ``b-a+1`` bytes (a 200 fails the read with
-EIO, a shorter body with -EINVAL) and at most 32 MiB (its parser's body
limit).  It speaks HTTP/1.1 with keep-alive and pipelines: the next request
goes out before the answer to the one before has come.  An answer that
says ``Connection: close`` makes it reconnect; a connection that closes or
a body cut short is retried on a new connection; any status but 2xx fails
the read (404: -ENOENT, 403: -EACCES, else -EIO).  It sets no timeout: it
waits for an answer for ever, so every request here is answered or its
connection closed, in bounded time.  QEMU's curl driver also needs
``Accept-Ranges: bytes`` on the HEAD, and asserts (aborts) on a body
shorter than it asked for.

Hence: an answer's first piece (up to ``piece`` bytes, 4 MiB; librbd asks
for one 1 MiB view cluster at a time) is read before its status line is
sent, so a failed read is a clean 5xx with ``Connection: close``, which
fails the client's read instead of sending it into a retry loop.  A longer
answer streams piece by piece through one reused buffer per worker; a piece
that fails to read resets the connection (RST), so no client can take the
short body for a whole one.  A range wider than ``max_range`` (64 MiB), or
a GET without one of a view that large, is refused with 416 and
``Content-Range: bytes */size`` rather than answered in part: a part answer
helps neither librbd nor QEMU (above).  Several ranges in one request get
the first one alone.

Bounds.  A fixed pool of ``workers`` threads answers requests, not
connections: librbd keeps its connection open as long as it has the image
open, so a thread per connection (``ThreadingHTTPServer``) would grow with
the clients.  Idle connections, and requests still arriving, wait in one
selector thread, which hands a connection to the pool only once a whole
request head is in; at most ``connections`` are open (one more is answered
503 and closed), an idle one is closed after ``idle_timeout``, a head that
takes longer than ``head_timeout`` to arrive closes its connection, and a
client that stops reading is cut off once a slice of the answer waits
``send_timeout`` to be sent.  A worker answers a connection's pipelined
requests as they come, TURN at most before the connections waiting for
a worker go first.  A view's reads are bounded in time by its own
``SourceContext`` (timeouts, retries); give it ``ViewServer.stopping`` as
its ``stop`` so that ``stop()`` ends reads in flight.

The server owns what it is given: ``remove`` and ``stop`` close each view
once no request is using it.  Access logging is off by default; the
counters (``counters()``) are for status.
"""
import enum
import http
import logging
import queue
import re
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from ..errors import Cancelled, MigrationError, TimedOut
from ..streams.base import Stream

#: What ``add`` takes: a view, or what opens one at its first request.
ViewSource = Union[Stream, Callable[[], Stream]]

#: Random bytes in a token (``secrets.token_urlsafe``): 43 characters.
TOKEN_BYTES = 32
#: Characters of a token that logs show.
TOKEN_SHOWN = 4
#: The longest request head taken (request line and headers).
MAX_HEAD = 16 << 10
#: Bytes sent per socket send, each within ``send_timeout``.
SEND_SLICE = 256 << 10
#: Bytes received per socket read of a request head.
RECV_SIZE = 64 << 10
#: Requests one worker answers on a connection before it lets the other
#: connections waiting for a worker go first.
TURN = 64
#: Longest the selector sleeps before it looks for expired connections.
TICK = 0.25
#: What a successful answer's head is padded to.  librbd 16.2's HttpClient
#: reads a connection into one beast flat_buffer, each read as large as the
#: buffer's free room and at least 512 bytes, and the buffer grows only to
#: hold a whole head: with nginx's or a plain head of 200 bytes it reads a
#: body 512 to 551 bytes at a time, two million reads per GiB.  A head near
#: beast's 8 KiB header limit grows it once for the connection's life, and
#: each read takes about 8 KiB (measured, 1 GiB of 4 MiB ranges: 3.7 s with
#: a plain head, 1.3 to 1.6 s padded).  Past 8192 bytes librbd refuses the
#: answer, so this stays a little below.
HEAD_PADDED_TO = 8000
#: The padding header's name (and ': ', CRLF), and what fills it.
_PAD_NAME = 'X-Read-Buffer'
_PAD_OVERHEAD = len(_PAD_NAME) + 4

_TOKEN_PATH = re.compile(r'/([A-Za-z0-9_-]+)')
_TOKEN = re.compile(r'[A-Za-z0-9_-]{43,}')
_ETAG = re.compile(r'[!#-~]+')
_RANGE = re.compile(r'([0-9]{0,20})-([0-9]{0,20})')
_VERSION = re.compile(r'HTTP/1\.[01]')
_REFUSAL = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n'
            b'Retry-After: 1\r\nConnection: close\r\n\r\n')


class _Next(enum.Enum):
    """What becomes of a connection once a worker has served it."""
    PARK = 'wait in the selector for its next request'
    AGAIN = 'be served again, after the connections waiting for a worker'
    CLOSE = 'close'


@dataclass(frozen=True)
class ServerLimits:
    """What the endpoint spends at most; see the module docstring."""

    workers: int = 16
    connections: int = 256
    idle_timeout: float = 60.0
    head_timeout: float = 10.0
    send_timeout: float = 30.0
    max_range: int = 64 << 20
    piece: int = 4 << 20


def mask_token(token: str) -> str:
    """A token as logs may show it."""
    return token[:TOKEN_SHOWN] + '...'


def _mask_target(target: str) -> str:
    return target if len(target) <= 1 + TOKEN_SHOWN else target[0] + mask_token(target[1:])


# -- requests -----------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Reset(Exception):
    """The body broke off: the connection is to be reset, not closed."""


@dataclass
class _Request:
    method: str
    target: str
    headers: Dict[str, str]
    keep_alive: bool


def _parse_head(head: bytes) -> _Request:
    """The request in ``head`` (without its blank line); _BadRequest(400)
    for one that does not parse, or that has a body (none is read)."""
    lines = head.decode('latin-1').split('\r\n')
    parts = lines[0].split(' ')
    if len(parts) != 3 or not _VERSION.fullmatch(parts[2]):
        raise _BadRequest(400)
    method, target, version = parts
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(':')
        if not colon or not name or name != name.strip():
            raise _BadRequest(400)
        key = name.lower()
        headers[key] = f'{headers[key]}, {value.strip()}' if key in headers else value.strip()
    if 'transfer-encoding' in headers or headers.get('content-length', '0') != '0':
        raise _BadRequest(400)
    tokens = {t.strip().lower() for t in headers.get('connection', '').split(',')}
    return _Request(method, target, headers, version == 'HTTP/1.1' and 'close' not in tokens)


#: The answer to a range no byte of which can be sent, or wider than allowed.
UNSATISFIABLE = (-1, -1)


def requested_span(value: Optional[str], size: int,
                   max_range: int) -> Optional[Tuple[int, int]]:
    """(first byte, length) that a ``Range`` header asks of ``size``
    bytes: None for the whole (no header, or another unit than bytes),
    UNSATISFIABLE for a range that does not parse, starts past the end or
    is wider than ``max_range``.  Of several ranges, the first."""
    if value is None:
        return None
    unit, equals, ranges = value.strip().partition('=')
    if not equals or unit.strip().lower() != 'bytes':
        return None
    m = _RANGE.fullmatch(ranges.split(',')[0].strip())
    if m is None or not (m[1] or m[2]):
        return UNSATISFIABLE
    if not m[1]:
        first = max(0, size - int(m[2]))
        last = size - 1 if int(m[2]) else -1
    else:
        first = int(m[1])
        last = min(size - 1, int(m[2])) if m[2] else size - 1
        if m[2] and int(m[2]) < first:
            return UNSATISFIABLE
    if first >= size or last < first or last - first + 1 > max_range:
        return UNSATISFIABLE
    return first, last - first + 1


# -- views --------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    """A registered view: opened at its first request when given as a
    factory, closed once removed and no request uses it."""

    source: ViewSource
    etag: str
    modified: str
    view: Optional[Stream] = None
    users: int = 0
    removed: bool = False
    opening: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> Stream:
        with self.opening:
            if self.view is None:
                self.view = self.source if isinstance(self.source, Stream) else self.source()
            return self.view

    def close(self) -> None:
        with self.opening:
            view, self.view = self.view, None
        if view is None and isinstance(self.source, Stream):
            view = self.source
        if view is not None:
            view.close()


# -- connections --------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    #: Bytes received and not yet taken as a request.
    buf: bytearray = field(default_factory=bytearray)
    #: ``time.monotonic()`` at which a parked connection is closed.
    expires: float = 0.0


@dataclass
class _Answered:
    status: int
    sent: int
    keep: bool


@dataclass
class Counters:
    """What the endpoint has done since it started, for status."""

    requests: int = 0
    bytes: int = 0
    errors: int = 0
    refused: int = 0


def _padding(room: int) -> str:
    """A header line of ``room`` bytes (CRLF included), or '' when too
    little room is left for one."""
    fill = room - _PAD_OVERHEAD
    return f'{_PAD_NAME}: {"0" * fill}\r\n' if fill > 0 else ''


def _status_for(exc: BaseException) -> int:
    """The 5xx for a view that failed to open or read: the source timed
    out (504) or failed (502), the server is stopping (503), or a bug (500)."""
    if isinstance(exc, Cancelled):
        return 503
    if isinstance(exc, TimedOut):
        return 504
    return 502 if isinstance(exc, MigrationError) else 500


class ViewServer:
    """Serves registered views at ``http://<address>/<token>``; started by
    the constructor (port 0: any free port), ended by ``stop``."""

    def __init__(self, address: Tuple[str, int], limits: ServerLimits = ServerLimits(),
                 log: Optional[logging.Logger] = None, access_log: bool = False,
                 listener: Optional[socket.socket] = None, start: bool = True) -> None:
        self.limits = limits
        self.log = log or logging.getLogger(__name__)
        self.access_log = access_log
        #: Set by ``stop``; give it to the views' SourceContext as ``stop``.
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._views: Dict[str, _Entry] = {}
        self._conns: Set[_Conn] = set()
        self._counters = Counters()
        self._ready: 'queue.SimpleQueue[Optional[_Conn]]' = queue.SimpleQueue()
        self._returns: Deque[_Conn] = deque()
        self._local = threading.local()
        family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
        #: A listening socket given (one a mgr respawn handed over) is used
        #: as it is; else one is bound to ``address``.
        self._listener = listener or socket.create_server(address, family=family,
                                                          backlog=128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.address: Tuple[str, int] = self._listener.getsockname()[:2]
        self._selector = threading.Thread(target=self._select_loop, daemon=True,
                                          name='rbd_migration-view-select')
        self._workers = [threading.Thread(target=self._work, daemon=True,
                                          name=f'rbd_migration-view-{i}')
                         for i in range(limits.workers)]
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Begin accepting and answering (the constructor does, unless told
        not to: a caller first registers the views clients already expect,
        since librbd reads a 404 as a source with no data there, zeros)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for thread in [self._selector, *self._workers]:
            thread.start()

    # -- registry -------------------------------------------------------------

    def add(self, source: ViewSource, token: Optional[str] = None,
            etag: Optional[str] = None, modified: Optional[float] = None) -> str:
        """Serve ``source`` (a view, or a callable that opens one at the
        first request) under ``token`` (default: a new random one), with
        ``etag`` and ``modified`` (a time stamp) as its validators (default:
        random, and now); the token.  A caller serving the same view again
        (another mgr after a failover) passes the token and validators it
        served it with before."""
        if token is None:
            token = secrets.token_urlsafe(TOKEN_BYTES)
        elif not _TOKEN.fullmatch(token):
            raise ValueError('a view token is at least 43 characters of A-Z, a-z, 0-9, - and _')
        if etag is not None and not _ETAG.fullmatch(etag):
            raise ValueError('an ETag is printable ASCII without spaces or quotes')
        entry = _Entry(source, f'"{etag or secrets.token_hex(8)}"',
                       formatdate(modified if modified is not None else time.time(),
                                  usegmt=True))
        with self._lock:
            if self.stopping.is_set():
                raise ValueError('the view server is stopped')
            if token in self._views:
                raise ValueError(f'view {mask_token(token)} is already served')
            self._views[token] = entry
        return token

    def remove(self, token: str) -> None:
        """Stop serving ``token`` (404 from now on); its view is closed once
        no request uses it."""
        with self._lock:
            entry = self._views.pop(token, None)
            if entry is None:
                return
            entry.removed = True
            idle = entry.users == 0
        if idle:
            self._close_view(token, entry)

    def url(self, token: str, host: Optional[str] = None) -> str:
        """The URL of ``token``'s view, at ``host`` (default: the bound
        address)."""
        host = host or self.address[0]
        return f'http://{f"[{host}]" if ":" in host else host}:{self.address[1]}/{token}'

    def counters(self) -> Dict[str, int]:
        """Requests, body bytes sent, errors (5xx and bodies cut off),
        connections refused; connections open and views served now."""
        with self._lock:
            c = self._counters
            return {'requests': c.requests, 'bytes': c.bytes, 'errors': c.errors,
                    'refused': c.refused, 'connections': len(self._conns),
                    'views': len(self._views)}

    def _acquire(self, token: str) -> Optional[_Entry]:
        with self._lock:
            entry = self._views.get(token)
            if entry is not None:
                entry.users += 1
            return entry

    def _release(self, token: str, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            idle = entry.removed and entry.users == 0
        if idle:
            self._close_view(token, entry)

    def _close_view(self, token: str, entry: _Entry) -> None:
        try:
            entry.close()
        except Exception as e:
            self.log.warning('live view %s: closing it failed: %s', mask_token(token), e)

    def _count(self, **add: int) -> None:
        with self._lock:
            for name, n in add.items():
                setattr(self._counters, name, getattr(self._counters, name) + n)

    # -- stopping -------------------------------------------------------------

    def stop(self, wait: float = 5.0) -> None:
        """Stop listening, close every connection and view; waits up to
        ``wait`` seconds for each thread (a view read that its context does
        not bound may hold a worker longer: the threads are daemons)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.start()     # a server never started ends through its threads too
        self._wake()
        self._selector.join(wait)
        for _ in self._workers:
            self._ready.put(None)
        with self._lock:
            busy = list(self._conns)
        for conn in busy:               # ends sends in progress
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._workers:
            thread.join(wait)
        with self._lock:
            entries = list(self._views.items())
            self._views.clear()
            for _, entry in entries:
                entry.removed = True
            idle = [(t, e) for t, e in entries if e.users == 0]
        for token, entry in idle:
            self._close_view(token, entry)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> 'ViewServer':
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the selector: accepting, idle connections, request heads ---------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b'\0')
        except OSError:
            pass

    def _select_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, 'listen')
        sel.register(self._wake_r, selectors.EVENT_READ, 'wake')
        parked: Dict[socket.socket, _Conn] = {}
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(TICK):
                    if key.data == 'listen':
                        self._accept(sel, parked)
                    elif key.data == 'wake':
                        self._drain_wake(sel, parked)
                    else:
                        self._receive(sel, parked, key.data)
                self._expire(sel, parked)
        except Exception:
            self.log.exception('live view server: the selector failed')
            self.stopping.set()
        finally:
            for conn in list(parked.values()):
                self._close(conn)
            sel.close()
            self._listener.close()

    def _park(self, sel: selectors.BaseSelector, parked: Dict[socket.socket, _Conn],
              conn: _Conn) -> None:
        """Wait for ``conn``'s next request in the selector (a partial head
        has ``head_timeout`` from now to arrive)."""
        conn.sock.setblocking(False)
        conn.expires = time.monotonic() + (self.limits.head_timeout if conn.buf
                                           else self.limits.idle_timeout)
        parked[conn.sock] = conn
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _accept(self, sel: selectors.BaseSelector, parked: Dict[socket.socket, _Conn]) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log.warning('live view server: accept failed: %s', e)
                return
            with self._lock:
                full = len(self._conns) >= self.limits.connections
                conn = _Conn(sock, f'{peer[0]}:{peer[1]}')
                if not full:
                    self._conns.add(conn)
                else:
                    self._counters.refused += 1
            if full:
                self._refuse(sock)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._park(sel, parked, conn)

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        """A 503 to a connection past the limit, sent without waiting."""
        try:
            sock.setblocking(False)
            sock.send(_REFUSAL)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _drain_wake(self, sel: selectors.BaseSelector,
                    parked: Dict[socket.socket, _Conn]) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while True:
            try:
                conn = self._returns.popleft()
            except IndexError:
                return
            self._park(sel, parked, conn)

    def _receive(self, sel: selectors.BaseSelector, parked: Dict[socket.socket, _Conn],
                 conn: _Conn) -> None:
        """What a parked connection sent; to a worker once a whole head (or
        more than a head may be) is in."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if data and not conn.buf:
            conn.expires = time.monotonic() + self.limits.head_timeout
        conn.buf += data
        if data and b'\r\n\r\n' not in conn.buf and len(conn.buf) <= MAX_HEAD:
            return
        sel.unregister(conn.sock)
        del parked[conn.sock]
        if data:
            self._ready.put(conn)
        else:
            self._close(conn)

    def _expire(self, sel: selectors.BaseSelector, parked: Dict[socket.socket, _Conn]) -> None:
        now = time.monotonic()
        for sock, conn in list(parked.items()):
            if conn.expires <= now:
                sel.unregister(sock)
                del parked[sock]
                self._close(conn)

    def _close(self, conn: _Conn, reset: bool = False) -> None:
        with self._lock:
            self._conns.discard(conn)
        try:
            if reset:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            conn.sock.close()
        except OSError:
            pass

    # -- workers: answering -----------------------------------------------------

    def _work(self) -> None:
        while True:
            conn = self._ready.get()
            if conn is None:
                return
            after, reset = _Next.CLOSE, False
            if not self.stopping.is_set():
                try:
                    after = self._serve(conn)
                except _Reset:
                    reset = True
                except OSError:
                    pass            # the client went away, or stopped reading
                except Exception:
                    self.log.exception('live view server: a request failed')
            if self.stopping.is_set():
                after = _Next.CLOSE
            if after is _Next.AGAIN:
                self._ready.put(conn)   # behind the connections waiting
            elif after is _Next.PARK:
                self._returns.append(conn)
                self._wake()
            else:
                self._close(conn, reset)

    def _serve(self, conn: _Conn) -> _Next:
        """Answer the requests whose heads are in ``conn.buf``, in order;
        what becomes of the connection.  After TURN answers it goes behind
        the others waiting for a worker: a client that pipelines without
        end must not keep one to itself."""
        for _ in range(TURN):
            while conn.buf[:2] == b'\r\n':
                del conn.buf[:2]
            end = conn.buf.find(b'\r\n\r\n')
            if end > MAX_HEAD or (end < 0 and len(conn.buf) > MAX_HEAD):
                self._count(requests=1)
                self._send_status(conn, 431, False)
                return _Next.CLOSE
            if end < 0:
                if not self._more(conn):
                    return _Next.PARK
                continue
            head = bytes(conn.buf[:end])
            del conn.buf[:end + 4]
            started = time.monotonic()
            try:
                request = _parse_head(head)
            except (_BadRequest, UnicodeDecodeError) as e:
                self._count(requests=1)
                self._send_status(conn, e.status if isinstance(e, _BadRequest) else 400, False)
                return _Next.CLOSE
            answered = self._answer(conn, request)
            if self.access_log:
                self.log.info('live view: %s %s %s %d %d bytes %.3fs', conn.peer,
                              request.method, _mask_target(request.target), answered.status,
                              answered.sent, time.monotonic() - started)
            if not answered.keep:
                return _Next.CLOSE
        return _Next.AGAIN

    @staticmethod
    def _more(conn: _Conn) -> bool:
        """Take what the client sent while its last answer went out, without
        waiting: librbd sends its next requests on the same connection, and
        handing it back to the selector to find them cost a switch of
        threads for each."""
        conn.sock.setblocking(False)    # else a socket with a timeout polls first
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            return False        # closed: the selector sees it
        conn.buf += data
        return True

    def _answer(self, conn: _Conn, request: _Request) -> _Answered:
        self._count(requests=1)
        keep = request.keep_alive
        if request.method not in ('GET', 'HEAD'):
            return self._send_status(conn, 405, keep, [('Allow', 'GET, HEAD')])
        m = _TOKEN_PATH.fullmatch(request.target)
        token = m[1] if m else None
        entry = self._acquire(token) if token is not None else None
        if token is None or entry is None:
            return self._send_status(conn, 404, keep)
        try:
            return self._answer_view(conn, request, token, entry, keep)
        finally:
            self._release(token, entry)

    def _answer_view(self, conn: _Conn, request: _Request, token: str, entry: _Entry,
                     keep: bool) -> _Answered:
        try:
            view = entry.open()
            size = view.size()
        except Exception as e:
            return self._failed(conn, request, token, e)
        headers = [('Accept-Ranges', 'bytes'), ('ETag', entry.etag),
                   ('Last-Modified', entry.modified), ('Cache-Control', 'no-store')]
        if request.method == 'HEAD':
            return self._send_head(conn, 200, size, keep, headers)
        value = request.headers.get('range')
        if_range = request.headers.get('if-range')
        if if_range is not None and if_range not in (entry.etag, entry.modified):
            value = None        # the client's copy is another version: the whole
        span = requested_span(value, size, self.limits.max_range)
        if span is None:
            span = (0, size) if size <= self.limits.max_range else UNSATISFIABLE
            status = 200
        else:
            status = 206
        if span == UNSATISFIABLE:
            return self._send_status(conn, 416, keep, [('Content-Range', f'bytes */{size}'),
                                                       *headers])
        first, length = span
        if status == 206:
            headers.append(('Content-Range', f'bytes {first}-{first + length - 1}/{size}'))
        return self._send_body(conn, request, token, view, status, first, length, headers, keep)

    def _send_body(self, conn: _Conn, request: _Request, token: str, view: Stream,
                   status: int, first: int, length: int,
                   headers: List[Tuple[str, str]], keep: bool) -> _Answered:
        """The status line once the first piece is read, then the body piece
        by piece; a piece that fails after the status line resets the
        connection (raises _Reset)."""
        piece = self.limits.piece
        buf = self._buffer(min(piece, length))
        n = min(piece, length)
        try:
            self._fill(view, first, buf[:n])
        except Exception as e:
            return self._failed(conn, request, token, e)
        self._send_head(conn, status, length, keep, headers)
        done = 0
        while True:
            self._send_all(conn, buf[:n])
            done += n
            self._count(bytes=n)
            if done == length:
                return _Answered(status, done, keep)
            n = min(piece, length - done)
            try:
                self._fill(view, first + done, buf[:n])
            except Exception as e:
                self._count(errors=1)
                self.log.warning('live view %s: reading bytes %d-%d failed after %d of %d '
                                 'bytes were sent; connection reset: %s', mask_token(token),
                                 first + done, first + done + n - 1, done, length, e)
                raise _Reset() from e

    def _buffer(self, n: int) -> memoryview:
        """This worker's body buffer, at least ``n`` bytes (at most a piece)."""
        buf: Optional[bytearray] = getattr(self._local, 'buf', None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = bytearray(n)
        return memoryview(buf)

    @staticmethod
    def _fill(view: Stream, offset: int, out: memoryview) -> None:
        got = view.read_into(offset, out)
        if got != len(out):
            raise MigrationError(f'the view gave {got} of {len(out)} bytes at offset {offset}')

    def _failed(self, conn: _Conn, request: _Request, token: str,
                exc: BaseException) -> _Answered:
        status = _status_for(exc)
        self._count(errors=1)
        self.log.warning('live view %s: %s failed (HTTP %d): %s', mask_token(token),
                         request.method, status, exc)
        return self._send_status(conn, status, False)

    # -- sending ------------------------------------------------------------------

    def _send_status(self, conn: _Conn, status: int, keep: bool,
                     headers: Optional[List[Tuple[str, str]]] = None) -> _Answered:
        """An answer without a body."""
        return self._send_head(conn, status, 0, keep, headers or [])

    def _send_head(self, conn: _Conn, status: int, length: int, keep: bool,
                   headers: List[Tuple[str, str]]) -> _Answered:
        lines = [f'HTTP/1.1 {status} {http.HTTPStatus(status).phrase}',
                 f'Date: {formatdate(usegmt=True)}', 'Server: ceph-mgr-rbd_migration',
                 f'Content-Length: {length}']
        lines += [f'{name}: {value}' for name, value in headers]
        if not keep:
            lines.append('Connection: close')
        head = '\r\n'.join(lines) + '\r\n'
        if 200 <= status < 300:
            head += _padding(HEAD_PADDED_TO - len(head) - 2)
        self._send_all(conn, memoryview((head + '\r\n').encode('latin-1')))
        return _Answered(status, 0, keep)

    def _send_all(self, conn: _Conn, data: memoryview) -> None:
        """``data`` sent, each slice within ``send_timeout`` (socket.timeout,
        an OSError, past it)."""
        conn.sock.settimeout(self.limits.send_timeout)
        for at in range(0, len(data), SEND_SLICE):
            conn.sock.sendall(data[at:at + SEND_SLICE])
