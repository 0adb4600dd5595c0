"""qcow (version 1) and qcow2 (versions 2 and 3) images, read natively.

Following QEMU's docs/interop/qcow2.txt and block/qcow.c: a two-level table
(L1 -> L2) maps each guest cluster to a host cluster in the file, to a
compressed cluster, to zeros, or to nothing (the backing file shows through).
Internal snapshots are other L1 tables.  Only what reading needs is parsed:
refcounts and bitmaps are ignored, nothing is ever written.

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
"""
import array
import bisect
import itertools
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Hashable, Iterable, Iterator, List,
                    Mapping, Optional, Set, Tuple, Union)

from ..context import SourceContext
from ..errors import InvalidArgument, Unsupported
from ..streams import open_stream
from ..streams.base import Stream
from .base import (Extent, ExtentKind, Format, FormatFeatures, Snapshot,
                   coalesce, zero_fill)
from .detect import QCOW_MAGIC, SNIFF_LENGTH, sniff

# Header extensions (qcow2 only).
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xe2792aca
EXT_FEATURE_NAMES = 0x6803f857
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits (qcow2 v3).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2)

# L1/L2 entry bits (qcow2).
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
OFFSET_MASK = 0x00fffffffffffe00
# qcow v1 has one flag: compressed, in bit 63.
V1_OFLAG_COMPRESSED = 1 << 63

COMPRESSION_TYPES = {0: 'zlib', 1: 'zstd'}
CRYPT_METHODS = {0: None, 1: 'aes', 2: 'luks'}

SUBCLUSTERS = 32
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20            # QEMU's QCOW_MAX_L1_SIZE
MAX_SNAPSHOTS = 65536              # QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024          # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BACKING_NAME = 1023
#: Longest snapshot name or id kept: snapshot names become RBD snapshot
#: names, which ``rbd import-diff`` also caps at this length.
MAX_SNAPSHOT_NAME = 4096

#: Decompressed clusters kept, in bytes (data, not metadata: outside the
#: ``metadata_bytes`` budget).
CLUSTER_CACHE_BYTES = 16 << 20
#: Runs decoded per piece of an L2 table at most: a piece is decoded and
#: cached whole, so this bounds what one lookup costs (a 2 MiB-cluster table
#: with extended L2 entries could otherwise make 4 million runs).
RUN_PIECE = 4096
#: Bytes of an L1 table read at once, between calls to ``ctx.check()``.
L1_READ = 1 << 20
#: L1 entries looked at between calls to ``ctx.check()`` when skipping
#: unallocated ones.
L1_SCAN = 1 << 16
#: What the compression scan's set of L2 table offsets (so that tables
#: shared by snapshots are read once) costs an entry; it may take a quarter
#: of ``metadata_bytes``, past which some tables are read again rather than
#: the set growing with the image.
SEEN_ENTRY_BYTES = 72
#: Header extensions walked between calls to ``ctx.check()``.
EXTENSION_BATCH = 4096

_V1_HEADER = struct.Struct('>4sIQIIQBBHIQ')
_V2_HEADER = struct.Struct('>4sIQIIQIIQQIIQ')
_V3_FIELDS = struct.Struct('>QQQII')
_SNAPSHOT_ENTRY = struct.Struct('>QIHHIIQII')
_HEADER_READ = 112


# --------------------------------------------------------------------------
# Parsed metadata


@dataclass(frozen=True)
class QcowHeader:
    """The fields of a qcow or qcow2 header that reading depends on."""

    version: int
    size: int
    cluster_bits: int
    #: log2 of the number of entries in one L2 table.
    l2_bits: int
    l1_size: int
    l1_table_offset: int
    crypt_method: int
    backing_file_offset: int
    backing_file_size: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    autoclear_features: int = 0
    header_length: int = _V2_HEADER.size
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def entry_words(self) -> int:
        """64-bit words per L2 entry: 2 with extended L2 (entry + bitmap)."""
        return 2 if self.extended_l2 else 1

    @property
    def l2_table_bytes(self) -> int:
        return (8 * self.entry_words) << self.l2_bits

    @property
    def l2_span(self) -> int:
        """Guest bytes that one L2 table maps."""
        return self.cluster_size << self.l2_bits


@dataclass
class HeaderExtensions:
    backing_format: Optional[str] = None
    data_file: Optional[str] = None
    #: (feature type, bit) -> name, from the feature name table.
    feature_names: Dict[Tuple[int, int], str] = field(default_factory=dict)


@dataclass(frozen=True)
class QcowSnapshot:
    """An internal snapshot: another L1 table, with its own disk size."""

    ident: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int


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
# Decompression


def _inflate(data: bytes, cluster_size: int) -> bytes:
    """Raw deflate, 4 KiB window, as QEMU writes it; trailing bytes are the
    next cluster's and are ignored."""
    try:
        out = zlib.decompressobj(-12).decompress(data, cluster_size)
    except zlib.error as e:
        raise ValueError(f'deflate: {e}') from None
    return out


def _unzstd(data: bytes, cluster_size: int) -> bytes:
    """zstd frames until a whole cluster is out, as QEMU reads them."""
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise Unsupported(
            'source-spec: stream: the image has zstd-compressed clusters and '
            'the Python zstandard module is missing; install '
            'python3-zstandard on the mgr hosts') from None
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            data, read_across_frames=True)
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as e:
        raise ValueError(f'zstd: {e}') from None
    return bytes(out)


_DECOMPRESSORS: Dict[int, Callable[[bytes, int], bytes]] = {
    0: _inflate, 1: _unzstd}


# --------------------------------------------------------------------------
# Helpers: a thread-safe LRU bounded in bytes, table decoding


class _LruCache:
    """Values are loaded outside the lock, so one slow stream read does not
    stall the other readers; two threads may then load the same key, which
    costs a read but is harmless.  The budget may be a function, read at
    each insertion: what a chain's L1 tables leave of its metadata budget."""

    def __init__(self, budget: Union[int, Callable[[], int]]) -> None:
        self._budget = budget if callable(budget) else (lambda: budget)
        self._used = 0
        self._items: 'OrderedDict[Hashable, Tuple[Any, int]]' = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Tuple[Any, int]]) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        value, weight = load()
        with self._lock:
            budget = self._budget()
            if key not in self._items and weight <= budget:
                self._items[key] = (value, weight)
                self._used += weight
                while self._used > budget:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._used -= dropped
        return value


class _Budget:
    """What one open chain holds in memory, shared by its layers: the active
    L1 tables (held while open, ``pinned``) and one LRU cache of all other
    metadata (L2 tables, their decoded runs, snapshot L1 tables) within
    what the L1 tables leave of ``metadata_bytes``.  Decompressed clusters
    are data, cached apart."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.limits = ctx.limits
        self.pinned = 0
        self.metadata = _LruCache(
            lambda: self.limits.metadata_bytes - self.pinned)
        self.clusters = _LruCache(CLUSTER_CACHE_BYTES)

    def pin(self, nbytes: int, where: str) -> None:
        """Hold ``nbytes`` of L1 table for as long as the chain is open."""
        total = self.pinned + nbytes
        if total > self.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + self.limits.refuse(
                'metadata_bytes', 'holding the qcow2 L1 tables of the '
                'backing chain (bytes)', total))
        self.pinned = total


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


def _highest_host(raw: bytes, marks: bytes, h: 'QcowHeader') -> int:
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


class _TableReader:
    """Sequential reads of a variable-length on-disk table (the snapshot
    table), fetched in large blocks rather than one request per field; only
    the current block is held, whatever the table's length."""

    BLOCK = 64 << 10

    def __init__(self, read: Callable[[int, int], bytes], offset: int,
                 truncated: Callable[[], Exception]) -> None:
        self._read = read
        self._truncated = truncated
        self._start = offset
        self._pos = offset
        self._buf = b''
        self._buf_start = offset

    def take(self, length: int) -> bytes:
        lo = self._pos - self._buf_start
        if lo < 0 or lo + length > len(self._buf):
            self._buf = self._read(self._pos, max(length, self.BLOCK))
            self._buf_start = self._pos
            lo = 0
            if length > len(self._buf):
                raise self._truncated()
        self._pos += length
        return self._buf[lo:lo + length]

    def align(self, boundary: int) -> None:
        self._pos += -(self._pos - self._start) % boundary


# --------------------------------------------------------------------------
# The format


_LAYER_IDS = itertools.count()


class QcowFormat(Format):
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
        self._file_size = stream.size()
        self.header = self._read_header()
        self.extensions = self._read_extensions()
        self._check_features()
        self.backing_file = self._read_backing_name()
        self.backing_format = self.extensions.backing_format
        self._snapshots = self._read_snapshots()
        self._largest_size = max(
            [self.header.size] + [s.disk_size for s in self._snapshots])
        h = self.header
        self._piece = min(1 << h.l2_bits,
                          RUN_PIECE // (SUBCLUSTERS if h.extended_l2 else 1))
        self._budget.pin(h.l1_size * 8, self._where)
        self._l1 = self._load_l1(h.l1_table_offset, h.l1_size)
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
                    f'{top._where}: ' + ctx.limits.refuse(
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

    # -- errors -------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f'source-spec: stream: {self._stream.description or "image"}'

    def _corrupt(self, detail: str) -> InvalidArgument:
        return InvalidArgument(
            f'{self._where}: the qcow image is corrupt: {detail}; check it '
            f'with `qemu-img check`')

    # -- header ---------------------------------------------------------------

    def _read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Metadata must lie inside the file: a short read means a truncated
        or corrupt image."""
        data = self._stream.read(offset, length)
        if len(data) != length:
            raise self._corrupt(
                f'{what} at {offset:#x} (+{length}) is past the end of the '
                f'file ({self._file_size} bytes)')
        return data

    def _read_header(self) -> QcowHeader:
        buf = self._stream.read(0, _HEADER_READ)
        if not buf.startswith(QCOW_MAGIC):
            raise InvalidArgument(
                f"source-spec: type: 'qcow', but "
                f"{self._stream.description or 'the image'} does not start "
                f"with the qcow magic; for a raw image use type 'raw'")
        if len(buf) < 8:
            raise self._corrupt('the header is truncated')
        version = struct.unpack_from('>I', buf, 4)[0]
        if version == 1:
            header = self._parse_v1(buf)
        elif version in (2, 3):
            header = self._parse_v2(buf, version)
        else:
            raise Unsupported(f'{self._where}: qcow version {version} is not '
                              f'supported (only 1, 2 and 3)')
        self._check_header(header)
        return header

    def _parse_v1(self, buf: bytes) -> QcowHeader:
        if len(buf) < _V1_HEADER.size:
            raise self._corrupt('the header is truncated')
        (_, version, backing_off, backing_size, _mtime, size, cluster_bits,
         l2_bits, _pad, crypt, l1_off) = _V1_HEADER.unpack_from(buf)
        if not 9 <= cluster_bits <= 16:
            raise self._corrupt(f'cluster_bits {cluster_bits} is outside '
                                f'9..16')
        if not 6 <= l2_bits <= 13:
            raise self._corrupt(f'l2_bits {l2_bits} is outside 6..13')
        shift = cluster_bits + l2_bits
        return QcowHeader(
            version=version, size=size, cluster_bits=cluster_bits,
            l2_bits=l2_bits, l1_size=(size + (1 << shift) - 1) >> shift,
            l1_table_offset=l1_off, crypt_method=crypt,
            backing_file_offset=backing_off, backing_file_size=backing_size,
            header_length=_V1_HEADER.size)

    def _parse_v2(self, buf: bytes, version: int) -> QcowHeader:
        if len(buf) < _V2_HEADER.size:
            raise self._corrupt('the header is truncated')
        (_, _, backing_off, backing_size, cluster_bits, size, crypt, l1_size,
         l1_off, _refcount_off, _refcount_clusters, nb_snapshots,
         snapshots_off) = _V2_HEADER.unpack_from(buf)
        incompat = autoclear = 0
        header_length = _V2_HEADER.size
        compression = 0
        if version >= 3:
            if len(buf) < _V2_HEADER.size + _V3_FIELDS.size:
                raise self._corrupt('the version 3 header is truncated')
            (incompat, _compat, autoclear, _refcount_order,
             header_length) = _V3_FIELDS.unpack_from(buf, _V2_HEADER.size)
            if header_length < 104 or header_length % 8:
                raise self._corrupt(f'header_length {header_length} is not '
                                    f'a multiple of 8 of at least 104')
            if header_length > 104 and len(buf) > 104:
                compression = buf[104]
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self._corrupt(f'cluster_bits {cluster_bits} is outside '
                                f'{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}')
        extended = bool(incompat & INCOMPAT_EXTENDED_L2)
        if extended and cluster_bits < 14:
            raise self._corrupt(f'extended L2 entries need clusters of at '
                                f'least 16 KiB, not {1 << cluster_bits}')
        return QcowHeader(
            version=version, size=size, cluster_bits=cluster_bits,
            l2_bits=cluster_bits - (4 if extended else 3), l1_size=l1_size,
            l1_table_offset=l1_off, crypt_method=crypt,
            backing_file_offset=backing_off, backing_file_size=backing_size,
            nb_snapshots=nb_snapshots, snapshots_offset=snapshots_off,
            incompatible_features=incompat, autoclear_features=autoclear,
            header_length=header_length, compression_type=compression)

    def _check_header(self, h: QcowHeader) -> None:
        if h.header_length > h.cluster_size and h.version > 1:
            raise self._corrupt(f'header_length {h.header_length} exceeds '
                                f'the cluster size')
        if h.crypt_method not in CRYPT_METHODS or \
                (h.version == 1 and h.crypt_method > 1):
            raise self._corrupt(f'unknown crypt_method {h.crypt_method}')
        if h.backing_file_offset:
            if h.backing_file_size > MAX_BACKING_NAME:
                raise self._corrupt(f'the backing file name is '
                                    f'{h.backing_file_size} bytes long '
                                    f'(at most {MAX_BACKING_NAME})')
            if h.version > 1 and h.backing_file_offset > h.cluster_size:
                raise self._corrupt('the backing file name lies outside '
                                    'the first cluster')
        needed = -(-h.size // h.l2_span)
        if h.l1_size < needed:
            raise self._corrupt(f'the L1 table has {h.l1_size} entries, '
                                f'{needed} are needed for {h.size} bytes')
        self._check_l1(h.l1_table_offset, h.l1_size, 'the active L1 table', h)
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise self._corrupt(f'{h.nb_snapshots} snapshots (at most '
                                f'{MAX_SNAPSHOTS})')
        if h.nb_snapshots > self._limits.snapshots:
            raise InvalidArgument(f'{self._where}: ' + self._limits.refuse(
                'snapshots', 'the qcow2 snapshot table (snapshots)',
                h.nb_snapshots))
        if h.nb_snapshots and h.snapshots_offset % h.cluster_size:
            raise self._corrupt('the snapshot table is not cluster aligned')

    def _check_l1(self, offset: int, entries: int, what: str,
                  header: Optional[QcowHeader] = None) -> None:
        h = header or self.header
        if entries * 8 > MAX_L1_BYTES:
            raise self._corrupt(f'{what} has {entries} entries (at most '
                                f'{MAX_L1_BYTES // 8})')
        if entries * 8 > self._limits.metadata_bytes:
            raise InvalidArgument(f'{self._where}: ' + self._limits.refuse(
                'metadata_bytes', f'{what} of the qcow2 image (bytes)',
                entries * 8))
        if h.version > 1 and offset % h.cluster_size:
            raise self._corrupt(f'{what} at {offset:#x} is not cluster '
                                f'aligned')
        if offset + entries * 8 > self._file_size:
            raise self._corrupt(f'{what} at {offset:#x} ({entries} entries) '
                                f'ends past the end of the file '
                                f'({self._file_size} bytes)')

    def _read_extensions(self) -> HeaderExtensions:
        exts = HeaderExtensions()
        h = self.header
        if h.version < 2:
            return exts
        end = h.backing_file_offset or h.cluster_size
        end = min(end, self._file_size)
        if end <= h.header_length:
            return exts
        buf = self._read_exact(h.header_length, end - h.header_length,
                               'the header extensions')
        pos = 0
        for count in itertools.count():
            if pos + 8 > len(buf):
                break
            if count % EXTENSION_BATCH == 0:
                self._ctx.check()
            kind, length = struct.unpack_from('>II', buf, pos)
            if kind == EXT_END:
                break
            data = buf[pos + 8:pos + 8 + length]
            if len(data) != length:
                raise self._corrupt(f'header extension {kind:#x} overruns '
                                    f'the header area')
            if kind == EXT_BACKING_FORMAT:
                exts.backing_format = data.decode('utf-8', 'replace')
            elif kind == EXT_DATA_FILE:
                exts.data_file = self._file_name(data, 'external data file')
            elif kind == EXT_FEATURE_NAMES:
                for i in range(0, length - 47, 48):
                    name = data[i + 2:i + 48].split(b'\0', 1)[0]
                    exts.feature_names[(data[i], data[i + 1])] = \
                        name.decode('utf-8', 'replace')
            pos += 8 + ((length + 7) & ~7)
        return exts

    def _check_features(self) -> None:
        h = self.header
        unknown = h.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = ', '.join(
                self.extensions.feature_names.get((0, bit), f'bit {bit}')
                for bit in range(64) if unknown >> bit & 1)
            raise Unsupported(f'{self._where}: the image uses incompatible '
                              f'qcow2 features this reader does not know '
                              f'({names}); convert it with `qemu-img convert '
                              f'-O qcow2` first')
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise InvalidArgument(f'{self._where}: the image is marked '
                                  f'corrupt; repair it with `qemu-img check '
                                  f'-r all` first')
        if h.compression_type not in COMPRESSION_TYPES:
            raise Unsupported(f'{self._where}: compression type '
                              f'{h.compression_type} is not supported (only '
                              f'zlib and zstd)')
        if bool(h.incompatible_features & INCOMPAT_COMPRESSION) != \
                bool(h.compression_type):
            raise self._corrupt('the compression type bit and the '
                                'compression_type field disagree')
        if h.has_data_file and not self.extensions.data_file:
            raise Unsupported(f'{self._where}: the image keeps its data in an '
                              f'external data file that it does not name; '
                              f'convert it with `qemu-img convert` first')

    def _read_backing_name(self) -> Optional[str]:
        h = self.header
        if not h.backing_file_offset or not h.backing_file_size:
            return None
        raw = self._read_exact(h.backing_file_offset, h.backing_file_size,
                               'the backing file name')
        return self._file_name(raw, 'backing file')

    def _file_name(self, raw: bytes, what: str) -> str:
        """A file name the header gives, to be opened next to the image:
        QEMU reads it as a C string, and no path holds a NUL."""
        if b'\0' in raw:
            raise self._corrupt(f'the {what} name holds a NUL byte')
        return raw.decode('utf-8', 'surrogateescape')

    def _read_snapshots(self) -> List[QcowSnapshot]:
        h = self.header
        snaps: List[QcowSnapshot] = []
        reader = _TableReader(
            self._stream.read, h.snapshots_offset,
            lambda: self._corrupt('the snapshot table runs past the end of '
                                  'the file'))
        for i in range(h.nb_snapshots):
            self._ctx.check()
            entry = reader.take(_SNAPSHOT_ENTRY.size)
            (l1_off, l1_size, id_len, name_len, _sec, _nsec, _clock,
             _vm_state, extra_len) = _SNAPSHOT_ENTRY.unpack(entry)
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise self._corrupt(f'snapshot {i} has {extra_len} bytes of '
                                    f'extra data')
            if max(id_len, name_len) > MAX_SNAPSHOT_NAME:
                raise Unsupported(
                    f'{self._where}: snapshot {i} has a name or id of '
                    f'{max(id_len, name_len)} bytes, longer than any RBD '
                    f'snapshot name ({MAX_SNAPSHOT_NAME}); delete it with '
                    f'`qemu-img snapshot -d` first')
            extra = reader.take(extra_len)
            ident = reader.take(id_len)
            name = reader.take(name_len)
            reader.align(8)
            disk_size = struct.unpack_from('>Q', extra, 8)[0] \
                if extra_len >= 16 else h.size
            self._check_l1(l1_off, l1_size, f'the L1 table of snapshot {i}')
            snaps.append(QcowSnapshot(
                ident.decode('utf-8', 'replace'),
                name.decode('utf-8', 'replace'), l1_off, l1_size, disk_size))
        return snaps

    def _static_features(self) -> FormatFeatures:
        h = self.header
        features = FormatFeatures(
            encrypted=h.crypt_method != 0,
            backing_file=self.backing_file,
            external_data_file=self.extensions.data_file
            if h.has_data_file else None,
            extended_l2=h.extended_l2,
            compression_type=COMPRESSION_TYPES[h.compression_type])
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

    # -- features -------------------------------------------------------------

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
            index = self._next_used(l1, 0)
            while index < len(l1):
                self._ctx.check()
                offset = self._l2_offset(l1, index)
                if offset and offset not in seen:
                    if len(seen) < most:
                        seen.add(offset)
                    c, p = self._scan_table(offset)
                    compressed, past_end = compressed or c, past_end or p
                    if compressed and past_end:
                        return True, True
                index = self._next_used(l1, index + 1)
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
                yield self._load_l1(s.l1_table_offset, s.l1_size)

    def _scan_table(self, offset: int) -> Tuple[bool, bool]:
        """(compressed, past the end) for the L2 table at ``offset``: C-speed
        byte operations over the whole table, and a decode entry by entry
        only when some entry may name a host offset past the end."""
        h = self.header
        raw = self._read_exact(offset, h.l2_table_bytes, 'an L2 table')
        marks = raw[0::8 * h.entry_words].translate(
            _COMPRESSED_MARKS[h.version == 1])
        compressed = 1 in marks
        if h.has_data_file:   # the data is in another file
            return compressed, False
        highest = _highest_host(raw, marks, h)
        if highest + h.cluster_size <= self._file_size:
            return compressed, False
        return compressed, self._maps_past_end(_words(raw))

    def _maps_past_end(self, table: 'array.array[int]') -> bool:
        """Whether a data cluster (with extended L2 entries: an allocated
        subcluster) of the L2 table reaches past the end of the file, read
        from the entries as ``_decode`` reads them but without making runs:
        a crafted table must not cost a run per subcluster here."""
        h = self.header
        cs, size = h.cluster_size, self._file_size
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

    # -- Format interface -----------------------------------------------------

    def size(self, snap: Optional[Snapshot] = None) -> int:
        if snap is None:
            return self.header.size
        return self._snapshot(snap).disk_size

    def snapshots(self) -> List[Snapshot]:
        return [Snapshot(s.name, s.disk_size, ident=s.ident)
                for s in self._snapshots]

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

    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """Past the virtual size reads as zeros, as for a raw image."""
        self._check_read(offset, length)
        end = min(offset + length, self.size(snap))
        parts: List[bytes] = []
        if offset < end:
            l1 = self._l1_for(snap)
            for run in _merge_runs(self._runs(l1, offset, end)):
                parts.append(self._read_run(run))
        tail = offset + length - max(end, offset)
        if tail:
            parts.append(bytes(tail))
        return parts[0] if len(parts) == 1 else b''.join(parts)

    def read_into(self, offset: int, view: memoryview,
                  snap: Optional[Snapshot] = None) -> None:
        """As ``read``, each run straight into its part of ``view``; the
        layers underneath fill their parts the same way."""
        self._check_read(offset, len(view))
        end = min(offset + len(view), self.size(snap))
        pos = 0
        if offset < end:
            l1 = self._l1_for(snap)
            for run in _merge_runs(self._runs(l1, offset, end)):
                self._read_run_into(run, view[pos:pos + run.length])
                pos += run.length
        zero_fill(view[pos:])

    def _check_read(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        if self.header.crypt_method:
            raise Unsupported(
                f'{self._where}: the image is encrypted '
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

    # -- snapshots and L1 tables ----------------------------------------------

    def _snapshot(self, snap: Snapshot) -> QcowSnapshot:
        for s in self._snapshots:
            if s.ident == snap.ident and s.name == snap.name:
                return s
        raise InvalidArgument(f"{self._where}: the image has no snapshot "
                              f"'{snap.name}' (id {snap.ident})")

    def _l1_for(self, snap: Optional[Snapshot]) -> 'array.array[int]':
        if snap is None:
            return self._l1
        return self._snapshot_l1(self._snapshot(snap))

    def _snapshot_l1(self, s: QcowSnapshot) -> 'array.array[int]':
        def load() -> Tuple[Any, int]:
            table = self._load_l1(s.l1_table_offset, s.l1_size)
            return table, len(table) * 8
        table: 'array.array[int]' = self._budget.metadata.get(
            ('l1', self._tag, s.l1_table_offset, s.l1_size), load)
        return table

    def _load_l1(self, offset: int, entries: int) -> 'array.array[int]':
        """Read in pieces: the table costs its own size (not twice that, as
        bytes and array), and a stop or the deadline ends a long read."""
        words = array.array('Q')
        end = offset + entries * 8
        for pos in range(offset, end, L1_READ):
            self._ctx.check()
            words.frombytes(self._read_exact(pos, min(L1_READ, end - pos),
                                             'an L1 table'))
        if sys.byteorder == 'little':
            words.byteswap()
        return words

    def _l2_offset(self, l1: 'array.array[int]', index: int) -> int:
        """The L2 table for L1 slot ``index``, 0 when unallocated."""
        if index >= len(l1):
            return 0
        entry = l1[index]
        if self.header.version == 1:
            return entry
        offset = entry & OFFSET_MASK
        if offset % self.header.cluster_size:
            raise self._corrupt(f'L2 table offset {offset:#x} (L1 index '
                                f'{index}) is not cluster aligned')
        return offset

    def _next_used(self, l1: 'array.array[int]', index: int) -> int:
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
            return _words(self._read_exact(offset, size, 'an L2 table')), size
        table: 'array.array[int]' = self._budget.metadata.get(
            ('l2', self._tag, offset), load)
        return table

    # -- mapping --------------------------------------------------------------

    def _runs(self, l1: 'array.array[int]', start: int,
              end: int) -> Iterator[_Run]:
        """What guest bytes ``[start, end)`` are, in order.  Unallocated L1
        slots in a row make one run; L2 tables are decoded by pieces."""
        span = self.header.l2_span
        piece = self._piece * self.header.cluster_size
        pos = start
        while pos < end:
            self._ctx.check()
            l1_index = pos // span
            l2_offset = self._l2_offset(l1, l1_index)
            if not l2_offset:
                used = self._next_used(l1, l1_index + 1)
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
        found: _Runs = self._budget.metadata.get(
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
                raise self._corrupt('a compressed cluster in an image with '
                                    'an external data file')
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
            raise self._corrupt(f'cluster offset {host:#x} is not cluster '
                                f'aligned')
        if h.extended_l2:
            yield from self._decode_subclusters(
                table[index * 2 + 1], allocated, host, cluster)
            return
        if entry & OFLAG_ZERO:
            if h.version < 3:
                raise self._corrupt('a zero cluster in a version 2 image')
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
            raise self._corrupt(f'subclusters of the cluster at guest offset '
                                f'{cluster:#x} are both allocated and zero')
        if alloc and not allocated:
            raise self._corrupt(f'allocated subclusters in the unallocated '
                                f'cluster at guest offset {cluster:#x}')
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

    # -- reading --------------------------------------------------------------

    def _read_run(self, run: _Run) -> bytes:
        if run.kind == _RunKind.ZERO:
            return bytes(run.length)
        if run.kind == _RunKind.UNALLOCATED:
            return self._read_lower(run.offset, run.length)
        if run.kind == _RunKind.COMPRESSED:
            data = self._decompressed(run.host, run.csize)
            within = run.offset % self.header.cluster_size
            return data[within:within + run.length]
        data = self._data().read(run.host, run.length)
        # As QEMU does, bytes past the end of the file read as zeros.
        if len(data) < run.length:
            data += bytes(run.length - len(data))
        return data

    def _read_run_into(self, run: _Run, view: memoryview) -> None:
        if run.kind == _RunKind.ZERO:
            zero_fill(view)
        elif run.kind == _RunKind.UNALLOCATED:
            self._read_lower_into(run.offset, view)
        elif run.kind == _RunKind.COMPRESSED:
            within = run.offset % self.header.cluster_size
            data = memoryview(self._decompressed(run.host, run.csize))
            view[:] = data[within:within + run.length]
        else:
            n = self._data().read_into(run.host, view)
            zero_fill(view[n:])  # past the end of the file: zeros, as QEMU

    def _read_lower_into(self, offset: int, view: memoryview) -> None:
        if self.backing is None:
            view[:] = self._read_lower(offset, len(view))  # zeros, or refused
            return
        n = max(0, min(offset + len(view), self.backing.size()) - offset)
        self.backing.read_into(offset, view[:n])
        zero_fill(view[n:])

    def _read_lower(self, offset: int, length: int) -> bytes:
        """What shows through where this layer maps nothing."""
        if self.backing is not None:
            lower_end = min(offset + length, self.backing.size())
            data = self.backing.read(offset, max(0, lower_end - offset))
            return data + bytes(length - len(data))
        if self.backing_file:
            raise Unsupported(
                f"{self._where}: the image has a backing file "
                f"'{self.backing_file}', which is not opened here; flatten "
                f"the chain with `qemu-img convert -O qcow2` first")
        return bytes(length)

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
            raise Unsupported(f"{self._where}: the image keeps its data in "
                              f"the external file '{name}', which cannot be "
                              f"reached through this stream type; convert "
                              f"it with `qemu-img convert` first") from None

    def _decompressed(self, host: int, csize: int) -> bytes:
        cs = self.header.cluster_size

        def load() -> Tuple[Any, int]:
            raw = self._stream.read(host, csize)
            decompress = _DECOMPRESSORS[self.header.compression_type]
            try:
                data = decompress(raw, cs)
            except ValueError as e:
                raise self._corrupt(f'the compressed cluster at {host:#x} '
                                    f'does not decompress ({e})') from None
            if len(data) != cs:
                raise self._corrupt(f'the compressed cluster at {host:#x} '
                                    f'decompresses to {len(data)} bytes, '
                                    f'not {cs}')
            return data, cs
        data: bytes = self._budget.clusters.get(('z', self._tag, host), load)
        return data
