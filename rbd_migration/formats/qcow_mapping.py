"""Where a qcow layer keeps each guest byte: the L1 -> L2 cluster mapping.

Following QEMU's block/qcow2-cluster.c and block/qcow.c: an L1 entry names
an L2 table, an L2 entry names a host cluster, a compressed cluster, zeros
(qcow2 v3), or nothing (the backing file shows through); with extended L2
entries, each of a cluster's 32 subclusters is data, zero or nothing.
Tables decode to runs (guest ranges of one kind), merged so that a read
costs one stream request per contiguous host range, and cached by pieces;
two states' tables compare entry by entry to tell which clusters changed.
"""
import array
import bisect
import sys
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterable, Iterator, Optional, Tuple,
                    Union)

from ..context import SourceContext
from ..errors import Unsupported
from .base import Extent, ExtentKind
from .deflate import Bytes, inflate_raw_into
from .qcow_cache import _LruCache
from .qcow_header import MetadataReader, QcowHeader

# L1/L2 entry bits (qcow2).
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
OFFSET_MASK = 0x00fffffffffffe00
# qcow v1 has one flag: compressed, in bit 63.
V1_OFLAG_COMPRESSED = 1 << 63

SUBCLUSTERS = 32
#: Runs decoded per piece of an L2 table at most: a piece is decoded and
#: cached whole, so this bounds what one lookup costs (a 2 MiB-cluster table
#: with extended L2 entries could otherwise make 4 million runs).
RUN_PIECE = 4096
#: Bytes of an L1 table read at once, between calls to ``ctx.check()``.
L1_READ = 1 << 20
#: L1 entries looked at between calls to ``ctx.check()`` when skipping
#: unallocated ones.
L1_SCAN = 1 << 16


# --------------------------------------------------------------------------
# Mapping runs: what a range of guest bytes is made of


class _RunKind:
    UNALLOCATED = 'unallocated'  # backing file shows through, or zeros
    ZERO = 'zero'
    DATA = 'data'                # at ``host`` in the data file
    COMPRESSED = 'compressed'    # cluster compressed at ``host``, ``csize``


@dataclass(frozen=True)
class _Run:
    offset: int
    length: int
    kind: str
    host: int = 0
    csize: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def clip(self, start: int, end: int) -> '_Run':
        lo, hi = max(start, self.offset), min(end, self.end)
        if (lo, hi) == (self.offset, self.end):
            return self
        host = self.host + (lo - self.offset) \
            if self.kind == _RunKind.DATA else self.host
        return _Run(lo, hi - lo, self.kind, host, self.csize)


def _joinable(a: _Run, b: _Run) -> bool:
    if a.kind != b.kind or a.end != b.offset:
        return False
    if a.kind == _RunKind.DATA:
        return a.host + a.length == b.host
    return a.kind != _RunKind.COMPRESSED


def _merge_runs(runs: Iterable[_Run]) -> Iterator[_Run]:
    """Adjacent runs fused, so a read costs one stream request per
    contiguous host range rather than one per cluster."""
    pending: Optional[_Run] = None
    for run in runs:
        if pending is not None and _joinable(pending, run):
            pending = _Run(pending.offset, pending.length + run.length,
                           pending.kind, pending.host, pending.csize)
            continue
        if pending is not None:
            yield pending
        pending = run
    if pending is not None:
        yield pending


_EXTENT_KIND = {_RunKind.DATA: ExtentKind.DATA,
                _RunKind.COMPRESSED: ExtentKind.DATA,
                _RunKind.ZERO: ExtentKind.ZERO}

_KIND_CODES = (_RunKind.UNALLOCATED, _RunKind.ZERO, _RunKind.DATA,
               _RunKind.COMPRESSED)
_KIND_CODE = {kind: code for code, kind in enumerate(_KIND_CODES)}


class _Runs:
    """Contiguous runs from ``base`` to ``end``, packed in arrays (about 21
    bytes a run rather than a Python object each): what one piece of an L2
    table decodes to, as cached."""

    __slots__ = ('starts', 'hosts', 'csizes', 'kinds', 'end')

    def __init__(self, base: int) -> None:
        self.starts = array.array('Q')
        self.hosts = array.array('Q')
        self.csizes = array.array('I')
        self.kinds = bytearray()
        self.end = base

    def add(self, kind: str, start: int, end: int, host: int = 0,
            csize: int = 0) -> None:
        self.starts.append(start)
        self.hosts.append(host)
        self.csizes.append(csize)
        self.kinds.append(_KIND_CODE[kind])
        self.end = end

    def add_run(self, run: _Run) -> None:
        self.add(run.kind, run.offset, run.end, run.host, run.csize)

    @property
    def weight(self) -> int:
        """Bytes held, for the cache."""
        return 256 + 21 * len(self.kinds)

    def run(self, i: int) -> _Run:
        start = self.starts[i]
        stop = self.starts[i + 1] if i + 1 < len(self.kinds) else self.end
        return _Run(start, stop - start, _KIND_CODES[self.kinds[i]],
                    self.hosts[i], self.csizes[i])

    def clipped(self, lo: int, hi: int) -> Iterator[_Run]:
        """The runs over ``[lo, hi)``, cut to it."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.kinds) and self.starts[i] < hi:
            run = self.run(i)
            if run.end > lo:
                yield run.clip(lo, hi)
            i += 1


def _show_through(upper: Iterable[Extent], lower: Iterable[Extent],
                  end: int) -> Iterator[Extent]:
    """``upper``'s extents, with ``lower``'s in the gaps between them (up to
    ``end``): a layer over its backing file."""
    lower_it = iter(lower)
    pending = next(lower_it, None)

    def gap(start: int, stop: int) -> Iterator[Extent]:
        nonlocal pending
        while pending is not None and pending.offset < stop:
            lo, hi = max(pending.offset, start), min(pending.end, stop)
            if lo < hi:
                yield Extent(lo, hi - lo, pending.kind)
            if pending.end > stop:
                return
            pending = next(lower_it, None)

    pos = 0
    for ext in upper:
        yield from gap(pos, ext.offset)
        yield ext
        pos = ext.end
    yield from gap(pos, end)


# --------------------------------------------------------------------------
# Compressed clusters: what a compressed run's ``host`` and ``csize`` hold


def _inflate(data: Bytes, out: memoryview) -> int:
    """Raw deflate, 4 KiB window, as QEMU writes it, into ``out`` (a
    cluster); trailing bytes are the next cluster's and are ignored."""
    return inflate_raw_into(data, out, 12)


def _unzstd(data: Bytes, out: memoryview) -> int:
    """zstd frames until a whole cluster is out, as QEMU reads them."""
    cluster_size = len(out)
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise Unsupported(
            'source-spec: stream: the image has zstd-compressed clusters and '
            'the Python zstandard module is missing; install '
            'python3-zstandard on the mgr hosts') from None
    got = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            data, read_across_frames=True)
        while len(got) < cluster_size:
            chunk = reader.read(cluster_size - len(got))
            if not chunk:
                break
            got += chunk
    except zstandard.ZstdError as e:
        raise ValueError(f'zstd: {e}') from None
    out[:len(got)] = got
    return len(got)


#: By the header's ``compression_type``: a cluster's stored bytes into the
#: cluster, the count of bytes made.
_DECOMPRESSORS: Dict[int, Callable[[Bytes, memoryview], int]] = {
    0: _inflate, 1: _unzstd}


# --------------------------------------------------------------------------
# Table decoding without a Python step per entry


def _words(data: Union[bytes, bytearray]) -> 'array.array[int]':
    """Big-endian u64s as a compact array (8 bytes each, fast to index)."""
    words = array.array('Q', data)
    if sys.byteorder == 'little':
        words.byteswap()
    return words


#: Byte translations marking (with 1) the top byte of a compressed L2
#: entry: qcow2 (bit 62) and qcow v1 (bit 63).
_COMPRESSED_MARKS = {
    v1: bytes(1 if b & (0x80 if v1 else 0x40) else 0 for b in range(256))
    for v1 in (False, True)}


def _highest_host(raw: bytes, marks: bytes, h: QcowHeader) -> int:
    """At least the highest host offset a plain (not compressed) entry of
    the L2 table ``raw`` names, found without a Python step per entry:
    compressed entries and the flag byte are zeroed, then ``max``."""
    clean = bytearray(raw)
    step = 8 * h.entry_words
    at = marks.find(1)
    while at >= 0:
        clean[at * step:at * step + 8] = bytes(8)
        at = marks.find(1, at + 1)
    if h.version > 1:
        clean[0::8] = bytes(len(clean) // 8)   # flags and reserved bits
    return max(_words(clean)[0::h.entry_words], default=0)


#: The byte of a table entry, as the arrays hold it (native order), that
#: holds bit 63: qcow2's COPIED flag.
_COPIED_BYTE = 7 if sys.byteorder == 'little' else 0
#: Byte translations: bit 7 cleared; any non-zero byte to 1.
_CLEAR_TOP = bytes(b & 0x7f for b in range(256))
_NONZERO = bytes([0]) + bytes([1]) * 255


def _differing(a: 'array.array[int]', b: 'array.array[int]', step: int,
               flag: Optional[int]) -> Iterator[int]:
    """Indices of the ``step``-byte entries that differ between the tables
    ``a`` and ``b`` (the shorter padded with zeros), bit 7 of byte
    ``flag`` of each entry aside: found with C-speed operations over the
    tables, a Python step per differing entry only."""
    length = max(len(a), len(b)) * a.itemsize
    x = bytearray((int.from_bytes(a, 'little') ^ int.from_bytes(b, 'little'))
                  .to_bytes(length, 'little'))
    if flag is not None:
        x[flag::step] = x[flag::step].translate(_CLEAR_TOP)
    marks = x.translate(_NONZERO)
    at = marks.find(1)
    while at >= 0:
        index = at // step
        yield index
        at = marks.find(1, (index + 1) * step)


# --------------------------------------------------------------------------
# One layer's mapping


class ClusterMap:
    """One layer's L1 and L2 tables read as runs.  L2 tables and the runs
    they decode to are kept in the chain's metadata ``cache`` under this
    layer's ``tag``; entries past ``largest_size`` (the largest virtual
    size, HEAD's or a snapshot's) are not decoded."""

    def __init__(self, header: QcowHeader, file: MetadataReader,
                 ctx: SourceContext, cache: _LruCache, tag: int,
                 largest_size: int) -> None:
        self.header = header
        h = header
        #: L2 entries decoded at once: a piece of ``RUN_PIECE`` runs at most.
        self._piece = min(1 << h.l2_bits,
                          RUN_PIECE // (SUBCLUSTERS if h.extended_l2 else 1))
        self._largest_size = largest_size
        self._file = file
        self._ctx = ctx
        self._cache = cache
        self._tag = tag

    # -- tables ---------------------------------------------------------------

    def load_l1(self, offset: int, entries: int) -> 'array.array[int]':
        """Read in pieces: the table costs its own size (not twice that, as
        bytes and array), and a stop or the deadline ends a long read."""
        words = array.array('Q')
        end = offset + entries * 8
        for pos in range(offset, end, L1_READ):
            self._ctx.check()
            words.frombytes(self._file.read_exact(
                pos, min(L1_READ, end - pos), 'an L1 table'))
        if sys.byteorder == 'little':
            words.byteswap()
        return words

    def l2_offset(self, l1: 'array.array[int]', index: int) -> int:
        """The L2 table for L1 slot ``index``, 0 when unallocated."""
        if index >= len(l1):
            return 0
        entry = l1[index]
        if self.header.version == 1:
            return entry
        offset = entry & OFFSET_MASK
        if offset % self.header.cluster_size:
            raise self._file.corrupt(f'L2 table offset {offset:#x} (L1 index '
                                     f'{index}) is not cluster aligned')
        return offset

    def next_used(self, l1: 'array.array[int]', index: int) -> int:
        """The first L1 slot from ``index`` that names an L2 table, or
        ``len(l1)``: a walk over a large, mostly empty disk skips its
        unallocated slots a block at a time rather than one by one."""
        mask = OFFSET_MASK if self.header.version > 1 else ~0
        while index < len(l1):
            self._ctx.check()
            block = l1[index:index + L1_SCAN]
            if block.count(0) != len(block):
                for i, entry in enumerate(block):
                    if entry & mask:
                        return index + i
            index += len(block)
        return len(l1)

    def _l2_table(self, offset: int) -> 'array.array[int]':
        def load() -> Tuple[Any, int]:
            size = self.header.l2_table_bytes
            return _words(self._file.read_exact(offset, size,
                                                'an L2 table')), size
        table: 'array.array[int]' = self._cache.get(
            ('l2', self._tag, offset), load)
        return table

    # -- runs -----------------------------------------------------------------

    def runs(self, l1: 'array.array[int]', start: int,
             end: int) -> Iterator[_Run]:
        """What guest bytes ``[start, end)`` are, in order.  Unallocated L1
        slots in a row make one run; L2 tables are decoded by pieces."""
        span = self.header.l2_span
        piece = self._piece * self.header.cluster_size
        pos = start
        while pos < end:
            self._ctx.check()
            l1_index = pos // span
            l2_offset = self.l2_offset(l1, l1_index)
            if not l2_offset:
                used = self.next_used(l1, l1_index + 1)
                stop = end if used >= len(l1) else min(end, used * span)
                yield _Run(pos, stop - pos, _RunKind.UNALLOCATED)
                pos = stop
                continue
            table_base = l1_index * span
            base = table_base + (pos - table_base) // piece * piece
            stop = min(end, base + piece)
            yield from self._piece_runs(l2_offset, table_base,
                                        base).clipped(pos, stop)
            pos = stop

    def _piece_runs(self, l2_offset: int, table_base: int,
                    base: int) -> _Runs:
        """The piece of the L2 table at ``l2_offset`` (mapping guest bytes
        from ``table_base``) that maps guest bytes from ``base``, decoded
        once into merged runs: a read or an extent listing then costs a
        lookup, not Python work per cluster -- which bounded the copy of a
        qcow2 chain.  Entries past the largest virtual size are not
        decoded; a piece holds at most RUN_PIECE runs."""
        def load() -> Tuple[Any, int]:
            h = self.header
            table = self._l2_table(l2_offset)
            cs = h.cluster_size
            first = (base - table_base) // cs
            used = -(-(self._largest_size - base) // cs)
            count = max(0, min(self._piece, used))
            if h.version >= 2 and not h.extended_l2 and not h.has_data_file:
                runs = self._plain_table_runs(table, first, count, base)
            else:
                runs = _Runs(base)
                for run in _merge_runs(
                        run for i in range(count) for run in
                        self._decode(table, first + i, base + i * cs)):
                    runs.add_run(run)
            return runs, runs.weight
        found: _Runs = self._cache.get(
            ('runs', self._tag, l2_offset, base), load)
        return found

    def _plain_table_runs(self, table: 'array.array[int]', first: int,
                          count: int, base: int) -> _Runs:
        """``_decode`` and ``_merge_runs`` over ``count`` entries of an L2
        table from ``first`` in one loop, for the common layout (v2/v3,
        64-bit entries, no external data file): the same runs without a
        Python object per cluster, since every layer of a chain decodes its
        tables once per copy."""
        cs = self.header.cluster_size
        zero_ok = self.header.version >= 3
        runs = _Runs(base)
        kind: Optional[str] = None   # the run being built
        start = host0 = 0
        for index in range(first, first + count):
            entry = table[index]
            cluster = base + (index - first) * cs
            host = entry & OFFSET_MASK
            if entry & OFLAG_COMPRESSED or host % cs or (entry & OFLAG_ZERO and not zero_ok):
                # Compressed, or corrupt: ``_decode`` has the run or the error.
                if kind is not None:
                    runs.add(kind, start, cluster, host0)
                    kind = None
                for run in self._decode(table, index, cluster):
                    runs.add_run(run)
                continue
            if entry & OFLAG_ZERO:
                new, at = _RunKind.ZERO, 0
            elif host:
                new, at = _RunKind.DATA, host
            else:
                new, at = _RunKind.UNALLOCATED, 0
            if kind == new and (new != _RunKind.DATA or host0 + (cluster - start) == at):
                continue
            if kind is not None:
                runs.add(kind, start, cluster, host0)
            kind, start, host0 = new, cluster, at
        if kind is not None:
            runs.add(kind, start, base + count * cs, host0)
        return runs

    # -- differences ----------------------------------------------------------

    def changed_clusters(self, old: 'array.array[int]', new: 'array.array[int]',
                         count: int) -> Iterator[Tuple[int, int]]:
        """Ranges ``[first, end)`` of the guest clusters below ``count``
        whose L2 entries differ between the L1 tables ``old`` and ``new``
        (HEAD's or a snapshot's), ascending.  Snapshots share tables and
        clusters, and both tables are read from the file as it is now, so
        an entry alike in both (host offset, compressed descriptor, zero
        flag, subcluster bitmap) reads alike; an L2 table both name is
        skipped unread.  The COPIED flag only says whether a cluster is
        shared, and is ignored (but not with an external data file, where
        it marks allocation)."""
        h = self.header
        per = 1 << h.l2_bits
        slots = -(-count // per)
        flag = self._copied_byte(h)
        l1_flag = None if h.version == 1 else _COPIED_BYTE
        pending: Optional[Tuple[int, int]] = None
        for start in range(0, slots, L1_SCAN):
            self._ctx.check()
            stop = min(slots, start + L1_SCAN)
            a, b = old[start:stop], new[start:stop]
            if a == b:
                continue
            for slot in _differing(a, b, 8, l1_flag):
                self._ctx.check()
                slot += start
                tables = [self._l2_table(offset) if offset else array.array('Q')
                          for offset in (self.l2_offset(old, slot),
                                         self.l2_offset(new, slot))]
                for i in _differing(tables[0], tables[1], 8 * h.entry_words, flag):
                    cluster = slot * per + i
                    if cluster >= count:
                        break
                    if pending is not None and pending[1] == cluster:
                        pending = (pending[0], cluster + 1)
                        continue
                    if pending is not None:
                        yield pending
                    pending = (cluster, cluster + 1)
        if pending is not None:
            yield pending

    @staticmethod
    def _copied_byte(h: QcowHeader) -> Optional[int]:
        """Where an L2 entry's COPIED flag lies in the table's bytes, or
        None where that bit is no mere flag (qcow v1: compressed; an
        external data file: allocated)."""
        return None if h.version == 1 or h.has_data_file else _COPIED_BYTE

    # -- entries --------------------------------------------------------------

    def _decode(self, table: 'array.array[int]', index: int,
                cluster: int) -> Iterator[_Run]:
        """The runs of the guest cluster at ``cluster``, whose L2 entry is
        ``table[index]``."""
        h = self.header
        cs = h.cluster_size
        if h.version == 1:
            yield self._decode_v1(table[index], cluster)
            return
        entry = table[index * h.entry_words]
        if entry & OFLAG_COMPRESSED:
            if h.has_data_file:
                raise self._file.corrupt('a compressed cluster in an image '
                                         'with an external data file')
            shift = 62 - (h.cluster_bits - 8)
            host = entry & ((1 << shift) - 1)
            sector_mask = (1 << (h.cluster_bits - 8)) - 1
            sectors = ((entry >> shift) & sector_mask) + 1
            yield _Run(cluster, cs, _RunKind.COMPRESSED, host,
                       sectors * 512 - (host & 511))
            return
        host = entry & OFFSET_MASK
        allocated = host != 0 or (h.has_data_file
                                  and bool(entry & OFLAG_COPIED))
        if allocated and host % cs:
            raise self._file.corrupt(f'cluster offset {host:#x} is not '
                                     f'cluster aligned')
        if h.extended_l2:
            yield from self._decode_subclusters(
                table[index * 2 + 1], allocated, host, cluster)
            return
        if entry & OFLAG_ZERO:
            if h.version < 3:
                raise self._file.corrupt('a zero cluster in a version 2 '
                                         'image')
            yield _Run(cluster, cs, _RunKind.ZERO)
        elif allocated:
            yield _Run(cluster, cs, _RunKind.DATA, host)
        else:
            yield _Run(cluster, cs, _RunKind.UNALLOCATED)

    def _decode_v1(self, entry: int, cluster: int) -> _Run:
        h = self.header
        cs = h.cluster_size
        if not entry:
            return _Run(cluster, cs, _RunKind.UNALLOCATED)
        if entry & V1_OFLAG_COMPRESSED:
            shift = 63 - h.cluster_bits
            host = entry & ((1 << shift) - 1)
            return _Run(cluster, cs, _RunKind.COMPRESSED, host,
                        (entry >> shift) & (cs - 1))
        return _Run(cluster, cs, _RunKind.DATA, entry)

    def _decode_subclusters(self, bitmap: int, allocated: bool, host: int,
                            cluster: int) -> Iterator[_Run]:
        """Extended L2: 32 subclusters, each data, zero or unallocated."""
        alloc, zero = bitmap & 0xffffffff, bitmap >> 32
        cs = self.header.cluster_size
        if bitmap == 0:
            yield _Run(cluster, cs, _RunKind.UNALLOCATED)
            return
        if alloc == 0xffffffff and allocated:
            yield _Run(cluster, cs, _RunKind.DATA, host)
            return
        if alloc & zero:
            raise self._file.corrupt(f'subclusters of the cluster at guest '
                                     f'offset {cluster:#x} are both '
                                     f'allocated and zero')
        if alloc and not allocated:
            raise self._file.corrupt(f'allocated subclusters in the '
                                     f'unallocated cluster at guest offset '
                                     f'{cluster:#x}')
        sc = cs // SUBCLUSTERS
        runs = []
        for i in range(SUBCLUSTERS):
            bit = 1 << i
            if zero & bit:
                run = _Run(cluster + i * sc, sc, _RunKind.ZERO)
            elif alloc & bit:
                run = _Run(cluster + i * sc, sc, _RunKind.DATA, host + i * sc)
            else:
                run = _Run(cluster + i * sc, sc, _RunKind.UNALLOCATED)
            runs.append(run)
        yield from _merge_runs(runs)

    # -- scanning -------------------------------------------------------------

    def scan_table(self, offset: int) -> Tuple[bool, bool]:
        """(compressed, past the end) for the L2 table at ``offset``: C-speed
        byte operations over the whole table, and a decode entry by entry
        only when some entry may name a host offset past the end."""
        h = self.header
        raw = self._file.read_exact(offset, h.l2_table_bytes, 'an L2 table')
        marks = raw[0::8 * h.entry_words].translate(
            _COMPRESSED_MARKS[h.version == 1])
        compressed = 1 in marks
        if h.has_data_file:   # the data is in another file
            return compressed, False
        highest = _highest_host(raw, marks, h)
        if highest + h.cluster_size <= self._file.file_size:
            return compressed, False
        return compressed, self._maps_past_end(_words(raw))

    def _maps_past_end(self, table: 'array.array[int]') -> bool:
        """Whether a data cluster (with extended L2 entries: an allocated
        subcluster) of the L2 table reaches past the end of the file, read
        from the entries as ``_decode`` reads them but without making runs:
        a crafted table must not cost a run per subcluster here."""
        h = self.header
        cs, size = h.cluster_size, self._file.file_size
        flag = V1_OFLAG_COMPRESSED if h.version == 1 else OFLAG_COMPRESSED
        mask = ~flag if h.version == 1 else OFFSET_MASK
        for index in range(0, len(table), h.entry_words):
            entry = table[index]
            host = entry & mask
            if entry & flag or not host or host + cs <= size:
                continue
            if h.extended_l2:
                alloc = table[index + 1] & 0xffffffff
                if host + alloc.bit_length() * (cs // SUBCLUSTERS) > size:
                    return True
            elif h.version == 1 or not entry & OFLAG_ZERO:
                return True
        return False
