"""Live imports without a cluster: what is pinned with a record and served
from there, the path chosen for a source-spec, and the endpoint serving a
view, then serving it again from its record (as the next mgr does after a
failover) and refusing a source that changed meanwhile.

Sources are real files (a sparse raw disk, a compressed qcow2 made by
qemu-img); the endpoint is read over HTTP on 127.0.0.1.
"""
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests

from rbd_migration.context import SourceContext
from rbd_migration.errors import InvalidArgument, SourceChanged
from rbd_migration.live import handover, pinned as pinned_mod
from rbd_migration.live.imports import LiveImports, ViewRecord, asks_hidden
from rbd_migration.live.pinned import Pinned, PinnedView, check_same, pin
from rbd_migration.live.view import QcowView
from rbd_migration.streams.base import Stream
from rbd_migration.validators import read_validators
from tests.unit.test_qcow import convert, scattered_raw

MiB = 1 << 20
#: Longest any HTTP read here waits.
WAIT = 10.0


def raw_spec(path: Path) -> Dict[str, object]:
    return {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(path)}}


def qcow_spec(path: Path) -> Dict[str, object]:
    return {'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(path)}}


def whole(stream: Stream) -> bytes:
    return stream.read(0, stream.size())


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Tuple[Path, Path]]:
    raw = scattered_raw(tmp_path / 'disk.raw', size=8 * MiB, seed=7)
    yield raw, convert(raw, tmp_path / 'disk.qcow2', compress=True)


# -- Pinned -------------------------------------------------------------------

def test_pinned_text_round_trip_and_fill() -> None:
    pinned = Pinned(size=10 * MiB, end=MiB, pieces=[(0, b'QFI\xfb'), (4096, b'\1' * 9),
                                                     (MiB - 2, b'xy')])
    back = Pinned.from_text(pinned.to_text())
    assert back == pinned
    buf = bytearray(b'\xff' * 4200)
    back.fill(4000, memoryview(buf))
    assert buf == bytes(96) + b'\1' * 9 + bytes(4200 - 96 - 9)
    tail = bytearray(4)
    back.fill(MiB - 4, memoryview(tail))
    assert tail == b'\0\0xy'
    assert back.covers(0, MiB) and not back.covers(MiB - 1, 2)


class Counting(Stream):
    """A stream of a fixed pattern that counts the reads it is asked for."""

    description = 'counting'

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: List[Tuple[int, int]] = []
        self.closed = False

    @classmethod
    def from_spec(cls, spec: object, ctx: SourceContext) -> 'Counting':
        raise NotImplementedError('made by tests only')

    def size(self) -> int:
        return len(self.data)

    def _read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset:offset + length]

    def close(self) -> None:
        self.closed = True


def test_pinned_view_opens_the_view_only_for_what_is_not_pinned() -> None:
    data = bytes(range(256)) * 64
    pinned = Pinned(size=len(data), end=4096, pieces=[(0, data[:4096])])
    opened: List[Counting] = []
    failures = [OSError('the source is down')]

    def open_view() -> Stream:
        if failures:
            raise failures.pop()
        opened.append(Counting(data))
        return opened[-1]

    view = PinnedView(pinned, open_view)
    assert view.read(0, 4096) == data[:4096]
    assert view.size() == len(data)
    assert not opened                       # opening never touched the source
    with pytest.raises(OSError, match='down'):
        view.read(4096, 100)                # the first open fails: that read fails
    assert view.read(4000, 1000) == data[4000:5000]     # and the next opens again
    assert view.read(8192, 8192) == data[8192:]
    assert len(opened) == 1
    view.close()
    assert opened[0].closed


def test_a_pinned_view_reads_exactly_as_the_view(sources: Tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    for spec in (raw_spec(sources[0]), qcow_spec(sources[1])):
        view = QcowView.from_spec(spec, SourceContext(allowed_file_roots=[str(tmp_path)]))
        kept = Pinned.from_text(pin(view).to_text())
        assert 0 < kept.end < view.size()
        other = QcowView.from_spec(spec, SourceContext(allowed_file_roots=[str(tmp_path)]))
        pinned = PinnedView(kept, lambda: other)
        try:
            assert whole(pinned) == whole(view)
        finally:
            pinned.close()
            view.close()


def test_check_same_refuses_another_layout(sources: Tuple[Path, Path], tmp_path: Path) -> None:
    ctx = SourceContext(allowed_file_roots=[str(tmp_path)])
    raw = sources[0]
    kept = pin(QcowView.from_spec(raw_spec(raw), ctx))
    same = QcowView.from_spec(raw_spec(raw), ctx)
    assert check_same(same, kept) is same
    same.close()
    grown = scattered_raw(tmp_path / 'other.raw', size=16 * MiB, seed=7)
    other = QcowView.from_spec(raw_spec(grown), ctx)     # another size: other tables
    with pytest.raises(SourceChanged, match='prepare it again'):
        check_same(other, kept)


def test_too_much_to_pin_is_refused_with_the_fix(sources: Tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pinned_mod, 'MAX_PINNED', 16)
    view = QcowView.from_spec(raw_spec(sources[0]),
                              SourceContext(allowed_file_roots=[str(tmp_path)]))
    try:
        with pytest.raises(InvalidArgument, match=r'^source-spec: .*"engine": "adapter"'):
            pin(view)
    finally:
        view.close()


# -- the path chosen ------------------------------------------------------------

def test_why_hidden_names_the_reason() -> None:
    live = LiveImports(lambda stop: SourceContext())
    spec: Dict[str, object] = {'type': 'qcow', 'stream': {'type': 'file', 'file_path': '/x'}}
    assert 'not started' in (live.why_hidden(spec, True) or '')
    assert asks_hidden(spec) is None
    assert '"live": false' in (asks_hidden(dict(spec, rbd_migration={'live': False})) or '')
    assert 'adapter engine' in (live.why_hidden(dict(spec, rbd_migration={'engine': 'adapter'}),
                                                True) or '')
    assert live.why_hidden(spec, False) == 'the live_imports option is off'
    with pytest.raises(InvalidArgument, match='not started'):
        live.open_view(spec)
    assert live.counters() == {'listening': False, 'why': live.down}


def test_a_busy_port_keeps_imports_hidden_and_says_how_to_fix_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handover.listen, '__defaults__', (0.2,))   # not 15 s of retries
    live = LiveImports(lambda stop: SourceContext())
    with socket.socket() as blocker:        # bound, not listening: not one to take over
        blocker.bind(('127.0.0.1', 0))
        port = blocker.getsockname()[1]
        live.start('127.0.0.1', port, '127.0.0.1')
    reason = live.why_hidden({'type': 'raw'}, True) or ''
    assert f'127.0.0.1:{port}' in reason and 'live_endpoint_port' in reason
    assert live.server is None


# -- serving, and serving again from the record ------------------------------------

def fetch(url: str, first: int, length: int) -> requests.Response:
    return requests.get(url, headers={'Range': f'bytes={first}-{first + length - 1}'},
                        timeout=WAIT)


def started(root: Path, record: Optional[ViewRecord] = None) -> LiveImports:
    """An endpoint on a free port; serving ``record`` again before it answers."""
    def context_for(stop: Optional[threading.Event]) -> SourceContext:
        return SourceContext(allowed_file_roots=[str(root)], stop=stop)
    live = LiveImports(context_for)
    live.start('127.0.0.1', 0, '127.0.0.1',
               lambda: live.restore(record) if record is not None else None)
    assert live.server is not None, live.down
    return live


def test_served_then_served_again_from_its_record(sources: Tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    spec = qcow_spec(sources[1])
    ctx = SourceContext(allowed_file_roots=[str(tmp_path)])
    expected = whole(QcowView.from_spec(spec, ctx))
    live = started(tmp_path)
    try:
        view, kept = live.open_view(spec)
        record = ViewRecord.from_dict(live.serve(view, kept, spec,
                                                 read_validators(spec, ctx)).to_dict())
        url = live.source_spec(record.token)['stream']['url']
        assert url.endswith('/' + record.token) and url.startswith('http://127.0.0.1:')
        head = requests.head(url, timeout=WAIT)
        assert head.status_code == 200 and int(head.headers['Content-Length']) == len(expected)
        for first, length in ((0, 4096), (kept.end - 100, 200), (len(expected) - MiB, MiB)):
            answer = fetch(url, first, length)
            assert answer.status_code == 206
            assert answer.content == expected[first:first + length]
        assert live.counters()['listening'] is True
    finally:
        live.stop()

    # The next mgr: the same token and bytes, the view opened at its first read.
    again = started(tmp_path, record)
    try:
        url = again.source_spec(record.token)['stream']['url']
        answer = fetch(url, len(expected) - 3 * MiB, 3 * MiB)
        assert answer.content == expected[len(expected) - 3 * MiB:]
        again.restore(record)               # a second restore changes nothing
        assert fetch(url, 0, 512).content == expected[:512]
        again.remove(record.token)
        assert fetch(url, 0, 512).status_code == 404
    finally:
        again.stop()


def test_a_changed_source_fails_reads_of_data_not_opening(sources: Tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    raw = sources[0]
    spec = raw_spec(raw)
    ctx = SourceContext(allowed_file_roots=[str(tmp_path)])
    live = started(tmp_path)
    try:
        view, kept = live.open_view(spec)
        record = live.serve(view, kept, spec, read_validators(spec, ctx))
        opening = fetch(live.source_spec(record.token)['stream']['url'], 0, 4096).content
    finally:
        live.stop()
    with open(raw, 'r+b') as f:                 # the source changes while no mgr serves it
        f.seek(MiB)
        f.write(b'changed')
    os.utime(raw, (1, 1))
    again = started(tmp_path, record)
    try:
        url = again.source_spec(record.token)['stream']['url']
        assert fetch(url, 0, 4096).content == opening     # librbd's open still succeeds
        answer = fetch(url, kept.end, MiB)
        assert answer.status_code >= 500                   # the data read fails cleanly
        assert answer.headers.get('Connection') == 'close'
    finally:
        again.stop()
