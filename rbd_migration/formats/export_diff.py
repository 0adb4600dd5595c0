"""``rbd export-diff`` files: a base image and the diffs taken after it.

A diff (its records: ``export_records``) holds what changed between two
snapshots (or from nothing, or up to HEAD), so a chain of them replays an
image's history, as ``rbd import-diff`` applied one after the other would.

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

Opening indexes every stream once (``export_records``) and checks the
chain; the snapshots it makes are bounded by the context's
``SourceLimits.snapshots``.  Reading is ``layered.LayeredFormat``'s.

An import opens its chain several times (the probe, each execute, verify),
and over HTTP or S3 indexing is most of the requests a chain costs: what
indexing a stream found is kept (``_INDEXES``, a few entries) under the
version the stream pinned at open (``Stream.version_key``: an HTTP or S3
object's ETag), which every read of the stream is then checked against,
and charged to the new format's budget as if indexed again.  (A file costs
no requests, and its inode and timestamps do not tell a rewrite within a
timestamp's granularity.)
"""
import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Mapping, Optional

from ..context import SourceContext
from ..errors import InvalidArgument
from ..streams import open_stream
from ..streams.base import Stream
from .detect import SNIFF_LENGTH as SNIFF
from .detect import sniff as known_type
from .export_records import Diff, RecordReader, Where, parse_diff
from .layered import Layer, LayeredFormat
from .runs import IndexBudget, Run, Runs, normalize


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


@dataclass(frozen=True)
class _Indexed:
    """What opening one stream of a chain learnt from it."""

    kind: Optional[str]
    diff: Optional[Diff] = None    # its records emptied: ``runs`` holds them
    runs: Optional[Runs] = None
    charged: int = 0               # budget bytes the runs took


class _IndexCache:
    """The last few streams' indexes, by (version key, place in the chain,
    size before it, limits): the same stream indexes alike only at the
    same place."""

    def __init__(self, entries: int = 8) -> None:
        self._entries = entries
        self._lock = threading.Lock()
        self._items: 'OrderedDict[Hashable, _Indexed]' = OrderedDict()

    def get(self, key: Hashable) -> Optional[_Indexed]:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Hashable, value: _Indexed) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)


_INDEXES = _IndexCache()


def _index_part(part: _Part, where: Where, index: int, size: int,
                ctx: SourceContext, budget: IndexBudget) -> _Indexed:
    """What ``part``'s stream holds: its kind and, for a diff, its index
    (from ``_INDEXES`` when the stream's pinned version was indexed at this
    place before)."""
    version = part.stream.version_key()
    # The limits too: an index found within one set of limits is no proof
    # that it is within another.
    key = None if version is None else (version, index, size, ctx.limits)
    found = _INDEXES.get(key) if key is not None else None
    if found is not None:
        if found.charged:
            budget.charge(found.charged, where, 'the index of the diff')
        return found
    kind = known_type(part.stream.read(0, SNIFF))
    if kind != 'export-diff':
        indexed = _Indexed(kind)
    else:
        before = budget.used
        diff = parse_diff(RecordReader(where, 0, part.stream.size(), ctx, budget),
                          index, size)
        runs = normalize(diff.records, where, budget)
        diff.records = Runs()    # the layer's runs replace them
        indexed = _Indexed(kind, diff, runs, budget.used - before)
    if key is not None:
        _INDEXES.put(key, indexed)
    return indexed


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
            indexed = _index_part(part, where, index, size, ctx, budget)
            if index == 0 and indexed.kind != 'export-diff':
                _refuse_base(indexed.kind, where)
                layer = Layer(part.spec_name, end, part.stream,
                              Runs.of([Run(0, end, 0, 0)] if end else []))
            else:
                if indexed.kind != 'export-diff':
                    _refuse_diff(indexed.kind, where, part.label)
                assert indexed.diff is not None and indexed.runs is not None
                diff = copy.copy(indexed.diff)
                _check_chain(diff, index, part, expected, parts)
                if index == 0 and diff.size is None:
                    raise where.corrupt(0, 'the base diff has no size record')
                layer = Layer(part.spec_name or diff.to_snap,
                              size if diff.size is None else diff.size,
                              part.stream, indexed.runs, diff.protected)
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
