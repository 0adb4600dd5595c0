"""The copy loop's pure logic: chunking, zero runs, and a checkpoint that
never passes a chunk whose write failed.  (Behaviour against real RBD
images is tested on the cluster, tests/cluster/test_adapter.py.)"""
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from rbd_migration.engine.copier import (BLOCK, Checkpoint, Copier, CopyOptions,
                                         _chunks, _runs)
from rbd_migration.formats.base import Extent, ExtentKind, Format, Snapshot
from rbd_migration.formats.qcow import QcowFormat
from rbd_migration.streams.base import Stream

MiB = 1 << 20


def test_chunks_cut_at_boundaries_and_skip_below_start() -> None:
    exts = [Extent(1 * MiB, 6 * MiB), Extent(9 * MiB, 1 * MiB, ExtentKind.ZERO)]
    got = list(_chunks(iter(exts), 4 * MiB, 2 * MiB))
    assert got == [Extent(2 * MiB, 2 * MiB), Extent(4 * MiB, 3 * MiB),
                   Extent(9 * MiB, 1 * MiB, ExtentKind.ZERO)]


def test_runs_find_non_zero_blocks() -> None:
    data = bytearray(1 * MiB)
    data[BLOCK + 5] = 1
    data[5 * BLOCK:7 * BLOCK] = os.urandom(2 * BLOCK)
    runs = _runs(bytes(data), 100)
    assert [(off, len(b)) for off, b in runs] == [(100 + BLOCK, BLOCK),
                                                  (100 + 5 * BLOCK, 2 * BLOCK)]
    assert _runs(bytes(MiB), 0) == []
    dense = os.urandom(MiB)
    assert _runs(dense, 7) == [(7, dense)]



def _naive_runs(data: bytes, base: int) -> List[tuple]:
    blocks = [(pos, data[pos:pos + BLOCK]) for pos in range(0, len(data), BLOCK)]
    runs: List[tuple] = []
    for pos, block in blocks:
        if any(block):
            if runs and runs[-1][0] + len(runs[-1][1]) == base + pos:
                runs[-1] = (runs[-1][0], runs[-1][1] + block)
            else:
                runs.append((base + pos, block))
    return runs


@pytest.mark.parametrize('seed', range(40))
def test_runs_match_a_byte_by_byte_scan(seed: int) -> None:
    """Zeros only in a block's first bytes, or only after them, or a short
    tail: the fast comparisons find the same runs as looking at every byte."""
    rng = random.Random(seed)
    length = rng.choice([4 * MiB, 4 * MiB - 4096, BLOCK * 3 + 17, 5])
    data = bytearray(length)
    for _ in range(rng.randrange(0, 12)):
        at = rng.randrange(length)
        if rng.random() < 0.5:
            data[at] = rng.randrange(1, 256)  # one byte, anywhere in a block
        else:
            n = min(rng.randrange(1, 2 * BLOCK), length - at)
            data[at:at + n] = os.urandom(n)
    assert _runs(bytes(data), 512) == _naive_runs(bytes(data), 512)

def test_checkpoint_is_parse_safe() -> None:
    assert Checkpoint.decode(Checkpoint(3, 4096).encode()) == Checkpoint(3, 4096)
    assert Checkpoint.decode(None) == Checkpoint()
    assert Checkpoint.decode('garbage') == Checkpoint()


class OnesFormat(Format):
    """64 MiB of 0x01: every chunk is data."""

    exact_diffs = True

    @classmethod
    def from_spec(cls, spec, ctx):
        return cls()

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return 64 * MiB

    def snapshots(self) -> List[Snapshot]:
        return []

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        yield Extent(0, 64 * MiB)

    def read(self, offset: int, length: int, snap: Optional[Snapshot] = None) -> bytes:
        return b'\x01' * length


class FailingTarget:
    """A target whose write at 8 MiB fails just as two earlier chunks land
    together, the race that once moved the checkpoint past it."""

    def __init__(self) -> None:
        self.written: List[int] = []
        self.lock = threading.Lock()

    def size(self) -> int:
        return 64 * MiB

    def list_snaps(self) -> List[dict]:
        return []

    def aio_write(self, data: bytes, offset: int,
                  oncomplete: Callable[['Completion'], None]) -> None:
        if offset in (0, 4 * MiB):
            delay, ret = 0.05, 0
        elif offset == 8 * MiB:
            delay, ret = 0.045, -5
        else:
            delay, ret = 0.3, 0

        def complete() -> None:
            if ret == 0:
                with self.lock:
                    self.written.append(offset)
            oncomplete(Completion(ret))
        threading.Timer(delay, complete).start()


class Completion:
    def __init__(self, ret: int) -> None:
        self.ret = ret

    def get_return_value(self) -> int:
        return self.ret


@pytest.mark.parametrize('attempt', range(3))
def test_checkpoint_never_passes_a_failed_chunk(attempt: int) -> None:
    saved: List[Checkpoint] = []

    def progress(done: int, total: int) -> bool:
        time.sleep(0.02)  # a progress update's round trip
        return True

    copier = Copier(OnesFormat(), FailingTarget(),
                    CopyOptions(window=4, checkpoint_interval=0.0), progress, saved.append)
    with pytest.raises(Exception):
        copier.run(Checkpoint())
    assert saved, 'the race needs checkpoints to be taken'
    assert all(c.offset <= 8 * MiB for c in saved if c.layer == 0), saved


class SlowTarget:
    """Writes that take a while: how many are in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.written = 0

    def size(self) -> int:
        return 64 * MiB

    def list_snaps(self) -> List[dict]:
        return []

    def aio_write(self, data: bytes, offset: int,
                  oncomplete: Callable[[Completion], None]) -> None:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)

        def complete() -> None:
            with self.lock:
                self.in_flight -= 1
                self.written += len(data)
            oncomplete(Completion(0))
        threading.Timer(0.05, complete).start()


def test_one_reader_keeps_the_window_of_writes_in_flight() -> None:
    target = SlowTarget()
    copier = Copier(OnesFormat(), target,
                    CopyOptions(window=6, readers=1), lambda done, total: True,
                    lambda c: None)
    copier.run(Checkpoint())
    assert target.written == 64 * MiB and target.in_flight == 0
    assert target.most == 6


def test_options_fit_whole_objects_and_group_a_streams_request_size() -> None:
    base = CopyOptions(chunk=4 * MiB, window=8, readers=4)
    assert base.fitted(4 * MiB) == base

    def held(o: CopyOptions) -> int:
        return (o.window + o.readers) * o.chunk

    # Larger objects: whole objects per chunk, no more buffer bytes held.
    big = base.fitted(8 * MiB)
    assert (big.chunk, big.window, big.readers) == (8 * MiB, 4, 2)
    assert held(big) == held(base)
    # A source whose requests are worth 16 MiB: chunks stay 4 MiB, read four
    # at a time, with no more readers than the window has groups.
    s3 = base.fitted(4 * MiB, 16 * MiB)
    assert (s3.chunk, s3.window, s3.readers, s3.group) == (4 * MiB, 8, 2, 4)
    assert held(s3) <= held(base)
    # Groups of whole chunks, rounded up.
    odd = base.fitted(4 * MiB, 10 * MiB)
    assert (odd.chunk, odd.window, odd.readers, odd.group) == (4 * MiB, 8, 2, 3)
    small = base.fitted(4 * MiB, 1 * MiB)
    assert (small.chunk, small.readers, small.group) == (4 * MiB, 4, 1)
    # Never more in a group than the window holds.
    tiny = CopyOptions(window=1, readers=4).fitted(4 * MiB, 16 * MiB)
    assert (tiny.chunk, tiny.window, tiny.readers, tiny.group) == (4 * MiB, 1, 1, 1)
    # Large objects and large requests: the memory rule first, then groups
    # of the larger chunks.
    both = base.fitted(8 * MiB, 16 * MiB)
    assert (both.chunk, both.window, both.readers, both.group) == (8 * MiB, 4, 2, 2)
    assert held(both) == held(base)
    # Huge objects: three buffers, whatever they cost (a chunk is an object).
    huge = base.fitted(64 * MiB)
    assert (huge.chunk, huge.window, huge.readers, huge.group) == (64 * MiB, 2, 1, 1)
    assert base.fitted(64 * MiB, 16 * MiB) == huge


def test_read_size_is_the_largest_of_the_streams() -> None:
    from rbd_migration.formats.raw import RawFormat
    from rbd_migration.streams.base import Stream

    class Remote(Stream):
        request_size = 16 * MiB

        @classmethod
        def from_spec(cls, spec, ctx):
            return cls()

        def size(self) -> int:
            return MiB

        def _read(self, offset: int, length: int) -> bytes:
            return bytes(length)

    class Local(Remote):
        request_size = 0

    assert RawFormat(Local()).read_size == 0
    assert RawFormat(Local(), [Remote()], ['s1']).read_size == 16 * MiB
    assert RawFormat(Remote()).read_size == 16 * MiB
    # Diff layers, a vmdk's files: the largest of their streams'.
    from rbd_migration.context import SourceContext
    from rbd_migration.formats.export_records import Where
    from rbd_migration.formats.layered import Layer, LayeredFormat
    from rbd_migration.formats.runs import Runs
    from rbd_migration.formats.vmdk import VmdkFormat

    class Diffs(LayeredFormat):
        @classmethod
        def from_spec(cls, spec, ctx):
            raise NotImplementedError

    def layered(*streams: Stream) -> LayeredFormat:
        return Diffs([Layer(f's{i}', MiB, s, Runs()) for i, s in enumerate(streams)],
                             Where('path', streams[0]))
    assert layered(Local(), Local()).read_size == 0
    assert layered(Local(), Remote()).read_size == 16 * MiB

    def vmdk(*streams: Stream) -> VmdkFormat:
        return VmdkFormat([], list(streams), 'disk.vmdk', SourceContext(), 'monolithicFlat')
    assert vmdk(Local()).read_size == 0
    assert vmdk(Local(), Remote()).read_size == 16 * MiB


def test_scattered_data_of_one_chunk_is_copied_as_one() -> None:
    from rbd_migration.engine.copier import MERGE_GAP, _merged
    KiB = 1 << 10
    D, Z = ExtentKind.DATA, ExtentKind.ZERO
    exts = [Extent(0, 4096), Extent(64 * KiB, 4096), Extent(200 * KiB, 4096),
            Extent(300 * KiB, 4096, Z), Extent(400 * KiB, 4096),
            Extent(400 * KiB + 4096 + MERGE_GAP + 1, 4096),
            Extent(4 * MiB - 8192, 4096), Extent(4 * MiB + 4096, 4096)]
    got = [(e.offset, e.length, e.kind) for e in _merged(iter(exts), 4 * MiB)]
    assert got == [(0, 200 * KiB + 4096, D), (300 * KiB, 4096, Z), (400 * KiB, 4096, D),
                   (400 * KiB + 4096 + MERGE_GAP + 1, 4096, D),
                   (4 * MiB - 8192, 4096, D), (4 * MiB + 4096, 4096, D)]


def test_a_layer_read_in_groups_fuses_each_chunks_data_and_a_fresh_one_drops_zeros() -> None:
    from rbd_migration.engine.copier import _planned
    KiB = 1 << 10
    D, Z = ExtentKind.DATA, ExtentKind.ZERO
    exts = [Extent(0, 4096), Extent(1 * MiB, 4096), Extent(2 * MiB, 4096, Z),
            Extent(3 * MiB, 4096), Extent(4 * MiB + 64 * KiB, 4096)]

    def planned(group: int, fresh: bool) -> List[Tuple[int, int, ExtentKind]]:
        return [(e.offset, e.length, e.kind)
                for e in _planned(iter(exts), 4 * MiB, group, fresh)]
    # Grouped, on a layer over earlier ones: a ZERO extent stays, and only
    # gaps up to MERGE_GAP fuse (the others hold earlier layers' data).
    assert planned(4, False) == [(0, 4096, D), (1 * MiB, 4096, D), (2 * MiB, 4096, Z),
                                 (3 * MiB, 4096, D), (4 * MiB + 64 * KiB, 4096, D)]
    # Grouped on a fresh target: the zeros are there already.
    assert planned(4, True) == [(0, 3 * MiB + 4096, D), (4 * MiB + 64 * KiB, 4096, D)]
    # Chunk by chunk: only gaps up to MERGE_GAP fuse, as before.
    assert planned(1, True) == [(0, 4096, D), (1 * MiB, 4096, D), (3 * MiB, 4096, D),
                                (4 * MiB + 64 * KiB, 4096, D)]


def test_an_extent_running_into_a_chunk_fuses_with_the_data_after_it_there() -> None:
    """A chain's composed extents cross chunk boundaries: 1-5 and 7-12 MiB
    must give three chunks (1-4, 4-8, 8-12), not a fourth piece of 7-8 MiB
    that takes a place in a group of its own."""
    from rbd_migration.engine.copier import _planned
    D = ExtentKind.DATA
    exts = [Extent(1 * MiB, 4 * MiB), Extent(7 * MiB, 5 * MiB), Extent(13 * MiB, MiB)]
    got = [(e.offset // MiB, e.length // MiB, e.kind)
           for e in _planned(iter(exts), 4 * MiB, 4, True)]
    assert got == [(1, 3, D), (4, 4, D), (8, 4, D), (13, 1, D)]
    # On a later layer only MERGE_GAP fuses, but the cut comes first too.
    got = [(e.offset // MiB, e.length // MiB, e.kind)
           for e in _planned(iter(exts), 4 * MiB, 4, False)]
    assert got == [(1, 3, D), (4, 1, D), (7, 1, D), (8, 4, D), (13, 1, D)]


# -- chunks read in groups ------------------------------------------------------


_PATTERN = random.Random(7).randbytes(64 * MiB)


class PatternFormat(Format):
    """64 MiB of random bytes where ``extents`` say, zeros elsewhere; it
    records the offsets of each read (``read_into`` as a call of one), and
    fails a ``read_pieces`` that includes ``fail_at``."""

    exact_diffs = True

    def __init__(self, extents: List[Extent], fail_at: Optional[int] = None) -> None:
        self._extents = extents
        self.fail_at = fail_at
        self.content = bytearray(64 * MiB)
        for ext in extents:
            if ext.kind is ExtentKind.DATA:
                self.content[ext.offset:ext.end] = _PATTERN[ext.offset:ext.end]
        self.into: List[int] = []
        self.pieces: List[List[int]] = []
        self.lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec, ctx):
        raise NotImplementedError

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return 64 * MiB

    def snapshots(self) -> List[Snapshot]:
        return []

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        return iter(self._extents)

    def read(self, offset: int, length: int, snap: Optional[Snapshot] = None) -> bytes:
        return bytes(self.content[offset:offset + length])

    def read_into(self, offset: int, view: memoryview,
                  snap: Optional[Snapshot] = None) -> None:
        with self.lock:
            self.into.append(offset)
        view[:] = self.content[offset:offset + len(view)]

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        with self.lock:
            self.pieces.append([offset for offset, _ in pieces])
        if any(offset == self.fail_at for offset, _ in pieces):
            raise OSError(f'read failed at {self.fail_at}')
        for offset, view in pieces:
            view[:] = self.content[offset:offset + len(view)]


class MemoryTarget:
    """An image in memory whose writes complete at once; ``fail_write_at``
    is a write librbd refuses to take."""

    def __init__(self, size: int, fail_write_at: Optional[int] = None) -> None:
        self.data = bytearray(size)
        self.fail_write_at = fail_write_at

    def size(self) -> int:
        return len(self.data)

    def resize(self, size: int) -> None:
        del self.data[size:]
        self.data += bytes(size - len(self.data))

    def list_snaps(self) -> List[dict]:
        return []

    def aio_write(self, data: bytes, offset: int,
                  oncomplete: Callable[[Completion], None]) -> None:
        if offset == self.fail_write_at:
            raise OSError(f'no write at {offset}')
        self.data[offset:offset + len(data)] = data
        oncomplete(Completion(0))

    def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])


#: Data in three 16 MiB regions of four chunks, a ZERO extent inside the
#: second, and two extents of one chunk too far apart to be merged.
MIXED = [Extent(0, 20 * MiB), Extent(20 * MiB, 4 * MiB, ExtentKind.ZERO),
         Extent(24 * MiB, 16 * MiB), Extent(48 * MiB, 4096),
         Extent(49 * MiB, 4096), Extent(60 * MiB, 4 * MiB)]


def _copy(fmt: Format, target: MemoryTarget, group: int,
          saved: Optional[List[Checkpoint]] = None) -> Copier:
    copier = Copier(fmt, target, CopyOptions(group=group, checkpoint_interval=0.0),
                    lambda done, total: True,
                    saved.append if saved is not None else lambda c: None)
    copier.run(Checkpoint())
    return copier


def test_chunks_of_one_region_are_read_together() -> None:
    """Consecutive DATA chunks of one aligned 16 MiB region are one read:
    a group stops at the region's end; on a fresh target a ZERO extent is
    no write and ends no group, and the data of one chunk is one piece."""
    fmt = PatternFormat(MIXED)
    target = MemoryTarget(64 * MiB)
    _copy(fmt, target, 4)
    assert fmt.into == []
    assert sorted(fmt.pieces) == [
        [0, 4 * MiB, 8 * MiB, 12 * MiB], [16 * MiB, 24 * MiB, 28 * MiB],
        [32 * MiB, 36 * MiB], [48 * MiB, 60 * MiB]]
    assert target.data == fmt.content


def test_groups_of_one_read_chunk_by_chunk_and_copy_the_same_bytes() -> None:
    grouped, single = PatternFormat(MIXED), PatternFormat(MIXED)
    a, b = MemoryTarget(64 * MiB), MemoryTarget(64 * MiB)
    _copy(grouped, a, 4)
    _copy(single, b, 1)
    assert single.pieces == []
    assert sorted(single.into) == [e.offset for e in _chunks(iter(MIXED), 4 * MiB, 0)
                                   if e.kind is ExtentKind.DATA]
    assert a.data == b.data


def test_groups_never_hold_more_chunks_than_the_window() -> None:
    fmt = PatternFormat([Extent(0, 64 * MiB)])
    copier = Copier(fmt, MemoryTarget(64 * MiB), CopyOptions(window=2, readers=2, group=8),
                    lambda done, total: True, lambda c: None)
    copier.run(Checkpoint())
    assert sorted(fmt.pieces) == [[o, o + 4 * MiB] for o in range(0, 64 * MiB, 8 * MiB)]


def test_a_failed_group_read_stops_the_copy_below_the_group() -> None:
    fmt = PatternFormat([Extent(0, 64 * MiB)], fail_at=36 * MiB)
    saved: List[Checkpoint] = []
    copier = Copier(fmt, MemoryTarget(64 * MiB), CopyOptions(group=4, checkpoint_interval=0.0),
                    lambda done, total: True, saved.append)
    with pytest.raises(OSError, match='read failed at 37748736'):
        copier.run(Checkpoint())
    assert saved and all(c.offset <= 32 * MiB for c in saved if c.layer == 0), saved
    # No buffer is lost from the count: the group's are forgotten, the
    # others are back.
    assert copier.buffers.free.qsize() == copier.buffers.made


def test_a_failed_write_in_a_group_gives_back_the_buffers_not_written() -> None:
    target = MemoryTarget(64 * MiB, fail_write_at=4 * MiB)
    fmt = PatternFormat([Extent(0, 64 * MiB)])
    saved: List[Checkpoint] = []
    copier = Copier(fmt, target, CopyOptions(group=4, checkpoint_interval=0.0),
                    lambda done, total: True, saved.append)
    with pytest.raises(OSError, match='no write at 4194304'):
        copier.run(Checkpoint())
    assert all(c.offset <= 4 * MiB for c in saved if c.layer == 0), saved
    assert copier.buffers.free.qsize() == copier.buffers.made
    assert target.data[:4 * MiB] == _PATTERN[:4 * MiB]


class CountingStream(Stream):
    """An image file in memory whose every read is a request, merged as
    HTTP merges them; its siblings (backing files) count into the same
    list."""

    request_size = 16 * MiB
    merge_gap = 128 << 10
    merge_limit = 4 * MiB

    def __init__(self, files: Dict[str, bytes], name: str, requests: List[Tuple[str, int]]) -> None:
        self.files, self.name, self.requests = files, name, requests
        self.description = f'counted {name}'

    @classmethod
    def from_spec(cls, spec, ctx):
        raise NotImplementedError

    def size(self) -> int:
        return len(self.files[self.name])

    def _read(self, offset: int, length: int) -> bytes:
        self.requests.append((self.name, length))
        return self.files[self.name][offset:offset + length]

    def sibling(self, name: str) -> 'CountingStream':
        return CountingStream(self.files, name, self.requests)


def _qemu(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope='module')
def chain(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Dict[str, bytes], bytes]:
    """A 3-deep qcow2 chain of 32 MiB, each layer with clusters in every
    chunk: the base all of it, the others a cluster in every MiB; and what
    QEMU reads of it."""
    tmp = tmp_path_factory.mktemp('chain')
    _qemu('qemu-img', 'create', '-f', 'qcow2', 'base.qcow2', '32M', cwd=tmp)
    _qemu('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 32M', 'base.qcow2', cwd=tmp)
    for name, under, at, fill in (('mid', 'base', 256 << 10, 0x22),
                                  ('top', 'mid', 640 << 10, 0x33)):
        _qemu('qemu-img', 'create', '-f', 'qcow2', '-b', f'{under}.qcow2', '-F', 'qcow2',
              f'{name}.qcow2', '32M', cwd=tmp)
        writes = [c for i in range(32) for c in ('-c', f'write -P {fill} {i * MiB + at} 64k')]
        _qemu('qemu-io', '-f', 'qcow2', *writes, f'{name}.qcow2', cwd=tmp)
    _qemu('qemu-img', 'convert', '-O', 'raw', 'top.qcow2', 'top.raw', cwd=tmp)
    files = {f'{n}.qcow2': (tmp / f'{n}.qcow2').read_bytes() for n in ('base', 'mid', 'top')}
    return files, (tmp / 'top.raw').read_bytes()


def _requests(files: Dict[str, bytes], group: int, expected: bytes) -> List[Tuple[str, int]]:
    """The requests a copy of the chain makes in groups of ``group`` chunks
    (opening it aside)."""
    requests: List[Tuple[str, int]] = []
    with QcowFormat.open_chain(CountingStream(files, 'top.qcow2', requests)) as fmt:
        opened = len(requests)
        target = MemoryTarget(32 * MiB)
        _copy(fmt, target, group)
    assert target.data == expected
    return requests[opened:]


def test_a_qcow2_chains_read_size_is_its_layers(chain: Tuple[Dict[str, bytes], bytes]) -> None:
    """Any layer's stream worth 16 MiB reads makes the chain worth them:
    the copier then reads it in groups of four chunks."""
    files, _ = chain
    top = CountingStream(files, 'top.qcow2', [])
    top.request_size = 0
    with QcowFormat.open_chain(top) as fmt:
        assert fmt.read_size == 16 * MiB
        assert CopyOptions().fitted(4 * MiB, fmt.read_size).group == 4
    files = {'top.qcow2': files['base.qcow2']}
    alone = CountingStream(files, 'top.qcow2', [])
    alone.request_size = 0
    with QcowFormat.open_chain(alone) as fmt:
        assert fmt.read_size == 0


def test_a_qcow2_chain_read_in_groups_takes_fewer_requests(
        chain: Tuple[Dict[str, bytes], bytes]) -> None:
    """Besides each layer's L2 table: per chunk, each layer is a request
    (24 for 8 chunks); four chunks read together merge the upper layers'
    clusters across them into one request each, and the base's reads into
    requests of the stream's limit (4 MiB)."""
    files, expected = chain
    per_chunk = _requests(files, 1, expected)
    grouped = _requests(files, 4, expected)
    assert len(per_chunk) == 3 + 24, per_chunk
    assert len(grouped) == 3 + 2 * (1 + 1 + 4), grouped
    assert ('top.qcow2', 16 * 64 << 10) in grouped


class S3Like(CountingStream):
    """Merges what lies within 1 MiB, up to 16 MiB a request."""

    merge_gap = 1 * MiB
    merge_limit = 16 * MiB


def test_a_raw_source_read_in_groups_is_a_request_per_group() -> None:
    from rbd_migration.formats.raw import RawFormat
    requests: List[Tuple[str, int]] = []
    data = _PATTERN[:30 * MiB]
    fmt = RawFormat(S3Like({'disk.raw': data}, 'disk.raw', requests))
    target = MemoryTarget(30 * MiB)
    _copy(fmt, target, fmt.read_size // (4 * MiB))
    assert target.data == data
    assert sorted(requests) == [('disk.raw', 14 * MiB), ('disk.raw', 16 * MiB)]


def test_raw_pieces_past_the_end_read_as_zeros() -> None:
    from rbd_migration.formats.raw import RawFormat
    requests: List[Tuple[str, int]] = []
    fmt = RawFormat(S3Like({'disk.raw': _PATTERN[:5 * MiB]}, 'disk.raw', requests))
    views = [memoryview(bytearray(b'\xff' * (2 * MiB))) for _ in range(4)]
    fmt.read_pieces([(2 * i * MiB, view) for i, view in enumerate(views)])
    assert b''.join(views) == _PATTERN[:5 * MiB] + bytes(3 * MiB)
    assert requests == [('disk.raw', 5 * MiB)]
    # Wholly past the end, next to a piece inside: only the inside is read.
    views = [memoryview(bytearray(b'\xff' * MiB)) for _ in range(2)]
    fmt.read_pieces([(4 * MiB, views[0]), (5 * MiB + 100, views[1])])
    assert bytes(views[0]) == _PATTERN[4 * MiB:5 * MiB] and bytes(views[1]) == bytes(MiB)
    assert requests[1:] == [('disk.raw', MiB)]
    with pytest.raises(ValueError, match='bad read'):
        fmt.read_pieces([(-1, views[0])])
