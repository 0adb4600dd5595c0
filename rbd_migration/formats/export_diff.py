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
Each layer keeps its records as runs (image range -> file offset, or zeros);
reading a snapshot composes the layers up to it (newest write wins, a 'z'
clears, an 's' that shrinks the image drops what lay past the new end), and
what changed between two snapshots is exactly the records in between, so
``exact_diffs`` holds.

:class:`LayeredFormat` (the composition) and :func:`parse_diff` are shared
with ``export_v2``, whose streams embed v2 diffs one after the other.
"""
import bisect
import heapq
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple)

from ..context import SourceContext
from ..errors import InvalidArgument
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
#: Composed layer maps kept: the copier walks the layers in order, so the
#: previous one is what the next one is built from.
COMPOSED_CACHE = 4

#: ``src`` of a run that reads as zeros (a 'z' record).
ZERO = -1

_U32 = struct.Struct('<I')
_U64 = struct.Struct('<Q')
_IO = struct.Struct('<QQ')


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
    S3 stream; payloads are skipped by offset and never read here."""

    def __init__(self, where: Where, pos: int, end: int) -> None:
        self.where = where
        self.pos = pos
        #: The end of the stream: anything a record needs past it is missing.
        self.end = end
        self._buf = b''
        self._buf_start = 0

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
    records: List[Run] = field(default_factory=list)


def _name(raw: bytes, where: Where, at: int) -> str:
    """Snapshot names become RBD snapshot names through a str API."""
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        raise where.corrupt(at, 'the snapshot name is not UTF-8') from None


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
        at = reader.pos
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
            text = _name(reader.string(at, name, MAX_NAME), where, at)
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
                diff.records.append(Run(offset, offset + count, layer, src))
        elif length is not None:
            # v2 lets a reader skip what it does not know, as rbd does.
            reader.skip(length, at, name)
        else:
            raise where.corrupt(at, f'unknown record tag {_tag_name(tag)} in '
                                    f'a version 1 diff')
    diff.end = reader.pos
    return diff


# --------------------------------------------------------------------------
# Layers and their composition


def _disjoint(runs: Sequence[Run]) -> bool:
    return all(a.end <= b.start for a, b in zip(runs, runs[1:]))


def _join(runs: Iterable[Run]) -> List[Run]:
    """Adjacent runs fused where one read (or one zero range) serves both."""
    out: List[Run] = []
    for run in runs:
        if out:
            last = out[-1]
            if last.end == run.start and last.layer == run.layer and (
                    (last.src == ZERO and run.src == ZERO) or
                    (last.src != ZERO and run.src != ZERO
                     and last.src + last.end - last.start == run.src)):
                out[-1] = Run(last.start, run.end, last.layer, last.src)
                continue
        out.append(run)
    return out


def normalize(records: Sequence[Run]) -> List[Run]:
    """Records in file order -> sorted disjoint runs, a later record winning
    where two overlap.  rbd writes them sorted and disjoint already; the
    sweep handles anything else in O(n log n)."""
    if _disjoint(records):
        return _join(records)
    bounds = sorted({p for r in records for p in (r.start, r.end)})
    order = sorted(range(len(records)), key=lambda i: records[i].start)
    active: List[int] = []  # -index: the newest record on top
    out: List[Run] = []
    j = 0
    for lo, hi in zip(bounds, bounds[1:]):
        while j < len(order) and records[order[j]].start <= lo:
            heapq.heappush(active, -order[j])
            j += 1
        while active and records[-active[0]].end <= lo:
            heapq.heappop(active)
        if active:
            out.append(records[-active[0]].clip(lo, hi))
    return _join(out)


def overlay(lower: Sequence[Run], upper: Sequence[Run]) -> List[Run]:
    """``upper`` over ``lower`` (both sorted and disjoint): upper wins."""
    out: List[Run] = []
    i, n = 0, len(lower)
    pending: Optional[Run] = lower[0] if lower else None
    for top in upper:
        while pending is not None and pending.start < top.end:
            if pending.start < top.start:
                out.append(pending.clip(pending.start, top.start))
            if pending.end > top.end:
                pending = pending.clip(top.end, pending.end)
                break
            i += 1
            pending = lower[i] if i < n else None
        out.append(top)
    if pending is not None:
        out.append(pending)
        out.extend(lower[i + 1:])
    return out


def truncate(runs: Sequence[Run], size: int) -> List[Run]:
    """What survives shrinking the image to ``size``."""
    cut = bisect.bisect_left([r.start for r in runs], size)
    out = list(runs[:cut])
    if out and out[-1].end > size:
        out[-1] = out[-1].clip(out[-1].start, size)
    return out


@dataclass
class Layer:
    """One state of the image: a snapshot (``name``) or HEAD (None)."""

    name: Optional[str]
    size: int
    stream: Stream
    runs: List[Run]
    protected: bool = False


def _coalesce(runs: Iterable[Run]) -> Iterator[Extent]:
    """Runs as extents: adjacent ones of one kind fused, then cut into
    pieces of at most EXTENT_PIECE so the copier can spread a large range
    over its workers."""
    pending: Optional[Tuple[int, int, ExtentKind]] = None
    for run in runs:
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

    def __init__(self, layers: List[Layer], where: Where) -> None:
        if not layers:
            raise ValueError('at least one layer')
        self._layers = layers
        self._where = where
        self._lock = threading.Lock()
        #: layer index -> (runs, their starts): the image at that layer.
        self._composed: 'OrderedDict[int, Tuple[List[Run], List[int]]]' = \
            OrderedDict()
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
        runs, _ = self._compose(self._index(snap))
        return _coalesce(runs)

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
        runs: List[Run] = []
        size = self._layers[begin].size
        for index in range(begin + 1, end + 1):
            layer = self._layers[index]
            if layer.size < size:
                runs = overlay(truncate(runs, layer.size),
                               [Run(layer.size, size, index, ZERO)])
            runs = overlay(runs, layer.runs)
            size = layer.size
        return _coalesce(truncate(runs, size))

    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """Past the image size reads as zeros, as for a raw image."""
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        index = self._index(snap)
        runs, starts = self._compose(index)
        end = min(offset + length, self._layers[index].size)
        parts: List[bytes] = []
        pos = offset
        i = max(0, bisect.bisect_right(starts, offset) - 1)
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

    def _compose(self, index: int) -> Tuple[List[Run], List[int]]:
        """The image at layer ``index``: layers 0..index applied in order,
        built from the nearest composed layer below it."""
        with self._lock:
            cached = self._composed.get(index)
            if cached is not None:
                self._composed.move_to_end(index)
                return cached
            base = max((i for i in self._composed if i < index), default=-1)
            runs = self._composed[base][0] if base >= 0 else []
        size = self._layers[base].size if base >= 0 else 0
        for i in range(base + 1, index + 1):
            layer = self._layers[i]
            if layer.size < size:
                runs = truncate(runs, layer.size)
            runs = overlay(runs, layer.runs)
            size = layer.size
        result = (runs, [r.start for r in runs])
        with self._lock:
            self._composed[index] = result
            while len(self._composed) > COMPOSED_CACHE:
                self._composed.popitem(last=False)
        return result


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
                 fields: List[str]) -> None:
        super().__init__(layers, where)
        self._fields = fields

    def _where_of(self, index: int) -> str:
        return str(Where(self._fields[index], self._layers[index].stream))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'ExportDiffFormat':
        opened: List[Stream] = []
        try:
            parts: List[_Part] = []
            stream = open_stream(spec['stream'], ctx)
            opened.append(stream)
            parts.append(_Part('stream', spec.get('name'), stream))
            for i, item in enumerate(spec.get('diffs') or []):
                stream = open_stream(item['stream'], ctx)
                opened.append(stream)
                parts.append(_Part(f'diffs[{i}]', item.get('name'), stream))
            return cls._build(parts)
        except BaseException:
            for stream in opened:
                stream.close()
            raise

    @classmethod
    def _build(cls, parts: List[_Part]) -> 'ExportDiffFormat':
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
                              [Run(0, end, 0, 0)] if end else [])
            else:
                if kind != 'export-diff':
                    _refuse_diff(kind, where, part.label)
                diff = parse_diff(RecordReader(where, 0, end), index, size)
                _check_chain(diff, index, part, expected, parts)
                if index == 0 and diff.size is None:
                    raise where.corrupt(0, 'the base diff has no size record')
                part.diff = diff
                layer = Layer(part.spec_name or diff.to_snap,
                              size if diff.size is None else diff.size,
                              part.stream, normalize(diff.records),
                              diff.protected)
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
        return cls(layers, Where(parts[0].field, parts[0].stream),
                   [p.field for p in parts])


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
