"""Which reads of a stream to merge into one request.

A format reading a chunk of a disk asks its stream for many small pieces
(compressed clusters, a layer's data clusters, diff records); over HTTP or
S3 each would be a request of its own, and a request costs far more than
the bytes between two pieces.  So pieces are sorted and merged while the
gap between them is at most ``gap`` bytes and the merged span at most
``limit`` bytes, the gaps' bytes read and thrown away.  Pieces may overlap
(a compressed cluster's stored length is rounded up into the next one).
"""
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
