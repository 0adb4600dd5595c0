"""An HTTP(S) object as a stream: one ranged GET per read, with requests.

The server must honour ``Range``; one that answers a ranged GET with the
whole body would make every read download the entire image, so it is refused
when the stream is opened rather than discovered hours into a copy.

Reads ask for ``Accept-Encoding: identity``: a range applies to the encoded
representation, so a compressed answer would hand out the wrong bytes.
Transient failures (connection errors, timeouts, 5xx, a body cut short) are
retried with capped exponential backoff; a 4xx is an answer, never retried.
Messages show the URL masked: it may carry a password or a signature.

The server is not trusted: whoever may prepare a migration picks the URL,
and the mgr reads it with the mgr's own network position.  So

* redirects are followed here, not by requests, and only to the URL's own
  origin or one the operator listed (``ctx.redirect_origins``); the URL's
  credentials go to its own origin only;
* every attempt has a limit in time (``ctx.timeout``) for the whole answer,
  not per socket read, which a server trickling a byte at a time would
  defeat: a watchdog cuts off the socket of an attempt that overruns it,
  passes the deadline or is told to stop, and bodies are read in pieces
  with checks between them;
* the object must not change while it is read: the size, ETag and
  Last-Modified seen at open are pinned and every later answer is checked
  against them.

The retries, time limits and network errors it shares with the S3 stream
live in ``net``.
"""
import http.client
import os
import queue
import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Tuple,
                    Union)
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import requests.utils
import urllib3
import urllib3.connection

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, NotFound,
                      PermissionDenied, SourceChanged, Unsupported)
from ..secrets import mask_text, mask_url
from .base import Stream
from .coalesce import Scatter
from .net import (PIECE, Guard, Transient, WatchedAdapter, causes, changed, clip,
                  guarded, host_port, network_reason, same_validator, timed_out,
                  tls_error, with_retries)

FIELD = 'source-spec: stream.url'
USER_AGENT = 'ceph-mgr-rbd_migration'
#: The option that lists the origins redirects may lead to.
REDIRECT_OPTION = 'mgr/rbd_migration/http_redirect_origins'
#: Redirects followed for one request at most.
MAX_REDIRECTS = 5
#: Error bodies up to this size are read to keep their connection alive.
DISCARD_MAX = 64 * 1024


# -- Origins -----------------------------------------------------------------

#: (scheme, host, port): where a URL's requests go, as browsers compare it.
Origin = Tuple[str, str, int]


def origin_of(url: str) -> Optional[Origin]:
    """The origin of an http(s) URL, the port spelled out; None for any
    other URL or one that does not parse."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ('http', 'https') or not parts.hostname:
        return None
    return scheme, parts.hostname, port or (443 if scheme == 'https' else 80)


def show_origin(origin: Origin) -> str:
    scheme, host, port = origin
    host = f'[{host}]' if ':' in host else host
    return f'{scheme}://{host}:{port}'


def _without_userinfo(url: str) -> str:
    """``url`` without user:password@ and #fragment: credentials go in an
    Authorization header, and only to the origin they were given for."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition('@')[2]
    return urlunsplit(parts._replace(netloc=netloc, fragment=''))


# -- Sessions ----------------------------------------------------------------


def _new_session() -> requests.Session:
    """A session with the watched connections and no credentials of its own
    (they are given per request, to the URL's own origin only).  It does not
    look at the environment per request (``trust_env``): that read the
    mgr's ``~/.netrc``, whose passwords must not go to hosts a spec names,
    and re-read the proxy variables at a cost of about half a millisecond a
    request; ``_Environment`` reads them once instead."""
    session = requests.Session()
    session.trust_env = False
    session.headers.update({'User-Agent': USER_AGENT,
                            'Accept-Encoding': 'identity'})
    for prefix in ('http://', 'https://'):
        session.mount(prefix, WatchedAdapter())
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


class _Environment:
    """What a requests session with ``trust_env`` would take from the mgr's
    environment for each request, read once per origin: the proxy (and
    ``no_proxy``) variables, and a CA bundle (``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE``), as before."""

    def __init__(self) -> None:
        self._proxies: Dict[Origin, Dict[str, str]] = {}
        self._lock = threading.Lock()
        self.verify: Union[bool, str] = (os.environ.get('REQUESTS_CA_BUNDLE')
                                         or os.environ.get('CURL_CA_BUNDLE') or True)

    def proxies(self, url: str, origin: Origin) -> Dict[str, str]:
        with self._lock:
            found = self._proxies.get(origin)
        if found is None:
            found = dict(requests.utils.get_environ_proxies(url))
            with self._lock:
                self._proxies[origin] = found
        return found


# -- Answers and validators --------------------------------------------------


def _readinto1(fp: http.client.HTTPResponse, view: memoryview) -> int:
    """http.client's ``read1`` into ``view``, without the bytes object: one
    receive at most, within the answer's length, which it keeps as
    ``read1`` does (so ``_finish`` sees the answer's end)."""
    if fp.length is not None:
        view = view[:fp.length]
    n: int = fp.fp.readinto1(view)
    if fp.length is not None:
        fp.length -= n
    return n


@dataclass
class _Into:
    """Where the bytes of a ranged GET go: into ``scatter`` from ``done``
    bytes on, ``done`` growing as they come, so that a retry asks only for
    the rest."""

    scatter: Scatter
    done: int = 0


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


def _total(answer: _Answer) -> Optional[int]:
    """The object's whole size as an answer tells it: a 200's length, or
    the total of a 206's or 416's Content-Range."""
    if answer.status == 200:
        return _length(answer.headers)
    where = _content_range(answer.headers.get('Content-Range', ''))
    return where[1] if where else None


#: Validators as ``validators()`` names them, and the headers they come from.
_VALIDATOR_HEADERS = (('etag', 'ETag'), ('last_modified', 'Last-Modified'))


def _validators_of(headers: Mapping[str, str],
                   size: Optional[int]) -> Dict[str, str]:
    """The validators an answer carries (only those it has)."""
    found = {} if size is None else {'size': str(size)}
    for key, header in _VALIDATOR_HEADERS:
        value = headers.get(header, '').strip()
        if value:
            found[key] = value
    return found




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


# -- The stream --------------------------------------------------------------


#: See ``HttpStream.request_size`` and ``merge_gap``.
REQUEST_SIZE = 16 << 20
MERGE_GAP = 1 << 20


class HttpStream(Stream):
    """Ranged GETs against one URL; its size, ETag and Last-Modified are
    read once, at open, and every later answer must agree with them."""

    #: The copier reads this much at once (consecutive chunks), so a
    #: layer's clusters or a diff's records merge across chunk boundaries:
    #: a 3-deep qcow2 chain took 507 requests per GiB with reads planned
    #: per 4 MiB chunk, 272 with 16 MiB groups.  A merged answer lands in the
    #: copier's own buffers, so its length costs no memory.
    request_size = REQUEST_SIZE
    merge_limit = REQUEST_SIZE
    #: Pieces of a read merge across gaps this large: a request costs more
    #: than 1 MiB of bytes on loopback already (about a millisecond), and
    #: far more over a real network; the chain's base, read around its
    #: overlays' 1 MiB extents, took 147 requests with 128 KiB, 90 with this.
    merge_gap = MERGE_GAP

    def __init__(self, url: str, ctx: SourceContext, what: str) -> None:
        parts = urlsplit(url)
        origin = origin_of(url)
        if origin is None:
            raise InvalidArgument(f'{what}: {mask_url(url)!r} is not an '
                                  f'http(s) URL')
        self._url = url
        self._ctx = ctx
        self._what = what
        self._shown = mask_url(url)
        self.description = f'http {self._shown}'
        self._target = _without_userinfo(url)
        self._origin = origin
        self._allowed = {o for o in map(origin_of, ctx.redirect_origins)
                         if o is not None}
        self._auth: Optional[Tuple[str, str]] = None
        self._secrets: List[str] = []
        if parts.username is not None:
            self._auth = (unquote(parts.username),
                          unquote(parts.password or ''))
            self._secrets = [self._auth[1], parts.password or '']
        self._sessions = _Sessions(_new_session)
        self._env = _Environment()
        self._size = 0
        #: What open saw (validators()' keys); answers are checked against it.
        self._pinned: Dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'HttpStream':
        url = spec.get('url')
        if not isinstance(url, str):
            raise InvalidArgument(f'{FIELD}: expected an http(s) URL')
        return cls.open(url, ctx, FIELD)

    @classmethod
    def open(cls, url: str, ctx: SourceContext, what: str) -> 'HttpStream':
        """The stream for ``url`` once the server has told its size (and
        ETag and Last-Modified, which are pinned) and shown that it honours
        Range; ``what`` starts every message."""
        stream = cls(url, ctx, what)
        try:
            stream._size, pinned = stream._describe()
            with stream._lock:
                stream._pinned.update(pinned)
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

    def _read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = self._read_into(offset, memoryview(buf))
        return bytes(buf if n == length else buf[:n])

    def _read_into(self, offset: int, view: memoryview) -> int:
        return self._read_scatter(Scatter.of(offset, view))

    def _read_scatter(self, scatter: Scatter) -> int:
        """The bytes, from as many attempts as it takes: an answer that
        breaks off keeps what it brought, and the next attempt asks for the
        rest only (a fault in a 4 MiB answer costs what was still missing)."""
        into = _Into(scatter)

        def attempt() -> _Answer:
            return self._attempt('GET', scatter.start + into.done,
                                 scatter.start + scatter.length - 1, True, into)
        answer = with_retries(self._ctx, self._what, attempt, self._text)
        if answer.status == 416:
            raise SourceChanged(self._text(
                f'{self._what}: {self._shown} changed since it was opened '
                f'(now shorter than its {self._size} bytes: HTTP 416); do '
                f'not change the image while it is imported'))
        return into.done

    def version_key(self) -> Optional[Hashable]:
        """The object at its ETag, as opened (every answer is checked
        against it); None when the server gave no ETag."""
        etag = self._pinned.get('etag')
        return ('http', self.description, etag, self._size) if etag else None

    def validators(self) -> Dict[str, str]:
        """Size, ETag and Last-Modified as the server tells them now (not
        checked against what open saw: comparing is the caller's part)."""
        self._check_open()
        return self._describe(check=False)[1]

    def close(self) -> None:
        super().close()
        self._sessions.close()

    # -- opening -------------------------------------------------------------

    def _describe(self, check: bool = True) -> Tuple[int, Dict[str, str]]:
        """Size and validators.  HEAD if it gives a length and advertises
        byte ranges; otherwise (HEAD refused -- presigned URLs sign GET only
        -- or no Accept-Ranges) a one-byte ranged GET, whose Content-Range
        tells both."""
        head = with_retries(self._ctx, self._what,
                            lambda: self._attempt('HEAD'), self._text)
        length = _length(head.headers)
        ranges = head.headers.get('Accept-Ranges', '').lower().split(',')
        if head.status == 200 and length is not None and \
                'bytes' in (r.strip() for r in ranges):
            return length, _validators_of(head.headers, length)
        probe = self._get(0, 0, check)
        if probe.status == 200:      # the whole body, all of one byte or none
            return len(probe.body), _validators_of(probe.headers,
                                                   len(probe.body))
        total = _total(probe)
        if total is None:
            raise Unsupported(self._text(
                f'{self._what}: {self._shown} does not tell its size (HTTP '
                f'{probe.status} without a Content-Length or a complete '
                f'Content-Range)'))
        return total, _validators_of(probe.headers, total)

    # -- requests ------------------------------------------------------------

    def _get(self, first: int, last: int, check: bool = True) -> _Answer:
        return with_retries(self._ctx, self._what,
                            lambda: self._attempt('GET', first, last, check),
                            self._text)

    def _attempt(self, method: str, first: int = 0, last: int = -1,
                 check: bool = False, into: Optional[_Into] = None) -> _Answer:
        """One request, its redirects followed, under a Guard.  Raises
        Transient for what a retry may cure and a MigrationError for a
        definite refusal; for GET returns 206 with the bytes asked for, 200
        with a body no larger than that, or 416, each first checked (with
        ``check``) against the validators pinned at open; for HEAD any
        answer but a 5xx (501: HEAD not implemented, answered)."""
        headers = {'Range': f'bytes={first}-{last}'} if method == 'GET' else {}
        with self._sessions.lend() as session, \
                guarded(self._ctx) as guard:
            response = self._send(session, method, headers, guard)
            with response:
                status = response.status_code
                if method == 'GET' and status in (200, 206, 416):
                    answer = _Answer(status, response.headers)
                    if check:
                        self._unchanged(answer)
                    if status != 416:
                        answer.body = self._body(response, first, last,
                                                 guard, into)
                        return answer
                _discard(response)
                if status >= 500 and (method, status) != ('HEAD', 501):
                    raise Transient(f'{self._shown} answered HTTP {status} '
                                    f'{response.reason}')
                if method == 'HEAD' or status == 416:
                    return _Answer(status, response.headers)
                raise self._refused(status, response.reason)

    def _send(self, session: requests.Session, method: str,
              headers: Mapping[str, str], guard: Guard) -> requests.Response:
        """The answer at the end of at most MAX_REDIRECTS redirects, each
        to an allowed origin; the credentials only go to the URL's own."""
        url = self._target
        for _ in range(MAX_REDIRECTS + 1):
            origin = origin_of(url)
            auth = self._auth if origin == self._origin else None
            try:
                response = session.request(
                    method, url, headers=headers, auth=auth, stream=True,
                    proxies=self._env.proxies(url, origin or self._origin),
                    verify=self._env.verify,
                    timeout=(self._ctx.connect_wait(), self._ctx.wait_for()),
                    allow_redirects=False)
            except requests.RequestException as e:
                raise self._failure(e, guard, url) from None
            location = session.get_redirect_target(response)
            if location is None:
                return response
            with response:
                _discard(response)
            url = self._redirect(url, location)
        raise InvalidArgument(self._text(
            f'{self._what}: {self._shown} redirects more than '
            f'{MAX_REDIRECTS} times; give the URL the redirects end at'))

    def _redirect(self, url: str, location: str) -> str:
        """Where a redirect from ``url`` to ``location`` leads, if allowed:
        the operator named one origin, and the mgr must not be sent to
        others (another host, an internal port) by the server's say-so."""
        target = _without_userinfo(urljoin(url, location.strip()))
        there = origin_of(target)
        if there is not None and (there == self._origin
                                  or there in self._allowed):
            return target
        shown = show_origin(there) if there else clip(mask_url(target))
        raise PermissionDenied(self._text(
            f'{self._what}: {self._shown} redirects to {shown}, another '
            f'origin; if the mgr may read from there, add it to '
            f'{REDIRECT_OPTION}'))

    def _unchanged(self, answer: _Answer) -> None:
        """SourceChanged unless ``answer`` agrees with what open saw.  A
        validator that open did not see (the HEAD had no ETag, say) is
        pinned by the first answer that has it."""
        seen = _validators_of(answer.headers, _total(answer))
        with self._lock:
            for key, value in seen.items():
                pinned = self._pinned.get(key)
                if pinned is None:
                    if key != 'size':   # the size is pinned at open only
                        self._pinned[key] = value
                elif not same_validator(key, pinned, value):
                    raise changed(self._what, self._shown, key, pinned,
                                  value, self._text)

    def _body(self, response: requests.Response, first: int, last: int,
              guard: Guard, into: Optional[_Into] = None) -> bytes:
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
        return self._read_exactly(response, want, first, guard, into)

    def _read_exactly(self, response: requests.Response, want: int,
                      first: int, guard: Guard,
                      into: Optional[_Into] = None) -> bytes:
        """``want`` bytes straight from the socket, in pieces of at most
        PIECE bytes, each one receive at most (http.client's ``read1``): the
        attempt's time and the context are checked between any two, so a
        trickle is cut off even where no watchdog is (a SOCKS proxy).  A body
        cut short is Transient.  With ``into``, the bytes go there as they
        come (and stay there when the answer breaks off), straight from the
        socket where the answer is plain (not chunked), and b'' is
        returned."""
        raw = response.raw
        fp: Any = getattr(raw, '_fp', None)
        direct = isinstance(fp, http.client.HTTPResponse)
        fill = direct and into is not None and not fp.chunked
        chunks: List[bytes] = []
        got = 0
        try:
            while got < want:
                guard.pace(self._shown, got, want)
                n = min(PIECE, want - got)
                if fill:
                    assert into is not None
                    k = _readinto1(fp, into.scatter.window(into.done, n))
                else:
                    chunk = fp.read1(n) if direct else \
                        raw.read(n, decode_content=False)
                    k = len(chunk)
                    if into is not None:
                        into.scatter.put(into.done, chunk)
                    else:
                        chunks.append(chunk)
                if not k:
                    break
                got += k
                if into is not None:
                    into.done += k
        except (urllib3.exceptions.HTTPError, OSError,
                http.client.HTTPException, requests.RequestException) as e:
            if guard.cut or timed_out(e):
                raise guard.overran(self._shown, got, want) from None
            raise self._failure(e, guard, self._target) from None
        if got < want:
            if guard.cut:
                raise guard.overran(self._shown, got, want)
            raise Transient(f'{self._shown}: the answer broke off after '
                            f'{got} of {want} bytes at offset {first}')
        if direct:
            self._finish(fp, raw)
        return chunks[0] if len(chunks) == 1 else b''.join(chunks)

    @staticmethod
    def _finish(fp: http.client.HTTPResponse, raw: Any) -> None:
        """Hand a connection whose body was read to its end past urllib3
        back to the pool, as urllib3 would have (it closes it otherwise).
        ``read1`` leaves the answer open at its end; an empty ``read()``
        closes it (a chunked one may hold more than asked for: left)."""
        if not fp.chunked and fp.length == 0:
            fp.read()
        if fp.isclosed():
            raw.release_conn()

    # -- errors --------------------------------------------------------------

    def _text(self, message: str) -> str:
        return mask_text(message, self._secrets)

    def _failure(self, exc: BaseException, guard: Guard,
                 url: str) -> Exception:
        """A requests/urllib3 exception as Transient, or as a definite error
        when it is no network trouble: a rejected certificate, a URL requests
        cannot use.  Cancelled or TimedOut first, where the context says so
        (a stop or the deadline may be why the socket gave up)."""
        self._ctx.check()
        where = host_port(url)
        if guard.cut:
            return Transient(f'{self._shown}: no answer within '
                             f'{self._ctx.timeout:g}s')
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
                             f'{self._ctx.connect_limit:g}s)')
        if isinstance(exc, (requests.ReadTimeout,
                            urllib3.exceptions.ReadTimeoutError,
                            socket.timeout)):
            return Transient(f'{self._shown}: no answer within '
                             f'{self._ctx.timeout:g}s')
        reason = network_reason(exc)
        if any(isinstance(e, urllib3.exceptions.NewConnectionError)
               for e in causes(exc)):
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
