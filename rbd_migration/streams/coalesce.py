"""Which reads of a stream to merge into one request.

A format reading a chunk of a disk asks its stream for many small pieces
(compressed clusters, a layer's data clusters, diff records); over HTTP or
S3 each would be a request of its own, and a request costs far more than
the bytes between two pieces.  So pieces are sorted and merged while the
gap between them is at most ``gap`` bytes and the merged span at most
``limit`` bytes, the gaps' bytes read and thrown away.  Pieces may overlap
(a compressed cluster's stored length is rounded up into the next one).
"""
import bisect
from dataclasses import dataclass
from typing import List, Sequence, Tuple


@dataclass
class Request:
    """One read: ``[start, end)`` of the stream, filling the pieces listed
    (their indexes in the caller's list)."""

    start: int
    end: int
    pieces: List[int]


def plan(pieces: Sequence[Tuple[int, int]], gap: int, limit: int) -> List[Request]:
    """Requests covering every (offset, length) piece; a piece longer than
    ``limit`` is a request of its own, and ``gap < 0`` merges nothing."""
    order = sorted(range(len(pieces)), key=lambda i: pieces[i][0])
    requests: List[Request] = []
    for i in order:
        offset, length = pieces[i]
        end = offset + length
        last = requests[-1] if requests else None
        if (last is not None and gap >= 0 and offset <= last.end + gap
                and max(end, last.end) - last.start <= limit):
            last.end = max(last.end, end)
            last.pieces.append(i)
        else:
            requests.append(Request(offset, end, [i]))
    return requests


class Scatter:
    """Where the bytes of one merged request go, in order: the pieces'
    own buffers, and one scratch buffer, reused, for every gap between
    them (read and thrown away).  A stream fills it straight from the
    answer, so a merged read costs no buffer of its own and no copy; a
    piece that overlaps the one before it (a compressed cluster's stored
    length runs into the next) takes its shared bytes from there once the
    request is done (``finish``)."""

    def __init__(self, start: int, pieces: Sequence[Tuple[int, memoryview]],
                 order: Sequence[int], length: int) -> None:
        self.start = start
        #: Buffers in stream order, with the stream offset each starts at.
        self.views: List[memoryview] = []
        self.offsets: List[int] = []
        #: (stream offset, piece index, bytes) of each overlap to copy.
        self._shared: List[Tuple[int, int, int]] = []
        self._pieces = pieces
        self._order = order
        end = start + length
        scratch = memoryview(bytearray(_widest_gap(start, end, pieces, order)))
        pos = start
        for i in order:
            offset, view = pieces[i]
            if offset >= end:
                break       # past the stream's end, as are all after it
            if offset > pos:
                self._add(pos, scratch[:offset - pos])
                pos = offset
            stop = min(offset + len(view), end)
            if offset < pos:
                self._shared.append((offset, i, min(pos, stop) - offset))
            if stop > pos:
                self._add(pos, view[pos - offset:stop - offset])
                pos = stop
        self.length = pos - start

    @classmethod
    def of(cls, offset: int, view: memoryview) -> 'Scatter':
        """One buffer, filled from ``offset``."""
        return cls(offset, [(offset, view)], [0], len(view))

    def put(self, got: int, data: bytes) -> None:
        """``data``, the bytes from ``got`` bytes into the request on, put
        where they go (for answers that come as ``bytes``)."""
        pos = 0
        while pos < len(data):
            part = self.window(got + pos, len(data) - pos)
            part[:] = data[pos:pos + len(part)]
            pos += len(part)

    def _add(self, offset: int, view: memoryview) -> None:
        if len(view):
            self.offsets.append(offset)
            self.views.append(view)

    def window(self, got: int, most: int) -> memoryview:
        """Where the bytes from ``got`` bytes into the request go: at most
        ``most`` of them, within one buffer."""
        at = self.start + got
        k = bisect.bisect_right(self.offsets, at) - 1
        inside = at - self.offsets[k]
        return self.views[k][inside:inside + most]

    def finish(self, got: int) -> List[int]:
        """Once ``got`` bytes arrived: copy the overlaps, and tell each
        piece's count of bytes (fewer only where the stream ended)."""
        end = self.start + got
        for offset, i, length in self._shared:
            view = self._pieces[i][1]
            n = max(0, min(length, end - offset))
            pos = 0
            while pos < n:
                part = self.window(offset + pos - self.start, n - pos)
                view[pos:pos + len(part)] = part
                pos += len(part)
        return [max(0, min(len(self._pieces[i][1]), end - self._pieces[i][0]))
                for i in self._order]


def _widest_gap(start: int, end: int, pieces: Sequence[Tuple[int, memoryview]],
                order: Sequence[int]) -> int:
    """The most bytes between one piece and the next (in ``order``) before
    ``end``."""
    widest, pos = 0, start
    for i in order:
        offset, view = pieces[i]
        if offset >= end:
            break
        widest = max(widest, offset - pos)
        pos = max(pos, offset + len(view))
    return widest
