"""``rbd export-diff`` files: a base image and the diffs taken after it.

Following Ceph's doc/dev/rbd-diff.rst and src/tools/rbd/action/Export.cc and
Import.cc (what ``rbd import-diff`` accepts).  A diff is a banner ("rbd diff
v1\\n", or "rbd diff v2\\n" where every record but the end carries a le64
length) and tagged records: metadata first ('f' from-snap, 't' to-snap,
's' image size at the end of the diff, 'p' protection of the to-snap, v2
only), then data ('w' offset, length, bytes; 'z' offset, length), then 'e'.
A diff holds what changed between two snapshots (or from nothing, or up to
HEAD), so a chain of them replays an image's history, as ``rbd import-diff``
applied one after the other would.

The source-spec (type ``export-diff``)::

    {"type": "export-diff",
     "stream": {...},                  # the base
     "name": "s1",                     # optional: the base's snapshot name
     "diffs": [{"stream": {...},       # oldest first
                "name": "s2"}, ...]}   # optional: this snapshot's name

The base is either a raw image (``rbd export img@s1 base.raw``) or a diff
from nothing (``rbd export-diff img@s1 base.diff``).  Each diff must start
where the one before ends: its from-snap is the previous diff's to-snap as
the file says it (a ``name`` in the spec renames the snapshot, not the
link), or the base's name.  A raw image says no snapshot name, so a raw
base is named by ``name``, which the first diff must then start from (the
only check that the raw image is the right one), or else by the first
diff's from-snap.  Every layer (base or diff) that has a
name (``name`` in the spec, else the diff's to-snap) becomes a snapshot;
only the last layer may be nameless (a diff up to HEAD, as ``rbd export-diff
--from-snap s2 img`` writes), and it is then HEAD.  When the last layer is a
snapshot, HEAD is that snapshot's state, as after ``rbd import-diff``.

Opening indexes every stream once: record headers are read through the
stream in windows, data payloads are skipped by offset and stay in the file.
Each layer keeps its records as runs (image range -> file offset, or zeros)
packed in arrays (:class:`Runs`, 28 bytes a run, not an object per record);
reading a snapshot composes the layers up to it (newest write wins, a 'z'
clears, an 's' that shrinks the image drops what lay past the new end), and
what changed between two snapshots is exactly the records in between, so
``exact_diffs`` holds.

A file's records are chosen by whoever wrote it, so before the index grows
their count is checked against the context's ``SourceLimits.records`` (per
stream), the index's bytes against ``metadata_bytes`` (for the whole
format) and the snapshots against ``snapshots``; indexing checks the
context every batch of records, so that a cancel or the probe's deadline
ends it.

:class:`LayeredFormat` (the composition) and :func:`parse_diff` are shared
with ``export_v2``, whose streams embed v2 diffs one after the other.
"""
import bisect
import heapq
import itertools
import operator
import struct
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    NamedTuple, Optional, Tuple)

from ..context import SourceContext
from ..errors import InvalidArgument
from ..limits import SourceLimits
from ..streams import open_stream
from ..streams.base import Stream
from .base import Extent, ExtentKind, Format, FormatFeatures, Snapshot
from .detect import DIFF_BANNER_V1, DIFF_BANNER_V2
from .detect import SNIFF_LENGTH as SNIFF
from .detect import sniff as known_type
from .raw import EXTENT_PIECE


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
#: Composed layer maps kept (fewer when they would hold more than the
#: metadata budget leaves): the copier walks the layers in order, so the
#: previous one is what the next one is built from.
COMPOSED_CACHE = 4
#: Records indexed between calls to ``ctx.check()``; index room is reserved
#: against the budget a batch at a time.
RECORD_BATCH = 4096
#: What sorting overlapping records costs per record while it runs (Python
#: ints, a set, lists and a heap: 180 to 280 bytes measured), checked
#: against the budget before it starts.
SWEEP_BYTES = 256

#: ``src`` of a run that reads as zeros (a 'z' record).
ZERO = -1
#: What the index is called in a refusal.
_INDEX = 'the index of the records (bytes)'

_U32 = struct.Struct('<I')
_U64 = struct.Struct('<Q')
_IO = struct.Struct('<QQ')
#: A data record's header: tag, (v2: record length,) offset, length.
_DATA_HEADERS = {1: struct.Struct('<BQQ'), 2: struct.Struct('<BQQQ')}


class Run(NamedTuple):
    """Image bytes ``[start, end)`` of one layer: at ``src`` in that layer's
    stream (the byte at ``start``), or zeros when ``src`` is ZERO."""

    start: int
    end: int
    layer: int
    src: int

    def clip(self, lo: int, hi: int) -> 'Run':
        lo, hi = max(lo, self.start), min(hi, self.end)
        if (lo, hi) == (self.start, self.end):
            return self
        src = self.src if self.src == ZERO else self.src + lo - self.start
        return Run(lo, hi, self.layer, src)


class Runs:
    """Runs packed in arrays, ``ITEM_BYTES`` each rather than a Python
    object (over 100 bytes) per record; indexing one gives a :class:`Run`.
    Never changed once built: composed maps share them."""

    __slots__ = ('starts', 'ends', 'layers', 'srcs')
    ITEM_BYTES = 28

    def __init__(self) -> None:
        self.starts = array('Q')
        self.ends = array('Q')
        self.layers = array('I')
        self.srcs = array('q')

    @classmethod
    def of(cls, runs: Iterable[Run]) -> 'Runs':
        out = cls()
        for run in runs:
            out.append(run)
        return out

    def add(self, start: int, end: int, layer: int, src: int) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.layers.append(layer)
        self.srcs.append(src)

    def append(self, run: Run) -> None:
        self.add(run.start, run.end, run.layer, run.src)

    def extend(self, other: 'Runs', lo: int, hi: int) -> None:
        """``other[lo:hi]`` appended, in C loops."""
        self.starts.extend(other.starts[lo:hi])
        self.ends.extend(other.ends[lo:hi])
        self.layers.extend(other.layers[lo:hi])
        self.srcs.extend(other.srcs[lo:hi])

    @property
    def nbytes(self) -> int:
        return self.ITEM_BYTES * len(self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Run:
        return Run(self.starts[i], self.ends[i], self.layers[i], self.srcs[i])

    def __iter__(self) -> Iterator[Run]:
        return map(Run, self.starts, self.ends, self.layers, self.srcs)

    def __repr__(self) -> str:
        return f'Runs({list(self)!r})'


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


class IndexBudget:
    """The bytes of index one format holds (its layers' runs), shared by
    its streams and bounded by ``metadata_bytes``."""

    def __init__(self, limits: SourceLimits) -> None:
        self.limits = limits
        self.used = 0

    def charge(self, nbytes: int, where: 'Where', what: str) -> None:
        """Room for ``nbytes`` more (fewer when negative), refused past the
        bound."""
        total = self.used + nbytes
        if nbytes > 0 and total > self.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + self.limits.refuse(
                'metadata_bytes', what, total))
        self.used = total


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
            self.budget.charge(room, self.where, _INDEX)
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
            want = min(max(length, INDEX_WINDOW), self.end - self.pos)
            self._buf = self.where.stream.read(self.pos, max(0, want))
            self._buf_start = self.pos
            lo = 0
        return self._buf, lo

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
            want = max(length, min(INDEX_WINDOW, self.end - pos))
            self._buf = self.where.stream.read(pos, want)
            self._buf_start = pos
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


# --------------------------------------------------------------------------
# Layers and their composition


def _disjoint(runs: Runs) -> bool:
    return all(map(operator.le, runs.ends,
                   itertools.islice(runs.starts, 1, None)))


def _join(runs: Runs) -> Runs:
    """Adjacent runs fused where one read (or one zero range) serves both;
    ``runs`` itself when no two touch (found in C loops, without a copy)."""
    if not any(map(operator.eq, itertools.islice(runs.starts, 1, None),
                   runs.ends)):
        return runs
    out = Runs()
    starts, ends, layers, srcs = runs.starts, runs.ends, runs.layers, runs.srcs
    i, n = 0, len(runs)
    while i < n:
        start, end, layer, src = starts[i], ends[i], layers[i], srcs[i]
        i += 1
        while i < n and starts[i] == end and layers[i] == layer and (
                srcs[i] == ZERO if src == ZERO
                else srcs[i] == src + end - start):
            end = ends[i]
            i += 1
        out.add(start, end, layer, src)
    return out


def normalize(records: Runs, where: Optional['Where'] = None,
              budget: Optional[IndexBudget] = None) -> Runs:
    """Records in file order -> sorted disjoint runs, a later record winning
    where two overlap.  rbd writes them sorted and disjoint already; the
    sweep handles anything else in O(n log n), at a cost per record checked
    against ``budget`` first (and the extra runs it makes charged to it)."""
    if _disjoint(records):
        out = _join(records)
        if budget is not None and where is not None:
            budget.charge(out.nbytes - records.nbytes, where, _INDEX)
        return out
    if budget is not None and where is not None:
        cost = SWEEP_BYTES * len(records)
        if budget.used + cost > budget.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + budget.limits.refuse(
                'metadata_bytes', 'sorting its overlapping records (bytes)',
                budget.used + cost))
    out = _join(_sweep(records))
    if budget is not None and where is not None:
        budget.charge(out.nbytes - records.nbytes, where, _INDEX)
    return out


def _sweep(records: Runs) -> Runs:
    starts, ends = records.starts, records.ends
    bounds = sorted(set(starts) | set(ends))
    order = sorted(range(len(records)), key=starts.__getitem__)
    active: List[int] = []  # -index: the newest record on top
    out = Runs()
    j = 0
    for lo, hi in zip(bounds, bounds[1:]):
        while j < len(order) and starts[order[j]] <= lo:
            heapq.heappush(active, -order[j])
            j += 1
        while active and ends[-active[0]] <= lo:
            heapq.heappop(active)
        if active:
            out.append(records[-active[0]].clip(lo, hi))
    return out


def overlay(lower: Runs, upper: Runs) -> Runs:
    """``upper`` over ``lower`` (both sorted and disjoint): upper wins.
    The runs of ``lower`` between two of ``upper`` are found by bisecting
    and copied a slice at a time: a small diff over a large image costs
    in proportion to the diff."""
    if not len(upper):
        return lower
    if not len(lower):
        return upper
    out = Runs()
    i, n = 0, len(lower)
    cut = 0   # lower[i] starts here (what lay before went under a top run)
    for top in upper:
        j = bisect.bisect_right(lower.ends, top.start, i)
        if j > i:   # lower[i:j] end before top starts: kept whole
            out.append(lower[i].clip(cut, lower.ends[i]))
            out.extend(lower, i + 1, j)
            i, cut = j, 0
        while i < n and lower.starts[i] < top.end:
            run = lower[i]
            lo = max(run.start, cut)
            if lo < top.start:
                out.append(run.clip(lo, top.start))
            if run.end > top.end:
                cut = top.end
                break
            i, cut = i + 1, 0
        out.append(top)
    if i < n:
        out.append(lower[i].clip(cut, lower.ends[i]))
        out.extend(lower, i + 1, n)
    return out


def truncate(runs: Runs, size: int) -> Runs:
    """What survives shrinking the image to ``size``."""
    cut = bisect.bisect_left(runs.starts, size)
    if cut == len(runs) and (not cut or runs.ends[-1] <= size):
        return runs
    out = Runs()
    out.extend(runs, 0, max(0, cut - 1))
    if cut:
        out.append(runs[cut - 1].clip(runs.starts[cut - 1], size))
    return out


@dataclass
class Layer:
    """One state of the image: a snapshot (``name``) or HEAD (None)."""

    name: Optional[str]
    size: int
    stream: Stream
    runs: Runs
    protected: bool = False


def _coalesce(runs: Iterable[Run],
              check: Optional[Any] = None) -> Iterator[Extent]:
    """Runs as extents: adjacent ones of one kind fused, then cut into
    pieces of at most EXTENT_PIECE so the copier can spread a large range
    over its workers.  ``check`` is called every RECORD_BATCH runs."""
    pending: Optional[Tuple[int, int, ExtentKind]] = None
    for count, run in enumerate(runs):
        if check is not None and count % RECORD_BATCH == 0:
            check()
        kind = ExtentKind.ZERO if run.src == ZERO else ExtentKind.DATA
        if pending is not None and pending[2] == kind \
                and pending[1] == run.start:
            pending = (pending[0], run.end, kind)
            continue
        if pending is not None:
            yield from _cut(*pending)
        pending = (run.start, run.end, kind)
    if pending is not None:
        yield from _cut(*pending)


def _cut(start: int, end: int, kind: ExtentKind) -> Iterator[Extent]:
    for offset in range(start, end, EXTENT_PIECE):
        yield Extent(offset, min(EXTENT_PIECE, end - offset), kind)


class LayeredFormat(Format):
    """An image made of layers applied in order, each a set of runs (data
    in a stream, or zeros) and a size.  Subclasses build the layers."""

    exact_diffs = True

    def __init__(self, layers: List[Layer], where: Where,
                 ctx: Optional[SourceContext] = None) -> None:
        if not layers:
            raise ValueError('at least one layer')
        self._layers = layers
        self._where = where
        self._ctx = ctx if ctx is not None else SourceContext()
        self._lock = threading.Lock()
        #: layer index -> the image at that layer.
        self._composed: 'OrderedDict[int, Runs]' = OrderedDict()
        #: What the composed maps may hold: what the layers leave of the
        #: metadata budget.
        self._composed_budget = self._ctx.limits.metadata_bytes - sum(
            layer.runs.nbytes for layer in layers)
        self._snapshots = [Snapshot(layer.name, layer.size, ident=str(i))
                           for i, layer in enumerate(layers)
                           if layer.name is not None]
        self.features = FormatFeatures()

    # -- Format interface -----------------------------------------------------

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return self._layers[self._index(snap)].size

    def snapshots(self) -> List[Snapshot]:
        return list(self._snapshots)

    def protected_snapshots(self) -> List[str]:
        """Snapshots the source had protected (v2 diffs record it), so the
        copier may protect them again."""
        return [layer.name for layer in self._layers
                if layer.name is not None and layer.protected]

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """Every byte a record wrote (DATA) or zeroed (ZERO) up to ``snap``;
        gaps were never written."""
        return _coalesce(self._compose(self._index(snap)), self._ctx.check)

    def changed_extents(self, prev: Optional[Snapshot],
                        snap: Optional[Snapshot]) -> Iterator[Extent]:
        """Exactly the records of the layers after ``prev`` up to ``snap``,
        plus ZERO where an image shrunk in between lost bytes that ``snap``
        has again (the copier resizes straight from ``prev``'s size to
        ``snap``'s, which would keep them)."""
        end = self._index(snap)
        if prev is None:
            return self.extents(snap)
        begin = self._index(prev)
        if begin > end:  # backwards: the generic answer is still right
            return super().changed_extents(prev, snap)
        runs = Runs()
        size = first = self._layers[begin].size
        for index in range(begin + 1, end + 1):
            self._ctx.check()
            layer = self._layers[index]
            if layer.size < size:
                runs = truncate(runs, layer.size)
            if layer.size < first:
                # Up to ``prev``'s size, all of it: a second shrink must not
                # forget what a first one cut.
                runs = overlay(runs, Runs.of(
                    [Run(layer.size, first, index, ZERO)]))
            runs = overlay(runs, layer.runs)
            size = layer.size
        return _coalesce(truncate(runs, size), self._ctx.check)

    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """Past the image size reads as zeros, as for a raw image."""
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        index = self._index(snap)
        runs = self._compose(index)
        end = min(offset + length, self._layers[index].size)
        parts: List[bytes] = []
        pos = offset
        i = max(0, bisect.bisect_right(runs.starts, offset) - 1)
        while pos < end and i < len(runs):
            run = runs[i]
            i += 1
            if run.end <= pos:
                continue
            if run.start >= end:
                break
            if run.start > pos:
                parts.append(bytes(run.start - pos))
                pos = run.start
            hi = min(run.end, end)
            if run.src == ZERO:
                parts.append(bytes(hi - pos))
            else:
                parts.append(self._read_run(run, pos, hi))
            pos = hi
        if pos < offset + length:
            parts.append(bytes(offset + length - pos))
        return parts[0] if len(parts) == 1 else b''.join(parts)

    def close(self) -> None:
        closed = set()
        for layer in self._layers:
            if id(layer.stream) not in closed:
                closed.add(id(layer.stream))
                layer.stream.close()

    # -- internals ------------------------------------------------------------

    def _index(self, snap: Optional[Snapshot]) -> int:
        if snap is None:
            return len(self._layers) - 1
        for known in self._snapshots:
            if known.ident == snap.ident and known.name == snap.name:
                return int(known.ident)
        raise InvalidArgument(f"{self._where}: the source has no snapshot "
                              f"'{snap.name}'")

    def _read_run(self, run: Run, lo: int, hi: int) -> bytes:
        """Indexing checked that every payload lies within its stream: a
        short read means the file changed since."""
        layer = self._layers[run.layer]
        at = run.src + lo - run.start
        data = layer.stream.read(at, hi - lo)
        if len(data) != hi - lo:
            raise InvalidArgument(
                f'{self._where_of(run.layer)}: {hi - lo} bytes at byte {at} '
                f'are missing: the file shrank after it was opened; leave '
                f'the source files alone while they are imported')
        return data

    def _where_of(self, index: int) -> str:
        """The stream of a layer, for messages (subclasses know the field)."""
        return str(self._where)

    def _compose(self, index: int) -> Runs:
        """The image at layer ``index``: layers 0..index applied in order,
        built from the nearest composed layer below it.  Composed maps are
        kept while they fit what the layers leave of the metadata budget
        (the newest always)."""
        with self._lock:
            cached = self._composed.get(index)
            if cached is not None:
                self._composed.move_to_end(index)
                return cached
            base = max((i for i in self._composed if i < index), default=-1)
            runs = self._composed[base] if base >= 0 else Runs()
        size = self._layers[base].size if base >= 0 else 0
        for i in range(base + 1, index + 1):
            self._ctx.check()
            layer = self._layers[i]
            if layer.size < size:
                runs = truncate(runs, layer.size)
            runs = overlay(runs, layer.runs)
            size = layer.size
        with self._lock:
            self._composed[index] = runs
            while len(self._composed) > 1 and (
                    len(self._composed) > COMPOSED_CACHE
                    or self._composed_bytes() > self._composed_budget):
                self._composed.popitem(last=False)
        return runs

    def _composed_bytes(self) -> int:
        """What the composed maps hold beyond the layers' own runs (a map
        that is a layer's runs, as the base's is, costs nothing more)."""
        own = {id(layer.runs) for layer in self._layers}
        return sum(runs.nbytes for runs in self._composed.values()
                   if id(runs) not in own)


# --------------------------------------------------------------------------
# Telling formats apart




# --------------------------------------------------------------------------
# The format


@dataclass
class _Part:
    """A base or diff of the spec, being opened."""

    label: str       # 'stream' or 'diffs[2]': the spec field, for messages
    spec_name: Optional[str]
    stream: Stream
    diff: Optional[Diff] = None   # None: a raw base

    @property
    def field(self) -> str:
        return 'stream' if self.label == 'stream' else f'{self.label}.stream'

    @property
    def desc(self) -> str:
        return 'the base' if self.label == 'stream' else self.label


class ExportDiffFormat(LayeredFormat):
    """A base image and ``rbd export-diff`` files on top (see the module
    docstring for the source-spec and the rules of the chain)."""

    def __init__(self, layers: List[Layer], where: Where,
                 fields: List[str],
                 ctx: Optional[SourceContext] = None) -> None:
        super().__init__(layers, where, ctx)
        self._fields = fields

    def _where_of(self, index: int) -> str:
        return str(Where(self._fields[index], self._layers[index].stream))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'ExportDiffFormat':
        diffs = spec.get('diffs') or []
        if len(diffs) > ctx.limits.snapshots:
            # Every layer but the last is a snapshot: at least this many.
            raise InvalidArgument('source-spec: diffs: ' + ctx.limits.refuse(
                'snapshots', 'the export-diff chain (snapshots)', len(diffs)))
        opened: List[Stream] = []
        try:
            parts: List[_Part] = []
            stream = open_stream(spec['stream'], ctx)
            opened.append(stream)
            parts.append(_Part('stream', spec.get('name'), stream))
            for i, item in enumerate(diffs):
                ctx.check()
                stream = open_stream(item['stream'], ctx)
                opened.append(stream)
                parts.append(_Part(f'diffs[{i}]', item.get('name'), stream))
            return cls._build(parts, ctx)
        except BaseException:
            for stream in opened:
                stream.close()
            raise

    @classmethod
    def _build(cls, parts: List[_Part],
               ctx: Optional[SourceContext] = None) -> 'ExportDiffFormat':
        ctx = ctx if ctx is not None else SourceContext()
        budget = IndexBudget(ctx.limits)
        size = 0
        layers: List[Layer] = []
        # The name the next diff must start from; None: any (a raw base
        # given no name takes the first diff's from-snap as its name).
        expected: Optional[str] = None
        names: Dict[str, str] = {}
        for index, part in enumerate(parts):
            where = Where(part.field, part.stream)
            end = part.stream.size()
            kind = known_type(part.stream.read(0, SNIFF))
            if index == 0 and kind != 'export-diff':
                _refuse_base(kind, where)
                layer = Layer(part.spec_name, end, part.stream,
                              Runs.of([Run(0, end, 0, 0)] if end else []))
            else:
                if kind != 'export-diff':
                    _refuse_diff(kind, where, part.label)
                diff = parse_diff(RecordReader(where, 0, end, ctx, budget),
                                  index, size)
                _check_chain(diff, index, part, expected, parts)
                if index == 0 and diff.size is None:
                    raise where.corrupt(0, 'the base diff has no size record')
                layer = Layer(part.spec_name or diff.to_snap,
                              size if diff.size is None else diff.size,
                              part.stream,
                              normalize(diff.records, where, budget),
                              diff.protected)
                diff.records = Runs()   # the layer's runs replace them
                part.diff = diff
                if index == 1 and parts[0].diff is None \
                        and layers[0].name is None:
                    layers[0].name = diff.from_snap
                    _check_unique(diff.from_snap, parts[0], names)
            _check_unique(layer.name, part, names)
            layers.append(layer)
            size = layer.size
            expected = (part.diff.to_snap if part.diff is not None
                        and part.diff.to_snap else part.spec_name)
        for part, layer in zip(parts[:-1], layers):
            if layer.name is None:
                raise InvalidArgument(
                    f'source-spec: {part.label}: {part.desc} ends at HEAD '
                    f'(no to-snap, no "name"), which only the last diff may '
                    f'do; give it a "name", or list the diffs oldest first')
        named = sum(layer.name is not None for layer in layers)
        if named > ctx.limits.snapshots:
            raise InvalidArgument('source-spec: diffs: ' + ctx.limits.refuse(
                'snapshots', 'the export-diff chain (snapshots)', named))
        return cls(layers, Where(parts[0].field, parts[0].stream),
                   [p.field for p in parts], ctx)


def _suggest(kind: Optional[str]) -> str:
    if kind == 'export':
        return ('it holds an `rbd export --export-format 2` image: use '
                '"type": "export"')
    if kind == 'qcow':
        return 'it holds a qcow image: use "type": "qcow"'
    return 'it looks like a raw image: use "type": "raw"'


def _refuse_base(kind: Optional[str], where: Where) -> None:
    """A raw base is fine; another known format here is a mistake."""
    if kind is None:
        return
    raise InvalidArgument(
        f"source-spec: type: 'export-diff', but {where.stream.description} "
        f'(stream) is neither a raw image nor an `rbd export-diff` file; '
        f'{_suggest(kind)}')


def _refuse_diff(kind: Optional[str], where: Where, label: str) -> None:
    raise InvalidArgument(
        f"source-spec: type: 'export-diff', but {where.stream.description} "
        f"({label}.stream) is not an `rbd export-diff` file (no 'rbd diff' "
        f'banner); {_suggest(kind)}')


def _check_chain(diff: Diff, index: int, part: _Part,
                 expected: Optional[str], parts: List[_Part]) -> None:
    """Each diff starts where the one before ends, as ``rbd import-diff``
    insists (it refuses a from-snap the image does not have)."""
    if index == 0:
        if diff.from_snap is not None:
            raise InvalidArgument(
                f"source-spec: stream: the base diff starts from snapshot "
                f"'{diff.from_snap}'; the base must be a raw image or a diff "
                f"from nothing (`rbd export-diff img@snap` without "
                f"--from-snap)")
        return
    before = parts[index - 1].desc
    if diff.from_snap is None:
        raise InvalidArgument(
            f'source-spec: {part.label}: is a diff from nothing (no '
            f'from-snap), so it cannot follow {before}; only the base '
            f'("stream") may be one')
    if expected is not None and diff.from_snap != expected:
        raise InvalidArgument(
            f"source-spec: {part.label}: starts from snapshot "
            f"'{diff.from_snap}', expected '{expected}' (where {before} "
            f"ends); list the diffs oldest first, each starting where the "
            f"one before ends")


def _check_unique(name: Optional[str], part: _Part,
                  names: Dict[str, str]) -> None:
    """Two snapshots of one name could not both be created on the target."""
    if name is None:
        return
    first = names.setdefault(name, part.desc)
    if first != part.desc:
        source = '"name"' if part.spec_name else 'to-snap'
        raise InvalidArgument(
            f"source-spec: {part.label}: snapshot '{name}' (its {source}) is "
            f"already the name of {names[name]}; give it another \"name\"")
