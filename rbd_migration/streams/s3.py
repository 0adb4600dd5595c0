"""An S3 object as a stream: ranged GetObject through botocore.

The URL is path-style, ``http(s)://host[:port]/bucket/key`` (RGW and most
on-premises S3 servers), signed with SigV4.  Credentials may be
``config://<key>`` references into the mon config-key store; they are
resolved here and never appear in a message, even when S3 echoes them.

Requests are retried here, not by botocore, whose backoff sleeps would not
end on a stop or at the deadline (``with_retries``, as for HTTP); every
attempt runs under the watchdog's Guard and reads its body in pieces with
checks between them, so a trickling endpoint cannot hold a read past
``ctx.timeout``.  The object's ETag and modification time are pinned at
open and each read asks for that ETag (If-Match): an object overwritten
mid-import fails with SourceChanged instead of mixing two versions.

Clients are shared: building one per stream (a boto3 session each, with
its own copy of the S3 model) made the mgr grow with every prepare.
"""
import datetime
import email.utils
import hashlib
import http.client
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Hashable, Mapping, Optional, Tuple)
from urllib.parse import quote, unquote, urljoin, urlsplit

import botocore.awsrequest
import botocore.exceptions as bce
import botocore.session
from botocore.config import Config
from botocore.response import StreamingBody

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, NotFound,
                      PermissionDenied, SourceChanged, Unsupported)
from ..secrets import is_config_ref, mask_text, mask_url, resolve_secrets
from .base import Stream
from .coalesce import Scatter
from .net import (PIECE, Guard, Transient, WatchedConnection, changed,
                  guarded, host_port, network_reason, same_validator,
                  timed_out, tls_error, with_retries)

FIELD = 'source-spec: stream.url'
CREDENTIALS = 'source-spec: stream.access_key/secret_key'
#: Any region will do for RGW; SigV4 needs one.
REGION = 'us-east-1'
#: Connections kept per client; more than the copier's threads ever use.
MAX_POOL_CONNECTIONS = 32
#: Clients kept for reuse (each holds its connection pool and a client
#: class of its own); beyond it the least recently opened is dropped.
CLIENT_CACHE_SIZE = 8
#: Bytes per ranged GET in a copy (consecutive chunks read in one plan; the
#: answer lands in the chunks' own buffers).  RGW does work per request
#: (signature, bucket and object lookups) and reads ahead within one
#: answer: 4 MiB answers were 25% slower than 16 MiB ones.  16 MiB requests
#: copy as fast as 8 MiB ones, with fewer requests where units are
#: scattered (a 3-deep qcow2 chain: 341 per GiB instead of 440), and with
#: two readers per task instead of four (a running task's peak in the mgr,
#: measured one after the other: 70 MiB, against 74 with 8 MiB groups and 81
#: with the 8 MiB chunks read one at a time before).
REQUEST_SIZE = 16 << 20
#: Error codes that mean the keys themselves are wrong.
CREDENTIAL_CODES = frozenset({'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                              'InvalidToken', 'ExpiredToken'})
#: Error codes worth another attempt besides any 5xx.
TRANSIENT_CODES = frozenset({'SlowDown', 'RequestTimeout', 'Throttling',
                             'ThrottlingException', 'RequestLimitExceeded',
                             'ServiceUnavailable', 'InternalError'})


def parse_s3_url(url: str) -> Tuple[str, str, str]:
    """(endpoint, bucket, key) of a path-style object URL; bucket and key are
    percent-decoded, as S3 names them."""
    parts = urlsplit(url)
    bucket, _, key = parts.path[1:].partition('/')
    if parts.scheme not in ('http', 'https') or not parts.hostname \
            or not bucket or not key:
        raise InvalidArgument(
            f'{FIELD}: {mask_url(url)!r} is not an S3 object URL (expected '
            f'http(s)://host[:port]/bucket/key)')
    return f'{parts.scheme}://{parts.netloc}', unquote(bucket), unquote(key)


def _no_config_store(key: str) -> Optional[str]:
    raise InvalidArgument(f"source-spec: config-key '{key}' cannot be "
                          f'resolved here (no config-key store)')


def _credentials(spec: Mapping[str, Any],
                 ctx: SourceContext) -> Tuple[str, str]:
    """The access and secret key, ``config://`` references resolved; a
    missing config-key is the NotFound that resolve_secrets raises."""
    stream = dict(spec)
    if any(is_config_ref(stream.get(f)) for f in ('access_key', 'secret_key')):
        lookup: Callable[[str], Optional[str]] = ctx.config_key or \
            _no_config_store
        # Nested under 'stream' so that messages name stream.access_key.
        stream = resolve_secrets({'stream': stream}, lookup)['stream']
    keys = stream.get('access_key'), stream.get('secret_key')
    for name, value in zip(('access_key', 'secret_key'), keys):
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f'source-spec: stream.{name}: expected a '
                                  f'non-empty string')
    return str(keys[0]), str(keys[1])


def _error_code(e: bce.ClientError) -> Tuple[str, int]:
    status = e.response.get('ResponseMetadata', {}).get('HTTPStatusCode', 0)
    return str(e.response.get('Error', {}).get('Code', '')), int(status)


def _http_date(value: Any) -> Optional[str]:
    """A LastModified (botocore gives a datetime) as an HTTP date, the form
    the HTTP stream's validators have."""
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return email.utils.format_datetime(
        value.astimezone(datetime.timezone.utc), usegmt=True)


def _validators_of(answer: Mapping[str, Any],
                   size: Optional[int]) -> Dict[str, str]:
    found = {} if size is None else {'size': str(size)}
    etag = answer.get('ETag')
    if isinstance(etag, str) and etag:
        found['etag'] = etag
    modified = _http_date(answer.get('LastModified'))
    if modified:
        found['last_modified'] = modified
    return found


def _total(content_range: str) -> Optional[int]:
    total = content_range.rpartition('/')[2].strip()
    return int(total) if total.isdigit() else None


# -- Shared clients ----------------------------------------------------------


# (botocore's own classes mix incompatible signatures, as its stubs say.)
class _WatchedAWSHTTPConnection(  # type: ignore[misc]
        WatchedConnection, botocore.awsrequest.AWSHTTPConnection):
    pass


class _WatchedAWSHTTPSConnection(  # type: ignore[misc]
        WatchedConnection, botocore.awsrequest.AWSHTTPSConnection):
    pass


class _WatchedAWSHTTPPool(botocore.awsrequest.AWSHTTPConnectionPool):
    ConnectionCls = _WatchedAWSHTTPConnection


class _WatchedAWSHTTPSPool(botocore.awsrequest.AWSHTTPSConnectionPool):
    ConnectionCls = _WatchedAWSHTTPSConnection


def _watch_client(client: Any) -> None:
    """Put the client's sockets under the watchdog.  botocore offers no
    way in, so this swaps the pool classes of its URLLib3Session (the dict
    its pool and proxy managers share); should a botocore release move
    them, reads are still bounded by the checks between body pieces."""
    endpoint = getattr(client, '_endpoint', None)
    classes = getattr(getattr(endpoint, 'http_session', None),
                      '_pool_classes_by_scheme', None)
    if not isinstance(classes, dict):
        return
    for scheme, pool in (('http', _WatchedAWSHTTPPool),
                         ('https', _WatchedAWSHTTPSPool)):
        if classes.get(scheme) is pool.__bases__[0]:
            classes[scheme] = pool


#: What tells one client from another: endpoint, region, access key, a
#: digest of the secret (the key outlives no stream, but need not hold it
#: in clear), certificate verification, connect and read timeouts.
ClientKey = Tuple[str, str, str, str, bool, float, float]


@dataclass
class _Cached:
    client: Any
    #: Open streams using it.
    users: int = 0
    #: Dropped from the cache; closed once its last user is gone.
    evicted: bool = False


class _Clients:
    """One botocore session for the process and a small LRU of its clients.

    A client is thread-safe and pools its connections, so streams with the
    same endpoint, keys and timeouts share one.  Reference-counted rather
    than never closed: a client dropped from the cache while streams still
    read through it is closed when the last of them closes, so neither is a
    client closed under a stream nor are connections of dropped clients
    left to the garbage collector.  The lock also guards client creation,
    which botocore's Session does not promise to be thread-safe.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._session: Optional[botocore.session.Session] = None
        self._cache: 'OrderedDict[ClientKey, _Cached]' = OrderedDict()

    def acquire(self, key: ClientKey, secret: str) -> _Cached:
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = _Cached(self._create(key, secret))
                self._cache[key] = cached
                self._evict()
            else:
                self._cache.move_to_end(key)
            cached.users += 1
            return cached

    def release(self, cached: _Cached) -> None:
        with self._lock:
            cached.users -= 1
            if cached.users == 0 and cached.evicted:
                cached.client.close()

    def cached(self) -> int:
        """Clients in the cache (not counting dropped ones still in use)."""
        with self._lock:
            return len(self._cache)

    def _evict(self) -> None:
        while len(self._cache) > self._size:
            _, old = self._cache.popitem(last=False)
            old.evicted = True
            if old.users == 0:
                old.client.close()

    def _create(self, key: ClientKey, secret: str) -> Any:
        endpoint, region, access_key, _, verify, connect, read = key
        if self._session is None:
            self._session = botocore.session.get_session()
        client = self._session.create_client(
            's3', endpoint_url=endpoint, region_name=region, verify=verify,
            aws_access_key_id=access_key, aws_secret_access_key=secret,
            config=Config(signature_version='s3v4',
                          s3={'addressing_style': 'path'},
                          # Retried by with_retries: botocore's own backoff
                          # would sleep through a stop or the deadline.
                          retries={'mode': 'standard',
                                   'total_max_attempts': 1},
                          connect_timeout=connect, read_timeout=read,
                          max_pool_connections=MAX_POOL_CONNECTIONS))
        _watch_client(client)
        return client


_CLIENTS = _Clients(CLIENT_CACHE_SIZE)


def cached_clients() -> int:
    """How many S3 clients the process keeps for reuse."""
    return _CLIENTS.cached()


# -- The stream --------------------------------------------------------------


class S3Stream(Stream):
    """Ranged GetObjects through a client shared with other streams of the
    same endpoint and keys; concurrent reads share it too."""

    request_size = REQUEST_SIZE
    #: A request costs RGW far more than 1 MiB of bytes thrown away.
    merge_gap = 1 << 20
    merge_limit = REQUEST_SIZE

    def __init__(self, url: str, keys: Tuple[str, str], ctx: SourceContext,
                 what: str) -> None:
        self._endpoint, self._bucket, self._key = parse_s3_url(url)
        self._url = url
        self._keys = keys
        self._ctx = ctx
        self._what = what
        self._shown = mask_url(url)
        self.description = f's3 {self._shown}'
        self._size = 0
        self._pinned: Dict[str, str] = {}
        self._lock = threading.Lock()
        key: ClientKey = (self._endpoint, REGION, keys[0],
                          hashlib.sha256(keys[1].encode()).hexdigest(),
                          True, ctx.connect_limit, ctx.timeout)
        self._cached: Optional[_Cached] = _CLIENTS.acquire(key, keys[1])
        self._client = self._cached.client

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'S3Stream':
        url = spec.get('url')
        if not isinstance(url, str):
            raise InvalidArgument(f'{FIELD}: expected an S3 object URL')
        return cls.open(url, _credentials(spec, ctx), ctx, FIELD)

    @classmethod
    def open(cls, url: str, keys: Tuple[str, str], ctx: SourceContext,
             what: str) -> 'S3Stream':
        """The stream once S3 has told the object's size, ETag and
        modification time; ``what`` starts every message about the
        object."""
        stream = cls(url, keys, ctx, what)
        try:
            stream._pinned = stream._head()
            stream._size = int(stream._pinned['size'])
        except BaseException:
            stream.close()
            raise
        return stream

    def sibling(self, name: str) -> 'S3Stream':
        """The key ``name`` resolves to next to this one, as a relative URL
        would; it must stay in this bucket (the credentials are for it)."""
        what = f'{FIELD}: {mask_url(name)!r} (named in {self._shown})'
        if '://' in name or name.startswith('/'):
            raise InvalidArgument(self._text(
                f'{what}: expected a key relative to this one, in the same '
                f'bucket'))
        url = urljoin(self._url, quote(name, safe='/'))
        if parse_s3_url(url)[1] != self._bucket:
            raise InvalidArgument(self._text(
                f"{what} lies outside bucket '{self._bucket}'"))
        return self.open(url, self._keys, self._ctx, what)

    def size(self) -> int:
        self._check_open()
        return self._size

    def _read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_into(self, offset: int, view: memoryview) -> int:
        return self._read_scatter(Scatter.of(offset, view))

    def _read_scatter(self, scatter: Scatter) -> int:
        """As many attempts as it takes; each asks only for what the ones
        before did not bring (an answer that breaks off keeps its bytes)."""
        done = [0]

        def attempt() -> None:
            start = done[0]

            def brought(got: int) -> None:
                done[0] = start + got
            self._get_into(scatter, start, brought)
        with_retries(self._ctx, self._what, attempt, self._text)
        return scatter.length

    def version_key(self) -> Optional[Hashable]:
        """The object at its ETag, as opened (every answer is checked
        against it); None when the server gave no ETag."""
        etag = self._pinned.get('etag')
        return ('s3', self.description, etag, self._size) if etag else None

    def validators(self) -> Dict[str, str]:
        """Size, ETag and modification time as S3 tells them now (not
        checked against what open saw: comparing is the caller's part)."""
        self._check_open()
        return self._head()

    def close(self) -> None:
        """Give the shared client back; it stays open for other streams."""
        super().close()
        with self._lock:
            cached, self._cached = self._cached, None
        if cached is not None:
            _CLIENTS.release(cached)

    # -- requests ------------------------------------------------------------

    def _head(self) -> Dict[str, str]:
        """The object's validators from a HeadObject, retried."""
        def attempt() -> Dict[str, str]:
            with guarded(self._ctx) as guard:
                answer = self._call(guard, 'head_object')
            return _validators_of(answer, int(answer['ContentLength']))
        return with_retries(self._ctx, self._what, attempt, self._text)

    def _call(self, guard: Guard, operation: str,
              **kwargs: Any) -> Dict[str, Any]:
        """One request for this object: Transient for what a retry may
        cure, a MigrationError for a definite answer."""
        try:
            answer: Dict[str, Any] = getattr(self._client, operation)(
                Bucket=self._bucket, Key=self._key, **kwargs)
            return answer
        except bce.ClientError as e:
            raise self._refused(e) from None
        except bce.BotoCoreError as e:
            raise self._failure(e, guard) from None

    def _get_into(self, scatter: Scatter, skip: int,
                  brought: Callable[[int], None] = lambda got: None) -> None:
        """One ranged GetObject for what ``scatter`` wants past its first
        ``skip`` bytes, of the version open saw (If-Match its ETag), put
        where it says; a body cut short or too slow is Transient."""
        offset = scatter.start + skip
        want = scatter.length - skip
        extra = {'IfMatch': self._pinned['etag']} \
            if 'etag' in self._pinned else {}
        with guarded(self._ctx) as guard:
            answer = self._call(guard, 'get_object', **extra,
                                Range=f'bytes={offset}-{offset + want - 1}')
            body = answer['Body']
            try:
                got = self._body(answer, body, scatter, skip, guard, brought)
            finally:
                body.close()
        if got < want:
            raise Transient(f'{self._shown}: the answer broke off after '
                            f'{got} of {want} bytes at offset {offset}')

    def _body(self, answer: Mapping[str, Any], body: Any, scatter: Scatter,
              skip: int, guard: Guard,
              brought: Callable[[int], None] = lambda got: None) -> int:
        """The answer's bytes put where ``scatter`` says from ``skip`` on,
        once its Content-Range and validators are what was asked for;
        their count."""
        offset = scatter.start + skip
        want = scatter.length - skip
        where = str(answer.get('ContentRange', ''))
        if not where.startswith(f'bytes {offset}-'):
            raise Unsupported(self._text(
                f'{self._what}: {self._shown}: S3 answered a request for '
                f'{want} bytes at {offset} with Content-Range {where!r}'))
        self._unchanged(_validators_of(answer, _total(where)))
        progress = [0]

        def pace(got: int) -> None:
            progress[0] = got
            brought(got)
            guard.pace(self._shown, got, want)
        try:
            return _fill(body, scatter, skip, pace)
        except (bce.IncompleteReadError, bce.ReadTimeoutError,
                bce.ResponseStreamingError, http.client.HTTPException,
                OSError) as e:
            if guard.cut or timed_out(e):
                raise guard.overran(self._shown, progress[0],
                                    want) from None
            self._ctx.check()
            raise Transient(f'{self._shown}: the answer broke off '
                            f'({network_reason(e)})') from None

    def _unchanged(self, seen: Mapping[str, str]) -> None:
        """SourceChanged unless an answer agrees with what open saw (an
        endpoint ignoring If-Match is caught here too)."""
        for key, value in seen.items():
            pinned = self._pinned.get(key)
            if pinned is not None and not same_validator(key, pinned, value):
                raise changed(self._what, self._shown, key, pinned, value,
                              self._text)

    # -- errors --------------------------------------------------------------

    def _text(self, message: str) -> str:
        return mask_text(message, self._keys)

    def _refused(self, e: bce.ClientError) -> Exception:
        """The error for an S3 error answer.  A HEAD answer has no body, so
        its code is just the status; a one-byte GET then tells the real one
        (NoSuchBucket or NoSuchKey, which key check failed)."""
        code, status = _error_code(e)
        if code.isdigit() and status in (400, 403, 404):
            code = self._code_of_get() or code
        bucket = f"bucket '{self._bucket}' at {self._endpoint}"
        if code == 'PreconditionFailed' or status == 412:
            return self._etag_changed()
        if code == 'NoSuchBucket':
            return NotFound(self._text(f'{self._what}: {bucket} does not '
                                       f'exist'))
        if code in ('NoSuchKey', '404'):
            return NotFound(self._text(
                f'{self._what}: {self._shown} not found (no key '
                f"'{self._key}' in {bucket})"))
        if code in CREDENTIAL_CODES:
            return PermissionDenied(self._text(
                f'{CREDENTIALS}: S3 refused the credentials ({code})'))
        if code in ('AccessDenied', '403'):
            return PermissionDenied(self._text(
                f'{self._what}: access to {self._shown} denied ({code}); '
                f'grant the user s3:GetObject on it'))
        if status >= 500 or status == 429 or code in TRANSIENT_CODES:
            self._ctx.check()
            return Transient(f'{self._shown}: S3 answered {code} (HTTP '
                             f'{status})')
        return InvalidArgument(self._text(
            f'{self._what}: {self._shown}: S3 refused the request ({code}, '
            f'HTTP {status})'))

    def _etag_changed(self) -> MigrationError:
        """SourceChanged for a GET whose If-Match failed, naming the ETag
        the object has now where S3 tells it."""
        pinned = self._pinned.get('etag', '')
        try:
            now = self._client.head_object(Bucket=self._bucket,
                                           Key=self._key).get('ETag')
        except (bce.ClientError, bce.BotoCoreError):
            now = None
        if isinstance(now, str) and now and now != pinned:
            return changed(self._what, self._shown, 'etag', pinned, now,
                           self._text)
        return SourceChanged(self._text(
            f'{self._what}: {self._shown} changed since it was opened (ETag '
            f'{pinned} no longer matches); do not change the image while it '
            f'is imported'))

    def _code_of_get(self) -> Optional[str]:
        try:
            self._client.get_object(Bucket=self._bucket, Key=self._key,
                                    Range='bytes=0-0')['Body'].close()
        except bce.ClientError as e:
            return _error_code(e)[0]
        except bce.BotoCoreError:
            pass
        return None

    def _failure(self, e: bce.BotoCoreError, guard: Guard) -> Exception:
        """The error for a request that failed on the way: Cancelled or
        TimedOut where the context says so, Transient for network trouble,
        a definite error otherwise."""
        self._ctx.check()
        where = host_port(self._endpoint)
        if guard.cut:
            return Transient(f'{self._shown}: no answer within '
                             f'{self._ctx.timeout:g}s')
        definite = tls_error(e, self._what, where)
        if definite is not None:
            return definite
        if isinstance(e, bce.ReadTimeoutError):
            return Transient(f'{self._shown}: no answer within '
                             f'{self._ctx.timeout:g}s')
        if isinstance(e, bce.ConnectTimeoutError):
            return Transient(f'cannot connect to {where} (no answer within '
                             f'{self._ctx.connect_limit:g}s)')
        if isinstance(e, bce.EndpointConnectionError):
            return Transient(f'cannot connect to {where} '
                             f'({network_reason(e)})')
        if isinstance(e, (bce.ConnectionError, bce.HTTPClientError)):
            return Transient(f'connection to {where} failed '
                             f'({network_reason(e)})')
        return InvalidArgument(self._text(
            f'{self._what}: {self._shown}: {type(e).__name__}: {e}'))


def _fill(body: Any, scatter: Scatter, skip: int,
          pace: Optional[Callable[[int], None]] = None) -> int:
    """Read the answer's body into the buffers ``scatter`` names from
    ``skip`` bytes on; the count of bytes put there.

    Straight from the socket into the caller's buffers when the body is the
    usual botocore-over-urllib3 stream of a plain (not chunked) answer:
    reading it as ``bytes`` would allocate and copy every 16 MiB once more
    (a tenth of the mgr's CPU in an S3 import, measured).  The
    connection then goes back to the pool, as urllib3 does once it has read
    a body to its end.  Any other body is read the documented way.  Either
    way in pieces of at most PIECE bytes, ``pace(bytes so far)`` called
    before each (it raises to end the read)."""
    check = pace or (lambda got: None)
    want = scatter.length - skip
    raw: Any = getattr(body, '_raw_stream', None)
    fp = getattr(raw, '_fp', None)
    if not isinstance(fp, http.client.HTTPResponse) or fp.chunked or \
            raw.headers.get('Content-Encoding', 'identity').lower() != 'identity':
        return _fill_documented(body, scatter, skip, check)
    got = 0
    while got < want:
        check(got)
        n = fp.readinto(scatter.window(skip + got, min(PIECE, want - got)))
        if not n:   # http.client leaves a body cut short to its caller
            raise http.client.IncompleteRead(b'', want - got)
        got += n
    if fp.isclosed():
        raw.release_conn()
    return got


def _fill_documented(body: Any, scatter: Scatter, skip: int,
                     check: Callable[[int], None]) -> int:
    """``_fill`` through the body's own ``read``: in pieces for botocore's
    StreamingBody (a body longer than asked for is not read at all), whole
    for any other."""
    want = scatter.length - skip
    if not isinstance(body, StreamingBody):
        check(0)
        data = body.read()   # botocore checks it against Content-Length
        n = min(len(data), want)
        scatter.put(skip, data[:n])
        return n
    got = 0
    while got < want:
        check(got)
        data = body.read(min(PIECE, want - got))
        if not data:
            break
        scatter.put(skip + got, data)
        got += len(data)
    return got
