"""qcow (version 1) and qcow2 (versions 2 and 3) images, read natively.

Following QEMU's docs/interop/qcow2.txt and block/qcow.c: a two-level table
(L1 -> L2) maps each guest cluster to a host cluster in the file, to a
compressed cluster, to zeros, or to nothing (the backing file shows through).
Internal snapshots are other L1 tables.  Only what reading needs is parsed:
refcounts and bitmaps are ignored, nothing is ever written.

Reads are safe from several threads: nothing keeps a seek position, the
caches take a lock, and the streams underneath are thread-safe.  Memory stays
bounded: the active L1 table is kept (QEMU caps it at 32 MiB), everything
else lives in byte-budgeted LRU caches.

Past the virtual size, reads return zeros (as raw images do); data clusters
past the end of the file read as zeros too, as in QEMU, while metadata (L1
and L2 tables, the snapshot table) past the end is reported as corruption.
"""
import array
import bisect
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Hashable, Iterable, Iterator, List,
                    Mapping, Optional, Tuple)

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

# Cache budgets, in bytes.
L1_CACHE_BYTES = 64 << 20          # snapshot L1 tables
L2_CACHE_BYTES = 32 << 20
CLUSTER_CACHE_BYTES = 16 << 20     # decompressed clusters
RUNS_CACHE_BYTES = 32 << 20        # L2 tables decoded into runs

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
    costs a read but is harmless."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
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
            if key not in self._items and weight <= self._budget:
                self._items[key] = (value, weight)
                self._used += weight
                while self._used > self._budget:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._used -= dropped
        return value


def _words(data: bytes) -> 'array.array[int]':
    """Big-endian u64s as a compact array (8 bytes each, fast to index)."""
    words = array.array('Q', data)
    if sys.byteorder == 'little':
        words.byteswap()
    return words


class _TableReader:
    """Sequential reads of a variable-length on-disk table (the snapshot
    table), fetched in large blocks rather than one request per field."""

    BLOCK = 64 << 10

    def __init__(self, read: Callable[[int, int], bytes], offset: int,
                 truncated: Callable[[], Exception]) -> None:
        self._read = read
        self._truncated = truncated
        self._start = offset
        self._pos = offset
        self._buf = bytearray()

    def take(self, length: int) -> bytes:
        want = self._pos + length - self._start
        if want > len(self._buf):
            more = max(want - len(self._buf), self.BLOCK)
            self._buf += self._read(self._start + len(self._buf), more)
            if want > len(self._buf):
                raise self._truncated()
        data = bytes(self._buf[self._pos - self._start:want])
        self._pos += length
        return data

    def align(self, boundary: int) -> None:
        self._pos += -(self._pos - self._start) % boundary


# --------------------------------------------------------------------------
# The format


#: Backing files followed at most (QEMU allows deeper, nobody needs them).
MAX_CHAIN = 16


class QcowFormat(Format):
    """A qcow or qcow2 image on a stream.

    ``backing`` is the image under this one, when the caller has opened it;
    without it, reading a cluster this layer does not allocate is refused if
    the header names a backing file.  The format owns ``backing`` and closes
    it with itself.
    """

    def __init__(self, stream: Stream,
                 backing: Optional[Format] = None) -> None:
        self._stream = stream
        self.backing = backing
        self._lock = threading.Lock()
        self._data_stream: Optional[Stream] = None
        self._l1_cache = _LruCache(L1_CACHE_BYTES)
        self._l2_cache = _LruCache(L2_CACHE_BYTES)
        self._cluster_cache = _LruCache(CLUSTER_CACHE_BYTES)
        self._runs_cache = _LruCache(RUNS_CACHE_BYTES)
        self._file_size = stream.size()
        self.header = self._read_header()
        self.extensions = self._read_extensions()
        self._check_features()
        self.backing_file = self._read_backing_name()
        self.backing_format = self.extensions.backing_format
        self._snapshots = self._read_snapshots()
        self._l1 = self._load_l1(self.header.l1_table_offset,
                                 self.header.l1_size)
        self._features = self._static_features()
        self._features_lock = threading.Lock()
        self._compressed_known = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'QcowFormat':
        stream = open_stream(spec['stream'], ctx)
        try:
            return cls.open_chain(stream)
        except BaseException:
            stream.close()
            raise

    @classmethod
    def open_chain(cls, stream: Stream, depth: int = 0) -> 'QcowFormat':
        """The image on ``stream`` with its backing chain attached: each
        backing file is found next to its overlay, through the same kind of
        stream (a file beside the file, a URL beside the URL, a key beside
        the key in the bucket), and is qcow2 or raw."""
        top = cls(stream)
        if top.backing_file is None:
            return top
        try:
            if depth + 1 >= MAX_CHAIN:
                raise InvalidArgument(
                    f'{top._where}: the backing chain is deeper than {MAX_CHAIN} '
                    'images; flatten part of it with qemu-img convert')
            under = stream.sibling(top.backing_file)
            try:
                head = under.read(0, SNIFF_LENGTH)
                if sniff(head) == 'qcow':
                    top.backing = cls.open_chain(under, depth + 1)
                else:
                    from .raw import RawFormat
                    top.backing = RawFormat(under)
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
        if h.nb_snapshots and h.snapshots_offset % h.cluster_size:
            raise self._corrupt('the snapshot table is not cluster aligned')

    def _check_l1(self, offset: int, entries: int, what: str,
                  header: Optional[QcowHeader] = None) -> None:
        h = header or self.header
        if entries * 8 > MAX_L1_BYTES:
            raise self._corrupt(f'{what} has {entries} entries (at most '
                                f'{MAX_L1_BYTES // 8})')
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
        while pos + 8 <= len(buf):
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
                exts.data_file = data.decode('utf-8', 'surrogateescape')
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
        return raw.decode('utf-8', 'surrogateescape')

    def _read_snapshots(self) -> List[QcowSnapshot]:
        h = self.header
        snaps: List[QcowSnapshot] = []
        reader = _TableReader(
            self._stream.read, h.snapshots_offset,
            lambda: self._corrupt('the snapshot table runs past the end of '
                                  'the file'))
        for i in range(h.nb_snapshots):
            entry = reader.take(_SNAPSHOT_ENTRY.size)
            (l1_off, l1_size, id_len, name_len, _sec, _nsec, _clock,
             _vm_state, extra_len) = _SNAPSHOT_ENTRY.unpack(entry)
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise self._corrupt(f'snapshot {i} has {extra_len} bytes of '
                                    f'extra data')
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
        """Computed on first use: knowing whether anything is compressed
        means reading every L2 table, which opening should not cost."""
        with self._features_lock:
            if not self._compressed_known:
                self._features.compressed = self._any_compressed()
                self._compressed_known = True
            return self._features

    def _any_compressed(self) -> bool:
        """Whether any L2 table reachable from HEAD or a snapshot maps a
        compressed cluster; each table is read once, not cached."""
        h = self.header
        flag_byte = 0x80 if h.version == 1 else 0x40  # top byte of the entry
        step = 8 * h.entry_words
        seen = set()
        l1s = [self._l1] + [self._snapshot_l1(s) for s in self._snapshots]
        for l1 in l1s:
            for index in range(len(l1)):
                offset = self._l2_offset(l1, index)
                if not offset or offset in seen:
                    continue
                seen.add(offset)
                table = self._read_exact(offset, h.l2_table_bytes,
                                         'an L2 table')
                if any(b & flag_byte for b in table[0::step]):
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
        table: 'array.array[int]' = self._l1_cache.get(
            ('l1', s.l1_table_offset, s.l1_size), load)
        return table

    def _load_l1(self, offset: int, entries: int) -> 'array.array[int]':
        return _words(self._read_exact(offset, entries * 8, 'an L1 table'))

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

    def _l2_table(self, offset: int) -> 'array.array[int]':
        def load() -> Tuple[Any, int]:
            size = self.header.l2_table_bytes
            return _words(self._read_exact(offset, size, 'an L2 table')), size
        table: 'array.array[int]' = self._l2_cache.get(offset, load)
        return table

    # -- mapping --------------------------------------------------------------

    def _runs(self, l1: 'array.array[int]', start: int,
              end: int) -> Iterator[_Run]:
        """What guest bytes ``[start, end)`` are, in order."""
        span = self.header.l2_span
        pos = start
        while pos < end:
            l1_index = pos // span
            base = l1_index * span
            table_end = min(end, base + span)
            l2_offset = self._l2_offset(l1, l1_index)
            if not l2_offset:
                yield _Run(pos, table_end - pos, _RunKind.UNALLOCATED)
                pos = table_end
                continue
            offsets, runs = self._table_runs(l2_offset, base)
            i = max(0, bisect.bisect_right(offsets, pos) - 1)
            while i < len(runs) and runs[i].offset < table_end:
                if runs[i].end > pos:
                    yield runs[i].clip(pos, table_end)
                i += 1
            pos = table_end

    def _table_runs(self, l2_offset: int, base: int) -> Tuple[List[int], List[_Run]]:
        """The L2 table at ``l2_offset``, mapping guest bytes from ``base``,
        decoded once into merged runs (with their offsets, for bisecting):
        a read or an extent listing then costs a lookup, not Python work
        per cluster -- which bounded the copy of a qcow2 chain.  Entries
        past the largest virtual size are not decoded."""
        def load() -> Tuple[Any, int]:
            table = self._l2_table(l2_offset)
            cs = self.header.cluster_size
            used = -(-(self._largest_size - base) // cs)
            count = max(0, min(1 << self.header.l2_bits, used))
            h = self.header
            if h.version >= 2 and not h.extended_l2 and not h.has_data_file:
                runs = self._plain_table_runs(table, count, base)
            else:
                runs = list(_merge_runs(run for index in range(count) for run in
                                        self._decode(table, index, base + index * cs)))
            return ([r.offset for r in runs], runs), 64 + 160 * len(runs)
        found: Tuple[List[int], List[_Run]] = self._runs_cache.get((l2_offset, base), load)
        return found

    def _plain_table_runs(self, table: 'array.array[int]', count: int,
                          base: int) -> List[_Run]:
        """``_decode`` and ``_merge_runs`` over a whole L2 table in one loop,
        for the common layout (v2/v3, 64-bit entries, no external data
        file): the same runs without a Python object per cluster, since
        every layer of a chain decodes its tables once per copy."""
        cs = self.header.cluster_size
        zero_ok = self.header.version >= 3
        runs: List[_Run] = []
        kind: Optional[str] = None   # the run being built
        start = host0 = 0
        for index in range(count):
            entry = table[index]
            cluster = base + index * cs
            host = entry & OFFSET_MASK
            if entry & OFLAG_COMPRESSED or host % cs or (entry & OFLAG_ZERO and not zero_ok):
                # Compressed, or corrupt: ``_decode`` has the run or the error.
                if kind is not None:
                    runs.append(_Run(start, cluster - start, kind, host0))
                    kind = None
                runs.extend(self._decode(table, index, cluster))
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
                runs.append(_Run(start, cluster - start, kind, host0))
            kind, start, host0 = new, cluster, at
        if kind is not None:
            runs.append(_Run(start, base + count * cs - start, kind, host0))
        return runs

    @property
    def _largest_size(self) -> int:
        return max([self.header.size] + [s.disk_size for s in self._snapshots])

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
        data: bytes = self._cluster_cache.get(host, load)
        return data
