"""S3Stream against the cluster's RGW, directly and through a proxy that
misbehaves on cue (5xx, resets, bodies cut short)."""
import concurrent.futures
import http.client
import random
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

import boto3
import pytest
from botocore.config import Config

from qa.cluster import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, Cluster
from rbd_migration.context import SourceContext
from rbd_migration.errors import (InvalidArgument, NotFound,
                                  PermissionDenied, SourceUnreachable)
from rbd_migration.streams import open_stream
from rbd_migration.streams.s3 import S3Stream
from tests.netfaults import reset

OTHER_USER = 'rbdmigration-other'
OTHER_ACCESS_KEY = 'rbdmigrationother'
OTHER_SECRET_KEY = 'rbdmigrationothersecret987654321'


def ctx(timeout: float = 10, retries: int = 3,
        config_key: Any = None) -> SourceContext:
    return SourceContext(timeout=timeout, retries=retries,
                         config_key=config_key)


def spec(url: str, access_key: str = S3_ACCESS_KEY,
         secret_key: str = S3_SECRET_KEY) -> Dict[str, Any]:
    return {'type': 's3', 'url': url, 'access_key': access_key,
            'secret_key': secret_key}


def open_s3(url: str, context: Optional[SourceContext] = None,
            access_key: str = S3_ACCESS_KEY,
            secret_key: str = S3_SECRET_KEY) -> S3Stream:
    stream = open_stream(spec(url, access_key, secret_key), context or ctx())
    assert isinstance(stream, S3Stream)
    return stream


def random_reads(size: int, count: int,
                 rng: random.Random) -> List[Tuple[int, int]]:
    return [(rng.randrange(size + 10), rng.choice((0, 1, 511, 4096,
                                                   rng.randrange(300_000))))
            for _ in range(count)]


class Bucket:
    """Our own prefix in the test bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = boto3.client(
            's3', endpoint_url=endpoint, region_name='us-east-1',
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(s3={'addressing_style': 'path'},
                          signature_version='s3v4'))
        self.prefix = f's3-stream-{uuid.uuid4().hex[:8]}/'

    def put(self, name: str, data: bytes) -> str:
        key = self.prefix + name
        self.client.put_object(Bucket=S3_BUCKET, Key=key, Body=data)
        return self.url(name)

    def url(self, name: str, endpoint: Optional[str] = None) -> str:
        return (f'{endpoint or self.endpoint}/{S3_BUCKET}/'
                f'{quote(self.prefix + name)}')

    def clean(self) -> None:
        listed = self.client.list_objects_v2(Bucket=S3_BUCKET,
                                             Prefix=self.prefix)
        for item in listed.get('Contents', []):
            self.client.delete_object(Bucket=S3_BUCKET, Key=item['Key'])


@pytest.fixture(scope='module')
def bucket(rgw: Cluster) -> Iterator[Bucket]:
    assert rgw.state and rgw.state.rgw_port
    b = Bucket(f'http://127.0.0.1:{rgw.state.rgw_port}')
    yield b
    b.clean()


@pytest.fixture(scope='module')
def image(bucket: Bucket) -> Tuple[str, bytes]:
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 4321)
    return bucket.put('disk.img', data), data


def test_size_and_random_reads(image: Tuple[str, bytes]) -> None:
    url, data = image
    with open_s3(url) as stream:
        assert stream.size() == len(data)
        for offset, length in random_reads(len(data), 150, random.Random(2)):
            assert stream.read(offset, length) == data[offset:offset + length]
        assert stream.read(len(data), 10) == b''
        assert stream.read(0, 0) == b''
        # read_into, the copier's way, puts the same bytes in its buffer.
        buf = bytearray(1 << 20)
        for offset, length in random_reads(len(data), 40, random.Random(3)):
            view = memoryview(buf)[:length]
            assert stream.read_into(offset, view) == len(data[offset:offset + length])
            assert buf[:len(data[offset:offset + length])] == data[offset:offset + length]
        assert stream.read_into(len(data) - 5, memoryview(buf)[:10]) == 5
        assert buf[:5] == data[-5:]
    with pytest.raises(ValueError, match='closed'):
        stream.read(0, 10)


def test_key_that_needs_escaping(bucket: Bucket) -> None:
    url = bucket.put('dir/a b+c%d ü?.img', b'escaped' * 100)
    assert '%20' in url and '%25' in url
    with open_s3(url) as stream:
        assert stream.size() == 700
        assert stream.read(0, 7) == b'escaped'


def test_concurrent_reads_from_8_threads(image: Tuple[str, bytes]) -> None:
    url, data = image

    def worker(seed: int) -> int:
        for offset, length in random_reads(len(data), 25, random.Random(seed)):
            assert stream.read(offset, length) == data[offset:offset + length]
        return seed

    with open_s3(url) as stream, \
            concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(worker, range(8))) == list(range(8))


def test_missing_object(bucket: Bucket) -> None:
    url = bucket.url('nope.img')
    with pytest.raises(NotFound) as e:
        open_s3(url)
    assert str(e.value) == (
        f"source-spec: stream.url: {url} not found (no key "
        f"'{bucket.prefix}nope.img' in bucket '{S3_BUCKET}' at "
        f"{bucket.endpoint})")


def test_missing_bucket(bucket: Bucket) -> None:
    with pytest.raises(NotFound) as e:
        open_s3(f'{bucket.endpoint}/no-such-bucket/disk.img')
    assert str(e.value) == (f"source-spec: stream.url: bucket "
                            f"'no-such-bucket' at {bucket.endpoint} does "
                            f"not exist")


@pytest.mark.parametrize('access_key, secret_key, code', [
    ('WRONGACCESSKEY42', S3_SECRET_KEY, 'InvalidAccessKeyId'),
    (S3_ACCESS_KEY, 'wrong-secret-0123456789', 'SignatureDoesNotMatch'),
])
def test_wrong_credentials(image: Tuple[str, bytes], access_key: str,
                           secret_key: str, code: str) -> None:
    with pytest.raises(PermissionDenied) as e:
        open_s3(image[0], access_key=access_key, secret_key=secret_key)
    assert str(e.value) == (f'source-spec: stream.access_key/secret_key: S3 '
                            f'refused the credentials ({code})')


@pytest.fixture(scope='module')
def other_user(rgw: Cluster) -> None:
    """A second RGW user, with no rights on the test bucket."""
    assert rgw.state
    admin = ['radosgw-admin', '--conf', rgw.state.conf]
    if subprocess.run([*admin, 'user', 'info', f'--uid={OTHER_USER}'],
                      capture_output=True).returncode != 0:
        subprocess.run([*admin, 'user', 'create', f'--uid={OTHER_USER}',
                        '--display-name=other',
                        f'--access-key={OTHER_ACCESS_KEY}',
                        f'--secret={OTHER_SECRET_KEY}'],
                       check=True, capture_output=True)


def test_access_denied(image: Tuple[str, bytes], other_user: None) -> None:
    with pytest.raises(PermissionDenied) as e:
        open_s3(image[0], access_key=OTHER_ACCESS_KEY,
                secret_key=OTHER_SECRET_KEY)
    assert str(e.value).startswith(f'source-spec: stream.url: access to '
                                   f'{image[0]} denied (AccessDenied)')


def test_secrets_never_shown(bucket: Bucket) -> None:
    """Not even when the URL itself holds them, or S3 is handed them."""
    wrong = 'wrong-secret-0123456789'
    messages = []
    for url, secret in (
            (bucket.url(f'{S3_SECRET_KEY}.img'), S3_SECRET_KEY),
            (f'{bucket.endpoint}/{S3_ACCESS_KEY}-b/x.img', S3_SECRET_KEY),
            (bucket.url(f'{wrong}.img'), wrong),
            (f'http://127.0.0.1:1/{S3_BUCKET}/{S3_SECRET_KEY}',
             S3_SECRET_KEY)):
        with pytest.raises((NotFound, PermissionDenied,
                            SourceUnreachable)) as e:
            open_s3(url, ctx(timeout=1, retries=1), secret_key=secret)
        messages.append(str(e.value))
    for message in messages:
        assert S3_ACCESS_KEY not in message
        assert S3_SECRET_KEY not in message and wrong not in message
    assert '***' in messages[0] and '***' in messages[1]


def test_config_references_resolved_from_the_mon(
        rgw: Cluster, image: Tuple[str, bytes]) -> None:
    base = f'rbd_migration/test/{uuid.uuid4().hex[:8]}'

    def config_key(key: str) -> Optional[str]:
        try:
            return rgw.ceph('config-key', 'get', key)
        except RuntimeError:     # ENOENT
            return None

    rgw.ceph('config-key', 'set', f'{base}/access', S3_ACCESS_KEY)
    rgw.ceph('config-key', 'set', f'{base}/secret', S3_SECRET_KEY)
    try:
        refs = spec(image[0], f'config://{base}/access',
                    f'config://{base}/secret')
        with open_stream(refs, ctx(config_key=config_key)) as stream:
            assert stream.read(100, 50) == image[1][100:150]
        refs['secret_key'] = f'config://{base}/missing'
        with pytest.raises(NotFound) as e:
            open_stream(refs, ctx(config_key=config_key))
        assert str(e.value).startswith(
            f"source-spec: stream.secret_key: config-key '{base}/missing' "
            f"not found")
    finally:
        for name in ('access', 'secret'):
            rgw.ceph('config-key', 'rm', f'{base}/{name}')


def test_endpoint_down_is_unavailable_after_retries() -> None:
    with socket.socket() as bound:              # bound, never listening
        bound.bind(('127.0.0.1', 0))
        port = bound.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SourceUnreachable) as e:
            open_s3(f'http://127.0.0.1:{port}/{S3_BUCKET}/x.img',
                    ctx(timeout=1, retries=2))
    assert time.monotonic() - started < 5
    assert str(e.value) == (f'source-spec: stream.url: cannot connect to '
                            f'127.0.0.1:{port} (connection refused) after 2 '
                            f'attempts')


def test_sibling(bucket: Bucket) -> None:
    base = bucket.put('base.img', b'base' * 100)
    top = bucket.put('chain/top.img', b'top' * 100)
    with open_s3(top) as stream:
        with stream.sibling('../base.img') as sibling:
            assert sibling.read(0, 8) == b'basebase'
            assert sibling.description == f's3 {base}'
        with pytest.raises(NotFound, match="'gone.img' \\(named in"):
            stream.sibling('gone.img')
        for name in ('../../../other-bucket/x.img', '/x.img',
                     'http://elsewhere/b/x.img'):
            with pytest.raises(InvalidArgument):
                stream.sibling(name)


# -- a proxy that misbehaves on cue -------------------------------------------


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: 'FaultyProxy'

    def log_message(self, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_HEAD(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self.server.gets.append(self.headers.get('Range', ''))
        fault = self.server.next_fault()
        if fault == 'reset':
            return self._reset()
        if fault == '503':
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
                    b'ServiceUnavailable</Code></Error>')
            self.send_response(503)
            self.send_header('Content-Type', 'application/xml')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._forward(truncate=fault == 'truncate')

    def _forward(self, truncate: bool = False) -> None:
        """The request as it came (the signature covers the Host header,
        which stays ours), the answer as RGW gave it."""
        upstream = http.client.HTTPConnection(
            '127.0.0.1', self.server.upstream, timeout=30)
        upstream.request(self.command, self.path, headers=dict(self.headers))
        answer = upstream.getresponse()
        body = answer.read()
        upstream.close()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in ('server', 'date', 'connection',
                                    'transfer-encoding', 'content-length'):
                self.send_header(name, value)
        length = answer.getheader('Content-Length', '0') \
            if self.command == 'HEAD' else str(len(body))
        self.send_header('Content-Length', length)
        self.end_headers()
        if truncate:                  # half the body, then a clean close
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
        elif self.command == 'GET':
            self.wfile.write(body)

    def _reset(self) -> None:
        reset(self)


class FaultyProxy(ThreadingHTTPServer):
    """Forwards to RGW; each GET first applies the next fault queued in
    ``faults`` ('503', 'reset', 'truncate'; none left: forward)."""

    daemon_threads = True

    def __init__(self, upstream: int) -> None:
        super().__init__(('127.0.0.1', 0), ProxyHandler)
        self.upstream = upstream
        self.faults: List[str] = []
        self.gets: List[str] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}'

    def next_fault(self) -> str:
        with self._lock:
            return self.faults.pop(0) if self.faults else ''

    def handle_error(self, request: object, client_address: object) -> None:
        pass    # resets are deliberate


@pytest.fixture
def proxy(rgw: Cluster) -> Iterator[FaultyProxy]:
    assert rgw.state and rgw.state.rgw_port
    server = FaultyProxy(rgw.state.rgw_port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


WHOLE, REST = 'bytes=1000-200999', 'bytes=101000-200999'


@pytest.mark.parametrize('faults,ranges', [
    (['503'], [WHOLE] * 2),
    (['reset'], [WHOLE] * 2),
    # An answer cut off halfway keeps its bytes: the retries ask for the rest.
    (['truncate'], [WHOLE, REST]),
    (['truncate', '503', 'reset'], [WHOLE, REST, REST, REST])])
def test_transient_failures_are_retried(proxy: FaultyProxy, bucket: Bucket,
                                        image: Tuple[str, bytes],
                                        faults: List[str], ranges: List[str]) -> None:
    data = image[1]
    # One attempt per fault and the one that succeeds.
    with open_s3(bucket.url('disk.img', proxy.endpoint),
                 ctx(retries=len(faults) + 1)) as stream:
        proxy.faults = list(faults)
        assert stream.read(1000, 200_000) == data[1000:201_000]
    assert proxy.gets == ranges


def test_truncated_beyond_the_retries(proxy: FaultyProxy, bucket: Bucket,
                                      image: Tuple[str, bytes]) -> None:
    url = bucket.url('disk.img', proxy.endpoint)
    with open_s3(url) as stream:
        proxy.faults = ['truncate'] * 3
        with pytest.raises(SourceUnreachable) as e:
            stream.read(0, 100)
        assert str(e.value) == (f'source-spec: stream.url: {url}: the answer '
                                f'broke off (connection closed mid-answer) '
                                f'after 3 attempts')
        assert stream.read(0, 100) == image[1][:100]   # and recovers
