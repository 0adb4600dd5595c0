"""An NBD export as a stream, read through libnbd (``python3-libnbd``).

The spec is upstream's: ``{"type": "nbd", "uri": "<NBD URI>"}`` with
``nbd://host[:port][/export]``, ``nbds://`` (TLS) or
``nbd+unix:///[export]?socket=PATH``; the port defaults to 10809.  Any
image QEMU can read becomes importable this way (``qemu-nbd -f vhdx ...``).

The server is not trusted any more than an HTTP one, so

* the URI is checked before libnbd sees it: only the TCP and unix-socket
  transports, a port that exists, no query parameter besides ``socket``,
  ``tls-certificates`` and ``tls-psk-file``, and every local path those
  name (the socket included) must lie under ``file_source_roots``, as a
  ``file`` stream's path must;
* that check holds when the file is used: at each connection the module
  opens those paths itself (``O_PATH``), checks the files it opened (their
  real path in ``/proc/self/fd``, and their kind) and hands libnbd and
  GnuTLS only ``/proc/self/fd/N``, which names that inode whatever the
  path names by then; it connects a unix socket itself and gives libnbd
  the connected socket; GnuTLS, which opens the files of a
  ``tls-certificates`` directory by name, gets a private copy of them,
  each read from a file opened and checked the same way.  A symbolic link
  swapped after the check cannot redirect the connection, nor the TLS
  files read;
* nothing blocks without a limit: libnbd is driven through its
  asynchronous calls, the handshake within the context's connect limit and
  every request within ``ctx.timeout``, checking the deadline and the stop
  event between polls of at most POLL_TICK;
* a connection that breaks or stops answering is dropped and a new one
  made on the next attempt (``with_retries``), and the export must still
  have the size it had at open.

Several requests are in flight on one connection (NBD pipelines them; a
server such as ``qemu-nbd`` allows one client unless told otherwise, so one
connection it is): the pieces of a read, and the reads of the copier's
threads, are sent together and their answers read by one of the waiting
threads at a time, straight into the caller's buffers (no buffer of
libnbd's to allocate, zero and copy out of per read).  Sparse data stays
sparse: ranges
that the ``base:allocation`` block status calls zero are left out of
``allocated``; what a server does not answer, or answers past the range
asked, is read as data or cut off, never taken on trust.
"""
import errno
import os
import select
import socket
import stat
import tempfile
import threading
import time
from itertools import islice
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

try:
    import nbd
except ImportError:     # the module loads without it; only nbd sources need it
    nbd = None

from ..context import SourceContext
from ..errors import (InvalidArgument, NotFound, PermissionDenied, SourceChanged,
                      Unsupported)
from ..secrets import mask_text, mask_url
from .base import Stream
from .file import ROOTS_OPTION, _is_under, _real_roots
from .net import Transient, with_retries

FIELD = 'source-spec: stream.uri'
DEFAULT_PORT = 10809
TCP_SCHEMES = ('nbd', 'nbds')
UNIX_SCHEMES = ('nbd+unix', 'nbds+unix')
EXPECTED = ('expected nbd://host[:port][/export], nbds://host[:port][/export] '
            'or nbd+unix:///[export]?socket=PATH')
#: Query parameters that name a local file or directory.
LOCAL_PARAMS = ('socket', 'tls-certificates', 'tls-psk-file')
#: Longest wait in one poll, so that a stop or deadline is seen this soon.
POLL_TICK = 0.1
#: The most bytes one request asks for (qemu-nbd's own limit is 32 MiB),
#: unless the server names a smaller maximum.
MAX_REQUEST = 32 << 20
#: Requests one read sends before it waits for their answers.
MAX_BATCH = 16
#: The least a server's largest request is taken to be: one that names
#: less would make every read thousands of requests.
MIN_REQUEST = 64 << 10
#: Most bytes one block-status request asks about (its count is 32-bit).
MAX_STATUS = 1 << 30
#: Zero runs shorter than this are read as data, and extents past the first
#: MAX_EXTENTS of an answer asked for again: a server answering in 1-byte
#: extents costs neither memory nor a flood of tiny reads.
MIN_HOLE = 64 << 10
MAX_EXTENTS = 1 << 14


# -- The URI -----------------------------------------------------------------

@dataclass
class Target:
    """What a checked URI names: shown masked, and how to reach it."""
    uri: str
    shown: str
    export: str
    #: The local paths the URI names, by parameter (see LOCAL_PARAMS).
    local: Dict[str, str] = field(default_factory=dict)
    #: ``nbds://`` or ``nbds+unix://``, and the TLS user the URI names.
    tls: bool = False
    username: Optional[str] = None

    @property
    def tcp(self) -> bool:
        return 'socket' not in self.local

    @property
    def tcp_uri(self) -> str:
        """What libnbd connects to over TCP: the URI less its parameters
        (the TLS files are handed to libnbd opened, see _Pinned)."""
        return self.uri.split('?', 1)[0]


def check_uri(uri: str, ctx: SourceContext, what: str = FIELD) -> Target:
    """``uri`` checked as the module reads NBD URIs (see the module's
    docstring); one-line InvalidArgument or PermissionDenied otherwise."""
    shown = mask_url(uri)
    bad = f'{what}: {shown!r} is not an NBD URI'
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        raise InvalidArgument(f'{bad} (a port is 1 to 65535); {EXPECTED}') from None
    if parts.scheme not in TCP_SCHEMES + UNIX_SCHEMES or not uri.startswith(f'{parts.scheme}://'):
        raise InvalidArgument(f'{bad}; {EXPECTED}')
    if parts.fragment or '#' in uri or ';' in parts.query:
        raise InvalidArgument(f"{bad} ('#' and ';' have no meaning in it); {EXPECTED}")
    if parts.password is not None:
        raise InvalidArgument(f'{what}: {shown!r} carries a password, which NBD has no '
                              'place for; give a TLS PSK file with ?tls-psk-file=PATH')
    if parts.username is not None and parts.scheme not in ('nbds', 'nbds+unix'):
        raise InvalidArgument(f'{what}: {shown!r} names a TLS user without TLS; use '
                              f'{parts.scheme.replace("nbd", "nbds", 1)}://')
    if port == 0:
        raise InvalidArgument(f'{bad} (a port is 1 to 65535); {EXPECTED}')
    params = _params(parts.query, bad)
    unix = parts.scheme in UNIX_SCHEMES
    if unix and (parts.hostname or port is not None):
        raise InvalidArgument(f'{what}: {shown!r} names a host, which a unix socket '
                              'has none of; write nbd+unix:///[export]?socket=PATH')
    if unix != ('socket' in params):
        raise InvalidArgument(
            f'{what}: {shown!r}: ' + ('a unix socket URI needs ?socket=PATH' if unix
                                      else '?socket= needs the nbd+unix:// scheme'))
    local = {name: params[name] for name in LOCAL_PARAMS if name in params}
    for name, path in local.items():
        fd = _pin(path, name, what, ctx)    # said at once; checked again at each use
        if fd is not None:
            os.close(fd)
    return Target(uri=uri, shown=shown, export=unquote(parts.path[1:]), local=local,
                  tls=parts.scheme in ('nbds', 'nbds+unix'),
                  username=None if parts.username is None else unquote(parts.username))


def _params(query: str, bad: str) -> Dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidArgument(f'{bad} (its query is not name=value pairs); {EXPECTED}') from None
    params: Dict[str, str] = {}
    for name, value in pairs:
        if name not in LOCAL_PARAMS:
            raise InvalidArgument(f'{bad} (unknown parameter {name!r}; allowed: '
                                  f'{", ".join(LOCAL_PARAMS)}); {EXPECTED}')
        if name in params:
            raise InvalidArgument(f'{bad} (parameter {name!r} given twice); {EXPECTED}')
        params[name] = value
    return params


@dataclass(frozen=True)
class _Kind:
    """What a local path must be, and what to give instead."""
    test: Callable[[int], bool]
    noun: str
    fix: str


KINDS = {
    'socket': _Kind(stat.S_ISSOCK, 'a unix socket', "give the path of the NBD server's "
                    'socket (qemu-nbd --socket PATH)'),
    'tls-certificates': _Kind(stat.S_ISDIR, 'a directory', 'give the directory holding '
                              'ca-cert.pem, client-cert.pem and client-key.pem'),
    'tls-psk-file': _Kind(stat.S_ISREG, 'a regular file', 'give the PSK file (username:key '
                          'lines, as psktool writes them)'),
}


def _pin(path: str, name: str, what: str, ctx: SourceContext) -> Optional[int]:
    """``path`` opened without reading it (``O_PATH``, links followed) and
    the file opened checked: its real path under an allowed root (the mgr
    connects to or reads it with its own rights) and of the kind ``name``
    takes.  The descriptor, or None when nothing is there yet (a server not
    started: connecting says so, and is retried)."""
    where = f'{what}: {name} {path!r}'
    if not os.path.isabs(path):
        raise InvalidArgument(f'{where} is not an absolute path; give the full path '
                              'on the host of the active mgr')
    roots = _real_roots(ctx.allowed_file_roots)
    outside = PermissionDenied(
        f'{where} is not under an allowed directory; move it under one of '
        f'{", ".join(roots) or "them"} or add its directory with '
        f'`ceph config set mgr {ROOTS_OPTION} DIR`')
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if not roots or not _is_under(os.path.realpath(path), roots):
            raise outside from None
        return None
    except OSError as e:
        raise InvalidArgument(f'{where} cannot be opened ({e.strerror}); '
                              f'{KINDS[name].fix}') from None
    try:
        if not roots or not _is_under(os.readlink(f'/proc/self/fd/{fd}'), roots):
            raise outside
        kind = KINDS[name]
        if not kind.test(os.fstat(fd).st_mode):
            raise InvalidArgument(f'{where} is not {kind.noun}; {kind.fix}')
    except BaseException:
        os.close(fd)
        raise
    return fd


#: The files libnbd reads from a ``tls-certificates`` directory (the CRL
#: is optional), and how large one may be.
CERTIFICATE_FILES = ('ca-cert.pem', 'ca-crl.pem', 'client-cert.pem', 'client-key.pem')
MAX_CERTIFICATE_BYTES = 1 << 20


class _Pinned:
    """The local files of one connection, open from their check until its
    handshake is over; libnbd and GnuTLS get ``path(name)``, which names
    the file checked whatever its path names meanwhile.  GnuTLS opens the
    files of a ``tls-certificates`` directory by name, so it gets a private
    copy of them instead, each read from a file opened and checked here
    (see ``_copy_certificates``)."""

    def __init__(self, target: Target, ctx: SourceContext) -> None:
        self.fds: Dict[str, int] = {}
        self._copies: Optional[tempfile.TemporaryDirectory[str]] = None
        try:
            for name, path in target.local.items():
                fd = _pin(path, name, FIELD, ctx)
                if fd is None and name == 'socket':
                    raise Transient(f'connect: {os.strerror(errno.ENOENT)}')
                if fd is None:
                    raise InvalidArgument(f'{FIELD}: {name} {path!r} does not exist; '
                                          f'{KINDS[name].fix}')
                self.fds[name] = fd
            if 'tls-certificates' in self.fds:
                self._copies = _copy_certificates(
                    self.fds['tls-certificates'], target.local['tls-certificates'], ctx)
        except BaseException:
            self.close()
            raise

    def path(self, name: str) -> str:
        if name == 'tls-certificates' and self._copies is not None:
            return self._copies.name
        return f'/proc/self/fd/{self.fds[name]}'

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self._copies is not None:
            self._copies.cleanup()
            self._copies = None

    def __enter__(self) -> '_Pinned':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy_certificates(dir_fd: int, path: str,
                       ctx: SourceContext) -> 'tempfile.TemporaryDirectory[str]':
    """The certificate files of the checked directory ``dir_fd``, copied
    into a directory only the mgr may read.  Each is opened here through
    the directory opened (a link inside it is followed, and where it led
    is checked against the roots as any path is), must be a regular file of
    at most MAX_CERTIFICATE_BYTES, and is read from that open file: what
    GnuTLS reads is what was checked, whatever the names point at later."""
    roots = _real_roots(ctx.allowed_file_roots)
    copies = tempfile.TemporaryDirectory(prefix='rbd_migration-nbd-tls-')
    try:
        for name in CERTIFICATE_FILES:
            where = f'{FIELD}: tls-certificates {path!r}: {name}'
            try:
                fd = os.open(f'/proc/self/fd/{dir_fd}/{name}', os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue            # GnuTLS says which ones it needed
            except OSError as e:
                raise InvalidArgument(f'{where} cannot be read ({e.strerror})') from None
            with os.fdopen(fd, 'rb') as f:
                if not _is_under(os.readlink(f'/proc/self/fd/{fd}'), roots):
                    raise PermissionDenied(
                        f'{where} leads outside the allowed directories; keep the '
                        f'certificates themselves under {", ".join(roots)}')
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CERTIFICATE_BYTES:
                    raise InvalidArgument(
                        f'{where} is not a regular file of at most '
                        f'{MAX_CERTIFICATE_BYTES} bytes; give PEM files')
                data = f.read(MAX_CERTIFICATE_BYTES + 1)
            target = os.open(os.path.join(copies.name, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(target, 'wb') as out:
                out.write(data[:MAX_CERTIFICATE_BYTES])
    except BaseException:
        copies.cleanup()
        raise
    return copies


def _start(handle: 'nbd.NBD', target: Target, pinned: _Pinned, limit: float) -> None:
    """The connection begun on ``handle``: over TCP libnbd connects by the
    URI; a unix socket is connected here, to the socket checked, and libnbd
    handed the connected socket and what the URI would have set."""
    if 'tls-certificates' in pinned.fds:
        handle.set_tls_certificates(pinned.path('tls-certificates'))
    if 'tls-psk-file' in pinned.fds:
        handle.set_tls_psk_file(pinned.path('tls-psk-file'))
    if target.tcp:
        handle.aio_connect_uri(target.tcp_uri)
        return
    handle.set_export_name(target.export)
    if target.tls:
        handle.set_tls(nbd.TLS_REQUIRE)
    if target.username is not None:
        handle.set_tls_username(target.username)
    sock = _connect_unix(pinned.path('socket'), limit)
    # libnbd's from here, even when the call fails (the handshake may fail
    # within it): libnbd closes it, and so must nobody else.
    handle.aio_connect_socket(sock.detach())


def _connect_unix(path: str, limit: float) -> socket.socket:
    """A unix socket connected to ``path`` within ``limit`` seconds (a
    connect waits only while the server's backlog is full)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(limit)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise Transient(f'connect: {e.strerror or e}') from None
    return sock


# -- One connection ----------------------------------------------------------

@dataclass
class _Request:
    """One command in flight: set done by its completion callback."""
    done: threading.Event = field(default_factory=threading.Event)
    error: int = 0

    def complete(self, error: Any) -> int:
        self.error = int(getattr(error, 'value', error) or 0)
        self.done.set()
        return 1        # retire the command: nobody calls aio_command_completed


class _Link:
    """One libnbd handle, connected.  Any thread may send commands on it;
    one waiting thread at a time reads the answers for all of them.

    Answers land in the callers' own buffers, which a retry on another link
    fills again: so every libnbd call that may move answers into them is
    made under ``_io`` and only while the link is whole, and a link is
    broken under ``_io`` too.  Once broken, nothing more lands from it."""

    def __init__(self, handle: 'nbd.NBD', size: int, max_request: int) -> None:
        self.handle = handle
        self.size = size
        self.max_request = max_request
        #: Whose turn it is to read answers: one thread at a time, the
        #: others woken after each of its polls to look at their own.
        self._turn = threading.Condition()
        self._polling = False
        self._io = threading.Lock()
        #: Why the link is no use any more; None while it is.
        self.broken: Optional[str] = None

    @classmethod
    def connect(cls, target: Target, ctx: SourceContext) -> '_Link':
        handle = nbd.NBD()
        handle.set_handle_name('rbd_migration')
        handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        handle.set_uri_allow_transports(nbd.ALLOW_TRANSPORT_TCP)
        handle.set_uri_allow_local_file(False)
        limit = ctx.connect_wait()
        started = time.monotonic()
        try:
            with _Pinned(target, ctx) as pinned:
                _start(handle, target, pinned, limit)
                while handle.aio_is_connecting():
                    ctx.check()
                    left = limit - (time.monotonic() - started)
                    if left <= 0:
                        raise Transient(f'no answer to the NBD handshake within {limit:g}s')
                    if target.tcp:
                        _quick_ack(handle)
                    _notify(handle, _ready(handle, min(POLL_TICK, left)))
            if not handle.aio_is_ready():
                raise Transient('the server closed the connection during the handshake')
            size = handle.get_size()
            most = handle.get_block_size(nbd.SIZE_MAXIMUM) or MAX_REQUEST
        except nbd.Error as e:
            raise _connect_error(e, target) from None
        return cls(handle, size, max(MIN_REQUEST, min(MAX_REQUEST, most)))

    def run(self, send: Callable[[Callable[[Any], int]], object],
            ctx: SourceContext, count: int = 1) -> List[_Request]:
        """Send ``count`` commands (``send(completion)`` each) and wait for
        all their answers, within ``ctx.timeout`` from the first; Transient
        when the link breaks or is too slow (it is then of no more use)."""
        requests = [_Request() for _ in range(count)]
        started = time.monotonic()
        try:
            for request in requests:
                with self._io:
                    self._check()
                    send(request.complete)
            for request in requests:
                while not request.done.is_set():
                    ctx.check()
                    self._check()
                    if time.monotonic() - started > ctx.timeout:
                        self._break(f'no answer within {ctx.timeout:g}s')
                    self._wait(request, ctx.wait_for(POLL_TICK))
        except nbd.Error as e:
            self._break(_reason(e))
        failed = next((r.error for r in requests if r.error), 0)
        if failed and (self.handle.aio_is_dead() or self.handle.aio_is_closed()):
            # A command failed because the connection ended: retry on a new one.
            self._break(f'the server closed the connection ({os.strerror(failed)})')
        return requests

    def _wait(self, request: _Request, seconds: float) -> None:
        """Read answers for ``seconds`` at most, or, while another thread
        reads them, wait until it has read some."""
        with self._turn:
            if self._polling:
                self._turn.wait(seconds)
                return
            self._polling = True
        try:
            if not request.done.is_set() and self.broken is None:
                ready = _ready(self.handle, seconds)
                with self._io:
                    if self.broken is None:
                        _notify(self.handle, ready)
        finally:
            with self._turn:
                self._polling = False
                self._turn.notify_all()

    def _check(self) -> None:
        if self.broken is not None:
            raise Transient(self.broken)

    def _break(self, reason: str) -> None:
        """The link is no more use (the first reason given stays)."""
        with self._io:
            self.broken = self.broken or reason
        self._check()

    def close(self) -> None:
        """Tell the server goodbye without waiting for it, unless the link
        is broken (its handle then says nothing more); the socket closes
        once the last thread using the handle lets go of it."""
        with self._io:
            whole, self.broken = self.broken is None, self.broken or 'closed'
            if whole:
                try:
                    self.handle.aio_disconnect(0)
                except nbd.Error:
                    pass


def _ready(handle: 'nbd.NBD', seconds: float) -> int:
    """One poll of the handle's socket, at most ``seconds``: the direction
    it is ready in (0 for none).  select releases the GIL and holds no
    libnbd lock, so other threads send commands meanwhile."""
    direction = handle.aio_get_direction()
    fd = handle.aio_get_fd()
    readable, writable, _ = select.select(
        [fd] if direction & nbd.AIO_DIRECTION_READ else [],
        [fd] if direction & nbd.AIO_DIRECTION_WRITE else [], [], seconds)
    return (nbd.AIO_DIRECTION_READ if readable else
            nbd.AIO_DIRECTION_WRITE if writable else 0)


def _quick_ack(handle: 'nbd.NBD') -> None:
    """Acknowledge what arrives at once.  A server that writes a reply in
    pieces without TCP_NODELAY (qemu-nbd in the handshake) holds each
    piece until the one before is acknowledged, which the delayed ACK puts
    off 40 ms: a handshake took 90 ms rather than one.  The flag does not
    stay set, so it is set before every poll of the handshake."""
    try:
        sock = socket.socket(fileno=handle.aio_get_fd())
    except (nbd.Error, OSError):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:
        pass
    finally:
        sock.detach()


def _notify(handle: 'nbd.NBD', ready: int) -> None:
    """libnbd's state machine moves on with what ``_ready`` found."""
    if ready == nbd.AIO_DIRECTION_READ:
        handle.aio_notify_read()
    elif ready == nbd.AIO_DIRECTION_WRITE:
        handle.aio_notify_write()


def _reason(e: 'nbd.Error') -> str:
    """libnbd's message without the name of the call that failed."""
    text = (e.string or str(e)).strip()
    head, sep, tail = text.partition(': ')
    return tail if sep and head.startswith('nbd_') else text


def _connect_error(e: 'nbd.Error', target: Target) -> Exception:
    """A handshake's failure: a missing export or TLS refused is an answer,
    anything else (refused, reset, no such socket yet) may pass."""
    reason = _reason(e)
    if 'no export named' in reason:
        name = f'export {target.export!r}' if target.export else 'default export (none named)'
        return NotFound(mask_text(f'{FIELD}: the NBD server at {target.shown} has no '
                                  f'{name}; name one it serves (qemu-nbd -x NAME serves '
                                  'NAME: nbd://host/NAME)', []))
    if 'TLS' in reason or e.errno in ('ENOTSUP', 'EINVAL'):
        return InvalidArgument(mask_text(f'{FIELD}: {target.shown}: {reason}', []))
    return Transient(mask_text(reason, []))


# -- The stream --------------------------------------------------------------

class NbdStream(Stream):
    """Reads of one NBD export over one connection, made afresh when it
    breaks; the size seen at open is pinned."""

    #: A request costs one round trip, and several are in flight at once:
    #: the pieces of a read are sent together rather than merged.
    merge_gap = -1

    def __init__(self, target: Target, ctx: SourceContext, what: str) -> None:
        self._target = target
        self._ctx = ctx
        self._what = f'{what}: {target.shown}'
        self.description = f'nbd {target.shown}'
        self._lock = threading.Lock()
        self._link: Optional[_Link] = None
        self._size = -1
        #: The link made at open, used for nothing else yet: its handshake
        #: is as new as another's would be.
        self._fresh = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'NbdStream':
        uri = spec.get('uri')
        if not isinstance(uri, str):
            raise InvalidArgument(f'{FIELD}: {EXPECTED}')
        if nbd is None:
            raise Unsupported(f'{FIELD}: reading NBD needs libnbd; install python3-libnbd '
                              'on the mgr hosts')
        stream = cls(check_uri(uri, ctx), ctx, FIELD)
        try:
            stream._size = stream._with_link(lambda link: link.size)
        except BaseException:
            stream.close()
            raise
        stream._fresh = True
        return stream

    def size(self) -> int:
        self._check_open()
        return self._size

    def validators(self) -> Dict[str, str]:
        """The export's size as a new connection finds it (the one made at
        open, when nothing has used it since)."""
        self._check_open()
        if self._fresh:
            self._fresh = False
            return {'size': str(self._size)}
        link = with_retries(self._ctx, self._what,
                            lambda: _Link.connect(self._target, self._ctx), self._text)
        link.close()
        return {'size': str(link.size)}

    def _read(self, offset: int, length: int) -> bytes:
        data = bytearray(length)
        self._read_into(offset, memoryview(data))
        return bytes(data)

    def _read_into(self, offset: int, view: memoryview) -> int:
        return self.read_pieces([(offset, view)])[0]

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]]) -> List[int]:
        """Every piece (cut to the export's end, split at the server's
        largest request) asked for at once, MAX_BATCH requests in flight."""
        counts = []
        spans: List[Tuple[int, memoryview]] = []
        for offset, view in pieces:
            want = self._span(offset, len(view))
            counts.append(want)
            step = self._max_request()
            spans += [(offset + at, view[at:min(want, at + step)]) for at in range(0, want, step)]
        for first in range(0, len(spans), MAX_BATCH):
            self._fetch(spans[first:first + MAX_BATCH])
        return counts

    def _fetch(self, spans: List[Tuple[int, memoryview]]) -> None:
        """The spans read, each answer straight into its view."""
        buffers = [nbd.Buffer.from_buffer(view) for _, view in spans]

        def attempt(link: _Link) -> None:
            sent = iter(zip(spans, buffers))

            def send(completion: Callable[[Any], int]) -> object:
                (offset, _), buf = next(sent)
                return link.handle.aio_pread(buf, offset, completion=completion)
            for (offset, view), request in zip(spans, link.run(send, self._ctx, len(spans))):
                if request.error:
                    raise Transient(f'read of {len(view)} bytes at {offset} failed '
                                    f'({os.strerror(request.error)})')
        self._with_link(attempt)

    def allocated(self, offset: int, length: int) -> Iterator[Tuple[int, int]]:
        """What block status does not call zero; all of it where the server
        has no ``base:allocation``, or fails to say."""
        end = min(offset + length, self.size())
        pos = offset
        while pos < end:
            self._ctx.check()
            found = self._block_status(pos, min(end - pos, MAX_STATUS))
            if not found:   # no answer for pos: read the rest as data
                yield pos, end - pos
                return
            for start, stop, zero in found:
                if not zero:
                    yield start, stop - start
            pos = found[-1][1]

    def _block_status(self, pos: int, count: int) -> List[Tuple[int, int, bool]]:
        """(start, end, reads as zero) from ``pos`` on, contiguous, within
        [pos, pos+count); empty when the server gives nothing usable."""
        def attempt(link: _Link) -> List[Tuple[int, int, bool]]:
            if not link.handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
                return []
            found: List[Tuple[int, int, bool]] = []

            def extent(meta: str, start: int, entries: List[int], err: Any) -> int:
                if meta == nbd.CONTEXT_BASE_ALLOCATION and start == pos and not found:
                    found.extend(_extents(start, entries, pos + count))
                return 0

            def send(completion: Callable[[Any], int]) -> object:
                return link.handle.aio_block_status(count, pos, extent, completion=completion)
            if link.run(send, self._ctx)[0].error:
                return []
            return found
        return self._with_link(attempt)

    def _max_request(self) -> int:
        link = self._link
        return link.max_request if link is not None else MAX_REQUEST

    def _with_link(self, use: Callable[[_Link], Any]) -> Any:
        """``use(link)`` with retries, on a new link after one breaks."""
        self._fresh = False
        return with_retries(self._ctx, self._what, lambda: use(self._current()), self._text)

    def _current(self) -> _Link:
        with self._lock:
            self._check_open()
            link = self._link
            if link is not None and link.broken is None:
                return link
            if link is not None:
                link.close()
            self._link = None
            link = _Link.connect(self._target, self._ctx)
            if self._size >= 0 and link.size != self._size:
                link.close()
                raise SourceChanged(self._text(
                    f'{self._what}: {self._target.shown} changed since it was opened '
                    f'(size {self._size} → {link.size}); do not change the image '
                    'while it is imported'))
            self._link = link
            return link

    def _text(self, text: str) -> str:
        return mask_text(text, [])

    def close(self) -> None:
        super().close()
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()


def _extents(start: int, entries: Sequence[int], end: int) -> List[Tuple[int, int, bool]]:
    """The (start, end, zero) runs in libnbd's flat [length, flags, ...]
    list, cut at ``end``, at the first entry that makes no progress and
    after MAX_EXTENTS entries; zero runs under MIN_HOLE count as data, and
    neighbours alike are merged."""
    runs: List[Tuple[int, int, bool]] = []
    pos = start
    for length, flags in islice(zip(entries[0::2], entries[1::2]), MAX_EXTENTS):
        if length <= 0 or pos >= end:
            break
        stop = min(end, pos + length)
        zero = bool(flags & nbd.STATE_ZERO) and stop - pos >= MIN_HOLE
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], stop, zero)
        else:
            runs.append((pos, stop, zero))
        pos = stop
    return runs
