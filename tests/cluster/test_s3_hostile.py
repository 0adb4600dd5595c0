"""S3Stream when the object changes under it, when the endpoint stalls or
trickles (through a proxy in front of the cluster's RGW), and how many
clients (and how much memory) many opens cost."""
import gc
import http.client
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, List, Optional, Tuple
from urllib.parse import quote

import boto3
import pytest
from botocore.config import Config

from qa.cluster import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, Cluster
from rbd_migration.context import SourceContext
from rbd_migration.errors import (Cancelled, SourceChanged,
                                  SourceUnreachable, TimedOut)
from rbd_migration.streams import open_stream
from rbd_migration.streams.s3 import (CLIENT_CACHE_SIZE, S3Stream,
                                      cached_clients)
from tests.netfaults import reset

#: Longest any proxy handler waits, whatever happens.
SERVER_WAIT = 20.0
TRICKLE_PAUSE = 0.2


def ctx(timeout: float = 10, retries: int = 1,
        stop: Optional[threading.Event] = None) -> SourceContext:
    return SourceContext(timeout=timeout, retries=retries, stop=stop)


def open_s3(url: str, context: Optional[SourceContext] = None) -> S3Stream:
    stream = open_stream({'type': 's3', 'url': url,
                          'access_key': S3_ACCESS_KEY,
                          'secret_key': S3_SECRET_KEY}, context or ctx())
    assert isinstance(stream, S3Stream)
    return stream


def timed(call: Callable[[], object]) -> Tuple[float, BaseException]:
    started = time.monotonic()
    with pytest.raises(Exception) as e:
        call()
    return time.monotonic() - started, e.value


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
        self.prefix = f's3-hostile-{uuid.uuid4().hex[:8]}/'

    def put(self, name: str, data: bytes) -> str:
        self.client.put_object(Bucket=S3_BUCKET, Key=self.prefix + name,
                               Body=data)
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


DATA = random.Random(11).randbytes(1 << 20)


# -- the object changes ------------------------------------------------------


def test_overwrite_between_reads_is_source_changed(bucket: Bucket) -> None:
    url = bucket.put('changing.img', DATA)
    with open_s3(url) as stream:
        assert stream.read(0, 100) == DATA[:100]
        before = stream.validators()
        bucket.put('changing.img', DATA[::-1])          # the same size
        with pytest.raises(SourceChanged) as e:
            stream.read(100, 100)
        after = stream.validators()
    assert before['size'] == after['size'] == str(len(DATA))
    assert before['etag'] != after['etag']
    assert str(e.value) == (
        f'source-spec: stream.url: {url} changed since it was opened (ETag '
        f'{before["etag"]} → {after["etag"]}); do not change the image '
        f'while it is imported')
    assert not e.value.transient


def test_overwrite_during_concurrent_reads(bucket: Bucket) -> None:
    """Readers in four threads; the object is overwritten while they read:
    each stops with SourceChanged, none returns bytes of the new version.
    (RGW may answer a GET racing the overwrite with a 500: retried.)"""
    url = bucket.put('racing.img', DATA)
    new = bytes(len(DATA))
    errors: List[BaseException] = []
    others: List[BaseException] = []
    mixed: List[int] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 20
        for _ in range(2000):
            if time.monotonic() > deadline:
                return
            offset = rng.randrange(len(DATA) - 4096)
            try:
                got = stream.read(offset, 4096)
            except SourceChanged as e:
                errors.append(e)
                return
            except Exception as e:
                others.append(e)
                return
            if got != DATA[offset:offset + 4096]:
                mixed.append(offset)

    with open_s3(url, ctx(retries=5)) as stream:
        threads = [threading.Thread(target=reader, args=(i,))
                   for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        bucket.put('racing.img', new)
        for t in threads:
            t.join(30)
    assert mixed == [] and others == []
    assert len(errors) == 4


def test_validators(bucket: Bucket) -> None:
    url = bucket.put('validated.img', DATA)
    with open_s3(url) as stream:
        found = stream.validators()
        assert set(found) == {'size', 'etag', 'last_modified'}
        assert found['size'] == str(len(DATA))
        assert found['etag'].startswith('"')
        assert found['last_modified'].endswith(' GMT')
        assert stream.validators() == found


# -- shared clients ----------------------------------------------------------


def _rss_mib() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    raise AssertionError('no VmRSS')


def test_opens_reuse_a_cached_client(bucket: Bucket) -> None:
    url = bucket.put('reused.img', b'x' * 4096)
    for _ in range(5):                      # warm up: models, pools
        open_s3(url).close()
    gc.collect()
    before = _rss_mib()
    clients: List[object] = []
    started = time.monotonic()
    for _ in range(50):
        stream = open_s3(url)
        try:
            assert stream.read(0, 10) == b'x' * 10
            if not any(c is stream._client for c in clients):
                clients.append(stream._client)
        finally:
            stream.close()
        assert cached_clients() <= CLIENT_CACHE_SIZE
    elapsed = time.monotonic() - started
    gc.collect()
    growth = _rss_mib() - before
    assert len(clients) == 1
    # One boto3 session and client per open grew the mgr by about 1.2 MiB
    # an open (60 MiB for these 50) and took 0.15 s each.
    assert growth < 10, f'RSS grew {growth:.1f} MiB over 50 opens'
    assert elapsed < 10


def test_cache_is_bounded_and_evicted_clients_stay_usable(
        bucket: Bucket) -> None:
    url = bucket.put('evicted.img', DATA)
    first = open_s3(url, ctx(timeout=101))      # timeouts are in the key
    try:
        others = [open_s3(url, ctx(timeout=102 + i))
                  for i in range(CLIENT_CACHE_SIZE + 4)]
        assert cached_clients() <= CLIENT_CACHE_SIZE
        assert len({id(s._client) for s in others}) == len(others)
        # ``first``'s client was dropped from the cache, not closed.
        assert first.read(5, 5) == DATA[5:10]
        for s in others:
            s.close()
        assert first.read(10, 5) == DATA[10:15]
    finally:
        first.close()
    with open_s3(url, ctx(timeout=101)) as again:
        assert again.read(0, 5) == DATA[:5]


def test_closing_a_stream_leaves_the_shared_client_open(
        bucket: Bucket) -> None:
    url = bucket.put('shared.img', DATA)
    a, b = open_s3(url), open_s3(url)
    assert a._client is b._client
    a.close()
    a.close()                                   # twice: released once
    try:
        assert b.read(0, 100) == DATA[:100]
    finally:
        b.close()
    with open_s3(url) as c:
        assert c.read(0, 100) == DATA[:100]


# -- an endpoint that stalls or trickles -------------------------------------


class ProxyHandler(BaseHTTPRequestHandler):
    """Forwards to RGW; a GET with a Range applies the proxy's fault."""

    protocol_version = 'HTTP/1.1'
    server: 'Proxy'

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self.server.count(self.headers.get('Range'))
        fault = self.server.fault if 'Range' in self.headers else ''
        if fault == 'break-once':
            self.server.fault = ''
        self._forward(fault)

    def _forward(self, fault: str = '') -> None:
        if fault == 'mute':
            return self._wait()
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
        if self.command != 'GET':
            return
        if fault == 'stall':
            self.wfile.write(body[:len(body) // 2])
            return self._wait()
        if fault == 'trickle':
            return self._trickle(body)
        if fault == 'break-once':
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return None
        self.wfile.write(body)

    def _wait(self) -> None:
        self.wfile.flush()
        self.server.stop.wait(SERVER_WAIT)
        reset(self)

    def _trickle(self, data: bytes) -> None:
        self.wfile.flush()
        for byte in data[:int(SERVER_WAIT / TRICKLE_PAUSE)]:
            if self.server.stop.wait(TRICKLE_PAUSE):
                break
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
        reset(self)


class Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: int) -> None:
        super().__init__(('127.0.0.1', 0), ProxyHandler)
        self.upstream = upstream
        self.fault = ''
        self.gets = 0
        self.ranges: List[Optional[str]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}'

    def count(self, wanted: Optional[str]) -> None:
        with self._lock:
            self.gets += 1
            self.ranges.append(wanted)

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@pytest.fixture
def proxy(rgw: Cluster) -> Iterator[Proxy]:
    assert rgw.state and rgw.state.rgw_port
    server = Proxy(rgw.state.rgw_port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def slow_url(proxy: Proxy, bucket: Bucket) -> str:
    bucket.put('slow.img', DATA)
    return bucket.url('slow.img', proxy.endpoint)


def test_trickled_body_is_cut_off_after_the_timeout(proxy: Proxy,
                                                    slow_url: str) -> None:
    with open_s3(slow_url, ctx(timeout=2)) as stream:
        proxy.fault = 'trickle'
        elapsed, error = timed(lambda: stream.read(0, 1000))
    assert isinstance(error, SourceUnreachable) and error.transient
    assert 'of 1000 bytes arrived in 2.' in str(error)
    assert str(error).endswith('(at most 2s per request) after 1 attempt')
    assert elapsed <= 2 + 1.5


@pytest.mark.parametrize('fault', ['mute', 'stall', 'trickle'])
def test_stop_ends_a_blocked_read(proxy: Proxy, slow_url: str,
                                  fault: str) -> None:
    stop = threading.Event()
    with open_s3(slow_url, ctx(timeout=30, retries=5, stop=stop)) as stream:
        proxy.fault = fault
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        try:
            elapsed, error = timed(lambda: stream.read(0, 100_000))
        finally:
            timer.cancel()
    assert isinstance(error, Cancelled)
    assert elapsed <= 0.5 + 1
    assert proxy.gets == 1


@pytest.mark.parametrize('fault', ['mute', 'stall', 'trickle'])
def test_probe_deadline(proxy: Proxy, slow_url: str, fault: str) -> None:
    proxy.fault = fault
    probe = open_s3(slow_url, ctx(timeout=10, retries=5).bounded(2, 'probe'))
    with probe:
        elapsed, error = timed(lambda: probe.read(0, 100_000))
    assert isinstance(error, TimedOut)
    assert elapsed <= 2 + 1.5


def test_an_answer_that_breaks_off_is_resumed_not_read_again(
        proxy: Proxy, slow_url: str) -> None:
    """A fault in the middle of a large ranged read costs what was still
    missing: the next attempt asks for the rest, and the bytes are whole."""
    with open_s3(slow_url, ctx(timeout=5, retries=3)) as stream:
        proxy.fault = 'break-once'
        assert stream.read(1000, 20_000) == DATA[1000:21_000]
    assert proxy.ranges == ['bytes=1000-20999', 'bytes=11000-20999']


def test_a_cut_off_connection_is_not_reused(proxy: Proxy,
                                           slow_url: str) -> None:
    """After a cut-off attempt, the shared client's next request gets a
    fresh connection and works."""
    with open_s3(slow_url, ctx(timeout=1.5, retries=1)) as stream:
        proxy.fault = 'stall'
        with pytest.raises(SourceUnreachable):
            stream.read(0, 10_000)
        proxy.fault = ''
        assert stream.read(0, 10_000) == DATA[:10_000]
