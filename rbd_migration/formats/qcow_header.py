"""What a qcow or qcow2 file says about itself: the header, its extensions,
the backing file name and the snapshot table, parsed and checked.

Following QEMU's docs/interop/qcow2.txt, block/qcow.c, block/qcow2.c
(qcow2_do_open, qcow2_read_extensions) and block/qcow2-snapshot.c
(qcow2_read_snapshots).  Every number here is chosen by whoever wrote the
file, so each is checked against QEMU's own bounds and the context's
``SourceLimits`` before anything is allocated or looped over.
"""
import itertools
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument, Unsupported
from ..limits import SourceLimits
from ..streams.base import Stream
from .detect import QCOW_MAGIC

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

COMPRESSION_TYPES = {0: 'zlib', 1: 'zstd'}
CRYPT_METHODS = {0: None, 1: 'aes', 2: 'luks'}

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20            # QEMU's QCOW_MAX_L1_SIZE
MAX_SNAPSHOTS = 65536              # QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA = 1024          # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BACKING_NAME = 1023
#: Longest snapshot name or id kept: snapshot names become RBD snapshot
#: names, which ``rbd import-diff`` also caps at this length.
MAX_SNAPSHOT_NAME = 4096

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
# Reading and checking


class MetadataReader:
    """Reads one qcow file's metadata, in QEMU's order: header, extensions,
    features, backing file name, snapshot table.  Metadata must lie inside
    the file, and every error names the file; the cluster mapping reads its
    L1 and L2 tables through ``read_exact`` for the same reasons.

    ``ctx`` gives the stop and deadline that long walks check, ``limits``
    the bounds (the chain's: its budget's)."""

    def __init__(self, stream: Stream, ctx: SourceContext,
                 limits: SourceLimits) -> None:
        self._stream = stream
        self._ctx = ctx
        self._limits = limits
        self.file_size = stream.size()

    # -- errors ---------------------------------------------------------------

    @property
    def where(self) -> str:
        """What every message about this file starts with."""
        return f'source-spec: stream: {self._stream.description or "image"}'

    def corrupt(self, detail: str) -> InvalidArgument:
        return InvalidArgument(
            f'{self.where}: the qcow image is corrupt: {detail}; check it '
            f'with `qemu-img check`')

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Metadata must lie inside the file: a short read means a truncated
        or corrupt image."""
        data = self._stream.read(offset, length)
        if len(data) != length:
            raise self.corrupt(
                f'{what} at {offset:#x} (+{length}) is past the end of the '
                f'file ({self.file_size} bytes)')
        return data

    # -- header ---------------------------------------------------------------

    def read_header(self) -> QcowHeader:
        buf = self._stream.read(0, _HEADER_READ)
        if not buf.startswith(QCOW_MAGIC):
            raise InvalidArgument(
                f"source-spec: type: 'qcow', but "
                f"{self._stream.description or 'the image'} does not start "
                f"with the qcow magic; for a raw image use type 'raw'")
        if len(buf) < 8:
            raise self.corrupt('the header is truncated')
        version = struct.unpack_from('>I', buf, 4)[0]
        if version == 1:
            header = self._parse_v1(buf)
        elif version in (2, 3):
            header = self._parse_v2(buf, version)
        else:
            raise Unsupported(f'{self.where}: qcow version {version} is not '
                              f'supported (only 1, 2 and 3)')
        self._check_header(header)
        return header

    def _parse_v1(self, buf: bytes) -> QcowHeader:
        if len(buf) < _V1_HEADER.size:
            raise self.corrupt('the header is truncated')
        (_, version, backing_off, backing_size, _mtime, size, cluster_bits,
         l2_bits, _pad, crypt, l1_off) = _V1_HEADER.unpack_from(buf)
        if not 9 <= cluster_bits <= 16:
            raise self.corrupt(f'cluster_bits {cluster_bits} is outside '
                               f'9..16')
        if not 6 <= l2_bits <= 13:
            raise self.corrupt(f'l2_bits {l2_bits} is outside 6..13')
        shift = cluster_bits + l2_bits
        return QcowHeader(
            version=version, size=size, cluster_bits=cluster_bits,
            l2_bits=l2_bits, l1_size=(size + (1 << shift) - 1) >> shift,
            l1_table_offset=l1_off, crypt_method=crypt,
            backing_file_offset=backing_off, backing_file_size=backing_size,
            header_length=_V1_HEADER.size)

    def _parse_v2(self, buf: bytes, version: int) -> QcowHeader:
        if len(buf) < _V2_HEADER.size:
            raise self.corrupt('the header is truncated')
        (_, _, backing_off, backing_size, cluster_bits, size, crypt, l1_size,
         l1_off, _refcount_off, _refcount_clusters, nb_snapshots,
         snapshots_off) = _V2_HEADER.unpack_from(buf)
        incompat = autoclear = 0
        header_length = _V2_HEADER.size
        compression = 0
        if version >= 3:
            if len(buf) < _V2_HEADER.size + _V3_FIELDS.size:
                raise self.corrupt('the version 3 header is truncated')
            (incompat, _compat, autoclear, _refcount_order,
             header_length) = _V3_FIELDS.unpack_from(buf, _V2_HEADER.size)
            if header_length < 104 or header_length % 8:
                raise self.corrupt(f'header_length {header_length} is not '
                                   f'a multiple of 8 of at least 104')
            if header_length > 104 and len(buf) > 104:
                compression = buf[104]
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise self.corrupt(f'cluster_bits {cluster_bits} is outside '
                               f'{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}')
        extended = bool(incompat & INCOMPAT_EXTENDED_L2)
        if extended and cluster_bits < 14:
            raise self.corrupt(f'extended L2 entries need clusters of at '
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
            raise self.corrupt(f'header_length {h.header_length} exceeds '
                               f'the cluster size')
        if h.crypt_method not in CRYPT_METHODS or \
                (h.version == 1 and h.crypt_method > 1):
            raise self.corrupt(f'unknown crypt_method {h.crypt_method}')
        if h.backing_file_offset:
            if h.backing_file_size > MAX_BACKING_NAME:
                raise self.corrupt(f'the backing file name is '
                                   f'{h.backing_file_size} bytes long '
                                   f'(at most {MAX_BACKING_NAME})')
            if h.version > 1 and h.backing_file_offset > h.cluster_size:
                raise self.corrupt('the backing file name lies outside '
                                   'the first cluster')
        needed = -(-h.size // h.l2_span)
        if h.l1_size < needed:
            raise self.corrupt(f'the L1 table has {h.l1_size} entries, '
                               f'{needed} are needed for {h.size} bytes')
        self.check_l1(h.l1_table_offset, h.l1_size, 'the active L1 table', h)
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise self.corrupt(f'{h.nb_snapshots} snapshots (at most '
                               f'{MAX_SNAPSHOTS})')
        if h.nb_snapshots > self._limits.snapshots:
            raise InvalidArgument(f'{self.where}: ' + self._limits.refuse(
                'snapshots', 'the qcow2 snapshot table (snapshots)',
                h.nb_snapshots))
        if h.nb_snapshots and h.snapshots_offset % h.cluster_size:
            raise self.corrupt('the snapshot table is not cluster aligned')

    def check_l1(self, offset: int, entries: int, what: str,
                 h: QcowHeader) -> None:
        """An L1 table (HEAD's or a snapshot's) within QEMU's bound and the
        metadata budget, aligned, and inside the file."""
        if entries * 8 > MAX_L1_BYTES:
            raise self.corrupt(f'{what} has {entries} entries (at most '
                               f'{MAX_L1_BYTES // 8})')
        if entries * 8 > self._limits.metadata_bytes:
            raise InvalidArgument(f'{self.where}: ' + self._limits.refuse(
                'metadata_bytes', f'{what} of the qcow2 image (bytes)',
                entries * 8))
        if h.version > 1 and offset % h.cluster_size:
            raise self.corrupt(f'{what} at {offset:#x} is not cluster '
                               f'aligned')
        if offset + entries * 8 > self.file_size:
            raise self.corrupt(f'{what} at {offset:#x} ({entries} entries) '
                               f'ends past the end of the file '
                               f'({self.file_size} bytes)')

    # -- extensions and features ----------------------------------------------

    def read_extensions(self, h: QcowHeader) -> HeaderExtensions:
        exts = HeaderExtensions()
        if h.version < 2:
            return exts
        end = h.backing_file_offset or h.cluster_size
        end = min(end, self.file_size)
        if end <= h.header_length:
            return exts
        buf = self.read_exact(h.header_length, end - h.header_length,
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
                raise self.corrupt(f'header extension {kind:#x} overruns '
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

    def check_features(self, h: QcowHeader, exts: HeaderExtensions) -> None:
        """Refuse what this reader cannot read faithfully: unknown
        incompatible features, a corrupt mark, an unknown compression, an
        external data file without a name."""
        unknown = h.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = ', '.join(
                exts.feature_names.get((0, bit), f'bit {bit}')
                for bit in range(64) if unknown >> bit & 1)
            raise Unsupported(f'{self.where}: the image uses incompatible '
                              f'qcow2 features this reader does not know '
                              f'({names}); convert it with `qemu-img convert '
                              f'-O qcow2` first')
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise InvalidArgument(f'{self.where}: the image is marked '
                                  f'corrupt; repair it with `qemu-img check '
                                  f'-r all` first')
        if h.compression_type not in COMPRESSION_TYPES:
            raise Unsupported(f'{self.where}: compression type '
                              f'{h.compression_type} is not supported (only '
                              f'zlib and zstd)')
        if bool(h.incompatible_features & INCOMPAT_COMPRESSION) != \
                bool(h.compression_type):
            raise self.corrupt('the compression type bit and the '
                               'compression_type field disagree')
        if h.has_data_file and not exts.data_file:
            raise Unsupported(f'{self.where}: the image keeps its data in an '
                              f'external data file that it does not name; '
                              f'convert it with `qemu-img convert` first')

    # -- backing file and snapshots -------------------------------------------

    def read_backing_name(self, h: QcowHeader) -> Optional[str]:
        if not h.backing_file_offset or not h.backing_file_size:
            return None
        raw = self.read_exact(h.backing_file_offset, h.backing_file_size,
                              'the backing file name')
        return self._file_name(raw, 'backing file')

    def _file_name(self, raw: bytes, what: str) -> str:
        """A file name the header gives, to be opened next to the image:
        QEMU reads it as a C string, and no path holds a NUL."""
        if b'\0' in raw:
            raise self.corrupt(f'the {what} name holds a NUL byte')
        return raw.decode('utf-8', 'surrogateescape')

    def read_snapshots(self, h: QcowHeader) -> List[QcowSnapshot]:
        snaps: List[QcowSnapshot] = []
        reader = _TableReader(
            self._stream.read, h.snapshots_offset,
            lambda: self.corrupt('the snapshot table runs past the end of '
                                 'the file'))
        for i in range(h.nb_snapshots):
            self._ctx.check()
            entry = reader.take(_SNAPSHOT_ENTRY.size)
            (l1_off, l1_size, id_len, name_len, _sec, _nsec, _clock,
             _vm_state, extra_len) = _SNAPSHOT_ENTRY.unpack(entry)
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise self.corrupt(f'snapshot {i} has {extra_len} bytes of '
                                   f'extra data')
            if max(id_len, name_len) > MAX_SNAPSHOT_NAME:
                raise Unsupported(
                    f'{self.where}: snapshot {i} has a name or id of '
                    f'{max(id_len, name_len)} bytes, longer than any RBD '
                    f'snapshot name ({MAX_SNAPSHOT_NAME}); delete it with '
                    f'`qemu-img snapshot -d` first')
            extra = reader.take(extra_len)
            ident = reader.take(id_len)
            name = reader.take(name_len)
            reader.align(8)
            disk_size = struct.unpack_from('>Q', extra, 8)[0] \
                if extra_len >= 16 else h.size
            self.check_l1(l1_off, l1_size, f'the L1 table of snapshot {i}', h)
            snaps.append(QcowSnapshot(
                ident.decode('utf-8', 'replace'),
                name.decode('utf-8', 'replace'), l1_off, l1_size, disk_size))
        return snaps
