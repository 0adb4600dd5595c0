"""An image made of layers applied in order: the composition both export
formats read through (``export_diff``: a base and the diffs on it;
``export_v2``: the diffs one file embeds).

Each layer keeps its records as runs (image range -> file offset, or
zeros; see ``runs``); reading a snapshot composes the layers up to it
(newest write wins, a 'z' clears, an 's' that shrinks the image drops what
lay past the new end), and what changed between two snapshots is exactly
the records in between, so ``exact_diffs`` holds.  Composed maps are kept
while they fit what the layers leave of the metadata budget.
"""
import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument
from ..streams.base import Stream
from .base import (Extent, ExtentKind, FormatFeatures, PieceReader, Snapshot,
                   zero_fill)
from .export_records import RECORD_BATCH, Where
from .raw import EXTENT_PIECE
from .runs import ZERO, Run, Runs, overlay, truncate


#: Composed layer maps kept (fewer when they would hold more than the
#: metadata budget leaves): the copier walks the layers in order, so the
#: previous one is what the next one is built from.
COMPOSED_CACHE = 4


@dataclass
class Layer:
    """One state of the image: a snapshot (``name``) or HEAD (None)."""

    name: Optional[str]
    size: int
    stream: Stream
    runs: Runs
    protected: bool = False


def _walk(runs: Runs, start: int, end: int) -> Iterator[Tuple[int, int, Optional[Run]]]:
    """``[start, end)`` as (lo, hi, the run holding it, or None for zeros)."""
    pos = start
    i = max(0, bisect.bisect_right(runs.starts, start) - 1)
    while pos < end and i < len(runs):
        run = runs[i]
        i += 1
        if run.end <= pos:
            continue
        if run.start >= end:
            break
        if run.start > pos:
            yield pos, run.start, None
            pos = run.start
        hi = min(run.end, end)
        yield pos, hi, None if run.src == ZERO else run
        pos = hi
    if pos < end:
        yield pos, end, None


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


class LayeredFormat(PieceReader):
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

    @property
    def read_size(self) -> int:
        """The largest of the layers' streams'."""
        return max(layer.stream.request_size for layer in self._layers)

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

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        """The records every piece needs, read with one ``read_pieces`` per
        file: a diff's records lie one after another in it, so over HTTP or
        S3 they merge into few requests.  Zeros fill the rest."""
        index = self._index(snap)
        runs = self._compose(index)
        size = self._layers[index].size
        wanted: Dict[int, List[Tuple[int, memoryview, int]]] = {}
        for offset, view in pieces:
            if offset < 0:
                raise ValueError(f'bad read: offset={offset} length={len(view)}')
            for lo, hi, run in _walk(runs, offset, min(offset + len(view), size)):
                part = view[lo - offset:hi - offset]
                if run is None:
                    zero_fill(part)
                else:
                    stream = self._layers[run.layer].stream
                    wanted.setdefault(id(stream), []).append(
                        (run.src + lo - run.start, part, run.layer))
            zero_fill(view[max(0, min(len(view), size - offset)):])
        for reads in wanted.values():
            stream = self._layers[reads[0][2]].stream
            counts = stream.read_pieces([(at, part) for at, part, _ in reads])
            for (at, part, layer), n in zip(reads, counts):
                if n != len(part):
                    raise self._shrank(layer, at, len(part))

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

    def _shrank(self, layer: int, at: int, length: int) -> InvalidArgument:
        """Indexing checked that every payload lies within its stream: a
        short read means the file changed since."""
        return InvalidArgument(
            f'{self._where_of(layer)}: {length} bytes at byte {at} '
            f'are missing: the file shrank after it was opened; leave '
            f'the source files alone while they are imported')

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
