"""VMware disks (vmdk), read natively.

Following VMware's Virtual Disk Format 5.0 and QEMU's block/vmdk.c: a disk is
a list of extents laid end to end.  A *hosted sparse* extent (magic KDMV) maps
grains through a grain directory and grain tables; a *flat* extent is raw
bytes at an offset of its file; a *zero* extent reads as zeros.  Three ways
to hold them:

- monolithicSparse and streamOptimized: one sparse file, its descriptor
  inside (streamOptimized -- the disk inside every OVA -- compresses each
  grain with deflate and keeps the real header in a footer at the end);
- a descriptor file (text) naming its extents, each a file *beside* it,
  opened through the same stream's ``sibling`` (never elsewhere):
  monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, vmfs.

Refused with one line each: ESX's COWD sparse (vmfsSparse), seSparse, raw
device mappings, delta disks (a parent disk), encrypted disks.  Every number
in a file is checked against ``SourceLimits`` before it sizes anything; the
grain tables live in an LRU cache within ``metadata_bytes``.
"""
import array
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..context import SourceContext
from ..errors import InvalidArgument, Unsupported
from ..streams import open_stream
from ..streams.base import Stream
from .base import (Extent, ExtentKind, FormatFeatures, PieceReader, Snapshot, coalesce,
                   zero_fill)
from .deflate import inflate_zlib_into
from .qcow_cache import _LruCache

SECTOR = 512
#: 'KDMV' little-endian: a hosted sparse extent.
SPARSE_MAGIC = 0x564D444B
#: 'COWD': ESX's vmfsSparse, which this reader does not support.
COWD_MAGIC = 0x44574F43
#: The header's gdOffset when the real one is in the footer (streamOptimized).
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_DEFLATE = 1
#: A grain table entry that reads as zeros (newer hosted sparse files).
GTE_ZERO = 1
#: Grain tables of at most 512 entries (QEMU's bound), grains of at most
#: 2 MiB (VMware writes 64 KiB; a compressed grain is held whole while it is
#: inflated), descriptors of at most 1 MiB.
MAX_GTES = 512
MAX_GRAIN = 2 << 20
MAX_DESCRIPTOR = 1 << 20
#: Bytes read for one compressed grain before its marker tells its length:
#: deflate output of an incompressible grain is a little longer than it.
GRAIN_SLACK = 4096
#: Bytes one read of consecutive compressed grains spans at most.
INFLATE_SPAN = 8 << 20

_HEADER = struct.Struct('<IIIQQQQIQQQB4sH')
_MARKER = struct.Struct('<QI')
_EXTENT_LINE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
FIELD = 'source-spec: type: vmdk'


@dataclass(frozen=True)
class SparseHeader:
    version: int
    flags: int
    capacity: int          # sectors
    grain_sectors: int
    descriptor_offset: int  # sectors
    descriptor_size: int    # sectors
    gtes_per_gt: int
    gd_offset: int          # sectors
    compress: int

    @classmethod
    def parse(cls, data: bytes) -> 'SparseHeader':
        (_magic, version, flags, capacity, grain, desc_off, desc_size, gtes,
         _rgd, gd, _overhead, _unclean, _chars, compress) = _HEADER.unpack_from(data)
        return cls(version, flags, capacity, grain, desc_off, desc_size, gtes, gd,
                   compress)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)


class _SparseFile:
    """One hosted sparse extent: its header, grain directory and tables."""

    def __init__(self, stream: Stream, header: SparseHeader, where: str,
                 ctx: SourceContext, tables: _LruCache) -> None:
        self.stream = stream
        self.header = header
        self.where = where
        self.ctx = ctx
        self.tables = tables
        self.grain = header.grain_sectors * SECTOR
        self.size = header.capacity * SECTOR
        self.gt_span = self.grain * header.gtes_per_gt
        entries = -(-self.size // self.gt_span)
        if entries * 4 > ctx.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + ctx.limits.refuse(
                'metadata_bytes', 'the grain directory (bytes)', entries * 4))
        raw = self._exact(header.gd_offset * SECTOR, entries * 4, 'the grain directory')
        self.directory = array.array('I', raw)
        if sys.byteorder != 'little':
            self.directory.byteswap()

    def _exact(self, offset: int, length: int, what: str) -> bytes:
        data = self.stream.read(offset, length)
        if len(data) != length:
            raise corrupt(self.where, f'{what} at {offset:#x} (+{length}) is past '
                          f'the end of the file')
        return data

    def table(self, index: int) -> Optional['array.array[int]']:
        """Grain table ``index``, or None where the directory has none."""
        sector = self.directory[index]
        if sector == 0:
            return None

        def load() -> Tuple[Any, int]:
            length = self.header.gtes_per_gt * 4
            table = array.array('I', self._exact(sector * SECTOR, length,
                                                 f'grain table {index}'))
            if sys.byteorder != 'little':
                table.byteswap()
            return table, length
        result: 'array.array[int]' = self.tables.get((id(self), index), load)
        return result

    def grains(self, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
        """(guest offset, length, grain table entry) over ``[start, end)``,
        grain by grain; entry 0 where no table maps it."""
        pos = start
        while pos < end:
            index, within = divmod(pos, self.gt_span)
            table = self.table(index)
            grain_no = within // self.grain
            stop = min(end, (pos // self.grain + 1) * self.grain)
            entry = table[grain_no] if table is not None else 0
            yield pos, stop - pos, entry
            pos = stop

    def allocated(self) -> Iterator[Extent]:
        for index in range(len(self.directory)):
            self.ctx.check()
            table = self.table(index)
            if table is None:
                continue
            base = index * self.gt_span
            for n, entry in enumerate(table):
                offset = base + n * self.grain
                if entry == 0 or offset >= self.size:
                    continue
                length = min(self.grain, self.size - offset)
                yield Extent(offset, length,
                             ExtentKind.ZERO if entry == GTE_ZERO else ExtentKind.DATA)

    def inflate(self, sector: int, stored: Union[bytes, memoryview], lba: int) -> bytearray:
        """The grain at ``sector`` from its stored bytes (marker, deflate)."""
        if len(stored) < _MARKER.size:
            raise corrupt(self.where, f'the grain at sector {sector} is cut short')
        marker_lba, size = _MARKER.unpack_from(stored)
        if marker_lba != lba:
            raise corrupt(self.where, f'the grain at sector {sector} says it '
                          f'holds sector {marker_lba}, not {lba}')
        if size > len(stored) - _MARKER.size:
            more = self._exact(sector * SECTOR, _MARKER.size + size,
                               f'the grain at sector {sector}')
            stored = more
        out = bytearray(self.grain)
        try:
            inflate_zlib_into(stored[_MARKER.size:_MARKER.size + size], memoryview(out))
        except ValueError as e:
            raise corrupt(self.where, f'the grain at sector {sector} does not '
                          f'inflate ({e})') from None
        return out


@dataclass
class _Part:
    """One extent of the disk: guest ``[start, start + length)``."""

    start: int
    length: int
    kind: str                        # 'flat', 'sparse' or 'zero'
    stream: Optional[Stream] = None
    offset: int = 0                  # flat: byte offset in its file
    sparse: Optional[_SparseFile] = None
    name: str = ''

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class _Reads:
    """What one read needs: raw bytes per stream, grains to inflate."""

    direct: Dict[int, List[Tuple[int, memoryview]]] = field(default_factory=dict)
    streams: Dict[int, Stream] = field(default_factory=dict)
    #: (extent, sector, its lba, where the grain goes, offset in the grain)
    grains: List[Tuple[_SparseFile, int, int, memoryview, int]] = \
        field(default_factory=list)

    def add(self, stream: Stream, offset: int, view: memoryview) -> None:
        self.streams[id(stream)] = stream
        self.direct.setdefault(id(stream), []).append((offset, view))


class VmdkFormat(PieceReader):
    """A VMware disk over a stream: a sparse file or a descriptor."""

    def __init__(self, parts: List[_Part], streams: List[Stream], where: str,
                 ctx: SourceContext, create_type: str) -> None:
        self._parts = parts
        self._streams = streams
        self._where = where
        self._ctx = ctx
        self._size = parts[-1].end if parts else 0
        self.create_type = create_type
        self.features = FormatFeatures(
            compressed=any(p.sparse is not None and p.sparse.header.compressed
                           for p in parts),
            compression_type='deflate' if any(
                p.sparse is not None and p.sparse.header.compressed for p in parts)
            else None)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'VmdkFormat':
        stream = open_stream(spec['stream'], ctx)
        opened = [stream]
        try:
            return cls._open(stream, opened, ctx)
        except BaseException:
            for s in opened:
                s.close()
            raise

    @classmethod
    def _open(cls, stream: Stream, opened: List[Stream], ctx: SourceContext) -> 'VmdkFormat':
        where = stream.description
        tables = _LruCache(ctx.limits.metadata_bytes)
        head = stream.read(0, SECTOR)
        magic = struct.unpack_from('<I', head)[0] if len(head) >= 4 else 0
        if magic == COWD_MAGIC:
            raise Unsupported(f'{where}: an ESX vmfsSparse (COWD) disk is not '
                              'supported; convert it with `vmkfstools -i` or '
                              '`qemu-img convert` first')
        if magic == SPARSE_MAGIC:
            sparse = _sparse(stream, where, ctx, tables)
            text = _embedded_descriptor(stream, sparse.header, where)
            create_type, _ = _parse_descriptor(text, where) if text else ('monolithicSparse', [])
            return cls([_Part(0, sparse.size, 'sparse', stream, sparse=sparse)],
                       opened, where, ctx, create_type)
        if not head.lstrip().startswith(b'#') and b'createType' not in head:
            raise InvalidArgument(f'{where}: not a vmdk (neither a sparse extent '
                                  f'nor a descriptor); check "type"')
        text = _descriptor_text(stream, where)
        create_type, lines = _parse_descriptor(text, where)
        if not lines:
            raise InvalidArgument(f'{where}: a vmdk descriptor without extents; '
                                  'check "type"')
        parts: List[_Part] = []
        start = 0
        for access, sectors, kind, name, offset in lines:
            length = sectors * SECTOR
            if access == 'NOACCESS':
                raise Unsupported(f"{where}: extent '{name}' is NOACCESS; give "
                                  'the disk with every extent readable')
            if kind == 'ZERO':
                parts.append(_Part(start, length, 'zero'))
            elif kind in ('FLAT', 'VMFS'):
                file = _sibling(stream, name, where)
                opened.append(file)
                parts.append(_Part(start, length, 'flat', file, offset * SECTOR, name=name))
            elif kind == 'SPARSE':
                file = _sibling(stream, name, where)
                opened.append(file)
                sparse = _sparse(file, file.description, ctx, tables)
                if sparse.size < length:
                    raise corrupt(where, f"extent '{name}' holds {sparse.size} "
                                  f'bytes, the descriptor says {length}')
                parts.append(_Part(start, length, 'sparse', file, sparse=sparse, name=name))
            else:
                raise Unsupported(f'{where}: extents of type {kind} are not '
                                  'supported; convert the disk with `qemu-img '
                                  'convert` first')
            start += length
        return cls(parts, opened, where, ctx, create_type)

    # -- the Format interface -------------------------------------------------

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return self._size

    def snapshots(self) -> List[Snapshot]:
        return []

    @property
    def read_size(self) -> int:
        """The largest of its files' streams' (an OVA's members share the
        archive's)."""
        streams = self._streams + [p.stream for p in self._parts if p.stream is not None]
        return max((s.request_size for s in streams), default=0)

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        def each() -> Iterator[Extent]:
            for part in self._parts:
                if part.kind == 'flat':
                    yield Extent(part.start, part.length)
                elif part.kind == 'sparse':
                    assert part.sparse is not None
                    for ext in part.sparse.allocated():
                        if ext.offset < part.length:
                            yield Extent(part.start + ext.offset,
                                         min(ext.length, part.length - ext.offset), ext.kind)
        return coalesce(each())

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        """Flat bytes and grains of every piece read with one
        ``read_pieces`` per file (merged into few requests remotely),
        compressed grains inflated after."""
        reads = _Reads()
        for offset, view in pieces:
            if offset < 0:
                raise ValueError(f'bad read: offset={offset}')
            end = min(offset + len(view), self._size)
            zero_fill(view[max(0, end - offset):])
            for part in self._parts:
                lo, hi = max(offset, part.start), min(end, part.end)
                if lo < hi:
                    self._plan(part, lo, hi, view[lo - offset:hi - offset], reads)
        for key, wanted in reads.direct.items():
            counts = reads.streams[key].read_pieces(wanted)
            for (at, view), n in zip(wanted, counts):
                zero_fill(view[n:])    # a flat file shorter than its extent
        self._inflate_grains(reads.grains)

    @staticmethod
    def _inflate_grains(grains: List[Tuple['_SparseFile', int, int, memoryview, int]]) -> None:
        """Compressed grains lie one after another (streamOptimized writes
        them in order): each run of them is one read, from the first marker
        to past the last grain's longest possible end, then inflated from
        that buffer (a grain that turns out longer is read again whole)."""
        grains = sorted(grains, key=lambda g: (id(g[0]), g[1]))
        i = 0
        while i < len(grains):
            sparse = grains[i][0]
            reach = _MARKER.size + sparse.grain + GRAIN_SLACK
            j = i + 1
            while j < len(grains) and grains[j][0] is sparse \
                    and (grains[j][1] - grains[j - 1][1]) * SECTOR <= reach \
                    and (grains[j][1] - grains[i][1]) * SECTOR + reach <= INFLATE_SPAN:
                j += 1
            start = grains[i][1] * SECTOR
            # Read into a buffer of ours: libdeflate reads it in place.
            buf = bytearray((grains[j - 1][1] * SECTOR - start) + reach)
            data = memoryview(buf)[:sparse.stream.read_into(start, memoryview(buf))]
            for _, sector, lba, view, within in grains[i:j]:
                at = sector * SECTOR - start
                grain = sparse.inflate(sector, data[at:at + reach], lba)
                view[:] = grain[within:within + len(view)]
            i = j

    def _plan(self, part: _Part, lo: int, hi: int, view: memoryview, reads: _Reads) -> None:
        if part.kind == 'zero':
            zero_fill(view)
            return
        assert part.stream is not None
        if part.kind == 'flat':
            reads.add(part.stream, part.offset + lo - part.start, view)
            return
        sparse = part.sparse
        assert sparse is not None
        pos = 0
        for at, length, entry in sparse.grains(lo - part.start, hi - part.start):
            target = view[pos:pos + length]
            pos += length
            if entry in (0, GTE_ZERO):
                zero_fill(target)
            elif sparse.header.compressed:
                within = at % sparse.grain
                reads.grains.append((sparse, entry, (at - within) // SECTOR, target, within))
            else:
                reads.add(part.stream, entry * SECTOR + at % sparse.grain, target)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


# -- opening -----------------------------------------------------------------


def corrupt(where: str, detail: str) -> InvalidArgument:
    return InvalidArgument(f'{where}: the vmdk is corrupt: {detail}; check it with '
                           '`qemu-img check`')


def _sparse(stream: Stream, where: str, ctx: SourceContext,
            tables: _LruCache) -> _SparseFile:
    data = stream.read(0, SECTOR)
    if len(data) < _HEADER.size or struct.unpack_from('<I', data)[0] != SPARSE_MAGIC:
        raise corrupt(where, 'a sparse extent without its header')
    header = SparseHeader.parse(data)
    if header.gd_offset == GD_AT_END:
        # streamOptimized: footer marker, footer (the real header), EOS.
        size = stream.size()
        footer = stream.read(size - 2 * SECTOR, SECTOR) if size >= 3 * SECTOR else b''
        if len(footer) < _HEADER.size or struct.unpack_from('<I', footer)[0] != SPARSE_MAGIC:
            raise corrupt(where, 'the grain directory is at the end, but no '
                          'footer is there')
        header = SparseHeader.parse(footer)
    if header.version not in (1, 2, 3):
        raise Unsupported(f'{where}: sparse extent version {header.version} is '
                          'not supported (1 to 3 are)')
    if header.compressed and header.compress != COMPRESS_DEFLATE:
        raise Unsupported(f'{where}: grains compressed with algorithm '
                          f'{header.compress} are not supported (deflate is)')
    grain = header.grain_sectors * SECTOR
    if header.grain_sectors < 1 or grain & (grain - 1):
        raise corrupt(where, f'grains of {header.grain_sectors} sectors')
    if grain > MAX_GRAIN:
        raise Unsupported(f'{where}: grains of {grain} bytes (at most '
                          f'{MAX_GRAIN >> 20} MiB are read); convert the disk with '
                          '`qemu-img convert` first')
    if not 1 <= header.gtes_per_gt <= MAX_GTES:
        raise corrupt(where, f'{header.gtes_per_gt} entries per grain table')
    if header.gd_offset in (0, GD_AT_END):
        raise corrupt(where, 'no grain directory')
    return _SparseFile(stream, header, where, ctx, tables)


def _embedded_descriptor(stream: Stream, header: SparseHeader, where: str) -> str:
    length = header.descriptor_size * SECTOR
    if not header.descriptor_offset or not length:
        return ''
    if length > MAX_DESCRIPTOR:
        raise corrupt(where, f'a descriptor of {length} bytes')
    return stream.read(header.descriptor_offset * SECTOR, length) \
        .split(b'\0', 1)[0].decode('utf-8', 'replace')


def _descriptor_text(stream: Stream, where: str) -> str:
    size = stream.size()
    if size > MAX_DESCRIPTOR:
        raise InvalidArgument(f'{where}: a vmdk descriptor of {size} bytes (at '
                              f'most {MAX_DESCRIPTOR} are read); check "type"')
    return stream.read(0, size).decode('utf-8', 'replace')


def _parse_descriptor(text: str, where: str
                      ) -> Tuple[str, List[Tuple[str, int, str, str, int]]]:
    """createType and the extent lines; refusing what this reader cannot
    import faithfully (a parent disk, encryption)."""
    values: Dict[str, str] = {}
    extents: List[Tuple[str, int, str, str, int]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith('#'):
            continue
        m = _EXTENT_LINE.match(line)
        if m:
            access, sectors, kind, name, offset = m.groups()
            extents.append((access, int(sectors), kind.upper(), name or '', int(offset or 0)))
            continue
        key, eq, value = line.partition('=')
        if eq:
            values[key.strip()] = value.strip().strip('"')
    create_type = values.get('createType', '')
    parent = values.get('parentCID', 'ffffffff').lower()
    if parent != 'ffffffff' or 'parentFileNameHint' in values:
        raise Unsupported(f"{where}: a delta disk on the parent "
                          f"'{values.get('parentFileNameHint', '?')}'; import a "
                          'consolidated disk (`qemu-img convert` of the child)')
    if any(k.startswith('encryption') or k == 'ddb.encryption' for k in values):
        raise Unsupported(f'{where}: an encrypted vmdk is not supported; decrypt it first')
    if create_type in ('vmfsSparse', 'seSparse', 'vmfsRDM', 'vmfsRawDeviceMap',
                       'vmfsPassthroughRawDeviceMap'):
        raise Unsupported(f'{where}: createType {create_type} is not supported; '
                          'convert the disk with `qemu-img convert` first')
    return create_type, extents


def _sibling(stream: Stream, name: str, where: str) -> Stream:
    """An extent file beside the descriptor, through the same stream type."""
    if not name or name in ('.', '..') or any(c in name for c in '/\\') \
            or not name.isprintable():
        raise InvalidArgument(f"{where}: extent file '{name}' is not a plain file "
                              'name beside the descriptor')
    try:
        return stream.sibling(name)
    except NotImplementedError:
        raise Unsupported(f"{where}: extent file '{name}' cannot be reached "
                          'through this stream type; give a single-file vmdk '
                          '(monolithicSparse or streamOptimized)') from None
