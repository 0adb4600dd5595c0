"""An HTTP(S) object as a stream: one ranged GET per read, with requests.

The server must honour ``Range``; one that answers a ranged GET with the
whole body would make every read download the entire image, so it is refused
when the stream is opened rather than discovered hours into a copy.

Reads ask for ``Accept-Encoding: identity``: a range applies to the encoded
representation, so a compressed answer would hand out the wrong bytes.
Transient failures (connection errors, timeouts, 5xx, a body cut short) are
retried with capped exponential backoff; a 4xx is an answer, never retried.
Messages show the URL masked: it may carry a password or a signature.

The retry and network-error helpers at the top are shared with the S3 stream.
"""
import http.client
import queue
import random
import re
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Any, Callable, Iterator, List, Mapping, Optional, Tuple,
                    TypeVar)
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, NotFound,
                      PermissionDenied, SourceUnavailable, Unsupported)
from ..secrets import mask_text, mask_url
from .base import Stream

FIELD = 'source-spec: stream.url'
USER_AGENT = 'ceph-mgr-rbd_migration'
#: The first pause between attempts, and the longest, in seconds.
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0
#: Error bodies up to this size are read to keep their connection alive.
DISCARD_MAX = 64 * 1024

T = TypeVar('T')

# -- Retries and network errors (also used by s3) ----------------------------


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


def with_retries(attempts: int, what: str, attempt: Callable[[], T],
                 mask: Callable[[str], str] = str) -> T:
    """``attempt()``, repeated while it raises Transient, ``attempts`` times
    at most; then SourceUnavailable '<what>: <last failure> after N attempts',
    passed through ``mask``.  Any other exception (a MigrationError for a
    definite answer) passes through at once."""
    attempts = max(1, attempts)
    for number in range(1, attempts + 1):
        try:
            return attempt()
        except Transient as e:
            failure = str(e)
        if number < attempts:
            time.sleep(backoff_delay(number))
    raise SourceUnavailable(
        mask(f'{what}: {failure} {after_attempts(attempts)}'))


def _causes(exc: BaseException) -> Iterator[BaseException]:
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
    causes = list(_causes(exc))
    for cls, text in _REASONS:
        if any(isinstance(e, cls) for e in causes):
            return text
    for e in causes:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    return type(exc).__name__


#: TLS errors that say the connection broke rather than that TLS failed.
_TLS_BROKEN = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError,
               ssl.SSLWantReadError, ssl.SSLWantWriteError)


def tls_error(exc: BaseException, what: str,
              where: str) -> Optional[MigrationError]:
    """The definite error for a TLS failure inside ``exc`` -- a rejected
    certificate, or no TLS spoken at all (https:// to a plain HTTP port) --
    which no retry cures; None otherwise, a handshake cut short included."""
    for e in _causes(exc):
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


# -- Sessions ----------------------------------------------------------------


def _new_session(auth: Optional[Tuple[str, str]]) -> requests.Session:
    session = requests.Session()
    session.auth = auth
    session.headers.update({'User-Agent': USER_AGENT,
                            'Accept-Encoding': 'identity'})
    return session


class _Sessions:
    """Keep-alive sessions lent out to one request at a time.

    requests does not promise that a Session is thread-safe (cookies,
    adapters and redirects mutate it), so no two threads share one.  A free
    list rather than a ``threading.local``: a session is not tied to the
    thread that made it, so the copier's short-lived workers reuse warm
    connections, their number never exceeds the peak concurrency, and
    ``close`` reaches every one of them.
    """

    def __init__(self, factory: Callable[[], requests.Session]) -> None:
        self._factory = factory
        self._free: 'queue.SimpleQueue[requests.Session]' = queue.SimpleQueue()
        self._all: List[requests.Session] = []
        self._lock = threading.Lock()

    @contextmanager
    def lend(self) -> Iterator[requests.Session]:
        try:
            session = self._free.get_nowait()
        except queue.Empty:
            session = self._factory()
            with self._lock:
                self._all.append(session)
        try:
            yield session
        finally:
            self._free.put(session)

    def close(self) -> None:
        with self._lock:
            sessions, self._all = self._all, []
        for session in sessions:
            session.close()


# -- The stream --------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes = b''


_CONTENT_RANGE = re.compile(r'bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*\Z',
                            re.IGNORECASE)


def _content_range(
        value: str) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """(first byte, total length) of a Content-Range, None where it says
    ``*``; None for a header that does not parse."""
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None
    first = int(m[1]) if m[1] is not None else None
    total = int(m[3]) if m[3] != '*' else None
    return first, total


def _length(headers: Mapping[str, str]) -> Optional[int]:
    value = headers.get('Content-Length', '').strip()
    return int(value) if value.isdigit() else None


def _discard(response: requests.Response) -> None:
    """Read a short body that is of no use (a HEAD's is empty whatever its
    Content-Length), so that its connection goes back to the pool instead of
    being closed; a long one is not worth it."""
    length = _length(response.headers)
    if response.request.method == 'HEAD' or \
            (length is not None and length <= DISCARD_MAX):
        try:
            response.content
        except (requests.RequestException, urllib3.exceptions.HTTPError,
                OSError):
            pass


class HttpStream(Stream):
    """Ranged GETs against one URL; its size is read once, at open."""

    def __init__(self, url: str, ctx: SourceContext, what: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise InvalidArgument(f'{what}: {mask_url(url)!r} is not an '
                                  f'http(s) URL')
        self._url = url
        self._ctx = ctx
        self._what = what
        self._shown = mask_url(url)
        self.description = f'http {self._shown}'
        # The userinfo goes into an Authorization header, not the request
        # line; a redirect to another host drops it (requests does that).
        netloc = parts.netloc.rpartition('@')[2]
        self._target = urlunsplit(parts._replace(netloc=netloc, fragment=''))
        auth = None
        self._secrets: List[str] = []
        if parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ''))
            self._secrets = [auth[1], parts.password or '']
        self._sessions = _Sessions(lambda: _new_session(auth))
        self._timeout = ctx.timeout
        self._attempts = max(1, ctx.retries)
        self._size = 0
        self._closed = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'HttpStream':
        url = spec.get('url')
        if not isinstance(url, str):
            raise InvalidArgument(f'{FIELD}: expected an http(s) URL')
        return cls.open(url, ctx, FIELD)

    @classmethod
    def open(cls, url: str, ctx: SourceContext, what: str) -> 'HttpStream':
        """The stream for ``url`` once the server has told its size and shown
        that it honours Range; ``what`` starts every message."""
        stream = cls(url, ctx, what)
        try:
            stream._size = stream._find_size()
        except BaseException:
            stream.close()
            raise
        return stream

    def sibling(self, name: str) -> 'HttpStream':
        """``name`` resolved against this URL as a browser would (urljoin),
        but only on the same server: a name inside an image file must not
        send the mgr to any URL it likes (the operator named this server,
        not others)."""
        url = urljoin(self._url, name)
        what = f'{FIELD}: {mask_url(name)!r} (named in {self._shown})'
        here, there = urlsplit(self._url), urlsplit(url)
        if there.scheme not in ('http', 'https'):
            raise InvalidArgument(self._text(f'{what} is not an http(s) '
                                             f'location'))
        if (there.scheme, there.hostname, there.port) != \
                (here.scheme, here.hostname, here.port):
            raise PermissionDenied(self._text(
                f'{what} is on another server; only files next to the image, on '
                f'the same server, are followed'))
        return self.open(url, self._ctx, what)

    def size(self) -> int:
        self._check_open()
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        self._check_open()
        end = min(offset + length, self._size)
        if end <= offset:
            return b''
        answer = self._get(offset, end - 1)
        if answer.status == 416:
            raise InvalidArgument(self._text(
                f'{self._what}: {self._shown} is now shorter than the '
                f'{self._size} bytes it had when opened (HTTP 416); do not '
                f'change the image while it is imported'))
        return answer.body

    def close(self) -> None:
        self._closed = True
        self._sessions.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f'{self.description}: stream is closed')

    # -- opening -------------------------------------------------------------

    def _find_size(self) -> int:
        """HEAD if it gives a length and advertises byte ranges; otherwise
        (HEAD refused -- presigned URLs sign GET only -- or no Accept-Ranges)
        a one-byte ranged GET, whose Content-Range tells both."""
        head = with_retries(self._attempts, self._what,
                            lambda: self._attempt('HEAD'), self._text)
        length = _length(head.headers)
        ranges = head.headers.get('Accept-Ranges', '').lower().split(',')
        if head.status == 200 and length is not None and \
                'bytes' in (r.strip() for r in ranges):
            return length
        probe = self._get(0, 0)
        if probe.status == 200:      # the whole body, all of one byte or none
            return len(probe.body)
        total = _content_range(probe.headers.get('Content-Range', ''))
        if total is None or total[1] is None:
            raise Unsupported(self._text(
                f'{self._what}: {self._shown} does not tell its size (HTTP '
                f'{probe.status} without a Content-Length or a complete '
                f'Content-Range)'))
        return total[1]

    # -- requests ------------------------------------------------------------

    def _get(self, first: int, last: int) -> _Answer:
        return with_retries(self._attempts, self._what,
                            lambda: self._attempt('GET', first, last),
                            self._text)

    def _attempt(self, method: str, first: int = 0, last: int = -1) -> _Answer:
        """One request.  Raises Transient for what a retry may cure and a
        MigrationError for a definite refusal; for GET returns 206 with the
        bytes asked for, 200 with a body no larger than that, or 416; for
        HEAD any answer but a 5xx (501: HEAD not implemented, answered)."""
        headers = {'Range': f'bytes={first}-{last}'} if method == 'GET' else {}
        with self._sessions.lend() as session:
            try:
                response = session.request(
                    method, self._target, headers=headers, stream=True,
                    timeout=(self._timeout, self._timeout),
                    allow_redirects=True)
            except requests.RequestException as e:
                raise self._failure(e) from None
            with response:
                status = response.status_code
                if method == 'GET' and status in (200, 206):
                    return _Answer(status, response.headers,
                                   self._body(response, first, last))
                _discard(response)
                if status >= 500 and (method, status) != ('HEAD', 501):
                    raise Transient(f'{self._shown} answered HTTP {status} '
                                    f'{response.reason}')
                if method == 'HEAD' or status == 416:
                    return _Answer(status, response.headers)
                raise self._refused(status, response.reason)

    def _body(self, response: requests.Response, first: int,
              last: int) -> bytes:
        """The body of a 200 or 206, checked to be the bytes asked for."""
        headers = response.headers
        if headers.get('Content-Encoding', 'identity').lower() != 'identity':
            raise Unsupported(self._text(
                f'{self._what}: {self._shown} was sent with Content-Encoding '
                f"{headers['Content-Encoding']!r} although identity was "
                f'asked for; serve the image uncompressed'))
        if response.status_code == 206:
            want = last - first + 1
            where = _content_range(headers.get('Content-Range', ''))
            if where is None or where[0] != first:
                raise Unsupported(self._text(
                    f'{self._what}: {self._shown} answered a request for '
                    f'bytes {first}-{last} with Content-Range '
                    f"{headers.get('Content-Range')!r}"))
        else:
            whole = _length(headers)
            if first != 0 or whole is None or whole > last + 1:
                raise Unsupported(self._text(
                    f'{self._what}: {self._shown}: the server ignored the '
                    f'Range header (HTTP 200 with the whole '
                    f"{'' if whole is None else f'{whole}-byte '}body); the "
                    f'server must support Range requests'))
            want = whole
        return self._read_exactly(response, want, first)

    def _read_exactly(self, response: requests.Response, want: int,
                      first: int) -> bytes:
        """``want`` bytes straight from the socket (no 10 KiB iter_content
        chunks); a body cut short is Transient."""
        chunks: List[bytes] = []
        got = 0
        try:
            while got < want:
                chunk = response.raw.read(want - got, decode_content=False)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (urllib3.exceptions.HTTPError, OSError,
                requests.RequestException) as e:
            raise self._failure(e) from None
        if got < want:
            raise Transient(f'{self._shown}: the answer broke off after '
                            f'{got} of {want} bytes at offset {first}')
        return chunks[0] if len(chunks) == 1 else b''.join(chunks)

    # -- errors --------------------------------------------------------------

    def _text(self, message: str) -> str:
        return mask_text(message, self._secrets)

    def _failure(self, exc: BaseException) -> Exception:
        """A requests/urllib3 exception as Transient, or as a definite error
        when it is no network trouble: a rejected certificate, a redirect
        loop, a URL requests cannot use."""
        where = host_port(self._target)
        definite = tls_error(exc, self._what, where)
        if definite is not None:
            return definite
        if isinstance(exc, requests.RequestException) and not isinstance(
                exc, (requests.ConnectionError, requests.Timeout,
                      requests.exceptions.ChunkedEncodingError)):
            return InvalidArgument(self._text(
                f'{self._what}: {self._shown}: {type(exc).__name__}: {exc}'))
        if isinstance(exc, requests.ConnectTimeout):
            return Transient(f'cannot connect to {where} (no answer within '
                             f'{self._timeout:g}s)')
        if isinstance(exc, (requests.ReadTimeout,
                            urllib3.exceptions.ReadTimeoutError,
                            socket.timeout)):
            return Transient(f'{self._shown}: no answer within '
                             f'{self._timeout:g}s')
        reason = network_reason(exc)
        if any(isinstance(e, urllib3.exceptions.NewConnectionError)
               for e in _causes(exc)):
            return Transient(f'cannot connect to {where} ({reason})')
        return Transient(f'connection to {where} failed ({reason})')

    def _refused(self, status: int, reason: str) -> MigrationError:
        """The error for a 4xx answer."""
        answer = f'HTTP {status}'
        if status in (404, 410):
            return NotFound(self._text(
                f'{self._what}: {self._shown} not found ({answer})'))
        if status in (401, 403, 407):
            fix = ('the server refused the user and password in the URL'
                   if self._secrets else
                   'give credentials as http(s)://user:password@host/path, '
                   'or a presigned URL')
            return PermissionDenied(self._text(
                f'{self._what}: access to {self._shown} denied ({answer} '
                f'{reason}); {fix}'))
        return InvalidArgument(self._text(
            f'{self._what}: {self._shown}: the server answered {answer} '
            f'{reason}'))
