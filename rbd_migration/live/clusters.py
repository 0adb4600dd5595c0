"""Which guest clusters each layer of a format holds, and since which layer.

The view (``view.py``) presents a format's layers (each snapshot, oldest
first, then HEAD) as qcow2 tables.  A layer's data clusters are those
holding some DATA byte (a cluster only partly covered is a data cluster:
the rest reads as the format's zeros).  All the view needs of the format
to build any table is, per layer and at cluster granularity:

* ``owned``: the data clusters whose bytes changed at that layer (or that
  were no data clusters before it).  Every other data cluster holds what
  the layer before held, so the view points it at that layer's host
  cluster, as qcow2 snapshots share clusters;
* ``gone``: the data clusters of the layer before that are none at this
  one (they read as zeros now).

Both are kept as ranges of cluster indices (:class:`ClusterRuns`, 16 bytes a
range), built in one walk of ``extents`` and ``changed_extents`` per layer
and bounded by the context's ``metadata_bytes``: a 10 TiB disk with a few
thousand extents costs kilobytes, never a table per cluster, and snapshots
that share most of their clusters cost what they changed.

A :class:`RangeMap` is what one L2 table's range looks like across all
layers: cut into segments where no layer changes, with a code per segment
and layer (the layer whose host cluster it reads, or zeros).  It is built on
demand from the runs, for one range at a time.

Which clusters changed comes from the format's ``changed_extents``: formats
with ``exact_diffs`` (qcow2, export, export-diff, native) name only what changed,
so later layers share everything else; the others name everything
allocated, so each layer owns all its data clusters (correct, but nothing
is shared and librbd copies each snapshot whole).  Whatever the format
says, a cluster that was not a data cluster in the layer before, or that
straddles the end of either layer where the size changed, is owned.
"""
import bisect
import heapq
from array import array
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument
from ..formats.base import Extent, ExtentKind, Format, Snapshot

#: Code of a segment that reads as zeros although some earlier layer had
#: data there (the qcow2 zero flag).
ZERO = 0xFE
#: Code of a segment no layer up to this one had data in (unallocated).
NONE = 0xFF
#: Layers a code can name (a byte, less the two codes above).
MAX_LAYERS = ZERO

#: Extents walked between calls to ``ctx.check()``.
CHECK_EVERY = 4096


class ClusterRuns:
    """Disjoint, ascending ranges ``[start, end)`` of cluster indices, packed
    in two arrays."""

    __slots__ = ('starts', 'ends')
    ITEM_BYTES = 16

    def __init__(self) -> None:
        self.starts = array('Q')
        self.ends = array('Q')

    @classmethod
    def of(cls, ranges: Iterable[Tuple[int, int]]) -> 'ClusterRuns':
        """Ranges in any order, overlapping or not, merged."""
        out = cls()
        for start, end in sorted(r for r in ranges if r[0] < r[1]):
            out.add(start, end)
        return out

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return zip(self.starts, self.ends)

    def add(self, start: int, end: int) -> None:
        """Append ``[start, end)``, which starts at or after every range
        held (merged with the last one when they touch)."""
        if start >= end:
            return
        if self.starts and start <= self.ends[-1]:
            if start < self.starts[-1]:
                raise ValueError(f'cluster range {start} added out of order')
            self.ends[-1] = max(self.ends[-1], end)
            return
        self.starts.append(start)
        self.ends.append(end)

    @property
    def nbytes(self) -> int:
        return len(self) * self.ITEM_BYTES

    def __contains__(self, cluster: int) -> bool:
        i = bisect.bisect_right(self.starts, cluster) - 1
        return i >= 0 and cluster < self.ends[i]

    def clip(self, lo: int, hi: int) -> Iterator[Tuple[int, int]]:
        """The parts of the ranges inside ``[lo, hi)``, ascending."""
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            start, end = max(lo, self.starts[i]), min(hi, self.ends[i])
            if start < end:
                yield start, end
            i += 1

    def same(self, other: 'ClusterRuns') -> bool:
        return self.starts == other.starts and self.ends == other.ends

    def _append(self, start: int, end: int) -> None:
        """``add`` for a range known to start past every range held."""
        self.starts.append(start)
        self.ends.append(end)

    def intersect(self, other: 'ClusterRuns') -> 'ClusterRuns':
        if self.same(other):
            return self
        small, big = (self, other) if len(self) <= len(other) else (other, self)
        out = ClusterRuns()
        if len(small) * 16 < len(big):     # few ranges: look each one up
            for start, end in small:
                for piece in big.clip(start, end):
                    out._append(*piece)
            return out
        a_starts, a_ends, b_starts, b_ends = self.starts, self.ends, other.starts, other.ends
        i = j = 0
        while i < len(a_starts) and j < len(b_starts):
            lo, hi = max(a_starts[i], b_starts[j]), min(a_ends[i], b_ends[j])
            if lo < hi:
                out._append(lo, hi)
            if a_ends[i] < b_ends[j]:
                i += 1
            else:
                j += 1
        return out

    def minus(self, other: 'ClusterRuns') -> 'ClusterRuns':
        out = ClusterRuns()
        if self.same(other):
            return out
        cut_starts, cut_ends = other.starts, other.ends
        j, n = 0, len(cut_starts)
        for start, end in zip(self.starts, self.ends):
            while j < n and cut_ends[j] <= start:
                j += 1
            k = j
            while k < n and cut_starts[k] < end and start < end:
                if cut_starts[k] > start:
                    out._append(start, cut_starts[k])
                start = cut_ends[k]
                k += 1
            if start < end:
                out._append(start, end)
        return out

    def union(self, other: 'ClusterRuns') -> 'ClusterRuns':
        if not other:
            return self
        if not self:
            return other
        out = ClusterRuns()
        for start, end in heapq.merge(self, other):
            out.add(start, end)
        return out


def _clusters_of(extents: Iterable[Extent], shift: int, limit: int,
                 kinds: Tuple[ExtentKind, ...], ctx: SourceContext) -> ClusterRuns:
    """The clusters (of ``1 << shift`` bytes, the first ``limit``) that the
    extents of ``kinds`` touch."""
    out = ClusterRuns()
    starts, ends = out.starts, out.ends
    walk = iter(extents)
    for count, ext in enumerate(walk):
        if count % CHECK_EVERY == 0:
            ctx.check()
        if ext.kind not in kinds or ext.length <= 0:
            continue
        start, end = ext.offset >> shift, min(limit, -(-ext.end >> shift))
        if start >= end:
            continue
        if not ends or start > ends[-1]:
            starts.append(start)
            ends.append(end)
        elif start >= starts[-1]:
            ends[-1] = max(ends[-1], end)
        else:        # a format out of its contract: sort what it gave
            return ClusterRuns.of([*out, (start, end), *(
                (e.offset >> shift, min(limit, -(-e.end >> shift)))
                for e in walk if e.kind in kinds and e.length > 0)])
    return out


@dataclass(frozen=True)
class RangeMap:
    """Clusters ``[bounds[0], bounds[-1])`` in segments ``[bounds[s],
    bounds[s + 1])``; ``codes[j][s]`` says what layer ``j`` holds there:
    the data of the layer it names (whose host cluster it reads), ZERO or
    NONE."""

    bounds: 'array[int]'
    codes: List[bytes]

    @property
    def nbytes(self) -> int:
        return 8 * len(self.bounds) + sum(len(c) for c in self.codes)

    def segments(self, lo: int, hi: int) -> Iterator[Tuple[int, int, int]]:
        """(start, end, segment) of the segments within ``[lo, hi)``."""
        s = max(0, bisect.bisect_right(self.bounds, lo) - 1)
        while s + 1 < len(self.bounds) and self.bounds[s] < hi:
            start, end = max(lo, self.bounds[s]), min(hi, self.bounds[s + 1])
            if start < end:
                yield start, end, s
            s += 1

    def refs(self, s: int, layer: int) -> int:
        """How many layers' tables point at ``layer``'s host cluster in
        segment ``s``: the layer itself, if it owns the cluster, and each
        later one that still shares it (sharing never resumes once a later
        layer owns the cluster)."""
        count = 0
        for codes in self.codes[layer:]:
            if codes[s] != layer:
                break
            count += 1
        return count


class ClusterIndex:
    """``owned`` and ``gone`` cluster runs of every layer of ``fmt``
    (snapshots oldest first, then HEAD), at clusters of ``1 << cluster_bits``
    bytes: what each layer changed, so that a format whose snapshots share
    most of their clusters costs little more than one layer.  ``gone``: the
    data clusters of the layer before that are no data clusters at this
    one.  Reads nothing but the format's extents."""

    def __init__(self, fmt: Format, cluster_bits: int,
                 ctx: Optional[SourceContext] = None) -> None:
        self._ctx = ctx if ctx is not None else SourceContext()
        self.cluster_bits = cluster_bits
        self.layers: List[Optional[Snapshot]] = [*fmt.snapshots(), None]
        if len(self.layers) > MAX_LAYERS:
            raise InvalidArgument(
                f'source-spec: the source has {len(self.layers) - 1} '
                f'snapshots, more than a live view can hold '
                f'({MAX_LAYERS - 1}); delete some of them first')
        self.sizes = [fmt.size(snap) for snap in self.layers]
        cs = 1 << cluster_bits
        self.clusters = max(-(-size // cs) for size in self.sizes)
        self.owned: List[ClusterRuns] = []
        self.gone: List[ClusterRuns] = []
        before = ClusterRuns()
        prev: Optional[Snapshot] = None
        for j, snap in enumerate(self.layers):
            limit = -(-self.sizes[j] // cs)
            data = _clusters_of(fmt.extents(snap), cluster_bits, limit,
                                (ExtentKind.DATA,), self._ctx)
            if j == 0 or self._everything_changes(fmt):
                owned = data
            else:
                changed = _clusters_of(
                    fmt.changed_extents(prev, snap), cluster_bits, limit,
                    (ExtentKind.DATA, ExtentKind.ZERO), self._ctx)
                changed = changed.union(self._straddling(j))
                owned = data.minus(before).union(data.intersect(changed))
            self.owned.append(owned)
            self.gone.append(before.minus(data))
            self._check_budget(before.nbytes + data.nbytes)
            before, prev = data, snap
        #: The format calls every cluster of HEAD data (a raw source, which
        #: says nothing of where its zeros are): librbd then writes zeros too.
        self.head_dense = sum(end - start for start, end in before) >= \
            -(-self.sizes[-1] // cs)

    @staticmethod
    def _everything_changes(fmt: Format) -> bool:
        """Whether ``changed_extents`` is the default, which names every
        data cluster: then each layer owns all of them, and walking the
        format twice more per layer to learn it is saved."""
        return type(fmt).changed_extents is Format.changed_extents

    def _straddling(self, j: int) -> ClusterRuns:
        """The clusters holding the end of layer ``j - 1`` or of layer
        ``j``, where the size changed and that end is not on a cluster
        boundary: their bytes past the end differ between the layers."""
        cs = 1 << self.cluster_bits
        before, after = self.sizes[j - 1], self.sizes[j]
        if before == after:
            return ClusterRuns()
        return ClusterRuns.of((size // cs, size // cs + 1)
                              for size in (before, after) if size % cs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.owned) + sum(r.nbytes for r in self.gone)

    def _check_budget(self, walking: int) -> None:
        """What is kept, and the two layers' data runs being compared."""
        limits = self._ctx.limits
        if self.nbytes + walking > limits.metadata_bytes:
            raise InvalidArgument('source-spec: ' + limits.refuse(
                'metadata_bytes', "the live view's index of the source's "
                'clusters (bytes)', self.nbytes + walking))

    def range_map(self, lo: int, hi: int) -> RangeMap:
        """Clusters ``[lo, hi)`` as every layer holds them: each layer's
        codes are the layer before's, ZERO where data went, the layer
        itself where it owns the cluster."""
        cuts = {lo, hi}
        clipped: List[Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]] = []
        for gone_runs, owned_runs in zip(self.gone, self.owned):
            gone, owned = list(gone_runs.clip(lo, hi)), list(owned_runs.clip(lo, hi))
            for start, end in gone + owned:
                cuts.update((start, end))
            clipped.append((gone, owned))
        bounds = array('Q', sorted(cuts))
        at = {cluster: s for s, cluster in enumerate(bounds)}
        current = bytearray([NONE]) * (len(bounds) - 1)
        codes = []
        for j, (gone, owned) in enumerate(clipped):
            for runs, code in ((gone, ZERO), (owned, j)):
                for start, end in runs:
                    current[at[start]:at[end]] = bytes([code]) * (at[end] - at[start])
            codes.append(bytes(current))
        return RangeMap(bounds, codes)
