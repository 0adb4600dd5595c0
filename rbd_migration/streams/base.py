"""The stream interface: a read-only, random-access byte source.

A stream knows nothing about image formats; a format driver sits on top of
it.  Implementations must be safe to call ``read`` from several threads at
once (the copier reads extents concurrently).

The base owns what every stream checks the same way: a negative offset or
length is a bug (ValueError), a closed stream refuses every call, and a
read is cut at the stream's end, so an implementation's ``_read`` only
ever sees a span that lies wholly inside the stream.
"""
import abc
from typing import Any, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..context import SourceContext
from .coalesce import Scatter, plan


class Stream(abc.ABC):
    """Random-access bytes: a local file, an HTTP(S) object, an S3 object."""

    #: Human-readable location with every secret masked, for messages.
    description: str = ''

    #: The fewest bytes worth one read, where each read is a request with a
    #: cost of its own (signing, the server's per-request work); the copier
    #: then reads chunks at least this large.  0: any size costs the same.
    request_size: int = 0

    #: Bytes between two pieces worth reading and throwing away rather than
    #: sending another request (``read_pieces``); -1: never merge (a file,
    #: where a read costs no more than its bytes).
    merge_gap: int = -1
    #: Bytes one merged request reads at most: how long one answer may hold
    #: its connection (a merged answer lands in the caller's buffers, and
    #: one that breaks off is resumed, so its length costs no memory).
    merge_limit: int = 4 << 20

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'Stream':
        """Open the stream that a validated source-spec ``stream`` names."""

    @abc.abstractmethod
    def size(self) -> int:
        """Total length in bytes."""

    #: Set by ``close``; every later call refuses.
    _closed: bool = False

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (fewer only past the end)."""
        want = self._span(offset, length)
        return self._read(offset, want) if want else b''

    def read_into(self, offset: int, view: memoryview) -> int:
        """What ``read(offset, len(view))`` returns, put in ``view``; the
        count of bytes put there (fewer only past the end)."""
        want = self._span(offset, len(view))
        return self._read_into(offset, view[:want]) if want else 0

    @abc.abstractmethod
    def _read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` (> 0) bytes at ``offset``, all inside the stream."""

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]]) -> List[int]:
        """Each view filled from its offset, as ``read_into`` would, with
        as few requests as ``merge_gap`` and ``merge_limit`` allow, each
        read straight into the views (see ``Scatter``); the counts of bytes
        put in each (fewer only past the end)."""
        counts = [0] * len(pieces)
        spans = [(offset, len(view)) for offset, view in pieces]
        for request in plan(spans, self.merge_gap, self.merge_limit):
            if len(request.pieces) == 1:
                i = request.pieces[0]
                counts[i] = self.read_into(*pieces[i])
                continue
            want = self._span(request.start, request.end - request.start)
            scatter = Scatter(request.start, pieces, request.pieces, want)
            got = self._read_scatter(scatter) if scatter.length else 0
            for i, n in zip(request.pieces, scatter.finish(got)):
                counts[i] = n
        return counts

    def _read_scatter(self, scatter: Scatter) -> int:
        """The ``scatter.length`` bytes at ``scatter.start`` (all inside the
        stream) put where ``scatter`` says; their count.  This default reads
        them as one ``bytes``; a stream that can fill buffers straight from
        an answer overrides it."""
        data = self._read(scatter.start, scatter.length)
        scatter.put(0, data)
        return len(data)

    def _read_into(self, offset: int, view: memoryview) -> int:
        """``_read`` into ``view``.  Streams that can fill the caller's
        buffer directly override it: the copier reuses its buffers instead
        of allocating 4 MiB per chunk."""
        data = self._read(offset, len(view))
        view[:len(data)] = data
        return len(data)

    def _span(self, offset: int, length: int) -> int:
        """How much of a read lies inside the stream, once it is known to be
        a read of an open stream."""
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        self._check_open()
        return max(0, min(length, self.size() - offset))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f'{self.description}: stream is closed')

    def allocated(self, offset: int, length: int) -> Iterator[Tuple[int, int]]:
        """Ranges within [offset, offset+length) that may hold data; holes
        between them read as zeros.  By default, all of it."""
        yield offset, length

    def validators(self) -> Dict[str, str]:
        """What tells this version of the source from another, read afresh
        from the source (size, and ETag or modification time where the
        stream has them).  Recorded at prepare and compared when an execute
        ends: a completed import must hold the bytes the source had at
        prepare, not a mix of two versions."""
        return {'size': str(self.size())}

    def version_key(self) -> Optional[Hashable]:
        """What names this version of the source for as long as the stream
        reads it (what its reads are checked against), for caching what was
        learnt from it across opens; None where no version is pinned that
        firmly (then nothing is cached)."""
        return None

    def sibling(self, name: str) -> 'Stream':
        """A stream for ``name`` next to this one (a qcow2 backing file)."""
        raise NotImplementedError(f'{type(self).__name__} has no siblings')

    def close(self) -> None:
        """Release connections or file handles (implementations call this too)."""
        self._closed = True

    def __enter__(self) -> 'Stream':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
