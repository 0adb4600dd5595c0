"""Any format as a plain qcow2 file, synthesized on demand: the decoded view
a live import serves to librbd.

librbd 16.2's qcow reader imports correctly only plain qcow2 (no compressed
clusters, backing file, extended L2 or external data file; see
docs/librbd-limits.rst).  :class:`QcowView` presents the bytes of such a
file for any :class:`~rbd_migration.formats.base.Format`: version 3, each
of the format's snapshots (oldest first) with its own L1 table, name and
disk size, then HEAD.  Metadata comes first, data after; nothing is written
anywhere, every byte is computed when it is read, and a data cluster is read
from the format at its layer (``read_pieces`` at that snapshot), so a
compressed qcow2 chain or an export-diff chain reads as it decodes.

Cluster size: 1 MiB (``CLUSTER_BITS`` 20).  librbd reads one whole cluster
per stream request and keeps only the last one, so a 4 MiB object costs 4
requests to the mgr (64 at QEMU's default 64 KiB).  An L2 table is one
cluster and maps 128 GiB, so a 10 TiB disk has an L1 of 80 entries per
layer: librbd loads every layer's L1 at each open of the target, which is
what costs at 64 KiB clusters (160 KiB per layer there).  Its L2 cache holds
16 tables, at most 16 MiB in a client that walks the whole disk.  2 MiB
clusters would halve the requests but double what a cluster only partly
covered by data writes to the target, and halve the host space librbd
compares (below).

Host layout.  Clusters ``[0, data_start)`` are metadata: the header, one L1
table per layer, the snapshot table, the refcount table and blocks, then
one L2 table per layer and L1 entry in use.  Data slots follow, placed by
arithmetic (:class:`HostLayout`): layer ``j``'s copy of guest cluster ``c``
lies at ``q * period + data_start + j * per_layer + r`` with ``q, r =
divmod(c, per_layer)``, so nothing but the runs of ``clusters.py`` is kept
to answer any read.  A cluster unchanged since layer ``k`` points at layer
``k``'s slot in every later layer's table, as qcow2 snapshots share
clusters, so librbd copies it once.

Why the period.  librbd 16.2 finds what changed between two snapshots by
comparing their L2 entries through the mask meant for compressed cluster
offsets, ``(1 << (63 - cluster_bits)) - 1``: only the low 43 bits at 1 MiB
clusters (8 TiB of host offsets).  Two layers' slots of one guest cluster
must differ in those bits, or librbd takes a changed cluster for an
unchanged one and the snapshot imports wrong; and no data slot may have
them all zero, or it compares equal to an unallocated entry.  Slots are
therefore laid out in periods of ``2 ** (63 - 2 * cluster_bits)`` clusters
whose first ``data_start`` are never used: a small disk fits in the first
period whole; a large one takes ``per_layer`` clusters of each layer per
period.

ZERO extents.  An entry is the zero flag only where some earlier layer had
data in that cluster, and unallocated otherwise (nothing shows through, as
there is no backing file).  librbd lists a zero flag as a zeroed extent and
an unchanged unallocated entry as nothing, so its deep copy zeroes what the
target's previous snapshot held there and does not touch (or create) an
object where no layer ever had data: the target stays as sparse as the
source, at cluster granularity.  (librbd lists the unallocated entries of
the first table of each L1 range, oldest layer first, as data; it reads
nothing for them.  Real qcow2 files import the same way.)

Refcounts are valid (refcount order 4, 16-bit): each metadata cluster
counts 1, each data slot the number of layers whose tables point at it,
synthesized per refcount block on demand; HEAD's entries carry the
``copied`` flag exactly where the count is 1.  librbd never reads them;
QEMU needs a refcount table to open the file and ``qemu-img check`` finds
no error in it.

Bounds.  At most ``MAX_SNAPSHOTS`` snapshots (librbd's per-snapshot cost in
the mgr, docs/librbd-limits.rst); HEAD's size a multiple of 512 bytes
(librbd's reader refuses any other).  The view holds the format's cluster
runs (within ``source_max_metadata_bytes``), the L1 tables and snapshot
table (bytes per layer), and a bounded cache of built L2 tables, refcount
blocks and range maps.
"""
import bisect
import struct
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument, MigrationError
from ..formats import open_format
from ..formats.base import Format, zero_fill
from ..formats.qcow_cache import _LruCache
from ..probe import LIBRBD_MAX_SNAPSHOTS
from ..streams.base import Stream
from .clusters import NONE, ZERO, ClusterIndex, RangeMap

CLUSTER_BITS = 20
REFCOUNT_ORDER = 4
#: Snapshots a view gives librbd at most: it holds about 60 KiB in the mgr
#: per snapshot each time it opens the image (see ``probe``).
MAX_SNAPSHOTS = LIBRBD_MAX_SNAPSHOTS
#: librbd refuses a qcow2 image whose size is not a multiple of this.
SECTOR = 512
#: QEMU keeps host offsets in bits 9-55 of an L2 entry.
MAX_HOST_BYTES = 1 << 56
#: L2 entry flag: the cluster's refcount is exactly 1.
COPIED = 1 << 63
#: L2 entry flag (v3): the cluster reads as zeros.
ZERO_FLAG = 1
#: Built L2 tables and refcount blocks kept, in bytes.
TABLE_CACHE_BYTES = 4 << 20
#: Guest bytes of one layer read from the format at once when librbd asks
#: for any cluster of them: librbd reads a 4 MiB object as four 1 MiB
#: clusters, each its own request to the endpoint, and over HTTP or S3 each
#: was its own source request (measured: 1,028 per GiB against the hidden
#: path's 74; with windows, 260).  Windows are kept in an
#: LRU of WINDOW_CACHE_BYTES (the window read, those read ahead, and one
#: more), one load at a time per window.
WINDOW = 4 << 20
WINDOW_CACHE_BYTES = 16 << 20
#: Windows loaded ahead of the one asked for, in the background: librbd
#: sends all its reads on one connection, answered in order, so without
#: them each window's source request waits for the one before.  Two, not
#: more: decoding further ahead only competes for the CPU with the copy
#: (measured on 2 cores, 1 GiB compressed qcow2 over HTTP: 6.6 s at two
#: ahead and 16 MiB kept, 7.2 s at four and 24 MiB; outside the mgr, 10.4 s
#: at eight against 7.0 at four), and
#: each window held costs the mgr (53 to 57 MiB per running execute at two,
#: 79 to 85 at four).
READ_AHEAD = 2
#: What every refusal suggests instead.
ADAPTER = 'import it with "rbd_migration": {"engine": "adapter"}'

_HEADER = struct.Struct('>4sIQIIQIIQQIIQQQQII')
_SNAPSHOT = struct.Struct('>QIHHIIQII')
#: vm_state_size_large, disk_size, icount (all ones: none).
_SNAPSHOT_EXTRA = struct.Struct('>QQQ')
_NO_ICOUNT = (1 << 64) - 1
_MAX_NAME = 0xffff


def _big_endian(values: 'array[int]') -> bytes:
    if sys.byteorder == 'little':
        values.byteswap()
    return values.tobytes()


@dataclass(frozen=True)
class HostLayout:
    """Where each host cluster (slot) lies; see the module docstring."""

    layers: int
    clusters: int
    period: int
    snapshot_start: int
    refcount_table_start: int
    refcount_block_start: int
    refcount_blocks: int
    l2_start: int
    data_start: int
    per_layer: int
    end: int

    @classmethod
    def plan(cls, layers: int, clusters: int, period: int, l2_tables: int,
             snapshot_clusters: int, cluster_bits: int) -> 'HostLayout':
        """The layout, with as many refcount blocks as its own end needs
        (found by growing them until they cover it)."""
        entries = (8 << cluster_bits) >> REFCOUNT_ORDER
        blocks = table = 1
        while True:
            snapshot_start = 1 + layers
            table_start = snapshot_start + snapshot_clusters
            block_start = table_start + table
            l2_start = block_start + blocks
            data_start = l2_start + l2_tables
            room = (period - data_start) // layers
            if room < 1:
                raise InvalidArgument(
                    f'source-spec: the source needs {data_start} clusters '
                    f'of qcow2 metadata, more than a live view can place; '
                    f'{ADAPTER}')
            per_layer = max(1, min(clusters, room))
            end = data_start
            if clusters:
                q, r = divmod(clusters - 1, per_layer)
                end = q * period + data_start + (layers - 1) * per_layer + r + 1
            need_blocks = -(-end // entries)
            need_table = -(-(8 * need_blocks) >> cluster_bits)
            if need_blocks <= blocks and need_table <= table:
                return cls(layers, clusters, period, snapshot_start, table_start,
                           block_start, blocks, l2_start, data_start, per_layer,
                           end)
            blocks, table = max(blocks, need_blocks), max(table, need_table)

    def slot(self, layer: int, cluster: int) -> int:
        q, r = divmod(cluster, self.per_layer)
        return q * self.period + self.data_start + layer * self.per_layer + r

    def locate(self, slot: int) -> Optional[Tuple[int, int]]:
        """(layer, guest cluster) of a data slot; None for a slot no layer
        uses."""
        q, within = divmod(slot, self.period)
        if within < self.data_start:
            return None
        layer, r = divmod(within - self.data_start, self.per_layer)
        cluster = q * self.per_layer + r
        if layer >= self.layers or cluster >= self.clusters:
            return None
        return layer, cluster

    def runs(self, layer: int, lo: int, hi: int) -> Iterator[Tuple[int, int, int]]:
        """Guest clusters ``[lo, hi)`` of ``layer`` as (start, end, first
        slot) pieces whose slots are consecutive (cut where periods end)."""
        while lo < hi:
            end = min(hi, (lo // self.per_layer + 1) * self.per_layer)
            yield lo, end, self.slot(layer, lo)
            lo = end

    def data_pieces(self, lo: int, hi: int) -> Iterator[Tuple[int, int, int, int]]:
        """The data slots within ``[lo, hi)`` as (layer, first guest
        cluster, end guest cluster, first slot), ascending by slot."""
        last = (self.clusters - 1) // self.per_layer
        for q in range(lo // self.period, min(last, (hi - 1) // self.period) + 1):
            for layer in range(self.layers):
                first = q * self.period + self.data_start + layer * self.per_layer
                start, end = max(lo, first), min(hi, first + self.per_layer)
                c0 = q * self.per_layer + start - first
                c1 = min(self.clusters, q * self.per_layer + end - first)
                if c0 < c1:
                    yield layer, c0, c1, start


#: Window buffers kept for reuse once their windows are dropped: a fresh
#: 4 MiB buffer per load faulted in 1,024 pages (2.4 ms of a 6 ms window
#: over NBD), every time.
SPARE_WINDOWS = 2


@dataclass(eq=False)
class _Window:
    """A loaded window: guest offset ``start`` and its bytes ``data`` (a
    view of ``backing``).  ``pins`` readers copy from it outside the lock;
    its backing is reused only once it is dropped and none does."""

    start: int
    data: memoryview
    backing: bytearray
    pins: int = 0
    dropped: bool = False


class _Windows:
    """Loaded windows by (layer, index), least recently used dropped past
    ``budget`` bytes; a window is loaded once however many readers want it
    meanwhile (librbd asks for an object's clusters all at once).  The
    buffers of dropped windows are reused (``buffer``)."""

    def __init__(self, load: Callable[[int, int], _Window], budget: int) -> None:
        self._load = load
        self._budget = budget
        self._used = 0
        self._items: 'OrderedDict[Tuple[int, int], _Window]' = OrderedDict()
        self._loading: Dict[Tuple[int, int], threading.Event] = {}
        self._spare: List[bytearray] = []
        self._lock = threading.Lock()

    def buffer(self, start: int, n: int) -> _Window:
        """An unloaded window of ``n`` bytes at ``start``: a dropped window's
        buffer when one is spare and ``n`` is near a window's worth."""
        spare = None
        if WINDOW // 2 < n <= WINDOW:
            with self._lock:
                spare = self._spare.pop() if self._spare else None
        backing = spare or bytearray(WINDOW if n > WINDOW // 2 else n)
        return _Window(start, memoryview(backing)[:n], backing)

    def prefetch(self, layer: int, index: int, pool: ThreadPoolExecutor) -> None:
        """Load the window in ``pool`` unless it is held or being loaded;
        a failure is left for the reader that asks for it."""
        key = (layer, index)
        with self._lock:
            if key in self._items or key in self._loading:
                return
            self._loading[key] = threading.Event()
        try:
            pool.submit(self._fill, key)
        except RuntimeError:        # the pool is shut down: the view closed
            self._finish(key, None)

    def _fill(self, key: Tuple[int, int]) -> None:
        try:
            self._finish(key, self._load(*key))
        except Exception:
            self._finish(key, None)

    def _finish(self, key: Tuple[int, int], loaded: Optional[_Window]) -> None:
        with self._lock:
            if loaded is not None:
                if len(loaded.backing) <= self._budget:
                    self._items[key] = loaded
                    self._used += len(loaded.backing)
                else:
                    self._drop(loaded)
                while self._used > self._budget:
                    _, dropped = self._items.popitem(last=False)
                    self._used -= len(dropped.backing)
                    self._drop(dropped)
            loading = self._loading.pop(key, None)
        if loading is not None:
            loading.set()

    def _drop(self, window: _Window) -> None:
        """(Under the lock.)  Out of the cache; its buffer spare once no
        reader copies from it."""
        window.dropped = True
        if window.pins == 0 and len(window.backing) == WINDOW \
                and len(self._spare) < SPARE_WINDOWS:
            self._spare.append(window.backing)

    def get(self, layer: int, index: int) -> _Window:
        """The window, pinned: give it back with ``unpin``."""
        key = (layer, index)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                hit.pins += 1
                return hit
            loading = self._loading.get(key)
            if loading is None:
                self._loading[key] = threading.Event()
        if loading is not None:
            loading.wait()
            with self._lock:
                hit = self._items.get(key)
                if hit is not None:
                    hit.pins += 1
                    return hit
            # The load failed (or the window was dropped): load it here,
            # for this reader alone.
            own = self._load(layer, index)
            own.pins, own.dropped = 1, True
            return own
        loaded: Optional[_Window] = None
        try:
            loaded = self._load(layer, index)
            loaded.pins = 1
            return loaded
        finally:
            self._finish(key, loaded)

    def unpin(self, window: _Window) -> None:
        with self._lock:
            window.pins -= 1
            if window.pins == 0 and window.dropped:
                self._drop(window)

    def clear(self) -> None:
        """Drop every window and spare buffer; a reader still waiting for a
        load that will not come (its read-ahead was cancelled) loads it
        itself."""
        with self._lock:
            for window in self._items.values():
                window.dropped = True
            self._items.clear()
            self._spare.clear()
            self._used = 0
            for loading in self._loading.values():
                loading.set()
            self._loading.clear()


class QcowView(Stream):
    """The qcow2 file that presents ``fmt`` (which the view owns and
    closes).  ``compare_bits``: how many low bits of an L2 entry librbd
    compares between snapshots (``63 - cluster_bits`` in 16.2); it sets
    the period of the host layout."""

    def __init__(self, fmt: Format, ctx: Optional[SourceContext] = None,
                 cluster_bits: int = CLUSTER_BITS,
                 compare_bits: Optional[int] = None) -> None:
        self._fmt = fmt
        self._ctx = ctx if ctx is not None else SourceContext()
        self.description = 'the qcow2 view of the source'
        snapshots = fmt.snapshots()
        if len(snapshots) > MAX_SNAPSHOTS:
            raise InvalidArgument(
                f'source-spec: the source has {len(snapshots)} snapshots, and '
                f'librbd holds about 60 KiB in the mgr per snapshot each time '
                f'it opens the image: a live import takes {MAX_SNAPSHOTS} at '
                f'most; delete some from the source, or {ADAPTER}')
        size = fmt.size()
        if size % SECTOR:
            raise InvalidArgument(
                f"source-spec: the source is {size} bytes, not a multiple of "
                f"{SECTOR}, and librbd's qcow2 reader refuses such an image; "
                f"{ADAPTER}")
        self.cluster_bits = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        #: Guest clusters one L2 table maps.
        self.table_entries = cs // 8
        self.index = ClusterIndex(fmt, cluster_bits, self._ctx)
        layers = len(self.index.layers)
        self.l1_entries = -(-self.index.clusters // self.table_entries)
        if self.l1_entries > self.table_entries:
            raise InvalidArgument(
                f'source-spec: the source is {max(self.index.sizes)} bytes, '
                f'more than a live view maps ({self.table_entries ** 2 * cs}); '
                f'{ADAPTER}')
        self._tables = self._l2_tables()
        self._l2_first = [0]
        for indices in self._tables:
            self._l2_first.append(self._l2_first[-1] + len(indices))
        self._snapshot_table = self._snapshot_entries()
        bits = compare_bits if compare_bits is not None else 63 - cluster_bits
        self.layout = HostLayout.plan(
            layers, self.index.clusters, 1 << (bits - cluster_bits),
            self._l2_first[-1], -(-len(self._snapshot_table) // cs), cluster_bits)
        if self.layout.end * cs > MAX_HOST_BYTES:
            raise InvalidArgument(
                f'source-spec: the source would need a qcow2 file of '
                f'{self.layout.end * cs} bytes, past what qcow2 addresses; '
                f'{ADAPTER}')
        self._header = self._header_bytes()
        self._l1 = [self._l1_bytes(j) for j in range(layers)]
        self._refcount_table = self._refcount_table_bytes()
        self._built = _LruCache(TABLE_CACHE_BYTES)
        self._maps = _LruCache(
            lambda: max(0, self._ctx.limits.metadata_bytes - self.index.nbytes))
        self._last_map: Optional[Tuple[int, RangeMap]] = None
        self._windows = _Windows(self._load_window, WINDOW_CACHE_BYTES)
        self._ahead = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix='rbd_migration-view-ahead')

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'QcowView':
        """The view of the source a source-spec names."""
        fmt = open_format(spec, ctx)
        try:
            return cls(fmt, ctx)
        except BaseException:
            fmt.close()
            raise

    def size(self) -> int:
        return self.layout.end * self.cluster_size

    def close(self) -> None:
        super().close()
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._windows.clear()
        self._fmt.close()

    def opening_bytes(self) -> Tuple[int, List[Tuple[int, bytes]]]:
        """What librbd reads to open the view, as ``(end, pieces)``: every
        byte below ``end`` is zero but for the pieces (offset, bytes).  The
        header, the L1 tables, the snapshot table and the refcount table:
        a few KiB for most images, tens of KiB at 64 snapshots of a large
        one.  See ``live/pinned.py`` for why they are kept."""
        end = self.layout.refcount_block_start
        cs = self.cluster_size
        pieces = [(slot * cs, bytes(self._metadata(slot)).rstrip(b'\0'))
                  for slot in range(end)]
        return end * cs, [(at, data) for at, data in pieces if data]

    # -- metadata -------------------------------------------------------------

    def _l2_tables(self) -> List['array[int]']:
        """Per layer, the L1 entries that point at an L2 table: wherever
        that layer or an earlier one has data (the zero flag needs a
        table), so a table's range, once present, is in every later
        layer and librbd compares each later table with one."""
        seen = bytearray(self.l1_entries)
        out = []
        for owned in self.index.owned:     # every data cluster is owned once
            for start, end in owned:
                first, last = start // self.table_entries, (end - 1) // self.table_entries
                seen[first:last + 1] = b'\1' * (last + 1 - first)
            out.append(array('Q', (i for i, flag in enumerate(seen) if flag)))
        return out

    def _l2_slot(self, layer: int, position: int) -> int:
        return self.layout.l2_start + self._l2_first[layer] + position

    def _l1_bytes(self, layer: int) -> bytes:
        entries = array('Q', bytes(8 * self.l1_entries))
        copied = COPIED if layer == len(self._tables) - 1 else 0
        for position, i in enumerate(self._tables[layer]):
            entries[i] = self._l2_slot(layer, position) * self.cluster_size | copied
        return _big_endian(entries)

    def _snapshot_entries(self) -> bytes:
        out = bytearray()
        for j, snap in enumerate(self.index.layers[:-1]):
            ident = str(j + 1).encode()
            name = snap.name.encode('utf-8', 'surrogateescape') if snap else b''
            if len(name) > _MAX_NAME:
                raise InvalidArgument(
                    f'source-spec: snapshot {j} has a name of {len(name)} '
                    f'bytes, more than qcow2 holds ({_MAX_NAME}); {ADAPTER}')
            extra = _SNAPSHOT_EXTRA.pack(0, self.index.sizes[j], _NO_ICOUNT)
            out += _SNAPSHOT.pack((1 + j) * self.cluster_size, self.l1_entries,
                                  len(ident), len(name), 0, 0, 0, 0, len(extra))
            out += extra + ident + name
            out += bytes(-len(out) % 8)
        return bytes(out)

    def _header_bytes(self) -> bytes:
        cs, lay = self.cluster_size, self.layout
        snapshots = len(self.index.layers) - 1
        return _HEADER.pack(
            b'QFI\xfb', 3, 0, 0, self.cluster_bits, self.index.sizes[-1], 0,
            self.l1_entries, lay.layers * cs, lay.refcount_table_start * cs,
            lay.refcount_block_start - lay.refcount_table_start, snapshots,
            lay.snapshot_start * cs if snapshots else 0, 0, 0, 0,
            REFCOUNT_ORDER, _HEADER.size)

    def _refcount_table_bytes(self) -> bytes:
        lay = self.layout
        return _big_endian(array('Q', (
            (lay.refcount_block_start + b) * self.cluster_size
            for b in range(lay.refcount_blocks))))

    def _metadata(self, slot: int) -> bytes:
        """The bytes of metadata cluster ``slot`` (zeros past them)."""
        lay, cs = self.layout, self.cluster_size
        if slot == 0:
            return self._header
        if slot < lay.snapshot_start:
            return self._l1[slot - 1]
        if slot < lay.refcount_table_start:
            at = (slot - lay.snapshot_start) * cs
            return self._snapshot_table[at:at + cs]
        if slot < lay.refcount_block_start:
            at = (slot - lay.refcount_table_start) * cs
            return self._refcount_table[at:at + cs]
        if slot < lay.l2_start:
            block = slot - lay.refcount_block_start
            return self._cached(('refcounts', block), lambda: self._refcount_block(block))
        rel = slot - lay.l2_start
        layer = bisect.bisect_right(self._l2_first, rel) - 1
        index = self._tables[layer][rel - self._l2_first[layer]]
        return self._cached(('l2', layer, index), lambda: self._l2_table(layer, index))

    def _cached(self, key: Tuple[Any, ...], build: Any) -> bytes:
        def load() -> Tuple[bytes, int]:
            data = build()
            return data, len(data)
        value: bytes = self._built.get(key, load)
        return value

    def _range_map(self, index: int) -> RangeMap:
        """The clusters L1 entry ``index`` maps, across every layer.  The
        last one is kept even past the cache's budget: librbd reads every
        layer's table of a range one after the other."""
        last = self._last_map
        if last is not None and last[0] == index:
            return last[1]

        def load() -> Tuple[RangeMap, int]:
            lo = index * self.table_entries
            rm = self.index.range_map(lo, min(self.index.clusters, lo + self.table_entries))
            return rm, rm.nbytes
        value: RangeMap = self._maps.get(index, load)
        self._last_map = (index, value)
        return value

    def _l2_table(self, layer: int, index: int) -> bytes:
        """Layer ``layer``'s L2 table for L1 entry ``index``."""
        lo = index * self.table_entries
        hi = min(self.index.clusters, lo + self.table_entries)
        rm = self._range_map(index)
        codes = rm.codes[layer]
        entries = array('Q', bytes(self.cluster_size))
        head = layer == len(self._tables) - 1
        cs = self.cluster_size
        for start, end, s in rm.segments(lo, hi):
            code = codes[s]
            if code == NONE:
                continue
            if code == ZERO:
                entries[start - lo:end - lo] = array('Q', [ZERO_FLAG]) * (end - start)
                continue
            flag = COPIED if head and code == layer else 0
            for c0, c1, slot in self.layout.runs(code, start, end):
                entries[c0 - lo:c1 - lo] = array(
                    'Q', range(slot * cs | flag, (slot + c1 - c0) * cs | flag, cs))
        return _big_endian(entries)

    def _refcount_block(self, block: int) -> bytes:
        entries = (8 * self.cluster_size) >> REFCOUNT_ORDER
        lo, data_start = block * entries, self.layout.data_start
        counts = array('H', bytes(2 * entries))
        if lo < data_start:
            n = min(entries, data_start - lo)
            counts[:n] = array('H', [1]) * n
        for layer, c0, c1, slot in self.layout.data_pieces(max(lo, data_start),
                                                           lo + entries):
            for start, end, refs in self._refs(layer, c0, c1):
                at = slot + start - c0 - lo
                counts[at:at + end - start] = array('H', [refs]) * (end - start)
        return _big_endian(counts)

    def _refs(self, layer: int, lo: int, hi: int) -> Iterator[Tuple[int, int, int]]:
        """(start, end, count) over the clusters of ``[lo, hi)`` that
        ``layer`` owns: how many layers' tables point at its slot."""
        per = self.table_entries
        for start, end in self.index.owned[layer].clip(lo, hi):
            for index in range(start // per, (end - 1) // per + 1):
                rm = self._range_map(index)
                for a, b, s in rm.segments(max(start, index * per),
                                           min(end, (index + 1) * per)):
                    yield a, b, rm.refs(s, layer)

    # -- reading --------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_into(self, offset: int, view: memoryview) -> int:
        """Metadata from what is built, data clusters from the format: one
        ``read_pieces`` per layer for all the clusters of the read."""
        cs = self.cluster_size
        pieces: Dict[int, List[Tuple[int, memoryview]]] = {}
        pos = 0
        while pos < len(view):
            slot, within = divmod(offset + pos, cs)
            part = view[pos:pos + min(cs - within, len(view) - pos)]
            pos += len(part)
            if slot < self.layout.data_start:
                content = self._metadata(slot)[within:within + len(part)]
                part[:len(content)] = content
                zero_fill(part[len(content):])
                continue
            where = self.layout.locate(slot)
            if where is None or where[1] not in self.index.owned[where[0]]:
                zero_fill(part)
                continue
            layer, cluster = where
            guest = cluster * cs + within
            inside = max(0, min(len(part), self.index.sizes[layer] - guest))
            zero_fill(part[inside:])
            if inside:
                pieces.setdefault(layer, []).append((guest, part[:inside]))
        for layer, layer_pieces in pieces.items():
            for guest, part in layer_pieces:
                self._copy_windows(layer, guest, part)
        return len(view)

    def _copy_windows(self, layer: int, guest: int, part: memoryview) -> None:
        done = 0
        while done < len(part):
            at = guest + done
            index = at // WINDOW
            self._read_ahead(layer, index)
            window = self._windows.get(layer, index)
            try:
                start, data = window.start, window.data
                n = min(len(part) - done, (index + 1) * WINDOW - at, start + len(data) - at)
                if at < start or n <= 0:
                    raise MigrationError(f'the view read layer {layer} at {at}, which '
                                         'it does not own (a bug)')
                part[done:done + n] = data[at - start:at - start + n]
            finally:
                self._windows.unpin(window)
            done += n

    def _read_ahead(self, layer: int, index: int) -> None:
        """Start loading the next READ_AHEAD windows past ``index`` that
        hold clusters of ``layer``: librbd asks for nothing where the layer
        owns none, so windows of holes are passed over, not loaded (loading
        the next two windows whatever they held left a sparse source's data
        windows to be read on demand: 86 waits of 17 ms on average in 1 GiB
        over NBD, three quarters of the copy's time)."""
        cs, queued, last = self.cluster_size, 0, index
        for start, end in self.index.owned[layer].clip(-(-(index + 1) * WINDOW // cs),
                                                       self.index.clusters):
            for ahead in range(max(last + 1, start * cs // WINDOW), (end * cs - 1) // WINDOW + 1):
                self._windows.prefetch(layer, ahead, self._ahead)
                last, queued = ahead, queued + 1
                if queued == READ_AHEAD:
                    return

    def _load_window(self, layer: int, index: int) -> _Window:
        """Layer ``layer``'s window ``index``: the bytes from its first
        cluster the layer owns to its last, read in one ``read_pieces``
        (zeros between, never served)."""
        lo = index * WINDOW
        hi = min(lo + WINDOW, self.index.sizes[layer])
        cs = self.cluster_size
        spans = [(max(start * cs, lo), min(end * cs, hi)) for start, end
                 in self.index.owned[layer].clip(lo // cs, -(-hi // cs))]
        spans = [(a, b) for a, b in spans if a < b]
        if not spans:
            return self._windows.buffer(lo, 0)
        first = spans[0][0]
        window = self._windows.buffer(first, spans[-1][1] - first)
        view = window.data
        for (_, b), (a, _) in zip(spans, spans[1:]):
            zero_fill(view[b - first:a - first])    # a reused buffer's old bytes
        self._fmt.read_pieces([(a, view[a - first:b - first]) for a, b in spans],
                              self.index.layers[layer])
        return window

    def allocated(self, offset: int, length: int) -> Iterator[Tuple[int, int]]:
        """The metadata, and the data slots some layer's table points at;
        every other byte reads as zeros."""
        cs, end = self.cluster_size, offset + length
        for lo, hi in self._used_slots(offset // cs, -(-end // cs)):
            start, stop = max(offset, lo * cs), min(end, hi * cs)
            if start < stop:
                yield start, stop - start

    def _used_slots(self, lo: int, hi: int) -> Iterator[Tuple[int, int]]:
        data_start = self.layout.data_start
        if lo < data_start:
            yield lo, min(hi, data_start)
        for layer, c0, c1, slot in self.layout.data_pieces(max(lo, data_start), hi):
            for start, end in self.index.owned[layer].clip(c0, c1):
                yield slot + start - c0, slot + end - c0
