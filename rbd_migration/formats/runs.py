"""Runs: a layer of an image as ranges of image bytes, each read at an
offset of the layer's stream or as zeros, and the algebra that composes
layers: a layer's records sorted into disjoint runs (:func:`normalize`),
one layer laid over another (:func:`overlay`), what a shrink leaves
(:func:`truncate`).

Runs know nothing of the files they come from (``export_records`` makes
them from a diff's records, ``layered`` composes them), so that the
algebra can be read and tested on its own.  They are packed in arrays
(:class:`Runs`, 28 bytes a run, not an object per record) and what they
hold is charged to an :class:`IndexBudget`, bounded by the context's
``SourceLimits.metadata_bytes``.
"""
import bisect
import heapq
import itertools
import operator
from array import array
from typing import Iterable, Iterator, List, NamedTuple, Optional

from ..errors import InvalidArgument
from ..limits import SourceLimits

#: What sorting overlapping records costs per record while it runs (Python
#: ints, a set, lists and a heap: 180 to 280 bytes measured), checked
#: against the budget before it starts.
SWEEP_BYTES = 256

#: ``src`` of a run that reads as zeros (a 'z' record).
ZERO = -1
#: What the index is called in a refusal.
INDEX_NAME = 'the index of the records (bytes)'


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


class IndexBudget:
    """The bytes of index one format holds (its layers' runs), shared by
    its streams and bounded by ``metadata_bytes``.  A refusal names the
    stream by ``str(where)``: runs know no streams."""

    def __init__(self, limits: SourceLimits) -> None:
        self.limits = limits
        self.used = 0

    def charge(self, nbytes: int, where: object, what: str) -> None:
        """Room for ``nbytes`` more (fewer when negative), refused past the
        bound."""
        total = self.used + nbytes
        if nbytes > 0 and total > self.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + self.limits.refuse(
                'metadata_bytes', what, total))
        self.used = total


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


def normalize(records: Runs, where: Optional[object] = None,
              budget: Optional[IndexBudget] = None) -> Runs:
    """Records in file order -> sorted disjoint runs, a later record winning
    where two overlap.  rbd writes them sorted and disjoint already; the
    sweep handles anything else in O(n log n), at a cost per record checked
    against ``budget`` first (and the extra runs it makes charged to it)."""
    if _disjoint(records):
        out = _join(records)
        if budget is not None and where is not None:
            budget.charge(out.nbytes - records.nbytes, where, INDEX_NAME)
        return out
    if budget is not None and where is not None:
        cost = SWEEP_BYTES * len(records)
        if budget.used + cost > budget.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + budget.limits.refuse(
                'metadata_bytes', 'sorting its overlapping records (bytes)',
                budget.used + cost))
    out = _join(_sweep(records))
    if budget is not None and where is not None:
        budget.charge(out.nbytes - records.nbytes, where, INDEX_NAME)
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
