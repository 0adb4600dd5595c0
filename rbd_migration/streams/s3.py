"""An S3 object as a stream: ranged GetObject through boto3.

The URL is path-style, ``http(s)://host[:port]/bucket/key`` (RGW and most
on-premises S3 servers), signed with SigV4.  Credentials may be
``config://<key>`` references into the mon config-key store; they are
resolved here and never appear in a message, even when S3 echoes them.

botocore retries failed requests itself (bounded to ``ctx.retries``
attempts); a body that breaks off after the headers is past its reach, so
reads retry that themselves.
"""
import http.client
from typing import Any, Callable, Mapping, Optional, Tuple
from urllib.parse import quote, unquote, urljoin, urlsplit

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from ..context import SourceContext
from ..errors import (InvalidArgument, MigrationError, NotFound,
                      PermissionDenied, SourceUnavailable, Unsupported)
from ..secrets import is_config_ref, mask_text, mask_url, resolve_secrets
from .base import Stream
from .http import (Transient, after_attempts, host_port, network_reason,
                   tls_error, with_retries)

FIELD = 'source-spec: stream.url'
CREDENTIALS = 'source-spec: stream.access_key/secret_key'
#: Any region will do for RGW; SigV4 needs one.
REGION = 'us-east-1'
#: Connections kept per stream; more than the copier's threads ever use.
MAX_POOL_CONNECTIONS = 32
#: Bytes per ranged GET in a copy.  RGW does work per request (signature,
#: bucket and object lookups) and reads ahead within one answer; 16 MiB
#: answers came about 25% faster than 4 MiB ones, at a third less client CPU.
REQUEST_SIZE = 16 << 20
#: Error codes that mean the keys themselves are wrong.
CREDENTIAL_CODES = frozenset({'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                              'InvalidToken', 'ExpiredToken'})


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


class S3Stream(Stream):
    """One boto3 client per stream: clients are thread-safe and pool their
    connections, so concurrent reads share it."""

    request_size = REQUEST_SIZE

    def __init__(self, url: str, keys: Tuple[str, str], ctx: SourceContext,
                 what: str) -> None:
        self._endpoint, self._bucket, self._key = parse_s3_url(url)
        self._url = url
        self._keys = keys
        self._ctx = ctx
        self._what = what
        self._shown = mask_url(url)
        self.description = f's3 {self._shown}'
        self._attempts = max(1, ctx.retries)
        self._size = 0
        self._closed = False
        self._client = boto3.session.Session().client(
            's3', endpoint_url=self._endpoint, region_name=REGION,
            aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
            config=Config(signature_version='s3v4',
                          s3={'addressing_style': 'path'},
                          retries={'mode': 'standard',
                                   'total_max_attempts': self._attempts},
                          connect_timeout=ctx.timeout,
                          read_timeout=ctx.timeout,
                          max_pool_connections=MAX_POOL_CONNECTIONS))

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
        """The stream once S3 has told the object's size; ``what`` starts
        every message about the object."""
        stream = cls(url, keys, ctx, what)
        try:
            stream._size = stream._head()
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

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        buf = bytearray(max(0, min(length, self._size - offset)))
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview) -> int:
        if offset < 0:
            raise ValueError(f'bad read: offset={offset}')
        self._check_open()
        end = min(offset + len(view), self._size)
        if end <= offset:
            return 0
        with_retries(self._attempts, self._what,
                     lambda: self._get_into(offset, view[:end - offset]),
                     self._text)
        return end - offset

    def close(self) -> None:
        self._closed = True
        self._client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f'{self.description}: stream is closed')

    # -- requests ------------------------------------------------------------

    def _head(self) -> int:
        try:
            answer = self._client.head_object(Bucket=self._bucket,
                                              Key=self._key)
        except bce.ClientError as e:
            raise self._refused(e) from None
        except bce.BotoCoreError as e:
            raise self._failure(e) from None
        return int(answer['ContentLength'])

    def _get_into(self, offset: int, view: memoryview) -> None:
        """One ranged GetObject for ``len(view)`` bytes, put in ``view``; a
        body cut short is Transient."""
        want = len(view)
        try:
            answer = self._client.get_object(
                Bucket=self._bucket, Key=self._key,
                Range=f'bytes={offset}-{offset + want - 1}')
        except bce.ClientError as e:
            raise self._refused(e) from None
        except bce.BotoCoreError as e:
            raise self._failure(e) from None
        where = answer.get('ContentRange', '')
        body = answer['Body']
        try:
            if not where.startswith(f'bytes {offset}-'):
                raise Unsupported(self._text(
                    f'{self._what}: {self._shown}: S3 answered a request for '
                    f'{want} bytes at {offset} with Content-Range {where!r}'))
            got = _fill(body, view)
        except (bce.IncompleteReadError, bce.ReadTimeoutError,
                bce.ResponseStreamingError, http.client.HTTPException,
                OSError) as e:
            raise Transient(f'{self._shown}: the answer broke off '
                            f'({network_reason(e)})') from None
        finally:
            body.close()
        if got < want:
            raise Transient(f'{self._shown}: the answer broke off after '
                            f'{got} of {want} bytes at offset {offset}')

    # -- errors --------------------------------------------------------------

    def _text(self, message: str) -> str:
        return mask_text(message, self._keys)

    def _refused(self, e: bce.ClientError) -> MigrationError:
        """The error for an S3 error answer.  A HEAD answer has no body, so
        its code is just the status; a one-byte GET then tells the real one
        (NoSuchBucket or NoSuchKey, which key check failed)."""
        code, status = _error_code(e)
        if code.isdigit() and status in (400, 403, 404):
            code = self._code_of_get() or code
        bucket = f"bucket '{self._bucket}' at {self._endpoint}"
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
        if status >= 500 or code in ('SlowDown', 'RequestTimeout'):
            return SourceUnavailable(self._text(
                f'{self._what}: {self._shown}: S3 answered {code} (HTTP '
                f'{status}) {after_attempts(self._attempts)}'))
        return InvalidArgument(self._text(
            f'{self._what}: {self._shown}: S3 refused the request ({code}, '
            f'HTTP {status})'))

    def _code_of_get(self) -> Optional[str]:
        try:
            self._client.get_object(Bucket=self._bucket, Key=self._key,
                                    Range='bytes=0-0')['Body'].close()
        except bce.ClientError as e:
            return _error_code(e)[0]
        except bce.BotoCoreError:
            pass
        return None

    def _failure(self, e: bce.BotoCoreError) -> MigrationError:
        """The error for a request botocore gave up on."""
        where = host_port(self._endpoint)
        after = after_attempts(self._attempts)
        definite = tls_error(e, self._what, where)
        if definite is not None:
            return definite
        if isinstance(e, bce.ReadTimeoutError):
            text = (f'{self._shown}: no answer within '
                    f'{self._ctx.timeout:g}s {after}')
        elif isinstance(e, bce.ConnectTimeoutError):
            text = (f'cannot connect to {where} (no answer within '
                    f'{self._ctx.timeout:g}s) {after}')
        elif isinstance(e, bce.EndpointConnectionError):
            text = f'cannot connect to {where} ({network_reason(e)}) {after}'
        elif isinstance(e, (bce.ConnectionError, bce.HTTPClientError)):
            text = (f'connection to {where} failed ({network_reason(e)}) '
                    f'{after}')
        else:
            return InvalidArgument(self._text(
                f'{self._what}: {self._shown}: {type(e).__name__}: {e}'))
        return SourceUnavailable(self._text(f'{self._what}: {text}'))


def _fill(body: Any, view: memoryview) -> int:
    """Read the answer's body into ``view``; the count of bytes put there.

    Straight from the socket into the caller's buffer when the body is the
    usual botocore-over-urllib3 stream of a plain (not chunked) answer:
    reading it as ``bytes`` would allocate and copy every 16 MiB once more
    (a tenth of the mgr's CPU in an S3 import, measured).  The
    connection then goes back to the pool, as urllib3 does once it has read
    a body to its end.  Any other body is read the documented way."""
    raw: Any = getattr(body, '_raw_stream', None)
    fp = getattr(raw, '_fp', None)
    if not isinstance(fp, http.client.HTTPResponse) or fp.chunked or \
            raw.headers.get('Content-Encoding', 'identity').lower() != 'identity':
        data = body.read()   # botocore checks it against Content-Length
        n = min(len(data), len(view))
        view[:n] = data[:n]
        return n
    got = 0
    while got < len(view):
        n = fp.readinto(view[got:])
        if not n:   # http.client leaves a body cut short to its caller
            raise http.client.IncompleteRead(b'', len(view) - got)
        got += n
    if fp.isclosed():
        raw.release_conn()
    return got
