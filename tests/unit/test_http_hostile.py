"""HttpStream against servers that lie, trickle, stall and redirect: real
``ThreadingHTTPServer``s on 127.0.0.1, one thread each, no cluster.

Every server-side wait is bounded (by ``Server.stop``, set in teardown, and a
cap), every loop counts, and every client-side wait is asserted against a
loose wall-time bound.
"""
import base64
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from rbd_migration.context import SourceContext
from rbd_migration.errors import (Cancelled, InvalidArgument,
                                  PermissionDenied, SourceChanged,
                                  SourceUnreachable, TimedOut)
from rbd_migration.streams.http import MAX_REDIRECTS, HttpStream, origin_of
from rbd_migration.streams.net import Transient, with_retries
from tests.netfaults import reset

PASSWORD = 'hostile-Pa55word'
AUTH = 'Basic ' + base64.b64encode(f'admin:{PASSWORD}'.encode()).decode()
#: Longest any server-side handler waits, whatever happens.
SERVER_WAIT = 20.0
#: Bytes per trickled piece, and the pause after each.
TRICKLE_PAUSE = 0.2


def ctx(timeout: float = 5, retries: int = 1,
        stop: Optional[threading.Event] = None,
        redirect_origins: Optional[List[str]] = None) -> SourceContext:
    return SourceContext(timeout=timeout, retries=retries, stop=stop,
                         redirect_origins=redirect_origins or [])


# -- the servers -------------------------------------------------------------


@dataclass
class Image:
    """What a server serves at a path; GETs first apply ``fault``."""

    data: bytes
    etag: Optional[str] = '"v1"'
    modified: Optional[str] = 'Wed, 01 Jan 2025 00:00:00 GMT'
    #: '' behave; 'trickle' the body a byte per TRICKLE_PAUSE; 'stall' the
    #: headers, then nothing; 'mute' nothing at all; 'slow-headers' the
    #: headers a byte at a time; 'lie-close' / 'lie-open' half the body
    #: under a full Content-Length, then close / stay silent; 'lie-once'
    #: as 'lie-close' for one answer, then behave.
    fault: str = ''
    #: Send ETag and Last-Modified on HEAD too.
    head_validators: bool = True
    #: Answer HEAD (else 403, as for a URL presigned for GET only).
    head: bool = True


@dataclass
class Request:
    method: str
    path: str
    headers: Dict[str, str]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: 'Server'

    def log_message(self, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.count_connection()

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self.server.record(Request(self.command, self.path,
                                   dict(self.headers.items())))
        if self.server.auth and self.headers.get('Authorization') != AUTH:
            return self._send(401, {'Content-Length': '0'})
        location = self.server.redirects.get(self.path)
        if location is not None:
            status, target = location
            return self._send(status, {'Location': target,
                                       'Content-Length': '0'})
        image = self.server.images.get(self.path)
        if image is None:
            return self._send(404, {'Content-Length': '0'})
        self._serve(image)

    def _serve(self, image: Image) -> None:
        headers = {'Accept-Ranges': 'bytes'}
        if image.etag and (self.command == 'GET' or image.head_validators):
            headers['ETag'] = image.etag
        if image.modified and (self.command == 'GET' or image.head_validators):
            headers['Last-Modified'] = image.modified
        size = len(image.data)
        if self.command == 'HEAD' and not image.head:
            return self._send(403, {'Content-Length': '0'})
        if self.command == 'HEAD':
            return self._send(200, {**headers, 'Content-Length': str(size)})
        first, last = 0, size - 1
        wanted = self.headers.get('Range', '')
        if wanted:
            a, b = wanted.split('=')[1].split('-')
            first, last = int(a), min(int(b), size - 1)
            if first >= size:
                return self._send(416, {'Content-Range': f'bytes */{size}',
                                        'Content-Length': '0'})
            headers['Content-Range'] = f'bytes {first}-{last}/{size}'
        body = image.data[first:last + 1]
        status = 206 if wanted else 200
        headers['Content-Length'] = str(len(body))
        fault = image.fault
        if fault == 'lie-once':
            fault, image.fault = 'lie-close', ''
        if fault == 'mute':
            return self._wait()
        if fault == 'slow-headers':
            return self._trickle(f'HTTP/1.1 {status} OK\r\n'
                                 f'X-Slow: {"x" * 200}\r\n'.encode())
        self._send(status, headers)
        if fault == 'trickle':
            return self._trickle(body)
        if fault == 'stall':
            return self._wait()
        if fault in ('lie-close', 'lie-open'):
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if fault == 'lie-open':
                return self._wait()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send(self, status: int, headers: Dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _trickle(self, data: bytes) -> None:
        """``data`` a byte per TRICKLE_PAUSE, until the client goes away or
        the server stops; then a reset, so that nothing waits for more."""
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

    def _wait(self) -> None:
        self.wfile.flush()
        self.server.stop.wait(SERVER_WAIT)
        reset(self)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(('127.0.0.1', 0), Handler)
        self.images: Dict[str, Image] = {}
        self.redirects: Dict[str, Tuple[int, str]] = {}
        self.auth = False
        self.log: List[Request] = []
        self.connections = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def origin(self) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}'

    def url(self, path: str, userinfo: str = '') -> str:
        return f'http://{userinfo}127.0.0.1:{self.server_address[1]}{path}'

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def count_connection(self) -> None:
        with self._lock:
            self.connections += 1

    def requests(self, method: Optional[str] = None) -> List[Request]:
        with self._lock:
            return [r for r in self.log if method in (None, r.method)]

    def handle_error(self, request: object, client_address: object) -> None:
        pass    # clients that go away mid-answer are the point


def _serve() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def origin() -> Iterator[Server]:
    yield from _serve()


@pytest.fixture
def other() -> Iterator[Server]:
    yield from _serve()


DATA = bytes(range(256)) * 4096        # 1 MiB


def open_url(url: str, context: Optional[SourceContext] = None) -> HttpStream:
    return HttpStream.open(url, context or ctx(), 'source-spec: stream.url')


def timed(call: Callable[[], object]) -> Tuple[float, BaseException]:
    """Seconds until ``call`` raised, and what it raised."""
    started = time.monotonic()
    with pytest.raises(Exception) as e:
        call()
    return time.monotonic() - started, e.value


# -- redirects ---------------------------------------------------------------


def test_redirect_to_another_port_is_refused(origin: Server,
                                             other: Server) -> None:
    other.images['/disk.img'] = Image(DATA)
    origin.redirects['/disk.img'] = (302, other.url('/disk.img'))
    url = origin.url('/disk.img', f'admin:{PASSWORD}@')
    with pytest.raises(PermissionDenied) as e:
        open_url(url)
    shown = origin.url('/disk.img', 'admin:***@')
    assert str(e.value) == (
        f'source-spec: stream.url: {shown} redirects to {other.origin}, '
        f'another origin; if the mgr may read from there, add it to '
        f'mgr/rbd_migration/http_redirect_origins')
    assert PASSWORD not in str(e.value) and '\n' not in str(e.value)
    assert other.requests() == []
    assert len(origin.requests()) == 1      # refused, not retried


@pytest.mark.parametrize('target', [
    'http://127.0.0.2:{port}/disk.img',     # another host, same port
    'https://127.0.0.1:{port}/disk.img',    # another scheme
    'http://127.0.0.1:1/disk.img',          # another port
    'file:///etc/passwd',
    'gopher://127.0.0.1:{port}/x',
])
def test_redirects_elsewhere_are_refused(origin: Server, target: str) -> None:
    origin.images['/disk.img'] = Image(DATA)
    origin.redirects['/start.img'] = (
        301, target.format(port=origin.server_address[1]))
    with pytest.raises(PermissionDenied,
                       match='another origin; .* add it to '
                             'mgr/rbd_migration/http_redirect_origins'):
        open_url(origin.url('/start.img'))
    assert [r.path for r in origin.requests()] == ['/start.img']


@pytest.mark.parametrize('status', [301, 302, 303, 307, 308])
@pytest.mark.parametrize('location', ['/real/disk.img', '../real/disk.img',
                                      '{origin}/real/disk.img'])
def test_same_origin_redirect_is_followed(origin: Server, status: int,
                                          location: str) -> None:
    origin.auth = True
    origin.images['/real/disk.img'] = Image(DATA)
    origin.redirects['/link/disk.img'] = (
        status, location.format(origin=origin.origin))
    url = origin.url('/link/disk.img', f'admin:{PASSWORD}@')
    with open_url(url) as stream:
        assert stream.size() == len(DATA)
        assert stream.read(1000, 5000) == DATA[1000:6000]
    gets = origin.requests('GET')
    assert [(r.path, r.headers.get('Range')) for r in gets] == [
        ('/link/disk.img', 'bytes=1000-5999'),
        ('/real/disk.img', 'bytes=1000-5999')]
    # The same origin: the credentials go along on every hop.
    assert all(r.headers.get('Authorization') == AUTH
               for r in origin.requests())


def test_redirect_to_a_listed_origin_keeps_the_credentials_home(
        origin: Server, other: Server) -> None:
    origin.auth = True
    other.images['/mirror/disk.img'] = Image(DATA)
    # Userinfo in the Location is the server's, and dropped too.
    target = other.url('/mirror/disk.img', 'evil:stolen@')
    origin.redirects['/disk.img'] = (307, target)
    context = ctx(redirect_origins=[other.origin + '/'])
    url = origin.url('/disk.img', f'admin:{PASSWORD}@')
    with open_url(url, context) as stream:
        assert stream.read(10, 20) == DATA[10:30]
    assert all(r.headers.get('Authorization') == AUTH
               for r in origin.requests())
    assert other.requests('GET') and other.requests('HEAD')
    assert all('Authorization' not in r.headers for r in other.requests())


def test_the_mgr_hosts_netrc_is_never_sent(origin: Server, other: Server,
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Passwords in the mgr's ~/.netrc are not the spec author's to send:
    neither to a URL without credentials nor to a redirect's origin."""
    netrc = tmp_path / 'netrc'
    netrc.write_text('machine 127.0.0.1 login root password hunter2\n')
    netrc.chmod(0o600)
    monkeypatch.setenv('NETRC', str(netrc))
    other.images['/mirror/disk.img'] = Image(DATA)
    origin.redirects['/disk.img'] = (307, other.url('/mirror/disk.img'))
    with open_url(origin.url('/disk.img'),
                  ctx(redirect_origins=[other.origin + '/'])) as stream:
        assert stream.read(10, 20) == DATA[10:30]
    assert other.requests('GET')
    assert all('Authorization' not in r.headers
               for r in origin.requests() + other.requests())


def test_redirect_loop_ends(origin: Server) -> None:
    origin.redirects['/a'] = (302, '/b')
    origin.redirects['/b'] = (302, '/a')
    elapsed, error = timed(lambda: open_url(origin.url('/a'), ctx(retries=3)))
    assert isinstance(error, InvalidArgument)
    assert str(error) == (f'source-spec: stream.url: {origin.url("/a")} '
                          f'redirects more than {MAX_REDIRECTS} times; give '
                          f'the URL the redirects end at')
    assert len(origin.requests()) == MAX_REDIRECTS + 1     # and not retried
    assert elapsed < 3


def test_origins() -> None:
    assert origin_of('http://Mirror.Example') == ('http', 'mirror.example', 80)
    assert origin_of('https://mirror.example') == \
        ('https', 'mirror.example', 443)
    assert origin_of('https://u:p@[::1]:8443/x?y') == ('https', '::1', 8443)
    for bad in ('mirror.example', 'ftp://x', 'http://x:99999', ''):
        assert origin_of(bad) is None


# -- time limits -------------------------------------------------------------


def test_trickled_body_is_cut_off_after_the_timeout(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img'), ctx(timeout=2)) as stream:
        image.fault = 'trickle'
        elapsed, error = timed(lambda: stream.read(0, 1000))
    assert isinstance(error, SourceUnreachable) and error.transient
    assert 1.8 < elapsed <= 2 + 1.5
    assert f'source-spec: stream.url: {origin.url("/disk.img")}: only ' \
        in str(error)
    assert 'of 1000 bytes arrived in 2.' in str(error)
    assert str(error).endswith('(at most 2s per request) after 1 attempt')


def test_trickled_headers_are_cut_off_after_the_timeout(
        origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img'), ctx(timeout=1.5)) as stream:
        image.fault = 'slow-headers'
        elapsed, error = timed(lambda: stream.read(0, 1000))
    assert isinstance(error, SourceUnreachable)
    assert str(error) == (f'source-spec: stream.url: {origin.url("/disk.img")}'
                          f': no answer within 1.5s after 1 attempt')
    assert elapsed <= 1.5 + 1.5


def test_each_attempt_has_its_own_time(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img'),
                  ctx(timeout=1, retries=3)) as stream:
        image.fault = 'trickle'
        elapsed, error = timed(lambda: stream.read(0, 1000))
    assert isinstance(error, SourceUnreachable)
    assert str(error).endswith('after 3 attempts')
    assert len(origin.requests('GET')) == 3
    # Three attempts of 1 s, and two pauses of at most 0.25 and 0.5 s.
    assert 3 <= elapsed <= 3 + 0.75 + 2


@pytest.mark.parametrize('fault', ['trickle', 'stall', 'mute',
                                   'slow-headers'])
def test_probe_deadline(origin: Server, fault: str) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img'), ctx(timeout=10, retries=5)) \
            as stream:
        image.fault = fault
        probe = HttpStream.open(origin.url('/disk.img'),
                                ctx(timeout=10, retries=5).bounded(2, 'probe'),
                                'source-spec: stream.url')
        with probe:
            elapsed, error = timed(lambda: probe.read(0, 1000))
        assert stream.size() == len(DATA)
    assert isinstance(error, TimedOut)
    assert str(error) == ('probe took longer than its limit; the source '
                          'answers too slowly')
    assert elapsed <= 2 + 1.5


def test_probe_deadline_while_opening(origin: Server) -> None:
    # HEAD refused, so open asks for one byte, which never comes.
    origin.images['/disk.img'] = Image(DATA, fault='mute', head=False)
    context = ctx(timeout=10, retries=5).bounded(1.5, 'probe')
    elapsed, error = timed(lambda: open_url(origin.url('/disk.img'), context))
    assert isinstance(error, TimedOut)
    assert elapsed <= 1.5 + 1.5
    assert len(origin.requests('GET')) == 1


@pytest.mark.parametrize('fault', ['trickle', 'stall', 'mute',
                                   'slow-headers'])
def test_stop_ends_a_blocked_read(origin: Server, fault: str) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    stop = threading.Event()
    with open_url(origin.url('/disk.img'),
                  ctx(timeout=30, retries=5, stop=stop)) as stream:
        image.fault = fault
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        try:
            elapsed, error = timed(lambda: stream.read(0, 100_000))
        finally:
            timer.cancel()
    assert isinstance(error, Cancelled)
    assert str(error) == 'reading the source: stopped'
    assert elapsed <= 0.5 + 1
    assert len(origin.requests('GET')) == 1      # not retried


def test_stop_ends_a_blocked_tls_read(origin: Server, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog shuts the socket under a TLS connection down without
    touching its TLS state, which the reading thread owns."""
    key, cert = tmp_path / 'key.pem', tmp_path / 'cert.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048',
                    '-nodes', '-subj', '/CN=127.0.0.1', '-addext',
                    'subjectAltName=IP:127.0.0.1', '-days', '1',
                    '-keyout', str(key), '-out', str(cert)],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    origin.socket = tls.wrap_socket(origin.socket, server_side=True)
    monkeypatch.setenv('REQUESTS_CA_BUNDLE', str(cert))
    image = origin.images['/disk.img'] = Image(DATA)
    url = origin.url('/disk.img').replace('http://', 'https://')
    stop = threading.Event()
    with open_url(url, ctx(timeout=30, retries=5, stop=stop)) as stream:
        assert stream.read(5, 5) == DATA[5:10]
        for fault in ('stall', 'mute'):
            image.fault = fault
            stop.clear()
            timer = threading.Timer(0.5, stop.set)
            timer.start()
            try:
                elapsed, error = timed(lambda: stream.read(0, 100_000))
            finally:
                timer.cancel()
            assert isinstance(error, Cancelled)
            assert elapsed <= 0.5 + 1
        image.fault = ''
        stop.clear()
        assert stream.read(0, 10) == DATA[:10]


@pytest.fixture
def unanswering() -> Iterator[str]:
    """A URL whose host takes no more connections: a listener that never
    accepts, its queue filled, so that further connects wait on SYNs it
    drops (a firewalled or overloaded server)."""
    import socket
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(('127.0.0.1', port))
        fillers.append(s)
    time.sleep(0.2)
    try:
        yield f'http://127.0.0.1:{port}/disk.img'
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_a_stop_reaches_a_hanging_connect(unanswering: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog sees a socket once it is connected; before that, the
    connect timeout (CONNECT_LIMIT, not the 30 s request timeout) bounds
    how long a stop waits."""
    monkeypatch.setattr('rbd_migration.context.CONNECT_LIMIT', 1.5)
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        elapsed, error = timed(lambda: open_url(unanswering,
                                                ctx(timeout=30, retries=5, stop=stop)))
    finally:
        timer.cancel()
    assert isinstance(error, Cancelled), error
    assert 1.0 <= elapsed <= 1.5 + 1


def test_a_connect_that_hangs_is_named(unanswering: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr('rbd_migration.context.CONNECT_LIMIT', 0.5)
    elapsed, error = timed(lambda: open_url(unanswering, ctx(timeout=30, retries=1)))
    assert isinstance(error, SourceUnreachable), error
    assert 'no answer within 0.5s' in str(error), error
    assert elapsed <= 0.5 + 1


def test_stop_ends_the_pause_between_attempts() -> None:
    stop = threading.Event()
    context = ctx(timeout=5, retries=10, stop=stop)
    calls: List[float] = []

    def attempt() -> None:
        calls.append(time.monotonic())
        if len(calls) == 4:
            stop.set()
        raise Transient('flaky')

    elapsed, error = timed(lambda: with_retries(context, 'x', attempt))
    assert isinstance(error, Cancelled)
    assert len(calls) == 4
    # The pauses after attempts 1-3 (at most 0.25 + 0.5 + 1 s); the fourth
    # pause, up to 2 s, ends at once.
    assert elapsed <= 1.75 + 0.5


def test_stop_before_a_read_sends_nothing(origin: Server) -> None:
    origin.images['/disk.img'] = Image(DATA)
    stop = threading.Event()
    with open_url(origin.url('/disk.img'), ctx(stop=stop)) as stream:
        stop.set()
        with pytest.raises(Cancelled):
            stream.read(0, 10)
    assert origin.requests('GET') == []


# -- lies --------------------------------------------------------------------


@pytest.mark.parametrize('fault', ['lie-close', 'lie-open'])
def test_content_length_longer_than_the_body(origin: Server,
                                             fault: str) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img'), ctx(timeout=1.5, retries=2)) \
            as stream:
        image.fault = fault
        elapsed, error = timed(lambda: stream.read(0, 10_000))
        assert isinstance(error, SourceUnreachable)
        assert str(error).endswith('after 2 attempts')
        # The second attempt asks only for what the first did not bring.
        if fault == 'lie-close':
            assert 'broke off after 2500 of 5000 bytes at offset 5000' in str(error)
            assert elapsed < 2
        else:
            assert 'only 2500 of 5000 bytes arrived in 1.' in str(error)
            assert elapsed <= 2 * 1.5 + 0.5 + 2
        assert [r.headers.get('Range') for r in origin.requests('GET')] == \
            ['bytes=0-9999', 'bytes=5000-9999']
        image.fault = ''
        assert stream.read(0, 10_000) == DATA[:10_000]    # and recovers


def test_an_answer_that_breaks_off_is_resumed_not_read_again(origin: Server) -> None:
    """A fault in the middle of a large ranged read costs what was still
    missing: the next attempt asks for the rest, and the bytes are whole."""
    origin.images['/disk.img'] = Image(DATA, fault='lie-once')
    with open_url(origin.url('/disk.img'), ctx(timeout=5, retries=3)) as stream:
        assert stream.read(1000, 20_000) == DATA[1000:21_000]
    assert [r.headers.get('Range') for r in origin.requests('GET')] == \
        ['bytes=1000-20999', 'bytes=11000-20999']


def test_etag_change_is_source_changed(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    url = origin.url('/disk.img', f'admin:{PASSWORD}@')
    with open_url(url) as stream:
        assert stream.read(0, 10) == DATA[:10]
        image.etag = '"v2"'
        with pytest.raises(SourceChanged) as e:
            stream.read(10, 10)
    assert str(e.value) == (
        f'source-spec: stream.url: {origin.url("/disk.img", "admin:***@")} '
        f'changed since it was opened (ETag "v1" → "v2"); do not change the '
        f'image while it is imported')
    assert not e.value.transient
    assert len(origin.requests('GET')) == 2     # not retried


def test_last_modified_change_is_source_changed(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA, etag=None)
    with open_url(origin.url('/disk.img')) as stream:
        # The same time, spelt otherwise, is the same time.
        image.modified = 'Wednesday, 01-Jan-25 00:00:00 GMT'
        assert stream.read(0, 10) == DATA[:10]
        image.modified = 'Thu, 02 Jan 2025 00:00:00 GMT'
        with pytest.raises(SourceChanged, match=r'\(Last-Modified Wed, 01 '
                           r'Jan 2025 00:00:00 GMT → Thu, 02 Jan 2025'):
            stream.read(0, 10)


def test_size_change_is_source_changed(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA, etag=None, modified=None)
    with open_url(origin.url('/disk.img')) as stream:
        image.data = DATA + b'more'
        with pytest.raises(SourceChanged,
                           match=rf'\(size {len(DATA)} → {len(DATA) + 4}\)'):
            stream.read(0, 10)
        image.data = DATA[:100]
        with pytest.raises(SourceChanged, match=r'\(size'):
            stream.read(1000, 10)          # 416, bytes */100


def test_weak_etag_of_the_same_version_is_no_change(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img')) as stream:
        image.etag = 'W/"v1"'
        assert stream.read(0, 10) == DATA[:10]


def test_etag_first_seen_on_a_get_is_pinned(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA, head_validators=False)
    with open_url(origin.url('/disk.img')) as stream:
        assert stream.read(0, 10) == DATA[:10]
        image.etag = '"v2"'
        with pytest.raises(SourceChanged, match='"v1" → "v2"'):
            stream.read(0, 10)


def test_validators_read_afresh(origin: Server) -> None:
    image = origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img')) as stream:
        assert stream.validators() == {
            'size': str(len(DATA)), 'etag': '"v1"',
            'last_modified': 'Wed, 01 Jan 2025 00:00:00 GMT'}
        image.etag, image.modified = '"v2"', None
        image.data = DATA[:5]
        # What the source is now, for the caller to compare.
        assert stream.validators() == {'size': '5', 'etag': '"v2"'}
    origin.images['/bare.img'] = Image(DATA, etag=None, modified=None)
    with open_url(origin.url('/bare.img')) as stream:
        assert stream.validators() == {'size': str(len(DATA))}


def test_keep_alive_survives_the_checks(origin: Server) -> None:
    origin.images['/disk.img'] = Image(DATA)
    with open_url(origin.url('/disk.img')) as stream:
        for offset in range(0, 20 * 4096, 4096):
            assert stream.read(offset, 4096) == DATA[offset:offset + 4096]
        # One large read in several pieces.
        assert stream.read(0, len(DATA)) == DATA
    assert origin.connections == 1
