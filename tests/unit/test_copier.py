"""The copy loop's pure logic: chunking, zero runs, and a checkpoint that
never passes a chunk whose write failed.  (Behaviour against real RBD
images is tested on the cluster, tests/cluster/test_adapter.py.)"""
import os
import random
import threading
import time
from typing import Callable, Iterator, List, Optional

import pytest

from rbd_migration.engine.copier import (BLOCK, Checkpoint, Copier, CopyOptions,
                                         _chunks, _runs)
from rbd_migration.formats.base import Extent, ExtentKind, Format, Snapshot

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


def test_options_fit_whole_objects_and_a_streams_request_size() -> None:
    base = CopyOptions(chunk=4 * MiB, window=8, readers=4)
    assert base.fitted(4 * MiB) == base

    def held(o: CopyOptions) -> int:
        return (o.window + o.readers) * o.chunk

    # Larger objects: whole objects per chunk, no more buffer bytes held.
    big = base.fitted(8 * MiB)
    assert (big.chunk, big.window, big.readers) == (8 * MiB, 4, 2)
    assert held(big) == held(base)
    # A source whose requests are worth 16 MiB: fewer, larger chunks, never
    # fewer than two in the window and one reader.
    s3 = base.fitted(4 * MiB, 16 * MiB)
    assert (s3.chunk, s3.window, s3.readers) == (16 * MiB, 2, 1)
    assert held(s3) == held(base)
    # Rounded up to whole objects.
    odd = base.fitted(4 * MiB, 10 * MiB)
    assert odd.chunk == 12 * MiB and (odd.window, odd.readers) == (2, 2)
    assert held(odd) == held(base)
    tiny = CopyOptions(window=1, readers=4).fitted(4 * MiB, 16 * MiB)
    assert (tiny.window, tiny.readers) == (2, 1)
    # Huge objects: three buffers, whatever they cost (a chunk is an object).
    huge = base.fitted(64 * MiB)
    assert (huge.chunk, huge.window, huge.readers) == (64 * MiB, 2, 1)


def test_raw_read_size_is_its_streams() -> None:
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
