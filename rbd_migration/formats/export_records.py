"""The records of an ``rbd export-diff`` stream, and the reader that
indexes them.

Following Ceph's doc/dev/rbd-diff.rst and src/tools/rbd/action/Export.cc and
Import.cc (what ``rbd import-diff`` accepts).  A diff is a banner ("rbd diff
v1\\n", or "rbd diff v2\\n" where every record but the end carries a le64
length) and tagged records: metadata first ('f' from-snap, 't' to-snap,
's' image size at the end of the diff, 'p' protection of the to-snap, v2
only), then data ('w' offset, length, bytes; 'z' offset, length), then 'e'.

Indexing reads record headers through the stream in windows; data payloads
are skipped by offset and stay in the file, so a diff's data records become
runs (image range -> file offset, or zeros; see ``runs``).  A file's
records are chosen by whoever wrote it, so before the index grows their
count is checked against the context's ``SourceLimits.records`` (per
stream) and the index's bytes against ``metadata_bytes`` (for the whole
format, through one :class:`IndexBudget`); indexing checks the context
every batch of records, so that a cancel or the probe's deadline ends it.

:func:`parse_diff` serves ``export_diff`` (a diff per stream) and
``export_v2`` (v2 diffs back to back in one stream).
"""
import struct
from array import array
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument
from ..streams.base import Stream
from .detect import DIFF_BANNER_V1, DIFF_BANNER_V2
from .runs import INDEX_NAME, ZERO, IndexBudget, Runs


TAG_FROM_SNAP = ord('f')
TAG_TO_SNAP = ord('t')
TAG_SIZE = ord('s')
TAG_PROTECTED = ord('p')
TAG_WRITE = ord('w')
TAG_ZERO = ord('z')
TAG_END = ord('e')

#: ``rbd import-diff`` refuses longer snapshot names as garbage.
MAX_NAME = 4096
#: Bytes of record headers fetched per stream request while indexing: one
#: request covers many small records, and a payload larger than this is
#: skipped without being read at all.
INDEX_WINDOW = 64 << 10
#: The most a window grows to while the payloads it skips are ones the
#: stream would rather read than send another request for (``merge_gap``):
#: over HTTP a diff of 1 MiB records cost a request per record header (110
#: for a 125 MiB diff) at every open; read through in growing windows it
#: costs a few dozen.  Bounded so an index stays within a probe's memory.
INDEX_WINDOW_MAX = 4 << 20
#: Records indexed between calls to ``ctx.check()``; index room is reserved
#: against the budget a batch at a time.
RECORD_BATCH = 4096

_U32 = struct.Struct('<I')
_U64 = struct.Struct('<Q')
_IO = struct.Struct('<QQ')
#: A data record's header: tag, (v2: record length,) offset, length.
_DATA_HEADERS = {1: struct.Struct('<BQQ'), 2: struct.Struct('<BQQQ')}


def _tag_name(tag: int) -> str:
    return f"'{chr(tag)}'" if 0x21 <= tag < 0x7f else f'{tag:#04x}'


# --------------------------------------------------------------------------
# Reading record headers


@dataclass(frozen=True)
class Where:
    """A stream as messages name it: the spec field and the location."""

    field: str
    stream: Stream

    def __str__(self) -> str:
        location = self.stream.description or 'image'
        return f'source-spec: {self.field}: {location}'

    def corrupt(self, at: int, detail: str) -> InvalidArgument:
        return InvalidArgument(f'{self}: at byte {at}: {detail}; the file is '
                               f'corrupt or incomplete, export it again')


class RecordReader:
    """Sequential reads of record headers.  Headers are fetched a window at a
    time, so a diff of many small records costs few requests to an HTTP or
    S3 stream; payloads are skipped by offset and never read here.

    The reader also counts the stream's records against the limits
    (:meth:`next_record`); ``budget`` is shared by the streams of one
    format."""

    def __init__(self, where: Where, pos: int, end: int,
                 ctx: Optional[SourceContext] = None,
                 budget: Optional[IndexBudget] = None) -> None:
        self.where = where
        self.pos = pos
        #: The end of the stream: anything a record needs past it is missing.
        self.end = end
        self.ctx = ctx if ctx is not None else SourceContext()
        self.limits = self.ctx.limits
        self.budget = budget if budget is not None else IndexBudget(self.limits)
        #: Records read from this stream so far.
        self.records = 0
        #: Records left in the batch reserved, and the index bytes reserved
        #: since the last ``settle``.
        self.batch_left = 0
        self._reserved = 0
        self._buf = b''
        self._buf_start = 0
        #: What the next refill reads at least (see INDEX_WINDOW_MAX).
        self._window = INDEX_WINDOW

    def next_record(self) -> None:
        """Count one more record: refused past ``limits.records``; at the
        start of every batch, the context is checked (a cancel or the
        deadline ends indexing) and index room for the batch is reserved,
        so the index never grows past the budget."""
        self.records += 1
        if self.records > self.limits.records:
            raise InvalidArgument(f'{self.where}: ' + self.limits.refuse(
                'records', 'indexing this stream (records)', self.records))
        if not self.batch_left:
            self.ctx.check()
            room = RECORD_BATCH * Runs.ITEM_BYTES
            self.budget.charge(room, self.where, INDEX_NAME)
            self._reserved += room
            self.batch_left = RECORD_BATCH
        self.batch_left -= 1

    def settle(self, held: int) -> None:
        """What was read since the last call holds ``held`` bytes of index:
        charge that instead of the batches reserved for it."""
        self.budget.used += held - self._reserved
        self._reserved = self.batch_left = 0

    def window(self, length: int) -> Tuple[bytes, int]:
        """The buffer holding the next ``length`` bytes (fewer at the end of
        the stream) and where they start in it, for parsing in place."""
        lo = self.pos - self._buf_start
        if lo < 0 or lo + length > len(self._buf):
            self._refill(self.pos, length)
            lo = 0
        return self._buf, lo

    def _refill(self, pos: int, length: int) -> None:
        """Read the window at ``pos``.  It doubles (up to INDEX_WINDOW_MAX)
        while what was skipped since the last one is within the stream's
        ``merge_gap``: reading through payloads that small costs less than
        a request per header; a file (no merging) always reads the least."""
        skipped = pos - (self._buf_start + len(self._buf))
        gap = self.where.stream.merge_gap
        if self._buf and gap >= 0 and skipped <= gap:
            self._window = min(2 * self._window, INDEX_WINDOW_MAX)
        else:
            self._window = INDEX_WINDOW
        want = min(max(length, self._window), self.end - pos)
        self._buf = self.where.stream.read(pos, max(0, want))
        self._buf_start = pos

    def truncated(self, at: int, what: str) -> InvalidArgument:
        return self.where.corrupt(at, f'{what} is cut short (the file ends at '
                                      f'byte {self.end})')

    def take(self, length: int, at: int, what: str) -> bytes:
        """``length`` bytes at the current position; ``at`` and ``what``
        name the record they belong to, should they be missing."""
        pos = self.pos
        if pos + length > self.end:
            raise self.truncated(at, what)
        lo = pos - self._buf_start
        if lo < 0 or lo + length > len(self._buf):
            self._refill(pos, length)
            lo = 0
            if len(self._buf) < length:
                raise self.truncated(at, what)
        self.pos = pos + length
        return self._buf[lo:lo + length]

    def u8(self, at: int, what: str) -> int:
        return self.take(1, at, what)[0]

    def u32(self, at: int, what: str) -> int:
        value: int = _U32.unpack(self.take(4, at, what))[0]
        return value

    def u64(self, at: int, what: str) -> int:
        value: int = _U64.unpack(self.take(8, at, what))[0]
        return value

    def skip(self, length: int, at: int, what: str) -> None:
        if self.pos + length > self.end:
            raise self.truncated(at, what)
        self.pos += length

    def string(self, at: int, what: str, limit: int) -> bytes:
        """A le32 length and that many bytes, as Ceph encodes a string."""
        length = self.u32(at, what)
        if length > limit:
            raise self.where.corrupt(at, f'{what} claims {length} bytes (at '
                                         f'most {limit})')
        return self.take(length, at, what)


# --------------------------------------------------------------------------
# One diff


@dataclass
class Diff:
    """What indexing one diff found.  ``records`` are in file order and may
    overlap (a later one wins, as ``rbd import-diff`` would write it)."""

    start: int
    end: int = 0
    version: int = 1
    from_snap: Optional[str] = None
    to_snap: Optional[str] = None
    #: The image size at the end of the diff; None: unchanged.
    size: Optional[int] = None
    protected: bool = False
    records: Runs = field(default_factory=Runs)


def _name(raw: bytes, where: Where, at: int, record: str) -> str:
    """Snapshot names become RBD snapshot names through a str API over C
    strings: an empty one, one holding a NUL or one not UTF-8 would make a
    snapshot nobody can name (rbd never writes them)."""
    try:
        name = raw.decode('utf-8')
    except UnicodeDecodeError:
        problem = 'is not UTF-8'
    else:
        if name and '\0' not in name:
            return name
        problem = 'holds a NUL byte' if name else 'is empty'
    raise where.corrupt(at, f'the snapshot name {problem} in {record}, so no '
                            f'RBD snapshot could be addressed by it')


def parse_diff(reader: RecordReader, layer: int, size_before: int) -> Diff:
    """Index the diff at the reader's position; afterwards the reader stands
    just past its end record.  ``size_before`` is the image size the diff
    applies to: data records must lie within the size in effect, as
    ``rbd import-diff`` would fail writing past the end.

    Known records are read by their layout and their v2 length is ignored,
    as ``rbd import-diff`` does: Pacific writes the 'p' record with a length
    of 8 around its one byte, so the length only serves to skip records of
    unknown tags.  Stricter than ``rbd import-diff`` where it would go on
    with a dubious file: a metadata record after the data, or one given
    twice, is reported as corruption.
    """
    where = reader.where
    start = reader.pos
    banner = reader.take(len(DIFF_BANNER_V1), start, 'the diff banner')
    if banner == DIFF_BANNER_V1:
        version = 1
    elif banner == DIFF_BANNER_V2:
        version = 2
    else:
        raise where.corrupt(start, f'expected a diff banner, '
                                   f'{DIFF_BANNER_V1!r} or {DIFF_BANNER_V2!r}'
                                   f', found {banner!r}')
    diff = Diff(start=start, version=version)
    size = size_before
    seen: List[int] = []
    data_seen = False
    while True:
        if _data_records(reader, diff.records, layer, size, version):
            data_seen = True
        at = reader.pos
        reader.next_record()
        tag = reader.u8(at, 'a record tag')
        if tag == TAG_END:
            break
        name = f'the {_tag_name(tag)} record'
        length: Optional[int] = None
        if version == 2:
            length = reader.u64(at, name)
        if tag in (TAG_FROM_SNAP, TAG_TO_SNAP, TAG_SIZE, TAG_PROTECTED):
            if data_seen:
                raise where.corrupt(at, f'{name} follows data records; '
                                        f'metadata records must come first')
            if tag in seen:
                raise where.corrupt(at, f'{name} appears twice in one diff')
            seen.append(tag)
        if tag in (TAG_FROM_SNAP, TAG_TO_SNAP):
            text = _name(reader.string(at, name, MAX_NAME), where, at, name)
            if tag == TAG_FROM_SNAP:
                diff.from_snap = text
            else:
                diff.to_snap = text
        elif tag == TAG_SIZE:
            size = reader.u64(at, name)
            diff.size = size
        elif tag == TAG_PROTECTED and version == 2:
            diff.protected = reader.u8(at, name) != 0
        elif tag in (TAG_WRITE, TAG_ZERO):
            data_seen = True
            offset, count = _IO.unpack(reader.take(16, at, name))
            if offset + count > size:
                raise where.corrupt(at, f'{name} covers bytes {offset} to '
                                        f'{offset + count}, past the image '
                                        f'size {size}')
            if tag == TAG_WRITE:
                src = reader.pos
                reader.skip(count, at, f'the data of {name}')
            else:
                src = ZERO
            if count:
                diff.records.add(offset, offset + count, layer, src)
        elif length is not None:
            # v2 lets a reader skip what it does not know, as rbd does.
            reader.skip(length, at, name)
        else:
            raise where.corrupt(at, f'unknown record tag {_tag_name(tag)} in '
                                    f'a version 1 diff')
    diff.end = reader.pos
    reader.settle(diff.records.nbytes)
    return diff


def _data_records(reader: RecordReader, records: Runs, layer: int,
                  size: int, version: int) -> bool:
    """Consume the data records ('w', 'z') at the reader's position that
    are plainly valid, parsed in place from its window: the bulk of a large
    diff at a fraction of what the general loop costs a record.  Anything
    else -- another record, one past the size or the end of the file, the
    first of a batch (where the limits are checked) -- is left to the
    general loop, which also words what is wrong.  True if any was."""
    header = _DATA_HEADERS[version]
    starts, ends = records.starts.append, records.ends.append
    srcs = records.srcs.append
    added = len(records.starts)
    try:
        return _scan_data(reader, header, size, starts, ends, srcs)
    finally:
        added = len(records.starts) - added
        records.layers.extend(array('I', [layer]) * added)


def _scan_data(reader: RecordReader, header: struct.Struct, size: int,
               starts: Callable[[int], None], ends: Callable[[int], None],
               srcs: Callable[[int], None]) -> bool:
    """The loop of ``_data_records``, appending through the arrays'
    ``append`` methods it is given; the reader's position and count are
    kept in locals and written back on the way out."""
    n = header.size
    limit, end = reader.limits.records, reader.end
    pos, counted, left = reader.pos, reader.records, reader.batch_left
    buf, lo = reader.window(n)
    base = pos - lo      # where ``buf`` starts in the stream
    try:
        while True:
            if counted + 1 > limit or not left:
                break
            lo = pos - base
            if lo + n > len(buf):
                reader.pos = pos
                buf, lo = reader.window(n)
                base = pos - lo
                if len(buf) - lo < n:
                    break
            fields = header.unpack_from(buf, lo)
            tag, offset, count = fields[0], fields[-2], fields[-1]
            if tag == TAG_ZERO:
                src, after = ZERO, pos + n
            elif tag == TAG_WRITE and pos + n + count <= end:
                src, after = pos + n, pos + n + count
            else:
                break
            if offset + count > size:
                break
            pos, counted, left = after, counted + 1, left - 1
            if count:
                starts(offset)
                ends(offset + count)
                srcs(src)
    finally:
        found = counted != reader.records
        reader.pos, reader.records, reader.batch_left = pos, counted, left
    return found
