"""A raw image: the stream's bytes are the disk.

Snapshots of a raw source are whole raw images of their own (one stream each,
oldest first), as exported from a platform that keeps snapshots as files.
Zero detection is left to the copier: a raw image says nothing about which
ranges are allocated, so every byte is reported as data.
"""
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument
from ..streams import open_stream
from ..streams.base import Stream
from .base import Extent, ExtentKind, Format, FormatFeatures, Snapshot, zero_fill

#: Extents are cut at this size so the copier can spread one large image over
#: its workers and report progress without asking for a huge range at once.
EXTENT_PIECE = 64 << 20


class RawFormat(Format):

    def __init__(self, head: Stream,
                 snapshot_streams: Optional[List[Stream]] = None,
                 snapshot_names: Optional[List[str]] = None,
                 ctx: Optional[SourceContext] = None) -> None:
        self._head = head
        self._ctx = ctx if ctx is not None else SourceContext()
        self._snap_streams = list(snapshot_streams or [])
        names = list(snapshot_names or [])
        if len(names) != len(self._snap_streams):
            raise ValueError('one snapshot name per snapshot stream')
        self._snapshots = [Snapshot(name, s.size(), ident=str(i))
                           for i, (name, s) in
                           enumerate(zip(names, self._snap_streams))]
        self.features = FormatFeatures()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'RawFormat':
        snaps = spec.get('snapshots') or []
        if len(snaps) > ctx.limits.snapshots:
            raise InvalidArgument('source-spec: snapshots: ' + ctx.limits.refuse(
                'snapshots', 'the raw source (snapshots)', len(snaps)))
        names = _snapshot_names(snaps)
        opened: List[Stream] = []
        try:
            head = open_stream(spec['stream'], ctx)
            opened.append(head)
            for snap in snaps:
                ctx.check()
                opened.append(open_stream(snap['stream'], ctx))
            return cls(head, opened[1:], names, ctx)
        except BaseException:
            for stream in opened:
                stream.close()
            raise

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return self._stream(snap).size()

    def snapshots(self) -> List[Snapshot]:
        return list(self._snapshots)

    @property
    def read_size(self) -> int:
        return max(s.request_size for s in [self._head] + self._snap_streams)

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """What the stream says may hold data (a sparse file's holes are
        left out), in pieces of at most EXTENT_PIECE."""
        size = self.size(snap)
        stream = self._stream(snap)
        for offset in range(0, size, EXTENT_PIECE):
            self._ctx.check()
            for start, length in stream.allocated(offset, min(EXTENT_PIECE, size - offset)):
                yield Extent(start, length, ExtentKind.DATA)

    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """Past the end of the image reads as zeros, like a sparse tail."""
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        data = self._stream(snap).read(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def read_into(self, offset: int, view: memoryview,
                  snap: Optional[Snapshot] = None) -> None:
        if offset < 0:
            raise ValueError(f'bad read: offset={offset}')
        n = self._stream(snap).read_into(offset, view)
        zero_fill(view[n:])

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        """One ``read_pieces`` of the stream: the copier's group of adjacent
        chunks of a source on S3 is one request.  Past the end reads as
        zeros, as in ``read_into``; a piece wholly past it is not asked
        for."""
        stream = self._stream(snap)
        size = stream.size()
        inside = []
        for offset, view in pieces:
            if offset < 0:
                raise ValueError(f'bad read: offset={offset}')
            if offset < size:
                inside.append((offset, view))
            else:
                zero_fill(view)
        counts = stream.read_pieces(inside)
        for (_, view), n in zip(inside, counts):
            zero_fill(view[n:])

    def _stream(self, snap: Optional[Snapshot]) -> Stream:
        if snap is None:
            return self._head
        for known, stream in zip(self._snapshots, self._snap_streams):
            if known.ident == snap.ident and known.name == snap.name:
                return stream
        raise InvalidArgument(f"source-spec: snapshots: no snapshot named "
                              f"'{snap.name}' in this source")

    def close(self) -> None:
        for stream in [self._head] + self._snap_streams:
            stream.close()


def _snapshot_names(snaps: List[Mapping[str, Any]]) -> List[str]:
    """Names in order, refusing what would make two snapshots ambiguous."""
    names: List[str] = []
    seen: Set[str] = set()
    for i, snap in enumerate(snaps):
        kind = snap.get('type', 'raw')
        if kind != 'raw':
            raise InvalidArgument(
                f"source-spec: snapshots[{i}].type: '{kind}' is not "
                f"supported for a raw source; use 'raw'")
        name = snap.get('name')
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f'source-spec: snapshots[{i}].name: give '
                                  f'each snapshot a non-empty name')
        if name in seen:
            raise InvalidArgument(f"source-spec: snapshots[{i}].name: "
                                  f"'{name}' is used twice; names must be "
                                  f"unique")
        names.append(name)
        seen.add(name)
    return names
