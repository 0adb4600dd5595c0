"""qcow (version 1) and qcow2 (versions 2 and 3) images, read natively.

Following QEMU's docs/interop/qcow2.txt and block/qcow.c: a two-level table
(L1 -> L2) maps each guest cluster to a host cluster in the file, to a
compressed cluster, to zeros, or to nothing (the backing file shows through).
Internal snapshots are other L1 tables, sharing L2 tables and clusters with
HEAD and each other: what changed between two of them is where their L2
entries differ, found without reading a cluster (``exact_diffs``).  Only
what reading needs is parsed: refcounts and bitmaps are ignored, nothing is
ever written.

Reads are safe from several threads: nothing keeps a seek position, the
caches take a lock, and the streams underneath are thread-safe.

Every number in the file is chosen by whoever wrote it, so each is checked
against ``SourceLimits`` (the context's ``limits``) before anything is
allocated or looped over: the snapshot count, the backing chain's depth,
the L1 tables' sizes.  Memory stays within ``metadata_bytes`` for the whole
chain: the active L1 tables are held (QEMU caps each at 32 MiB), everything
else (L2 tables, their decoded runs, snapshot L1 tables) lives in one LRU
cache with what the L1 tables leave of that budget.  Walks over tables call
the context's ``check()``, so a cancel or the probe's deadline ends them.

Past the virtual size, reads return zeros (as raw images do); data clusters
past the end of the file read as zeros too, as in QEMU (``qemu-img convert``
reads them so, and ``qemu-img check`` reports them), while metadata (L1 and
L2 tables, the snapshot table) past the end is reported as corruption.  Such
data is reported as ``FormatFeatures.data_past_end``: librbd imports it
differently.

The reading is in four parts, as QEMU's block/qcow2*.c and librbd's
migration/QCOW* split it: ``qcow_header`` parses and checks the header,
its extensions and the snapshot table; ``qcow_mapping`` turns L1 and L2
tables into runs of guest bytes; ``qcow_cache`` bounds what the chain holds
in memory; this module opens the chain and reads through it.
"""
import array
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument, Unsupported
from ..streams import open_stream
from ..streams.base import Stream
from .base import (Extent, ExtentKind, Format, FormatFeatures, PieceReader, Snapshot,
                   coalesce, zero_fill)
from .deflate import Bytes
from .detect import SNIFF_LENGTH, sniff
from .qcow_cache import _Budget
from .qcow_header import (COMPRESSION_TYPES, CRYPT_METHODS, INCOMPAT_DIRTY,
                          MetadataReader, QcowSnapshot)
from .qcow_mapping import (_DECOMPRESSORS, _EXTENT_KIND, ClusterMap, _Run,
                           _RunKind, _merge_runs, _show_through)

#: What the compression scan's set of L2 table offsets (so that tables
#: shared by snapshots are read once) costs an entry; it may take a quarter
#: of ``metadata_bytes``, past which some tables are read again rather than
#: the set growing with the image.
SEEN_ENTRY_BYTES = 72

_LAYER_IDS = itertools.count()


@dataclass
class _LayerReads:
    """What one layer reads for a set of pieces: its data clusters (stream
    offset, where to), its whole compressed clusters (stream offset, their
    stored bytes, where the decompressed cluster goes) and the guest ranges
    it leaves to the layer below."""

    data: List[Tuple[int, memoryview]] = field(default_factory=list)
    compressed: List[Tuple[int, bytearray, memoryview]] = field(default_factory=list)
    lower: List[Tuple[int, memoryview]] = field(default_factory=list)


@dataclass
class _Below:
    """What shows through unallocated clusters: the backing's extents
    (none without a backing), asked for ascending ranges."""

    extents: Iterator[Extent]
    pending: Optional[Extent] = None
    started: bool = False

    def over(self, start: int, end: int, gaps: bool) -> Iterator[Extent]:
        """The extents over ``[start, end)``, cut to it; with ``gaps``, ZERO
        where there are none (what the layer above had there is gone)."""
        pos = start
        while pos < end:
            ext = self._reaching(pos)
            if ext is None or ext.offset >= end:
                break
            if ext.offset > pos and gaps:
                yield Extent(pos, ext.offset - pos, ExtentKind.ZERO)
            pos = max(pos, ext.offset)
            stop = min(ext.end, end)
            yield Extent(pos, stop - pos, ext.kind)
            pos = stop
        if pos < end and gaps:
            yield Extent(pos, end - pos, ExtentKind.ZERO)

    def _reaching(self, pos: int) -> Optional[Extent]:
        """The first extent ending past ``pos``."""
        if not self.started:
            self.pending, self.started = next(self.extents, None), True
        while self.pending is not None and self.pending.end <= pos:
            self.pending = next(self.extents, None)
        return self.pending


class QcowFormat(PieceReader):
    """A qcow or qcow2 image on a stream.

    ``backing`` is the image under this one, when the caller has opened it;
    without it, reading a cluster this layer does not allocate is refused if
    the header names a backing file.  The format owns ``backing`` and closes
    it with itself.
    """

    def __init__(self, stream: Stream, backing: Optional[Format] = None,
                 ctx: Optional[SourceContext] = None,
                 budget: Optional['_Budget'] = None) -> None:
        """``budget`` is shared by the layers of one chain; ``ctx`` gives
        the limits and the stop and deadline that long walks check."""
        self._stream = stream
        self.backing = backing
        self._ctx = ctx if ctx is not None else SourceContext()
        self._budget = budget if budget is not None else _Budget(self._ctx)
        self._limits = self._budget.limits
        self._tag = next(_LAYER_IDS)   # this layer's keys in shared caches
        self._lock = threading.Lock()
        self._data_stream: Optional[Stream] = None
        self._file = MetadataReader(stream, self._ctx, self._limits)
        self.header = self._file.read_header()
        h = self.header
        self.extensions = self._file.read_extensions(h)
        self._file.check_features(h, self.extensions)
        self.backing_file = self._file.read_backing_name(h)
        self.backing_format = self.extensions.backing_format
        self._snapshots = self._file.read_snapshots(h)
        self._map = ClusterMap(
            h, self._file, self._ctx, self._budget.metadata, self._tag,
            largest_size=max([h.size] + [s.disk_size
                                         for s in self._snapshots]))
        self._budget.pin(h.l1_size * 8, self._file.where)
        self._l1 = self._map.load_l1(h.l1_table_offset, h.l1_size)
        self._features = self._static_features()
        self._features_lock = threading.Lock()
        self._scanned = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'QcowFormat':
        stream = open_stream(spec['stream'], ctx)
        try:
            return cls.open_chain(stream, ctx)
        except BaseException:
            stream.close()
            raise

    @classmethod
    def open_chain(cls, stream: Stream, ctx: Optional[SourceContext] = None,
                   depth: int = 0,
                   budget: Optional['_Budget'] = None) -> 'QcowFormat':
        """The image on ``stream`` with its backing chain attached: each
        backing file is found next to its overlay, through the same kind of
        stream (a file beside the file, a URL beside the URL, a key beside
        the key in the bucket), and is qcow2 or raw.  ``depth`` layers are
        already open above this one; all share one ``budget``."""
        ctx = ctx if ctx is not None else SourceContext()
        budget = budget if budget is not None else _Budget(ctx)
        top = cls(stream, ctx=ctx, budget=budget)
        if top.backing_file is None:
            return top
        try:
            layers = depth + 2
            if layers > ctx.limits.chain_depth:
                raise InvalidArgument(
                    f'{top._file.where}: ' + ctx.limits.refuse(
                        'chain_depth', 'the qcow2 backing chain (layers)',
                        layers) + '; or flatten part of it with `qemu-img '
                    'convert`')
            under = stream.sibling(top.backing_file)
            try:
                head = under.read(0, SNIFF_LENGTH)
                if sniff(head) == 'qcow':
                    top.backing = cls.open_chain(under, ctx, depth + 1, budget)
                else:
                    from .raw import RawFormat
                    top.backing = RawFormat(under, ctx=ctx)
            except BaseException:
                under.close()
                raise
        except BaseException:
            top.close()
            raise
        return top

    # -- features -------------------------------------------------------------

    def _static_features(self) -> FormatFeatures:
        h = self.header
        features = FormatFeatures(
            encrypted=h.crypt_method != 0,
            backing_file=self.backing_file,
            external_data_file=self.extensions.data_file
            if h.has_data_file else None,
            extended_l2=h.extended_l2,
            compression_type=COMPRESSION_TYPES[h.compression_type],
            open_tables=8 * (h.l1_size + sum(s.l1_size for s in self._snapshots)))
        if h.version == 1:
            features.notes.append('qcow version 1')
        if h.incompatible_features & INCOMPAT_DIRTY:
            features.notes.append(
                'the image is marked dirty: it may be open in a running VM')
        if h.crypt_method:
            features.notes.append(
                f'encrypted with {CRYPT_METHODS[h.crypt_method]}')
        if self.backing_format:
            features.notes.append(f'backing file format: '
                                  f'{self.backing_format}')
        return features

    @property
    def features(self) -> FormatFeatures:  # type: ignore[override]
        """Computed on first use: knowing whether anything is compressed, or
        lies past the end of the file, means reading every L2 table, which
        opening should not cost."""
        with self._features_lock:
            if not self._scanned:
                compressed, past_end = self._scan_tables()
                self._features.compressed = compressed
                self._features.data_past_end = past_end
                self._scanned = True
            return self._features

    def _scan_tables(self) -> Tuple[bool, bool]:
        """Whether any L2 table reachable from HEAD or a snapshot maps a
        compressed cluster, and whether any maps data past the end of the
        file.  Each table is read once (L1 tables and L2 tables that
        snapshots share are not read again), not cached."""
        compressed = past_end = False
        seen: Set[int] = set()
        most = self._limits.metadata_bytes // (4 * SEEN_ENTRY_BYTES)
        for l1 in self._all_l1s():
            index = self._map.next_used(l1, 0)
            while index < len(l1):
                self._ctx.check()
                offset = self._map.l2_offset(l1, index)
                if offset and offset not in seen:
                    if len(seen) < most:
                        seen.add(offset)
                    c, p = self._map.scan_table(offset)
                    compressed, past_end = compressed or c, past_end or p
                    if compressed and past_end:
                        return True, True
                index = self._map.next_used(l1, index + 1)
        return compressed, past_end

    def _all_l1s(self) -> Iterator['array.array[int]']:
        """HEAD's L1 table, then each snapshot's, one at a time (not
        cached: a scan should not evict what reads use) and each distinct
        one once."""
        yield self._l1
        done = {(self.header.l1_table_offset, self.header.l1_size)}
        for s in self._snapshots:
            if (s.l1_table_offset, s.l1_size) not in done:
                done.add((s.l1_table_offset, s.l1_size))
                yield self._map.load_l1(s.l1_table_offset, s.l1_size)

    # -- Format interface -----------------------------------------------------

    def size(self, snap: Optional[Snapshot] = None) -> int:
        if snap is None:
            return self.header.size
        return self._snapshot(snap).disk_size

    def snapshots(self) -> List[Snapshot]:
        return [Snapshot(s.name, s.disk_size, ident=s.ident)
                for s in self._snapshots]

    @property
    def read_size(self) -> int:
        """The largest of the chain's streams': this file's, an external
        data file's once opened (a sibling, through the same kind of
        stream), the layers' below."""
        sizes = [self._stream.request_size]
        data = self._data_stream
        if data is not None:
            sizes.append(data.request_size)
        if self.backing is not None:
            sizes.append(self.backing.read_size)
        return max(sizes)

    def own_extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """What this layer maps: data (plain or compressed) and explicit
        zeros.  Unallocated ranges are left out; they read from the backing
        file, or as zeros when there is none."""
        runs = self._runs(self._l1_for(snap), 0, self.size(snap))
        return coalesce(Extent(r.offset, r.length, _EXTENT_KIND[r.kind])
                         for r in runs if r.kind != _RunKind.UNALLOCATED)

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """This layer's extents, and where it maps nothing, those of an
        attached backing format (whose HEAD sits under every snapshot)."""
        own = self.own_extents(snap)
        if self.backing is None:
            return own
        size = self.size(snap)
        lower = self.backing.extents()
        return coalesce(_show_through(own, lower, size))

    #: What changed between two states is what their L2 entries say.
    exact_diffs = True

    def changed_extents(self, prev: Optional[Snapshot],
                        snap: Optional[Snapshot]) -> Iterator[Extent]:
        """The clusters whose L2 entries differ between ``prev``'s and
        ``snap``'s tables (``ClusterMap.changed_clusters``), as ``snap``
        reads them: DATA, ZERO, and where ``snap`` maps nothing, the
        backing's extents with ZERO in their gaps (that backing's HEAD lies
        under every state alike, so what neither maps is unchanged).  Past
        ``prev``'s size, what ``snap`` has (the copier grows the target
        with zeros).  Both states are read from the file as it is now, so
        this holds for any two, in either order."""
        if prev is None:
            return self.extents(snap)
        return coalesce(self._changed(self._l1_for(prev), self.size(prev), snap))

    def _changed(self, old: 'array.array[int]', old_size: int,
                 snap: Optional[Snapshot]) -> Iterator[Extent]:
        """``changed_extents`` from the L1 table ``old`` of a state of
        ``old_size`` bytes; the backing's extents are walked once, as the
        ranges ascend."""
        cs = self.header.cluster_size
        size = self.size(snap)
        common = min(old_size, size)
        l1 = self._l1_for(snap)
        below = _Below(self.backing.extents() if self.backing is not None else iter(()))
        for first, end in self._map.changed_clusters(old, l1, -(-common // cs)):
            yield from self._as_read(l1, first * cs, min(end * cs, common), below, True)
        if common < size:
            yield from self._as_read(l1, common, size, below, False)

    def _as_read(self, l1: 'array.array[int]', start: int, end: int,
                 below: '_Below', gaps: bool) -> Iterator[Extent]:
        """``[start, end)`` as the table ``l1`` reads it; where it maps
        nothing, the backing's extents, and ZERO in their gaps if ``gaps``."""
        for run in _merge_runs(self._runs(l1, start, end)):
            if run.kind == _RunKind.UNALLOCATED:
                yield from below.over(run.offset, run.end, gaps)
            else:
                yield Extent(run.offset, run.length, _EXTENT_KIND[run.kind])

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        """Every piece mapped to runs first, then read together: this
        layer's data and whole compressed clusters with one ``read_pieces``
        of its stream (over HTTP or S3, a few merged requests instead of one
        per cluster), what it leaves unallocated with one ``read_pieces``
        of the layer below, zeros filled in place."""
        reads = _LayerReads()
        for offset, view in pieces:
            self._check_read(offset, len(view))
            end = min(offset + len(view), self.size(snap))
            pos = 0
            if offset < end:
                l1 = self._l1_for(snap)
                for run in _merge_runs(self._runs(l1, offset, end)):
                    self._plan_run(run, view[pos:pos + run.length], reads)
                    pos += run.length
            zero_fill(view[pos:])
        self._read_planned(reads)

    def _plan_run(self, run: _Run, view: memoryview, reads: '_LayerReads') -> None:
        cs = self.header.cluster_size
        if run.kind == _RunKind.ZERO:
            zero_fill(view)
        elif run.kind == _RunKind.UNALLOCATED:
            reads.lower.append((run.offset, view))
        elif run.kind == _RunKind.COMPRESSED and run.offset % cs == 0 \
                and run.length == cs:
            reads.compressed.append((run.host, bytearray(run.csize), view))
        elif run.kind == _RunKind.COMPRESSED:   # in part: through the cache
            within = run.offset % cs
            view[:] = memoryview(self._decompressed(run.host, run.csize))[
                within:within + run.length]
        else:
            reads.data.append((run.host, view))

    def _read_planned(self, reads: '_LayerReads') -> None:
        """This layer's reads, then the layer below's; at once, the below's
        in a thread of its own, where the chain is read over the network:
        each layer's requests then overlap the others' (one after the
        other, a group of a 3-deep chain waited for four answers in turn)."""
        below: Optional[_Beside] = None
        if reads.lower and self.backing is not None and self.backing.read_size:
            below = _Beside(self._read_lower_pieces, reads.lower)
        try:
            self._read_own(reads)
        except BaseException:
            if below is not None:
                below.join(quiet=True)      # this layer's error is the one told
            raise
        if below is not None:
            below.join()
        elif reads.lower:
            self._read_lower_pieces(reads.lower)

    def _read_own(self, reads: '_LayerReads') -> None:
        compressed = [(host, memoryview(buf)) for host, buf, _ in reads.compressed]
        if self.header.has_data_file:
            # The data file is opened only when a read needs it.
            data_counts = self._data().read_pieces(reads.data) if reads.data else []
            counts = self._stream.read_pieces(compressed)
        else:
            both = self._stream.read_pieces(reads.data + compressed)
            data_counts, counts = both[:len(reads.data)], both[len(reads.data):]
        for (_, view), n in zip(reads.data, data_counts):
            zero_fill(view[n:])   # past the end of the file: zeros, as QEMU
        for (host, buf, view), n in zip(reads.compressed, counts):
            self._inflate_into(host, memoryview(buf)[:n], view)

    def _read_lower_pieces(self, pieces: List[Tuple[int, memoryview]]) -> None:
        if self.backing is None:
            for _, view in pieces:
                self._without_backing(view)
            return
        size = self.backing.size()
        inside = []
        for offset, view in pieces:
            n = max(0, min(offset + len(view), size) - offset)
            zero_fill(view[n:])
            if n:
                inside.append((offset, view[:n]))
        self.backing.read_pieces(inside)

    def _check_read(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        if self.header.crypt_method:
            raise Unsupported(
                f'{self._file.where}: the image is encrypted '
                f'({CRYPT_METHODS[self.header.crypt_method]}), which is not '
                f'supported; decrypt it with `qemu-img convert` first')

    def close(self) -> None:
        with self._lock:
            data, self._data_stream = self._data_stream, None
        if data is not None:
            data.close()
        if self.backing is not None:
            self.backing.close()
        self._stream.close()

    # -- snapshots and mapping ------------------------------------------------

    def _snapshot(self, snap: Snapshot) -> QcowSnapshot:
        for s in self._snapshots:
            if s.ident == snap.ident and s.name == snap.name:
                return s
        raise InvalidArgument(f"{self._file.where}: the image has no "
                              f"snapshot '{snap.name}' (id {snap.ident})")

    def _l1_for(self, snap: Optional[Snapshot]) -> 'array.array[int]':
        if snap is None:
            return self._l1
        return self._snapshot_l1(self._snapshot(snap))

    def _snapshot_l1(self, s: QcowSnapshot) -> 'array.array[int]':
        def load() -> Tuple[Any, int]:
            table = self._map.load_l1(s.l1_table_offset, s.l1_size)
            return table, len(table) * 8
        table: 'array.array[int]' = self._budget.metadata.get(
            ('l1', self._tag, s.l1_table_offset, s.l1_size), load)
        return table

    def _runs(self, l1: 'array.array[int]', start: int,
              end: int) -> Iterator[_Run]:
        """What guest bytes ``[start, end)`` are, in order, as the L1 table
        ``l1`` (HEAD's or a snapshot's) maps them."""
        return self._map.runs(l1, start, end)

    # -- reading --------------------------------------------------------------

    def _without_backing(self, view: memoryview) -> None:
        """What shows through where this layer maps nothing and no backing
        image is attached: zeros, unless the header names a backing file."""
        if self.backing_file:
            raise Unsupported(
                f"{self._file.where}: the image has a backing file "
                f"'{self.backing_file}', which is not opened here; flatten "
                f"the chain with `qemu-img convert -O qcow2` first")
        zero_fill(view)

    def _data(self) -> Stream:
        """The stream holding guest clusters: this file, or the external data
        file, opened on first use."""
        if not self.header.has_data_file:
            return self._stream
        with self._lock:
            if self._data_stream is None:
                self._data_stream = self._open_data_file()
            return self._data_stream

    def _open_data_file(self) -> Stream:
        name = self.extensions.data_file or ''
        try:
            return self._stream.sibling(name)
        except NotImplementedError:
            raise Unsupported(f"{self._file.where}: the image keeps its data "
                              f"in the external file '{name}', which cannot "
                              f"be reached through this stream type; convert "
                              f"it with `qemu-img convert` first") from None

    def _inflate_into(self, host: int, raw: Bytes, out: memoryview) -> None:
        """The compressed cluster stored at ``host`` (``raw``), whole, in
        ``out`` (a cluster long)."""
        decompress = _DECOMPRESSORS[self.header.compression_type]
        try:
            made = decompress(raw, out)
        except ValueError as e:
            raise self._file.corrupt(
                f'the compressed cluster at {host:#x} does not '
                f'decompress ({e})') from None
        if made != len(out):
            raise self._file.corrupt(
                f'the compressed cluster at {host:#x} decompresses to '
                f'{made} bytes, not {len(out)}')

    def _inflate(self, host: int, raw: Bytes) -> bytes:
        """The compressed cluster stored at ``host`` (``raw``), whole."""
        out = bytearray(self.header.cluster_size)
        self._inflate_into(host, raw, memoryview(out))
        return bytes(out)

    def _decompressed(self, host: int, csize: int) -> bytes:
        """The cluster at ``host``, decompressed and cached, for a cluster
        read in part (the read of its other part finds it).  Whole clusters
        are inflated where they are read and never cached: a copy reads
        whole clusters, and caching them would hold 16 MiB per running task
        for nothing."""
        cs = self.header.cluster_size

        def load() -> Tuple[Any, int]:
            return self._inflate(host, self._stream.read(host, csize)), cs
        data: bytes = self._budget.clusters.get(('z', self._tag, host), load)
        return data


class _Beside:
    """A call run in a thread of its own while the caller goes on; ``join``
    waits for it and raises what it raised.  The caller always joins, even
    when it fails itself: the call writes into the caller's buffers."""

    def __init__(self, call: Callable[..., None], *args: Any) -> None:
        self._error: Optional[BaseException] = None

        def run() -> None:
            try:
                call(*args)
            except BaseException as e:  # handed to join
                self._error = e
        self._thread = threading.Thread(target=run, daemon=True,
                                        name='rbd_migration-chain-read')
        self._thread.start()

    def join(self, quiet: bool = False) -> None:
        self._thread.join()
        if self._error is not None and not quiet:
            raise self._error
