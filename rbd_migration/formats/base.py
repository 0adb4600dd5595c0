"""The format interface: a virtual disk image, read through a stream.

Modelled on QEMU's block drivers and librbd's migration ``FormatInterface``:
a format maps virtual offsets to bytes, tells which ranges are allocated (so
copies stay sparse) and lists snapshots oldest first.
"""
import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Mapping, Optional, TypeVar

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

    def close(self) -> None:
        """Release the streams underneath."""

    def __enter__(self: '_F') -> '_F':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
