"""Reads merged into few requests: the plan, and its effect over HTTP.

A real ThreadingHTTPServer on 127.0.0.1 serves files with Range support and
counts the GETs; images are made with qemu-img and read back against
``qemu-img convert``.
"""
import contextlib
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings, strategies as st

from rbd_migration.context import SourceContext
from rbd_migration.formats.export_records import RecordReader, Where, parse_diff
from rbd_migration.formats import open_format
from rbd_migration.streams.base import Stream
from rbd_migration.streams.coalesce import plan
from rbd_migration.streams.http import HttpStream
from tests.profile import examples

KiB, MiB = 1 << 10, 1 << 20


# -- the plan -----------------------------------------------------------------


@settings(max_examples=examples(quick=300, thorough=5000), deadline=None, database=None)
@given(pieces=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 64 * KiB)),
                       max_size=40),
       gap=st.sampled_from([-1, 0, 1, 4 * KiB, 256 * KiB]),
       limit=st.sampled_from([1, 4 * KiB, 64 * KiB, 4 * MiB]))
def test_plan_covers_each_piece_once_within_gap_and_limit(
        pieces: List[Tuple[int, int]], gap: int, limit: int) -> None:
    requests = plan(pieces, gap, limit)
    seen = sorted(i for r in requests for i in r.pieces)
    assert seen == list(range(len(pieces)))
    for r in requests:
        for i in r.pieces:
            offset, length = pieces[i]
            assert r.start <= offset and offset + length <= r.end
        assert r.end - r.start <= limit or len(r.pieces) == 1
        if gap < 0:
            assert len(r.pieces) == 1
        # No hole inside a request is larger than the gap allowed.
        reach = r.start
        for i in sorted(r.pieces, key=lambda i: pieces[i][0]):
            offset, length = pieces[i]
            assert offset - reach <= max(gap, 0)
            reach = max(reach, offset + length)
        assert reach == r.end
    # In order (pieces that overlap may still be two requests, when merging
    # them would pass the limit).
    assert [r.start for r in requests] == sorted(r.start for r in requests)


def test_plan_merges_neighbours_and_splits_at_the_limit() -> None:
    pieces = [(0, 100), (100, 100), (250, 50), (1000, 10)]
    assert [(r.start, r.end, r.pieces) for r in plan(pieces, 64, 1 << 20)] == \
        [(0, 300, [0, 1, 2]), (1000, 1010, [3])]
    assert [(r.start, r.end) for r in plan(pieces, 64, 200)] == \
        [(0, 200), (250, 300), (1000, 1010)]
    assert len(plan(pieces, -1, 1 << 20)) == 4


# -- merged reads straight into the pieces --------------------------------------


class BytesStream(Stream):
    """Bytes in memory, merging like a remote stream, through the base's
    ``_read_scatter`` (one ``bytes`` per request, put where it goes)."""

    merge_gap = 4 * KiB
    merge_limit = 64 * KiB

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests = 0

    @classmethod
    def from_spec(cls, spec: object, ctx: SourceContext) -> 'BytesStream':
        raise NotImplementedError

    def size(self) -> int:
        return len(self.data)

    def _read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and offset + length <= len(self.data), \
            'the base hands _read only spans inside the stream'
        self.requests += 1
        return self.data[offset:offset + length]


PIECES = st.lists(st.tuples(st.integers(0, 80 * KiB), st.integers(0, 9 * KiB)),
                  min_size=1, max_size=30)


def _scattered(stream: Stream, pieces: List[Tuple[int, int]]) -> Tuple[List[int], List[bytes]]:
    """``read_pieces`` of ``pieces``, each into a buffer of its own poisoned
    beforehand, so a byte left unwritten shows."""
    bufs = [bytearray(b'\xee' * length) for _, length in pieces]
    counts = stream.read_pieces([(offset, memoryview(buf))
                                 for (offset, _), buf in zip(pieces, bufs)])
    return counts, [bytes(buf[:n]) for buf, n in zip(bufs, counts)]


def _expected(data: bytes, pieces: List[Tuple[int, int]]) -> List[bytes]:
    return [data[offset:offset + length] for offset, length in pieces]


@settings(max_examples=examples(quick=200, thorough=3000), deadline=None, database=None)
@given(pieces=PIECES, size=st.integers(1, 96 * KiB))
def test_a_merged_read_fills_every_piece_as_its_own_read_would(
        pieces: List[Tuple[int, int]], size: int) -> None:
    """Gaps, overlapping pieces (a compressed cluster's stored length runs
    into the next), pieces inside others, and the stream's end."""
    data = bytes((i * 131 + i // 251) % 256 for i in range(size))
    stream = BytesStream(data)
    counts, got = _scattered(stream, pieces)
    assert got == _expected(data, pieces)
    assert counts == [len(b) for b in _expected(data, pieces)]
    assert stream.requests <= len(pieces)


def test_merged_reads_over_http_land_in_the_pieces_without_a_copy(
        tmp_path: Path, server: 'FileServer') -> None:
    """The same through the HTTP stream's own filling, with requests merged
    and overlapping pieces among them."""
    data = bytes((i * 7 + i // 4099) % 256 for i in range(2 * MiB))
    (tmp_path / 'blob').write_bytes(data)
    pieces = [(0, 1000), (500, 700), (1200, 10), (100 * KiB, 64 * KiB),
              (100 * KiB + 32 * KiB, 8 * KiB), (2 * MiB - 5, 100), (900 * KiB, 300 * KiB)]
    with HttpStream.open(server.url('blob'), SourceContext(), 'blob') as stream:
        before = len(server.gets)
        counts, got = _scattered(stream, pieces)
        assert got == _expected(data, pieces)
        assert counts == [len(b) for b in _expected(data, pieces)]
        assert len(server.gets) - before <= 3, server.gets[before:]


def _diff_of_records(count: int, length: int) -> bytes:
    """A v1 export-diff writing ``count`` records of ``length`` bytes."""
    body = b''.join(b'w' + struct.pack('<QQ', i * length, length) + bytes([i % 251]) * length
                    for i in range(count))
    return b'rbd diff v1\n' + b't' + struct.pack('<I', 2) + b's1' \
        + b's' + struct.pack('<Q', count * length) + body + b'e'


@pytest.mark.parametrize('gap, most', [(-1, 66), (128 * KiB, 66), (1 * MiB, 12)])
def test_indexing_reads_through_payloads_the_stream_would_merge(gap: int, most: int) -> None:
    """Each record header of a diff of 64 records of 256 KiB lies past the
    last window: a request per record, unless the stream would rather read
    256 KiB than send a request, when the windows grow to read through."""
    data = _diff_of_records(64, 256 * KiB)
    stream = BytesStream(data)
    stream.merge_gap = gap
    reader = RecordReader(Where('stream', stream), 0, len(data))
    diff = parse_diff(reader, 1, 64 * 256 * KiB)
    assert len(diff.records) == 64
    assert stream.requests <= most, stream.requests
    if gap < 256 * KiB:
        assert stream.requests >= 64     # payloads skipped, never read


# -- over HTTP ------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: 'FileServer'

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        # A GET is counted in flight and held ``delay`` (a GET of a missing
        # file only counted); a HEAD answers at once.
        held = (self.server.root / self.path.lstrip('/')).exists()
        with self.server.flight(held) if body else contextlib.nullcontext():
            self._send(body)

    def _send(self, body: bool) -> None:
        path = self.server.root / self.path.lstrip('/')
        if not path.exists():
            self.send_error(404)
            return
        data = path.read_bytes()
        first, last = 0, len(data) - 1
        wanted = self.headers.get('Range')
        if body:
            self.server.count(wanted)
        if wanted:
            a, b = wanted.split('=')[1].split('-')
            first, last = int(a), min(int(b), len(data) - 1)
        self.send_response(206 if wanted else 200)
        self.send_header('Accept-Ranges', 'bytes')
        self.send_header('ETag', self.server.etag)
        if wanted:
            self.send_header('Content-Range', f'bytes {first}-{last}/{len(data)}')
        self.send_header('Content-Length', str(last - first + 1 if body else len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data[first:last + 1])


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(('127.0.0.1', 0), Handler)
        self.root = root
        self.etag = '"v1"'
        self.gets: List[Optional[str]] = []
        self._lock = threading.Lock()
        #: Seconds each GET waits before its answer, and the most GETs
        #: answered at once.
        self.delay = 0.0
        self.in_flight = self.most_in_flight = 0

    @contextlib.contextmanager
    def flight(self, held: bool = True) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay if held else 0.0)
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def count(self, wanted: Optional[str]) -> None:
        with self._lock:
            self.gets.append(wanted)

    def url(self, name: str) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}/{name}'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    srv = FileServer(tmp_path)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def _qemu(*args: str) -> None:
    subprocess.run(['qemu-img', *args], check=True, capture_output=True)


def test_compressed_qcow2_over_http_takes_a_request_per_chunk(
        tmp_path: Path, server: FileServer) -> None:
    """One GET per cluster was 8,000 requests per GiB; merged, a 4 MiB chunk
    of compressed clusters lying one after another is one or two."""
    letters = bytes(b'ACGT'[(i * 7 + i // 4096) % 4] for i in range(64 * KiB))
    raw = tmp_path / 'disk.raw'
    raw.write_bytes(letters * 256)   # 16 MiB, compressible
    _qemu('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536',
          str(raw), str(tmp_path / 'disk.qcow2'))
    spec = {'type': 'qcow', 'stream': {'type': 'http', 'url': server.url('disk.qcow2')}}
    chunk = 4 * MiB
    with open_format(spec, SourceContext()) as fmt:
        assert fmt.features.compressed
        opened = len(server.gets)
        buf = bytearray(chunk)
        got = bytearray()
        for offset in range(0, fmt.size(), chunk):
            fmt.read_into(offset, memoryview(buf))
            got += buf
        reads = len(server.gets) - opened
    assert bytes(got) == raw.read_bytes()
    assert reads <= 2 * (16 * MiB // chunk), server.gets[opened:]


def test_a_chain_opened_again_at_the_same_version_is_not_indexed_again(
        tmp_path: Path, server: FileServer) -> None:
    """The probe, each execute and verify open the chain: the second open
    of an unchanged diff (same ETag) reads no record headers; a new ETag
    indexes it afresh."""
    (tmp_path / 'base.diff').write_bytes(_diff_of_records(64, 256 * KiB))
    spec = {'type': 'export-diff',
            'stream': {'type': 'http', 'url': server.url('base.diff')}}

    def open_and_read() -> Tuple[int, bytes]:
        before = len(server.gets)
        with open_format(spec, SourceContext()) as fmt:
            opened = len(server.gets) - before
            data = fmt.read(0, fmt.size())
        return opened, data

    first, data = open_and_read()
    again, same = open_and_read()
    assert first >= 3 and again == 0, (first, again)
    assert same == data == b''.join(bytes([i % 251]) * 256 * KiB for i in range(64))
    server.etag = '"v2"'
    changed, _ = open_and_read()
    assert changed == first


def _chain(tmp_path: Path) -> Path:
    """base <- ov1 <- ov2 (16 MiB), each layer writing 1 MiB extents of its
    own in every 4 MiB, so that each chunk reads from all three files."""
    _qemu('create', '-f', 'qcow2', str(tmp_path / 'base.qcow2'), '16M')
    previous = 'base.qcow2'
    for n, name in enumerate(('base.qcow2', 'ov1.qcow2', 'ov2.qcow2')):
        if name != 'base.qcow2':
            _qemu('create', '-f', 'qcow2', '-F', 'qcow2', '-b', previous, str(tmp_path / name))
            previous = name
        cmds = [a for chunk in range(4) for a in
                ('-c', f'write -P {0x11 * (n + 1) + chunk} {chunk * 4 + n}M 1M')]
        subprocess.run(['qemu-io', '-f', 'qcow2', *cmds, str(tmp_path / name)],
                       check=True, capture_output=True)
    return tmp_path / 'ov2.qcow2'


def test_a_chain_over_http_reads_its_layers_at_once_and_as_qemu_does(
        tmp_path: Path, server: FileServer) -> None:
    """A group of chunks of a 3-deep chain over HTTP: the layers' requests
    are in flight together (each layer's answer held 0.2 s), and the bytes
    are qemu-img's."""
    top = _chain(tmp_path)
    _qemu('convert', '-O', 'raw', str(top), str(tmp_path / 'want.raw'))
    want = (tmp_path / 'want.raw').read_bytes()
    spec = {'type': 'qcow', 'stream': {'type': 'http', 'url': server.url(top.name)}}
    with open_format(spec, SourceContext()) as fmt:
        bufs = [bytearray(4 * MiB) for _ in range(4)]
        fmt.read_pieces([(i * 4 * MiB, memoryview(b)) for i, b in enumerate(bufs)])
        assert b''.join(bufs) == want       # and every layer's tables are loaded
        server.delay, server.most_in_flight = 0.2, 0
        bufs = [bytearray(4 * MiB) for _ in range(4)]
        fmt.read_pieces([(i * 4 * MiB, memoryview(b)) for i, b in enumerate(bufs)])
    assert b''.join(bufs) == want
    assert server.most_in_flight == 3


def test_a_failing_lower_layer_fails_the_read_after_the_upper_one_ends(
        tmp_path: Path, server: FileServer) -> None:
    top = _chain(tmp_path)
    spec = {'type': 'qcow', 'stream': {'type': 'http', 'url': server.url(top.name)}}
    with open_format(spec, SourceContext()) as fmt:
        (tmp_path / 'base.qcow2').rename(tmp_path / 'gone.qcow2')
        server.delay = 0.5          # the upper layers' answers; the 404 comes at once
        buf = bytearray(16 * MiB)
        with pytest.raises(Exception) as e:
            fmt.read_pieces([(0, memoryview(buf))])
        # The server counts an answer done just after the client has it:
        # a read that returned before the upper layers' answers would find
        # them in flight for most of half a second still.
        ends = time.monotonic() + 0.1
        while server.in_flight and time.monotonic() < ends:
            time.sleep(0.005)
        assert server.in_flight == 0
    assert 'base.qcow2' in str(e.value) or '404' in str(e.value), e.value
