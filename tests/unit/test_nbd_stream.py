"""NbdStream against real servers (qemu-nbd, nbdkit): the URI forms upstream
tests and the ones it refuses, exports by name, bytes equal to
``qemu-img convert``'s, sparse ranges, requests in flight together, and
servers that stop, vanish, come back or lie in block status.

Every server is a child of the test, killed in teardown; every wait is
bounded."""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from rbd_migration.context import SourceContext
from rbd_migration.errors import (Cancelled, InvalidArgument, MigrationError, NotFound,
                                  PermissionDenied, SourceChanged, SourceUnreachable)
from rbd_migration.formats import open_format
from rbd_migration.live.imports import SECOND_READER_WAIT, LiveImports
from rbd_migration.probe import ADAPTER, probe
from rbd_migration.source_spec import spec_summary, validate_source_spec
from rbd_migration.streams import open_stream
from rbd_migration.streams.base import Stream
from rbd_migration.streams import nbd as nbd_stream
from rbd_migration.streams.net import Transient
from rbd_migration.streams.nbd import (DEFAULT_PORT, MAX_EXTENTS, NbdStream, _extents, _Link,
                                       _Request, check_uri)

pytest.importorskip('nbd')
pytestmark = pytest.mark.skipif(
    not (shutil.which('qemu-nbd') and shutil.which('nbdkit') and shutil.which('qemu-img')),
    reason='needs qemu-nbd, nbdkit and qemu-img')

#: Longest wait for a server to listen, or to exit once killed.
START_LIMIT = 10.0
KiB, MiB = 1 << 10, 1 << 20


# -- Servers -------------------------------------------------------------------


class Servers:
    """The servers one test started, each killed (and reaped) at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: List[subprocess.Popen] = []

    def start(self, argv: List[str], sock: Optional[Path] = None,
              port: Optional[int] = None) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        self.procs.append(proc)
        until = time.monotonic() + START_LIMIT
        while not _listening(sock, port):
            if proc.poll() is not None:
                error = proc.stderr.read() if proc.stderr else b''
                raise AssertionError(f'{argv[0]} exited: {error.decode()}')
            assert time.monotonic() < until, f'{argv[0]} did not listen within {START_LIMIT}s'
            time.sleep(0.02)
        return proc

    def qemu_nbd(self, image: Path, fmt: str = 'qcow2', name: Optional[str] = None,
                 sock: Optional[Path] = None, port: Optional[int] = None,
                 shared: int = 8) -> subprocess.Popen:
        argv = ['qemu-nbd', '--read-only', '--persistent', '--shared', str(shared), '-f', fmt]
        argv += ['-x', name] if name is not None else []
        argv += ['--socket', str(sock)] if sock else ['-b', '127.0.0.1', '-p', str(port)]
        return self.start(argv + [str(image)], sock, port)

    def nbdkit(self, sock: Path, *args: str) -> subprocess.Popen:
        return self.start(['nbdkit', '--foreground', '--exit-with-parent', '-U', str(sock),
                           *args], sock)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGTERM first, so that nbdkit removes its scripts' directory."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)
            try:
                proc.wait(START_LIMIT / 2)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(START_LIMIT)
        if proc.stderr:
            proc.stderr.close()

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc)


def _listening(sock: Optional[Path], port: Optional[int]) -> bool:
    family = socket.AF_UNIX if sock else socket.AF_INET
    address: Any = str(sock) if sock else ('127.0.0.1', port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(address) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory (a unix socket's path has 107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix='nbd', dir='/tmp'))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers(root: Path) -> Iterator[Servers]:
    made = Servers(root)
    yield made
    made.close()


def ctx_for(root: Path, **kw: Any) -> SourceContext:
    return SourceContext(allowed_file_roots=[str(root)], **{'timeout': 5.0, 'retries': 2, **kw})


def qcow2(root: Path, name: str = 'disk.qcow2', size: str = '24M') -> Path:
    """A qcow2 with data here and there, holes between."""
    path = root / name
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', str(path), size], check=True)
    subprocess.run(['qemu-io', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0x11 17M 64k',
                    '-c', 'write -P 0x77 8388096 1024', str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    return path


def converted(image: Path) -> bytes:
    """The guest's bytes as qemu-img reads them."""
    out = image.with_suffix('.raw')
    subprocess.run(['qemu-img', 'convert', '-O', 'raw', str(image), str(out)], check=True)
    return out.read_bytes()


def read_all(stream: Stream, piece: int = 4 * MiB) -> bytes:
    data = bytearray(stream.size())
    view = memoryview(data)
    pieces = [(at, view[at:at + piece]) for at in range(0, len(data), piece)]
    assert sum(stream.read_pieces(pieces)) == len(data)
    return bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nbd(uri: str, root: Path, **kw: Any) -> NbdStream:
    stream = open_stream({'type': 'nbd', 'uri': uri}, ctx_for(root, **kw))
    assert isinstance(stream, NbdStream)
    return stream


# -- Reading -------------------------------------------------------------------


def test_unix_export_by_name_reads_what_qemu_img_converts(root: Path, servers: Servers) -> None:
    image = qcow2(root)
    servers.qemu_nbd(image, name='vm0', sock=root / 'q.sock')
    want = converted(image)
    with nbd(f'nbd+unix:///vm0?socket={root}/q.sock', root) as stream:
        assert stream.size() == len(want)
        assert sha(read_all(stream)) == sha(want)
        assert stream.read(MiB - 2, 4) == want[MiB - 2:MiB + 2]
        assert stream.read(len(want) - 3, 100) == want[-3:]
        assert stream.read(len(want), 10) == b''
        assert stream.validators() == {'size': str(len(want))}
        assert list(stream.allocated(0, len(want))) == [
            (MiB, 3 * MiB), (8 * MiB - 64 * KiB, 128 * KiB), (17 * MiB, 64 * KiB)]
        assert list(stream.allocated(2 * MiB, MiB)) == [(2 * MiB, MiB)]
        assert 'vm0' in stream.description


@pytest.mark.parametrize('fmt, sparse', [('vpc', True), ('vdi', True), ('vmdk', True),
                                         ('vhdx', False)])   # qemu: no block status
def test_formats_qemu_reads_import_as_raw(root: Path, servers: Servers, fmt: str,
                                         sparse: bool) -> None:
    source = qcow2(root)
    image = root / f'disk.{fmt}'
    subprocess.run(['qemu-img', 'convert', '-O', fmt, str(source), str(image)], check=True)
    servers.qemu_nbd(image, fmt=fmt, sock=root / 'q.sock')
    spec = validate_source_spec({'type': 'raw', 'stream': {
        'type': 'nbd', 'uri': f'nbd+unix:///?socket={root}/q.sock'}})
    want = converted(image)
    with open_format(spec, ctx_for(root)) as raw:
        size = raw.size()
        assert raw.read(0, size)[:len(want)] == want[:size]
        data = [(e.offset, e.length) for e in raw.extents()]
        assert (sum(length for _, length in data) < size) == sparse    # holes stay holes


def test_tcp_forms(root: Path, servers: Servers) -> None:
    image = qcow2(root)
    want = sha(converted(image))
    named, unnamed = free_port(), free_port()
    servers.qemu_nbd(image, name='myexport', port=named)
    servers.qemu_nbd(image, port=unnamed)
    for uri in (f'nbd://127.0.0.1:{named}/myexport', f'nbd://localhost:{named}/myexport',
                f'nbd://127.0.0.1:{unnamed}', f'nbd://127.0.0.1:{unnamed}/'):
        with nbd(uri, root) as stream:
            assert sha(read_all(stream)) == want, uri


def test_shortest_uri_is_localhost_default_port(root: Path, servers: Servers) -> None:
    if _listening(None, DEFAULT_PORT):
        pytest.skip(f'port {DEFAULT_PORT} is taken')
    image = qcow2(root)
    servers.qemu_nbd(image, port=DEFAULT_PORT)
    with nbd('nbd://', root) as stream:
        assert stream.size() == 24 * MiB
    with pytest.raises(NotFound, match="has no export 'myexport'"):
        nbd('nbd:///myexport', root)


def test_missing_export_is_an_answer_not_retried(root: Path, servers: Servers) -> None:
    servers.qemu_nbd(qcow2(root), name='myexport', sock=root / 'q.sock')
    started = time.monotonic()
    with pytest.raises(NotFound) as e:
        nbd(f'nbd+unix:///other?socket={root}/q.sock', root, retries=5)
    assert "has no export 'other'" in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(NotFound, match='default export'):
        nbd(f'nbd+unix:///?socket={root}/q.sock', root)
    assert time.monotonic() - started < 2


def test_tcp_handshake_is_not_held_by_delayed_acks(root: Path, servers: Servers) -> None:
    """qemu-nbd writes handshake replies in pieces without TCP_NODELAY: with
    the client's ACKs delayed 40 ms, each handshake took 90 ms."""
    port = free_port()
    servers.qemu_nbd(qcow2(root), port=port)
    took = []
    for _ in range(5):
        started = time.monotonic()
        nbd(f'nbd://127.0.0.1:{port}', root).close()
        took.append(time.monotonic() - started)
    assert sorted(took)[2] < 0.04, took


def test_validators_after_open_use_the_open_connection(root: Path, servers: Servers) -> None:
    """A stream opened to be checked (each execute does so twice) costs one
    handshake; once it has read, its validators come from a new one."""
    log = root / 'k.log'
    servers.nbdkit(root / 'k.sock', '--filter=log', 'memory', '1M', f'logfile={log}')
    with nbd(f'nbd+unix:///?socket={root}/k.sock', root) as stream:
        assert stream.validators() == {'size': str(MiB)}
        assert log.read_text().count(' Connect ') == 1
        stream.read(0, 4)
        assert stream.validators() == {'size': str(MiB)}
        assert log.read_text().count(' Connect ') == 2


def test_no_server(root: Path) -> None:
    port = free_port()
    for uri in (f'nbd://127.0.0.1:{port}/x', f'nbd+unix:///x?socket={root}/none.sock'):
        with pytest.raises(SourceUnreachable, match='after 2 attempts'):
            nbd(uri, root)


# -- Refused URIs ---------------------------------------------------------------


@pytest.mark.parametrize('stream, message', [
    ({'type': 'nbd'}, "source-spec: stream: missing required field 'uri'"),
    ({'type': 'nbd', 'uri': 123456}, 'source-spec: stream.uri: expected a string, got an integer'),
    ({'type': 'nbd', 'uri': ''}, "source-spec: stream.uri: '' is not an NBD URI"),
    ({'type': 'nbd', 'uri': 'foo.example.com'}, "'foo.example.com' is not an NBD URI"),
    ({'type': 'nbd', 'uri': 'nbd+vsock:///'}, "'nbd+vsock:///' is not an NBD URI"),
    ({'type': 'nbd', 'uri': 'NBD://host'}, "'NBD://host' is not an NBD URI"),
    ({'type': 'nbd', 'uri': 'nbd://host', 'url': 'x'}, 'source-spec: stream.url: unknown field'),
])
def test_schema_refuses(stream: Dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        validate_source_spec({'type': 'raw', 'stream': stream})
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('uri, message', [
    ('nbd://host:99999/x', 'a port is 1 to 65535'),
    ('nbd://host:0/x', 'a port is 1 to 65535'),
    ('nbd://host/x?foo=1', "unknown parameter 'foo'"),
    ('nbd://host/x?tls-verify-peer=false', "unknown parameter 'tls-verify-peer'"),
    ('nbd://host/x#frag', "'#' and ';' have no meaning"),
    ('nbd://alice@host/x', 'TLS user without TLS; use nbds://'),
    ('nbd://host/x?socket=/tmp/s', '?socket= needs the nbd+unix:// scheme'),
    ('nbd+unix:///x', 'a unix socket URI needs ?socket=PATH'),
    ('nbd+unix://host/x?socket=/tmp/s', 'names a host'),
    ('nbd+unix:///x?socket=s.sock', 'is not an absolute path'),
    ('nbd+unix:///x?socket=/a&socket=/b', "parameter 'socket' given twice"),
])
def test_stream_refuses(root: Path, uri: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        nbd(uri, root)
    assert message in str(e.value) and str(e.value).startswith('source-spec: stream.uri: ')
    assert '\n' not in str(e.value)


def test_password_is_refused_and_masked(root: Path) -> None:
    uri = 'nbds://alice:s3cret-pass@host/x'
    with pytest.raises(InvalidArgument) as e:
        nbd(uri, root)
    assert 's3cret' not in str(e.value) and 'carries a password' in str(e.value)
    assert 's3cret' not in spec_summary({'type': 'raw', 'stream': {'type': 'nbd', 'uri': uri}})


def test_local_paths_only_under_the_roots(root: Path, tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied, match='file_source_roots'):
        nbd('nbd+unix:///x?socket=/run/other.sock', root)
    with pytest.raises(PermissionDenied, match='tls-psk-file'):
        nbd(f'nbds://host/x?tls-psk-file={tmp_path}/keys.psk', root)
    (root / 'link.sock').symlink_to('/run/other.sock')
    with pytest.raises(PermissionDenied, match='not under an allowed directory'):
        nbd(f'nbd+unix:///x?socket={root}/link.sock', root)
    (root / 'plain').write_bytes(b'x')
    with pytest.raises(InvalidArgument, match='is not a unix socket'):
        nbd(f'nbd+unix:///x?socket={root}/plain', root)
    with pytest.raises(PermissionDenied):
        open_stream({'type': 'nbd', 'uri': f'nbd+unix:///x?socket={root}/q.sock'},
                    SourceContext())


def test_a_link_under_the_root_to_a_socket_outside_is_refused(
        root: Path, tmp_path: Path, servers: Servers) -> None:
    servers.nbdkit(tmp_path / 'outside.sock', 'memory', '1M')
    (root / 'link.sock').symlink_to(tmp_path / 'outside.sock')
    with pytest.raises(PermissionDenied, match="socket '.*link.sock' is not under an allowed"):
        nbd(f'nbd+unix:///?socket={root}/link.sock', root)


@pytest.fixture
def swap_before_connecting(monkeypatch: pytest.MonkeyPatch) -> List[Path]:
    """Each link named in the returned list is pointed at ``<link>.swap``'s
    target between the check of the files a connection uses and the
    connection: what an attacker racing the mgr would do."""
    links: List[Path] = []
    real = nbd_stream._start

    def swapped(*args: Any) -> None:
        for link in links:
            fresh = link.with_name(link.name + '.new')
            fresh.symlink_to(os.readlink(link.with_name(link.name + '.swap')))
            fresh.replace(link)
        real(*args)
    monkeypatch.setattr(nbd_stream, '_start', swapped)
    return links


def test_a_socket_swapped_after_the_check_does_not_redirect(
        root: Path, tmp_path: Path, servers: Servers, swap_before_connecting: List[Path]) -> None:
    servers.qemu_nbd(qcow2(root), sock=root / 'q.sock')                # 24 MiB
    servers.nbdkit(tmp_path / 'outside.sock', 'memory', '1M')
    link = root / 'link.sock'
    link.symlink_to(root / 'q.sock')
    (root / 'link.sock.swap').symlink_to(tmp_path / 'outside.sock')
    swap_before_connecting.append(link)
    with nbd(f'nbd+unix:///?socket={link}', root) as stream:
        assert os.readlink(link) == str(tmp_path / 'outside.sock')     # swapped
        assert stream.size() == 24 * MiB and stream.read(MiB, 2) == b'ZZ'


def test_a_reconnect_checks_the_socket_again(root: Path, tmp_path: Path,
                                             servers: Servers) -> None:
    proc = servers.qemu_nbd(qcow2(root), sock=root / 'q.sock')
    servers.nbdkit(tmp_path / 'outside.sock', 'memory', '24M')
    link = root / 'link.sock'
    link.symlink_to(root / 'q.sock')
    with nbd(f'nbd+unix:///?socket={link}', root, retries=2) as stream:
        assert stream.read(MiB, 2) == b'ZZ'
        (root / 'new.sock').symlink_to(tmp_path / 'outside.sock')
        (root / 'new.sock').replace(link)
        servers.kill(proc)
        with pytest.raises(PermissionDenied, match='not under an allowed directory'):
            stream.read(MiB, 2)


def psk_server(servers: Servers, keys: Path, sock: Optional[Path] = None,
               port: Optional[int] = None) -> None:
    where = ['-U', str(sock)] if sock else ['-i', '127.0.0.1', '-p', str(port)]
    servers.start(['nbdkit', '--foreground', '--exit-with-parent', '--tls=require',
                   f'--tls-psk={keys}', *where, 'pattern', '1M'], sock, port)


def write_psk(path: Path, key: str) -> Path:
    path.write_text(f'alice:{key}\n')
    return path


def test_tls_psk_over_unix_and_tcp(root: Path, servers: Servers) -> None:
    keys = write_psk(root / 'keys.psk', '0123456789abcdef' * 4)
    port = free_port()
    psk_server(servers, keys, sock=root / 't.sock')
    psk_server(servers, keys, port=port)
    for uri in (f'nbds+unix://alice@/?socket={root}/t.sock&tls-psk-file={keys}',
                f'nbds://alice@127.0.0.1:{port}/?tls-psk-file={keys}'):
        with nbd(uri, root) as stream:
            assert stream.read(8, 8) == (8).to_bytes(8, 'big'), uri
    with pytest.raises(InvalidArgument, match='is not a regular file; give the PSK file'):
        nbd(f'nbds://alice@127.0.0.1:{port}/?tls-psk-file={root}', root)
    with pytest.raises(InvalidArgument, match="tls-psk-file '.*none.psk' does not exist"):
        nbd(f'nbds://alice@127.0.0.1:{port}/?tls-psk-file={root}/none.psk', root)


def test_a_psk_file_swapped_after_the_check_is_not_read(
        root: Path, tmp_path: Path, servers: Servers, swap_before_connecting: List[Path]) -> None:
    """The server knows alice's key in keys.psk; the link is swapped to a
    file outside the roots with another key before the handshake."""
    keys = write_psk(root / 'keys.psk', '0123456789abcdef' * 4)
    other = write_psk(tmp_path / 'other.psk', 'fedcba9876543210' * 4)
    psk_server(servers, keys, sock=root / 't.sock')
    link = root / 'link.psk'
    link.symlink_to(keys)
    (root / 'link.psk.swap').symlink_to(other)
    swap_before_connecting.append(link)
    with nbd(f'nbds+unix://alice@/?socket={root}/t.sock&tls-psk-file={link}', root) as stream:
        assert os.readlink(link) == str(other)
        assert stream.read(8, 8) == (8).to_bytes(8, 'big')


# -- Servers that misbehave -----------------------------------------------------


def test_server_that_stops_answering(root: Path, servers: Servers) -> None:
    proc = servers.qemu_nbd(qcow2(root), sock=root / 'q.sock')
    with nbd(f'nbd+unix:///?socket={root}/q.sock', root, timeout=1.0) as stream:
        assert stream.read(MiB, 4) == b'ZZZZ'
        os.killpg(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(SourceUnreachable) as e:
            stream.read(2 * MiB, 4)
        took = time.monotonic() - started
    assert took < 6, took      # two 1 s requests and a 1 s handshake, a pause
    assert 'after 2 attempts' in str(e.value)


def test_stop_event_ends_a_blocked_read(root: Path, servers: Servers) -> None:
    proc = servers.qemu_nbd(qcow2(root), sock=root / 'q.sock')
    stop = threading.Event()
    with nbd(f'nbd+unix:///?socket={root}/q.sock', root, timeout=30.0, stop=stop) as stream:
        os.killpg(proc.pid, signal.SIGSTOP)
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            stream.read(0, 4)
        assert time.monotonic() - started < 2


def test_server_that_goes_away_and_comes_back(root: Path, servers: Servers) -> None:
    """Two attempts are enough to find a server back: a read the server
    cut off ends its connection, and the next attempt connects again rather
    than sending on the dead one."""
    image = qcow2(root)
    sock = root / 'q.sock'
    proc = servers.qemu_nbd(image, sock=sock)
    with nbd(f'nbd+unix:///?socket={sock}', root, retries=2) as stream:
        assert stream.read(MiB, 2) == b'ZZ'
        servers.kill(proc)
        sock.unlink(missing_ok=True)
        with pytest.raises(SourceUnreachable):
            stream.read(MiB, 2)
        servers.qemu_nbd(image, sock=sock)
        assert stream.read(MiB, 2) == b'ZZ'         # a new connection
        servers.kill(servers.procs[-1])
        sock.unlink(missing_ok=True)
        servers.qemu_nbd(qcow2(root, 'other.qcow2', '32M'), sock=sock)
        with pytest.raises(SourceChanged, match='size 25165824 → 33554432'):
            stream.read(MiB, 2)


def test_requests_are_in_flight_together(root: Path, servers: Servers) -> None:
    """Eight reads of a server that takes 0.5 s for each: sent one at a
    time (as upstream does) they would take 4 s."""
    servers.nbdkit(root / 'k.sock', '--filter=delay', 'pattern', '16M', 'rdelay=500ms')
    with nbd(f'nbd+unix:///?socket={root}/k.sock', root) as stream:
        started = time.monotonic()
        data = read_all(stream, 2 * MiB)
        assert time.monotonic() - started < 2.5
    assert data[8:16] == (8).to_bytes(8, 'big')      # the pattern plugin's offsets


def test_a_broken_link_lands_nothing_more(root: Path, servers: Servers) -> None:
    """Answers land in the caller's buffer, which a retry fills again: an
    answer arriving while another thread waits on the link must not land
    once the link is broken (here 0.2 s before the answer comes)."""
    import nbd as libnbd
    servers.nbdkit(root / 'k.sock', '--filter=delay', 'pattern', '1M', 'rdelay=400ms')
    ctx = ctx_for(root)
    link = _Link.connect(check_uri(f'nbd+unix:///?socket={root}/k.sock', ctx), ctx)
    data = bytearray(b'\xee' * 4096)
    sent = _Request()
    link.handle.aio_pread(libnbd.Buffer.from_buffer(memoryview(data)), 4096,
                          completion=sent.complete)
    before = bytes(data)      # libnbd zeroes it first
    waiter = threading.Thread(target=link._wait, args=(_Request(), 1.5))
    waiter.start()
    time.sleep(0.2)
    with pytest.raises(Transient, match='gave up'):
        link._break('gave up')
    waiter.join(5)
    assert not waiter.is_alive()
    assert data == before and not sent.done.is_set()
    link.close()


def test_without_block_status_everything_is_data(root: Path, servers: Servers) -> None:
    servers.nbdkit(root / 'k.sock', '--filter=noextents', 'memory', '4M')
    with nbd(f'nbd+unix:///?socket={root}/k.sock', root) as stream:
        assert list(stream.allocated(0, 4 * MiB)) == [(0, 4 * MiB)]


def eval_server(servers: Servers, root: Path, extents: str) -> None:
    """1 MiB of 0xaa whose block status is whatever ``extents`` prints."""
    servers.nbdkit(root / 'k.sock', 'eval', 'get_size=echo 1048576',
                   'pread=head -c $3 /dev/zero | tr "\\0" "\\252"',
                   'can_extents=exit 0', f'extents={extents}', 'thread_model=echo parallel')


def test_block_status_that_answers_part_of_the_range(root: Path, servers: Servers) -> None:
    """Only the first 64 KiB are described per answer: the rest is asked
    for again, and what is called zero left out."""
    eval_server(servers, root, 'echo $4 65536 hole,zero')
    with nbd(f'nbd+unix:///?socket={root}/k.sock', root) as stream:
        assert list(stream.allocated(0, MiB)) == []
        assert stream.read(0, 2) == b'\xaa\xaa'


def test_block_status_that_fails_reads_as_data(root: Path, servers: Servers) -> None:
    eval_server(servers, root, 'echo EIO broken >&2; exit 1')
    with nbd(f'nbd+unix:///?socket={root}/k.sock', root) as stream:
        assert list(stream.allocated(4096, 8192)) == [(4096, 8192)]


def test_block_status_past_the_range_is_cut(root: Path, servers: Servers) -> None:
    eval_server(servers, root, 'echo 0 1048576 0')
    with nbd(f'nbd+unix:///?socket={root}/k.sock', root) as stream:
        assert list(stream.allocated(4096, 8192)) == [(4096, 8192)]


def test_extents_that_lie_are_cut_at_the_first_that_makes_no_progress() -> None:
    zero, data, end = 3, 0, 10 * MiB
    assert _extents(100, [MiB, zero, 0, data, 10, data], end) == [(100, 100 + MiB, True)]
    assert _extents(100, [end * 2, data], end) == [(100, end, False)]
    assert _extents(100, [10, data, 10], end) == [(100, 110, False)]
    assert _extents(100, [], end) == []


def test_extents_in_tiny_pieces_cost_neither_memory_nor_reads() -> None:
    zero, data = 3, 0
    assert _extents(0, [1, zero, 1, data] * 1000 + [MiB, zero], 10 * MiB) == [
        (0, 2000, False), (2000, 2000 + MiB, True)]
    many = _extents(0, [1, data] * (MAX_EXTENTS * 2), 10 * MiB)
    assert many == [(0, MAX_EXTENTS, False)]


# -- Routing ------------------------------------------------------------------


def test_probe_sends_nbd_to_the_adapter_engine(root: Path, servers: Servers) -> None:
    servers.qemu_nbd(qcow2(root), sock=root / 'q.sock')
    spec = validate_source_spec({'type': 'raw', 'stream': {
        'type': 'nbd', 'uri': f'nbd+unix:///?socket={root}/q.sock'}})
    report = probe(spec, ctx_for(root))
    assert report.path == ADAPTER and report.size == 24 * MiB
    assert any('no nbd stream' in reason for reason in report.reasons)
    assert report.location == f'nbd nbd+unix:///?socket={root}/q.sock'
    with pytest.raises(MigrationError, match='no nbd stream'):
        probe({**spec, 'rbd_migration': {'engine': 'librbd'}}, ctx_for(root))


def make_certificates(where: Path) -> Tuple[Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate,
    as nbdkit's and libnbd's ``tls-certificates`` directories hold them."""
    server, client = where / 'server', where / 'client'
    server.mkdir(parents=True)
    client.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(['openssl', *args], cwd=where, check=True, capture_output=True)

    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem',
            '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=test CA')
    for name, usage, san in (('server', 'serverAuth', 'subjectAltName=IP:127.0.0.1\n'),
                             ('client', 'clientAuth', '')):
        (where / f'{name}.ext').write_text(f'{san}extendedKeyUsage={usage}\n')
        openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', f'{name}/{name}-key.pem',
                '-out', f'{name}.csr', '-subj', f'/CN={name}')
        openssl('x509', '-req', '-in', f'{name}.csr', '-CA', 'ca-cert.pem', '-CAkey',
                'ca-key.pem', '-CAcreateserial', '-out', f'{name}/{name}-cert.pem',
                '-days', '2', '-extfile', f'{name}.ext')
        shutil.copy(where / 'ca-cert.pem', where / name / 'ca-cert.pem')
    return server, client


def cert_server(servers: Servers, certificates: Path, port: int) -> None:
    servers.start(['nbdkit', '--foreground', '--exit-with-parent', '--tls=require',
                   f'--tls-certificates={certificates}', '--tls-verify-peer',
                   '-i', '127.0.0.1', '-p', str(port), 'pattern', '1M'], port=port)


def test_tls_certificates_are_read_from_the_files_checked(
        root: Path, tmp_path: Path, servers: Servers,
        swap_before_connecting: List[Path]) -> None:
    """Certificate TLS end to end, with the client key a link that is
    swapped, between the check and the handshake, to another CA's key
    outside the roots: GnuTLS gets the module's copy of the file checked,
    so the handshake still succeeds."""
    server, client = make_certificates(root / 'pki')
    _, stranger = make_certificates(tmp_path / 'other')
    port = free_port()
    cert_server(servers, server, port)
    uri = f'nbds://127.0.0.1:{port}/?tls-certificates={client}'
    with nbd(uri, root) as stream:
        assert stream.read(8, 8) == (8).to_bytes(8, 'big')
    key = client / 'client-key.pem'
    key.rename(client / 'real-key.pem')
    key.symlink_to(client / 'real-key.pem')
    (client / 'client-key.pem.swap').symlink_to(stranger / 'client-key.pem')
    swap_before_connecting.append(key)
    with nbd(uri, root) as stream:
        assert os.readlink(key) == str(stranger / 'client-key.pem')
        assert stream.read(16, 8) == (16).to_bytes(8, 'big')
    assert not list(Path(tempfile.gettempdir()).glob('rbd_migration-nbd-tls-*'))


def test_a_certificate_linked_outside_the_roots_is_refused(
        root: Path, tmp_path: Path, servers: Servers) -> None:
    server, client = make_certificates(root / 'pki')
    _, stranger = make_certificates(tmp_path / 'other')
    port = free_port()
    cert_server(servers, server, port)
    (client / 'client-key.pem').unlink()
    (client / 'client-key.pem').symlink_to(stranger / 'client-key.pem')
    with pytest.raises(PermissionDenied, match='client-key.pem leads outside the allowed'):
        nbd(f'nbds://127.0.0.1:{port}/?tls-certificates={client}', root)


# -- Live imports --------------------------------------------------------------


@pytest.mark.parametrize('shared', [1, 2])
def test_a_live_view_needs_a_server_of_two_clients(root: Path, servers: Servers,
                                                   shared: int) -> None:
    """The view holds one connection and the execute's copy opens another:
    a server of one client is found at prepare (the import goes hidden,
    saying why) instead of leaving every attempt of the copy waiting."""
    sock = root / 'one.sock'
    servers.qemu_nbd(qcow2(root), sock=sock, shared=shared)
    live = LiveImports(lambda stop: ctx_for(root, stop=stop))
    live.start('127.0.0.1', 0, '127.0.0.1')
    spec = {'type': 'raw', 'stream': {'type': 'nbd', 'uri': f'nbd+unix:///?socket={sock}'}}
    try:
        started = time.monotonic()
        if shared == 1:
            with pytest.raises(InvalidArgument, match=r'second reader.*--shared 2'):
                live.open_view(spec)
            assert time.monotonic() - started < SECOND_READER_WAIT + 2
        else:
            view, _ = live.open_view(spec)
            view.close()
    finally:
        live.stop()

