"""The format interface: a virtual disk image, read through a stream.

Modelled on QEMU's block drivers and librbd's migration ``FormatInterface``:
a format maps virtual offsets to bytes, tells which ranges are allocated (so
copies stay sparse) and lists snapshots oldest first.
"""
import abc
import enum
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, TypeVar)

from ..context import SourceContext


class ExtentKind(enum.Enum):
    DATA = 'data'   # bytes must be read and written
    ZERO = 'zero'   # reads as zeros, explicitly (qcow2 zero cluster, discard)


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: ExtentKind = ExtentKind.DATA

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Snapshot:
    name: str
    size: int
    #: Format-specific identity (qcow2 snapshot id, rbd snap id, list index).
    ident: str = ''


@dataclass
class FormatFeatures:
    """What the probe reports about an image; drives the choice of path."""

    compressed: bool = False
    encrypted: bool = False
    backing_file: Optional[str] = None
    external_data_file: Optional[str] = None
    extended_l2: bool = False
    compression_type: Optional[str] = None
    #: Some data cluster lies (wholly or partly) past the end of the file.
    #: QEMU reads those bytes as zeros, and so do our formats; librbd's
    #: import reads them otherwise, so such a source must not take its path.
    data_past_end: bool = False
    #: Bytes of tables librbd's reader loads whenever it opens the image
    #: (qcow2: the L1 table of HEAD and of every snapshot), in the mgr, for
    #: every status, execute and abort; 0 where nothing is loaded up front.
    open_tables: int = 0
    notes: List[str] = field(default_factory=list)


_F = TypeVar('_F', bound='Format')


class Format(abc.ABC):
    """A disk image. ``snap=None`` means HEAD (the newest state)."""

    features: FormatFeatures

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'Format':
        """Open the image that a validated source-spec describes."""

    @abc.abstractmethod
    def size(self, snap: Optional[Snapshot] = None) -> int:
        """Virtual size in bytes."""

    @abc.abstractmethod
    def snapshots(self) -> List[Snapshot]:
        """Snapshots, oldest first."""

    @abc.abstractmethod
    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """Allocated ranges in ascending order; gaps read as zeros."""

    @abc.abstractmethod
    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """``length`` bytes of virtual disk at ``offset``."""

    def read_into(self, offset: int, view: memoryview,
                  snap: Optional[Snapshot] = None) -> None:
        """Fill ``view`` with what ``read(offset, len(view), snap)`` returns.
        Formats that can read straight into it override this: the copier
        reuses its buffers, and a qcow2 chain's layers then fill one buffer
        without a copy or a join per layer."""
        view[:] = self.read(offset, len(view), snap)

    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        """``read_into`` of each (offset, view).  Formats whose units are
        small (compressed clusters, a layer's clusters, diff records)
        override it to read all the pieces' units together, which a stream
        whose every read is a request merges into few requests."""
        for offset, view in pieces:
            self.read_into(offset, view, snap)

    @property
    def read_size(self) -> int:
        """The fewest bytes worth one read (see ``Stream.request_size``);
        0 when any size costs the same."""
        return 0

    #: True when ``changed_extents`` names only ranges that really changed;
    #: otherwise the copier compares each range with what the target holds.
    exact_diffs: bool = False

    def changed_extents(self, prev: Optional[Snapshot],
                        snap: Optional[Snapshot]) -> Iterator[Extent]:
        """Ranges whose content at ``snap`` may differ from ``prev`` (``None``:
        an empty disk), ascending.  DATA ranges are read at ``snap``; ZERO
        ranges must read as zeros there.  This default is correct for any
        format, not minimal: everything allocated at ``snap``, plus ZERO over
        what ``prev`` had allocated and ``snap`` has not.  Formats that know
        their history (qcow2 L2 tables, rbd diffs, export-diff files) narrow
        it and set ``exact_diffs``."""
        now = list(self.extents(snap))
        yield from _merge_sorted(now, _uncovered(
            list(self.extents(prev)) if prev is not None else [], now))

    def image_metadata(self) -> Dict[str, str]:
        """Image-meta key/value pairs the source carries (rbd exports)."""
        return {}

    def protected_snapshots(self) -> List[str]:
        """Snapshots the source had protected, to protect again."""
        return []

    def close(self) -> None:
        """Release the streams underneath."""

    def __enter__(self: '_F') -> '_F':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PieceReader(Format):
    """A format whose every read goes through ``read_pieces``."""

    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """Past the image size reads as zeros, as for a raw image."""
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        buf = bytearray(length)
        self.read_pieces([(offset, memoryview(buf))], snap)
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview,
                  snap: Optional[Snapshot] = None) -> None:
        self.read_pieces([(offset, view)], snap)

    @abc.abstractmethod
    def read_pieces(self, pieces: Sequence[Tuple[int, memoryview]],
                    snap: Optional[Snapshot] = None) -> None:
        """See ``Format.read_pieces``."""


_ZEROS = memoryview(bytes(4 << 20))


def zero_fill(view: memoryview) -> None:
    """Zeros over all of ``view``, from a shared buffer (no allocation)."""
    for pos in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos:pos + n] = _ZEROS[:n]


def _uncovered(before: List[Extent], now: List[Extent]) -> List[Extent]:
    """ZERO extents over the parts of ``before`` that ``now`` does not cover."""
    out: List[Extent] = []
    j = 0
    for ext in before:
        start, end = ext.offset, ext.end
        while j < len(now) and now[j].end <= start:
            j += 1
        k = j
        while start < end:
            if k < len(now) and now[k].offset < end:
                if now[k].offset > start:
                    out.append(Extent(start, now[k].offset - start, ExtentKind.ZERO))
                start = max(start, now[k].end)
                k += 1
            else:
                out.append(Extent(start, end - start, ExtentKind.ZERO))
                break
    return out


def _merge_sorted(a: List[Extent], b: List[Extent]) -> Iterator[Extent]:
    i = j = 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and a[i].offset <= b[j].offset):
            yield a[i]
            i += 1
        else:
            yield b[j]
            j += 1


def _adjacent(a: Extent, b: Extent) -> bool:
    return a.kind == b.kind and a.end == b.offset


def coalesce(extents: Iterable[Extent],
             fuse: Callable[[Extent, Extent], bool] = _adjacent) -> Iterator[Extent]:
    """Extents fused while ``fuse(pending, next)`` says so, by default the
    adjacent ones of one kind (readers report them per cluster or per
    object)."""
    pending: Optional[Extent] = None
    for ext in extents:
        if pending is not None and fuse(pending, ext):
            pending = Extent(pending.offset, ext.end - pending.offset, ext.kind)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending
