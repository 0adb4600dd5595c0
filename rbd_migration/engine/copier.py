"""The adapter engine's copy loop: a Format into an RBD image.

Snapshots are reproduced oldest first, then HEAD; for each, only what the
format says changed since the previous one is considered, and of that only
what differs from what the target already holds is written.  All-zero data
is never written on a fresh layer, so the target stays as sparse as the
data allows.  A few reader threads read chunks (consecutive ones in groups
where the source's every read is a request: the format then merges the
chunks' reads) and hand their data to librbd's asynchronous writes, with
at most ``window`` chunks read and not yet on the target: memory is
bounded whatever the image size, and many writes are in flight without a
thread waiting on each (reading a qcow2 chain is Python work, and more
threads than cores only contend for the GIL).
A checkpoint (layer, offset below which everything is written) is handed to
the caller every few seconds, so an interrupted copy resumes there.
"""
import functools
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple

import rbd

from ..errors import Cancelled
from ..formats.base import Extent, ExtentKind, Format, Snapshot, coalesce
from ..rbd_errors import translate

#: Zero detection granularity inside a chunk.
BLOCK = 64 << 10


@dataclass
class CopyOptions:
    chunk: int = 4 << 20
    #: Chunks read and not yet written, at most.
    window: int = 8
    #: Threads that read chunks (never more than ``window``).
    readers: int = 4
    #: Bytes per second written at most; 0 for no limit.
    bandwidth: float = 0.0
    checkpoint_interval: float = 5.0
    #: Consecutive chunks read with one ``read_pieces`` (at most ``window``).
    group: int = 1

    def fitted(self, object_size: int, read_size: int = 0) -> 'CopyOptions':
        """These options for a target with ``object_size`` objects and a
        source whose reads are worth ``read_size`` bytes each.  Chunks are
        whole objects (no object is written by two workers), at least
        ``chunk`` long; a copy holds up to ``window + readers`` chunk
        buffers (a reader takes one before the chunk it replaces has given
        its own back), so objects larger than the chunk mean fewer of them,
        within what the defaults hold: with 16 MiB objects, two in the
        window and one reader.  A source worth ``read_size`` reads gets
        groups of chunks that long read together (the format then merges
        each layer's units across the chunks into few requests), each chunk
        still in the window with a buffer of its own: no more memory, and
        no more readers than the window has groups."""
        unit = max(1, object_size)
        chunk = -(-max(self.chunk, unit) // unit) * unit
        window, readers = self.window, self.readers
        if chunk > self.chunk:
            held = (self.window + self.readers) * self.chunk
            buffers = max(3, held // chunk)
            window = max(2, buffers * self.window // (self.window + self.readers))
            readers = max(1, min(self.readers, buffers - window))
        group = max(1, min(window, -(-read_size // chunk)))
        readers = max(1, min(readers, window // group))
        return replace(self, chunk=chunk, window=window, readers=readers, group=group)


@dataclass(frozen=True)
class Checkpoint:
    layer: int = 0     # index into snapshots + [HEAD]
    offset: int = 0    # everything of that layer below it is written

    def encode(self) -> str:
        return f'{self.layer}:{self.offset}'

    @classmethod
    def decode(cls, text: Optional[str]) -> 'Checkpoint':
        try:
            layer, offset = (text or '').split(':')
            return cls(int(layer), int(offset))
        except ValueError:
            return cls()


@dataclass
class CopyStats:
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0


class RateLimiter:
    """A token bucket shared by the workers."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, amount: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + amount / self.rate
        if start > now:
            time.sleep(start - now)


#: Data extents of one chunk closer than this are copied as one: a snapshot
#: diff of scattered 4 KiB writes would otherwise be a read and a write per
#: write (measured: 16,384 of them from another cluster took 3 s more than
#: reading their chunks whole).  The bytes between are the source's as they
#: were at the previous layer, which the target already holds, so writing
#: them again changes nothing.
MERGE_GAP = 256 << 10


def _chunks(extents: Iterator[Extent], chunk: int, start: int) -> Iterator[Extent]:
    """Extents cut at chunk boundaries, skipping what lies below ``start``."""
    for ext in extents:
        pos, end = max(ext.offset, start), ext.end
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            yield Extent(pos, stop - pos, ext.kind)
            pos = stop


def _merged(extents: Iterator[Extent], chunk: int, gap: int = MERGE_GAP) -> Iterator[Extent]:
    """Data extents within one chunk and ``gap`` of each other, fused; cut
    at chunk boundaries first, so an extent that runs into a chunk fuses
    with the ones after it there (uncut, the chain's first 1 to 5 MiB and
    7 to 12 MiB left 4 to 5 and 7 to 8 MiB as two extents of one chunk, and
    111 groups of at most 4 chunks read a 1 GiB disk where 64 do)."""
    def near(a: Extent, b: Extent) -> bool:
        return (a.kind is b.kind is ExtentKind.DATA and b.offset - a.end <= gap
                and a.offset // chunk == (b.end - 1) // chunk)
    return coalesce(_chunks(extents, chunk, 0), near)


def _planned(extents: Iterator[Extent], chunk: int, group: int,
             fresh: bool, whole: bool = False) -> Iterator[Extent]:
    """What a layer's copy walks.  On a fresh layer: without the ZERO
    extents (the target holds zeros already, so they cost nothing but would
    end a group), and, when chunks are read in groups, with the data of a
    chunk fused whole: each extent takes a place in the window and a
    buffer, so a chunk whose data lies in several pieces (a chain's base
    between its overlays' extents) would otherwise fill a group with one
    chunk's pieces and leave the next chunk's reads unmerged.  The gaps
    between are what the source leaves unallocated, read as zeros without a
    request and not written.  On a later layer the gaps hold earlier layers'
    data, which fusing would fetch again from their files (an export-diff
    chain over http: 18 MiB more read and written), so only MERGE_GAP.
    ``whole``: a fresh chunk's data fused always, for targets written a
    chunk at a time."""
    if not fresh:
        return _merged(extents, chunk)
    data = (e for e in extents if e.kind is ExtentKind.DATA)
    return _merged(data, chunk, MERGE_GAP if group <= 1 and not whole else chunk)


_ZERO_BLOCK = bytes(BLOCK)
#: A block whose first bytes are not all zero needs no full comparison.
_PROBE = 16
_ZERO_PROBE = bytes(_PROBE)


@functools.lru_cache(maxsize=4)
def _zeros(length: int) -> bytes:
    """Zeros to compare whole chunks with (a copy has one or two sizes)."""
    return bytes(length)


def _all_zero(data: bytes) -> bool:
    return data == _zeros(len(data))


def _runs(data: bytes, base: int) -> List[Tuple[int, bytes]]:
    """Non-zero runs of ``data`` at BLOCK granularity, as (offset, bytes).

    This runs under the GIL, which every command of the mgr waits for, so
    it does as little as it can: comparisons are of ``bytes`` (a C memcmp,
    where memoryviews compare element by element), against constants (no
    4 MiB of zeros allocated per chunk), and a block is compared whole only
    when its first bytes are zero (dense data never copies a block)."""
    if _all_zero(data):
        return []
    runs: List[Tuple[int, bytes]] = []
    start = None
    for pos in range(0, len(data), BLOCK):
        empty = (data[pos:pos + _PROBE] == _ZERO_PROBE[:min(_PROBE, len(data) - pos)]
                 and data[pos:pos + BLOCK] == _ZERO_BLOCK[:min(BLOCK, len(data) - pos)])
        if not empty and start is None:
            start = pos
        elif empty and start is not None:
            runs.append((base + start, data[start:pos]))
            start = None
    if start is not None:
        runs.append((base + start, data if start == 0 else data[start:]))
    return runs


class Copier:
    #: Whether a fresh layer's chunk is written from one piece of data
    #: (``_writes`` then sees all of a chunk's runs at once).
    WHOLE_CHUNKS = False

    def __init__(self, fmt: Format, image: rbd.Image, options: CopyOptions,
                 progress: Callable[[int, int], bool],
                 checkpoint: Callable[[Checkpoint], None]) -> None:
        self.fmt = fmt
        self.image = image
        self.opts = options
        self.progress = progress
        self.save_checkpoint = checkpoint
        self.limiter = RateLimiter(options.bandwidth)
        # A failed write's buffer may stay with librbd; the copy stops then.
        self.buffers = _Buffers(options.chunk, options.window + options.readers)
        self.stats = CopyStats()
        self._lock = threading.Lock()

    def layers(self) -> List[Optional[Snapshot]]:
        return [*self.fmt.snapshots(), None]

    def run(self, start: Checkpoint) -> CopyStats:
        layers = self.layers()
        existing = {s['name'] for s in self.image.list_snaps()}
        for index, snap in enumerate(layers):
            if index < start.layer or (snap is not None and snap.name in existing):
                continue  # done before an interruption
            prev = layers[index - 1] if index > 0 else None
            offset = start.offset if index == start.layer else 0
            self._copy_layer(index, len(layers), prev, snap, offset)
            if snap is not None:
                self.image.create_snap(snap.name)
            self.save_checkpoint(Checkpoint(index + 1, 0))
        return self.stats

    def _copy_layer(self, index: int, count: int, prev: Optional[Snapshot],
                    snap: Optional[Snapshot], offset: int) -> None:
        size = self.fmt.size(snap)
        if self.image.size() != size:
            self.image.resize(size)
        fresh = index == 0  # the target holds nothing yet: zeros are free
        landing = _Landing(self.opts.window)
        last_saved = time.monotonic()

        def report(pos: int) -> None:
            nonlocal last_saved
            total = count * max(size, 1)
            if not self.progress(index * max(size, 1) + min(pos, size), total):
                raise Cancelled('cancelled')
            now = time.monotonic()
            if now - last_saved >= self.opts.checkpoint_interval:
                last_saved = now
                self.save_checkpoint(Checkpoint(index, pos))

        pool = ThreadPoolExecutor(max_workers=max(1, min(self.opts.readers, self.opts.window)),
                                  thread_name_prefix='rbd_migration copy')
        group = _Group(self.opts.chunk, max(1, min(self.opts.group, self.opts.window)))

        def submit() -> None:
            if group.exts:
                pool.submit(self._copy_chunks, group.take(), snap, fresh, landing)
        try:
            changed = _planned(self.fmt.changed_extents(prev, snap), self.opts.chunk,
                               group.most, fresh, self.WHOLE_CHUNKS)
            for ext in _chunks(changed, self.opts.chunk, offset):
                if not group.joins(ext):
                    submit()
                # Room for one more; the first error.  The chunks of the group
                # being gathered are in the window and not yet submitted, but
                # fewer than ``group.most`` <= ``window``: a full window holds
                # a submitted chunk too, which lands (or fails), so this wait
                # ends.
                landing.enter(ext.offset)
                group.exts.append(ext)
                if group.full():
                    submit()
                report(landing.low(ext.end))
            submit()
            landing.drain()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            landing.quiesce()  # no write may land after the caller moves on
        report(size)

    def _copy_chunks(self, exts: List[Extent], snap: Optional[Snapshot], fresh: bool,
                     landing: '_Landing') -> None:
        try:
            self._copy(exts, snap, fresh, landing)
        except BaseException as e:
            landing.failed(e)

    def _copy(self, exts: List[Extent], snap: Optional[Snapshot], fresh: bool,
              landing: '_Landing') -> None:
        """Read a ZERO extent, or a group of DATA chunks, and write what the
        target lacks of them; a chunk has landed (``landing.landed``) once
        all its writes completed."""
        ext = exts[0]
        try:
            if ext.kind is ExtentKind.ZERO:
                if not fresh:
                    self.image.write_zeroes(ext.offset, ext.length)
                    self._count(zeroed=ext.length)
                return landing.landed(ext.offset)
            bufs = self._read_chunks(exts, snap)
            for i, (ext, buf) in enumerate(zip(exts, bufs)):
                try:
                    self._write_data(ext, fresh, landing, buf)
                except BaseException:
                    self.buffers.forget()  # a write issued may still hold it
                    for unwritten in bufs[i + 1:]:
                        self.buffers.give(unwritten)
                    raise
        except rbd.Error as e:
            raise translate(e, f'writing the target at offset {ext.offset}')
        return None

    def _read_chunks(self, exts: List[Extent], snap: Optional[Snapshot]) -> List[bytearray]:
        """The chunks' data, each in a buffer of its own, read together: the
        format plans all their units at once, so each layer's reads merge
        across the chunks' boundaries.  One chunk is read with
        ``read_into``, which every format has."""
        bufs: List[bytearray] = []
        try:
            for _ in exts:
                bufs.append(self.buffers.take())
            views = [memoryview(buf)[:ext.length] for buf, ext in zip(bufs, exts)]
            if len(views) == 1:
                self.fmt.read_into(exts[0].offset, views[0], snap)
            else:
                self.fmt.read_pieces([(ext.offset, view) for ext, view in zip(exts, views)],
                                     snap)
        except BaseException:
            for _ in bufs:
                self.buffers.forget()  # as after a write: not known to be let go
            raise
        self._count(read=sum(ext.length for ext in exts))
        return bufs

    def _write_data(self, ext: Extent, fresh: bool, landing: '_Landing',
                    buf: bytearray) -> None:
        """The data of a chunk, read into ``buf``, written where the target
        lacks it; ``buf`` goes back to the pool once nothing refers to it
        any more."""
        data = buf if ext.length == len(buf) else buf[:ext.length]
        if not fresh and not self.fmt.exact_diffs:
            if self.image.read(ext.offset, ext.length) == data:
                self._count(skipped=ext.length)
                return self._done(buf, landing, ext.offset)
        runs = _runs(data, ext.offset)
        if not fresh:
            # Not a fresh layer: what is zero now must be zero on the target.
            if not runs:
                self.image.write_zeroes(ext.offset, ext.length)
                self._count(zeroed=ext.length)
                return self._done(buf, landing, ext.offset)
            runs = [(ext.offset, data)]
        if not runs:
            return self._done(buf, landing, ext.offset)
        writes = self._writes(runs)
        chunk = _ChunkWrites(ext.offset, len(writes), landing, self._count,
                             lambda: self.buffers.give(buf))
        for write in writes:
            self.limiter.take(write.length)
            landing.issued()
            try:
                self._issue(write, chunk.callback(write.offset, write.length))
            except BaseException:
                landing.completed()
                chunk.abandon()
                raise
        return None

    def _writes(self, runs: List[Tuple[int, bytes]]) -> List['Write']:
        """The writes that put a chunk's non-zero runs on the target: one
        each, through librbd."""
        return [Write(off, len(run), run) for off, run in runs]

    def _issue(self, write: 'Write', done: Callable[[Any], None]) -> None:
        self.image.aio_write(write.data, write.offset, done)

    def _done(self, buf: bytearray, landing: '_Landing', offset: int) -> None:
        self.buffers.give(buf)
        landing.landed(offset)

    def _count(self, read: int = 0, written: int = 0, zeroed: int = 0,
               skipped: int = 0) -> None:
        with self._lock:
            self.stats.bytes_read += read
            self.stats.bytes_written += written
            self.stats.bytes_zeroed += zeroed
            self.stats.bytes_skipped += skipped


@dataclass(frozen=True)
class Write:
    """One asynchronous write of a chunk: where, how many bytes of data,
    and what is sent."""

    offset: int
    length: int
    data: bytes


@dataclass
class _Group:
    """Chunks read together: consecutive DATA chunks of one aligned region
    of ``most`` chunks (so a group never passes a region's end, whatever
    chunks are missing), or a ZERO extent alone."""

    chunk: int
    most: int
    exts: List[Extent] = field(default_factory=list)

    def joins(self, ext: Extent) -> bool:
        if not self.exts:
            return True
        span = self.chunk * self.most
        return ext.kind is ExtentKind.DATA and ext.offset // span == self.exts[0].offset // span

    def full(self) -> bool:
        """Nothing more can join: read it now, not when the next extent
        comes (finding it may take a while)."""
        last = self.exts[-1]
        return (last.kind is ExtentKind.ZERO or len(self.exts) >= self.most
                or last.end % (self.chunk * self.most) == 0)

    def take(self) -> List[Extent]:
        exts, self.exts = self.exts, []
        return exts


class _Buffers:
    """The chunk buffers of one copy: at most ``count``, made on first use
    and reused, so a copy does not allocate (and fault in) 4 MiB per chunk."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.count = max(1, count)
        self.made = 0
        self.lock = threading.Lock()
        self.free: 'queue.SimpleQueue[bytearray]' = queue.SimpleQueue()

    def take(self) -> bytearray:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            with self.lock:
                make = self.made < self.count
                self.made += make
            return bytearray(self.size) if make else self.free.get()

    def give(self, buf: bytearray) -> None:
        self.free.put(buf)

    def forget(self) -> None:
        """One buffer will not come back: another may be made instead."""
        with self.lock:
            self.made -= 1


class _Landing:
    """Chunks read and not yet on the target: at most ``window`` of them
    (what bounds memory); the lowest (below it everything landed: the
    checkpoint); the first error of a read or write, which stops the copy;
    and librbd writes issued but not completed, which must all have
    completed before the copy returns."""

    def __init__(self, window: int) -> None:
        self.window = max(1, window)
        self.cv = threading.Condition()
        self.in_flight: Set[int] = set()
        self.outstanding = 0
        self.error: Optional[BaseException] = None

    def enter(self, offset: int) -> None:
        with self.cv:
            while len(self.in_flight) >= self.window and self.error is None:
                self.cv.wait()
            self._raise()
            self.in_flight.add(offset)

    def landed(self, offset: int) -> None:
        with self.cv:
            self.in_flight.discard(offset)
            self.cv.notify_all()

    def failed(self, error: BaseException) -> None:
        """A chunk that failed stays in flight: the checkpoint holds below
        it until the error surfaces and the copy stops."""
        with self.cv:
            if self.error is None:
                self.error = error
            self.cv.notify_all()

    def low(self, default: int) -> int:
        with self.cv:
            self._raise()
            return min(self.in_flight) if self.in_flight else default

    def drain(self) -> None:
        with self.cv:
            while self.in_flight and self.error is None:
                self.cv.wait()
            self._raise()

    def issued(self) -> None:
        with self.cv:
            self.outstanding += 1

    def completed(self) -> None:
        with self.cv:
            self.outstanding -= 1
            self.cv.notify_all()

    def quiesce(self) -> None:
        with self.cv:
            while self.outstanding:
                self.cv.wait()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class _ChunkWrites:
    """The librbd writes of one chunk; it has landed when all completed
    without error, and its buffer is free once all completed.  Callbacks run
    on librbd's completion thread: short."""

    def __init__(self, offset: int, writes: int, landing: _Landing,
                 count: Callable[..., None], release: Callable[[], None]) -> None:
        self.offset = offset
        self.left = writes
        self.ok = True
        self.landing = landing
        self.count = count
        self.release = release
        self.lock = threading.Lock()

    def abandon(self) -> None:
        """A write could not be issued: the chunk never lands, and its
        buffer is left to whichever write still holds it."""
        with self.lock:
            self.ok = False
            self.left = -1

    def callback(self, offset: int, length: int) -> Callable[[Any], None]:
        """What a write's completion (librbd's or librados') calls."""
        def done(completion: Any) -> None:
            try:
                ret = completion.get_return_value()
                if ret < 0:
                    self.ok = False
                    self.landing.failed(translate(
                        rbd.OSError('write failed', errno=-ret),
                        f'writing the target at offset {offset}'))
                else:
                    self.count(written=length)
                with self.lock:
                    self.left -= 1
                    last = self.left == 0
                if last:
                    self.release()
                    if self.ok:
                        self.landing.landed(self.offset)
            finally:
                self.landing.completed()
        return done
