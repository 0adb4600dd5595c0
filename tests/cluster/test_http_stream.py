"""HttpStream against the cluster's nginx, and against a local server that
misbehaves on cue (5xx, resets, bodies cut short, Range ignored, no answer,
an untrusted certificate)."""
import base64
import concurrent.futures
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from qa.cluster import Cluster
from rbd_migration.context import SourceContext
from rbd_migration.errors import (InvalidArgument, NotFound,
                                  PermissionDenied, SourceUnreachable,
                                  Unsupported)
from rbd_migration.streams import open_stream
from rbd_migration.streams.http import HttpStream
from tests.netfaults import reset

PASSWORD = 's3cr3t-Pa55word'


def ctx(timeout: float = 5, retries: int = 3) -> SourceContext:
    return SourceContext(timeout=timeout, retries=retries)


def open_url(url: str, context: Optional[SourceContext] = None) -> HttpStream:
    stream = open_stream({'type': 'http', 'url': url}, context or ctx())
    assert isinstance(stream, HttpStream)
    return stream


def random_reads(size: int, count: int,
                 rng: random.Random) -> List[Tuple[int, int]]:
    """Offsets anywhere, lengths from 0 to 300 KiB, some crossing the end."""
    return [(rng.randrange(size + 10), rng.choice((0, 1, 511, 4096,
                                                   rng.randrange(300_000))))
            for _ in range(count)]


# -- nginx -------------------------------------------------------------------


class Www:
    """A directory of our own under the cluster's nginx root."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url

    def publish(self, name: str, data: bytes, mode: int = 0o644) -> str:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        return f'{self.url}/{name}'


@pytest.fixture(scope='module')
def www_dir(cluster: Cluster) -> Iterator[Www]:
    state = cluster.state
    assert state and state.http_port and state.http_root, 'no nginx'
    path = Path(state.http_root) / f'http-stream-{uuid.uuid4().hex[:8]}'
    path.mkdir(mode=0o755)
    yield Www(path, f'http://127.0.0.1:{state.http_port}/{path.name}')
    shutil.rmtree(path)


@pytest.fixture
def www(www_dir: Www) -> Www:
    return www_dir


@pytest.fixture
def image(www: Www) -> Tuple[str, bytes]:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 12345)
    return www.publish('disk.img', data), data


def test_size_and_random_reads(image: Tuple[str, bytes]) -> None:
    url, data = image
    with open_url(url) as stream:
        assert stream.size() == len(data)
        for offset, length in random_reads(len(data), 200, random.Random(1)):
            assert stream.read(offset, length) == data[offset:offset + length]


def test_read_edges(image: Tuple[str, bytes]) -> None:
    url, data = image
    with open_url(url) as stream:
        assert stream.read(0, 0) == b''
        assert stream.read(len(data), 10) == b''
        assert stream.read(len(data) - 3, 100) == data[-3:]
        assert stream.read(0, len(data)) == data
        with pytest.raises(ValueError):
            stream.read(-1, 10)
    with pytest.raises(ValueError, match='closed'):
        stream.read(0, 10)


def test_empty_file(www: Www) -> None:
    with open_url(www.publish('empty.img', b'')) as stream:
        assert stream.size() == 0
        assert stream.read(0, 4096) == b''


def test_concurrent_reads_from_8_threads(image: Tuple[str, bytes]) -> None:
    url, data = image

    def worker(seed: int) -> int:
        for offset, length in random_reads(len(data), 40, random.Random(seed)):
            assert stream.read(offset, length) == data[offset:offset + length]
        return seed

    with open_url(url) as stream, \
            concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(worker, range(8))) == list(range(8))


def test_missing_file_is_not_found(www: Www) -> None:
    url = f'{www.url}/nope.img'
    with pytest.raises(NotFound) as e:
        open_url(url)
    assert str(e.value) == \
        f'source-spec: stream.url: {url} not found (HTTP 404)'


def test_forbidden_file_is_permission_denied(www: Www) -> None:
    # The test cluster's nginx refuses everything under /private/.
    url = www.publish('private/secret.img', b'x' * 1000)
    with pytest.raises(PermissionDenied) as e:
        open_url(url)
    assert str(e.value).startswith(f'source-spec: stream.url: access to {url} '
                                   f'denied (HTTP 403 Forbidden)')


def test_url_secrets_never_shown(www: Www) -> None:
    host = www.url.split('://', 1)[1]
    signature = 'c2lnbmF0dXJlLXNlY3JldA'
    for url in (f'http://admin:{PASSWORD}@{host}/nope.img',
                f'http://{host}/nope.img?X-Amz-Signature={signature}&x=1'):
        with pytest.raises(NotFound) as e:
            open_url(url)
        message = str(e.value)
        assert PASSWORD not in message and signature not in message
        assert '***' in message and host in message


def test_sibling(www: Www) -> None:
    base = www.publish('base.img', b'base' * 1000)
    top = www.publish('chain/top.img', b'top' * 1000)
    with open_url(top) as stream:
        with stream.sibling('../base.img') as sibling:
            assert sibling.size() == 4000
            assert sibling.read(0, 8) == b'basebase'
            assert sibling.description == f'http {base}'
        with stream.sibling(base) as sibling:     # an absolute URL
            assert sibling.size() == 4000
        with pytest.raises(NotFound) as e:
            stream.sibling('gone.img')
        assert "'gone.img' (named in" in str(e.value)
        assert f'{www.url}/chain/gone.img not found' in str(e.value)
        with pytest.raises(InvalidArgument, match='not an http'):
            stream.sibling('file:///etc/passwd')


def test_https_to_a_plain_http_port(image: Tuple[str, bytes]) -> None:
    url = image[0].replace('http://', 'https://')
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match='TLS handshake with .* failed'):
        open_url(url)
    assert time.monotonic() - started < 2    # not retried


def test_server_down_is_unavailable_after_retries() -> None:
    with socket.socket() as bound:              # bound, never listening
        bound.bind(('127.0.0.1', 0))
        port = bound.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SourceUnreachable) as e:
            open_url(f'http://user:{PASSWORD}@127.0.0.1:{port}/x.img',
                     ctx(timeout=1, retries=3))
    assert time.monotonic() - started < 5
    assert str(e.value) == (f'source-spec: stream.url: cannot connect to '
                            f'127.0.0.1:{port} (connection refused) after 3 '
                            f'attempts')
    assert e.value.transient


# -- a server that misbehaves on cue ------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: 'Faulty'

    def log_message(self, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle
        # and delayed ACKs add 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.count('connections')

    def do_HEAD(self) -> None:
        self.server.log.append(('HEAD', ''))
        if not self.server.head:      # as for a URL presigned for GET only
            return self._headers(403, 0)
        if self._authorised():
            self._headers(200, len(self.server.data))

    def do_GET(self) -> None:
        wanted = self.headers.get('Range', '')
        self.server.log.append(('GET', wanted))
        fault = self.server.next_fault()
        if fault == 'reset':
            return self._reset()
        if fault == 'hang':
            self.server.stop.wait(30)
            return self._reset()
        if fault.isdigit():
            return self._headers(int(fault), 0)
        if not self._authorised():
            return
        first, last = 0, len(self.server.data) - 1
        if wanted and self.server.ranges:
            a, b = wanted.split('=')[1].split('-')
            first, last = int(a), min(int(b), last)
        body = self.server.data[first:last + 1]
        if wanted and self.server.ranges:
            self._headers(206, len(body), {'Content-Range': f'bytes {first}-'
                                           f'{last}/{len(self.server.data)}'})
        else:
            self._headers(200, len(body))
        if fault == 'truncate':       # half the body, then a clean close
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if self.server.auth is None or \
                self.headers.get('Authorization') == self.server.auth:
            return True
        self._headers(401, 0, {'WWW-Authenticate': 'Basic realm="x"'})
        return False

    def _headers(self, status: int, length: int,
                 extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header('Content-Length', str(length))
        if self.server.ranges:
            self.send_header('Accept-Ranges', 'bytes')
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _reset(self) -> None:
        reset(self)


class Faulty(ThreadingHTTPServer):
    """Serves ``data`` at any path; each GET first applies the next fault
    queued in ``faults`` ('503', 'reset', 'truncate', 'hang'; none left:
    behave)."""

    daemon_threads = True

    def __init__(self, data: bytes) -> None:
        super().__init__(('127.0.0.1', 0), Handler)
        self.data = data
        self.faults: List[str] = []
        self.log: List[Tuple[str, str]] = []
        self.counts = {'connections': 0}
        self.ranges = True          # honour Range (and say so on HEAD)
        self.head = True            # answer HEAD
        self.auth: Optional[str] = None
        self.stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}/disk.img'

    def next_fault(self) -> str:
        with self._lock:
            return self.faults.pop(0) if self.faults else ''

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def gets(self) -> List[str]:
        return [wanted for method, wanted in self.log if method == 'GET']

    def handle_error(self, request: object, client_address: object) -> None:
        pass    # resets are deliberate


@pytest.fixture
def faulty() -> Iterator[Faulty]:
    server = Faulty(random.Random(3).randbytes(1024 * 1024 + 7))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()
    thread.join()


WHOLE, REST = 'bytes=1000-200999', 'bytes=101000-200999'


@pytest.mark.parametrize('faults,ranges', [
    (['503', '502'], [WHOLE] * 3),
    (['reset'], [WHOLE] * 2),
    # An answer cut off halfway keeps its bytes: the retry asks for the rest.
    (['truncate'], [WHOLE, REST]),
    (['truncate', '503'], [WHOLE, REST, REST])])
def test_transient_failures_are_retried(faulty: Faulty, faults: List[str],
                                        ranges: List[str]) -> None:
    data = faulty.data
    with open_url(faulty.url) as stream:
        faulty.faults = list(faults)
        assert stream.read(1000, 200_000) == data[1000:201_000]
    assert faulty.gets() == ranges


def test_failures_beyond_the_retries(faulty: Faulty) -> None:
    with open_url(faulty.url) as stream:
        faulty.faults = ['503'] * 3
        with pytest.raises(SourceUnreachable) as e:
            stream.read(0, 100)
        assert str(e.value) == (f'source-spec: stream.url: {faulty.url} '
                                f'answered HTTP 503 Service Unavailable after '
                                f'3 attempts')
        faulty.faults = ['truncate'] * 3
        # Each attempt brings half of what is left: 50, 25, then 12 of 25.
        with pytest.raises(SourceUnreachable,
                           match=r'broke off after 12 of 25 bytes at offset '
                                 r'75 after 3 attempts'):
            stream.read(0, 100)
        assert stream.read(0, 100) == faulty.data[:100]   # and recovers


def test_4xx_is_never_retried(faulty: Faulty) -> None:
    with open_url(faulty.url) as stream:
        faulty.faults = ['403']
        with pytest.raises(PermissionDenied, match='HTTP 403'):
            stream.read(0, 100)
        faulty.faults = ['404']
        with pytest.raises(NotFound):
            stream.read(0, 100)
    assert faulty.gets() == ['bytes=0-99'] * 2


def test_no_answer_times_out(faulty: Faulty) -> None:
    with open_url(faulty.url, ctx(timeout=0.5, retries=2)) as stream:
        faulty.faults = ['hang', 'hang']
        started = time.monotonic()
        with pytest.raises(SourceUnreachable) as e:
            stream.read(0, 100)
    assert time.monotonic() - started < 5
    assert str(e.value) == (f'source-spec: stream.url: {faulty.url}: no '
                            f'answer within 0.5s after 2 attempts')


def test_server_ignoring_range_is_refused(faulty: Faulty) -> None:
    faulty.ranges = False
    with pytest.raises(Unsupported) as e:
        open_url(faulty.url)
    message = str(e.value)
    assert message.startswith(f'source-spec: stream.url: {faulty.url}: ')
    assert 'the server must support Range requests' in message


def test_range_ignored_after_open_is_refused(faulty: Faulty) -> None:
    with open_url(faulty.url) as stream:
        faulty.ranges = False
        with pytest.raises(Unsupported, match='must support Range'):
            stream.read(4096, 100)


def test_size_without_head(faulty: Faulty) -> None:
    faulty.head = False
    with open_url(faulty.url) as stream:
        assert stream.size() == len(faulty.data)
        assert stream.read(5, 5) == faulty.data[5:10]
    assert faulty.gets()[0] == 'bytes=0-0'


def test_keep_alive(faulty: Faulty) -> None:
    with open_url(faulty.url) as stream:
        for offset in range(0, 50 * 4096, 4096):
            assert stream.read(offset, 4096) == \
                faulty.data[offset:offset + 4096]
    assert faulty.counts['connections'] == 1


def test_basic_auth_from_url(faulty: Faulty) -> None:
    faulty.auth = 'Basic ' + base64.b64encode(
        f'admin:{PASSWORD}'.encode()).decode()
    host = f'127.0.0.1:{faulty.server_address[1]}'
    with open_url(f'http://admin:{PASSWORD}@{host}/disk.img') as stream:
        assert stream.read(0, 10) == faulty.data[:10]
        assert PASSWORD not in stream.description
    for url in (f'http://admin:wrong-password@{host}/disk.img',
                f'http://{host}/disk.img'):
        with pytest.raises(PermissionDenied) as e:
            open_url(url)
        assert 'HTTP 401' in str(e.value)
        assert 'wrong-password' not in str(e.value)


def test_untrusted_certificate(tmp_path: Path, faulty: Faulty) -> None:
    key, cert = tmp_path / 'key.pem', tmp_path / 'cert.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048',
                    '-nodes', '-subj', '/CN=127.0.0.1', '-days', '1',
                    '-keyout', str(key), '-out', str(cert)],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    faulty.socket = tls.wrap_socket(faulty.socket, server_side=True)
    url = faulty.url.replace('http://', 'https://')
    with pytest.raises(PermissionDenied) as e:
        open_url(url)
    assert str(e.value).startswith(
        f'source-spec: stream.url: the TLS certificate of 127.0.0.1:'
        f'{faulty.server_address[1]} is not trusted (self-signed certificate)')
