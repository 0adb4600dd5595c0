"""The bytes librbd reads to open a view, kept so that opening never fails.

librbd 16.2 crashes the process that opens an image whose qcow2 source
fails a read while it is being opened (measured: a 502 answer to the
header's ``GET`` is a segmentation fault in the client, after "failed to
probe QCOW image"); a failed read of data later is a clean EIO.  In the
mgr, which opens live targets for status, execute, commit and abort, such
a failure would take the mgr down at every start: a crash loop whenever a
live import's source went away (a deleted file, a server down, a key
revoked).  So what an open reads (the header, the L1 tables, the snapshot
and refcount tables, and the size a ``HEAD`` asks for) is kept with the
migration's record and served from there: opening the target never waits
on the source and never fails because of it.  Data clusters and L2 tables
are read from the view, opened at the first read that needs it; if the
source cannot be read then, that read fails cleanly.
"""
import base64
import json
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..context import SourceContext
from ..errors import InvalidArgument, SourceChanged
from ..streams.base import Stream
from .view import ADAPTER, QcowView

#: Kept pinned bytes at most, compressed (a view of 64 snapshots of a
#: 64 TiB image pins about 260 KiB of L1 tables, mostly zeros).
MAX_PINNED = 1 << 20


@dataclass
class Pinned:
    """The view's size, and its bytes below ``end`` (zeros but for ``pieces``)."""

    size: int
    end: int
    pieces: List[Tuple[int, bytes]]

    def to_text(self) -> str:
        """Compact text for the KV store."""
        raw = json.dumps({'size': self.size, 'end': self.end,
                          'pieces': [[at, base64.b64encode(data).decode()]
                                     for at, data in self.pieces]}).encode()
        return base64.b64encode(zlib.compress(raw, 9)).decode()

    @classmethod
    def from_text(cls, text: str) -> 'Pinned':
        data: Dict[str, Any] = json.loads(zlib.decompress(base64.b64decode(text)))
        return cls(size=int(data['size']), end=int(data['end']),
                   pieces=[(int(at), base64.b64decode(piece))
                           for at, piece in data['pieces']])

    def covers(self, offset: int, length: int) -> bool:
        return offset + length <= self.end

    def fill(self, offset: int, view: memoryview) -> None:
        """``view`` from the pinned bytes at ``offset`` (all below ``end``)."""
        view[:] = bytes(len(view))
        stop = offset + len(view)
        for at, data in self.pieces:
            lo, hi = max(at, offset), min(at + len(data), stop)
            if lo < hi:
                view[lo - offset:hi - offset] = data[lo - at:hi - at]


class PinnedView(Stream):
    """Serves the pinned bytes itself and the rest from the view that
    ``open_view`` opens at the first read needing it (again after a failed
    open, at the next such read)."""

    def __init__(self, pinned: Pinned, open_view: Callable[[], Stream]) -> None:
        self.pinned = pinned
        self._open_view = open_view
        self._view: Optional[Stream] = None
        self._lock = threading.Lock()
        self.description = 'the qcow2 view of the source'

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], ctx: SourceContext) -> 'PinnedView':
        raise NotImplementedError('a pinned view is made from a kept record')

    def size(self) -> int:
        return self.pinned.size

    def _read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_into(self, offset: int, view: memoryview) -> int:
        if self.pinned.covers(offset, len(view)):
            self.pinned.fill(offset, view)
            return len(view)
        return self._opened().read_into(offset, view)

    def _opened(self) -> Stream:
        with self._lock:
            if self._view is None:
                self._view = self._open_view()
            return self._view

    def close(self) -> None:
        super().close()
        with self._lock:
            view, self._view = self._view, None
        if view is not None:
            view.close()


def pin(view: QcowView) -> Pinned:
    """What to keep of ``view``; InvalidArgument when it is too much."""
    end, pieces = view.opening_bytes()
    pinned = Pinned(view.size(), end, pieces)
    if len(pinned.to_text()) > MAX_PINNED:
        raise InvalidArgument(
            f'source-spec: the live view of the source would keep '
            f'{len(pinned.to_text())} bytes of tables with its record, more than '
            f'{MAX_PINNED}; {ADAPTER}')
    return pinned


def check_same(view: QcowView, pinned: Pinned) -> QcowView:
    """``view``, once it is the one the pinned bytes describe: another
    module version could lay out the view otherwise, and tables of one
    layout over data of another would be wrong data, not an error."""
    end, pieces = view.opening_bytes()
    if (view.size(), end, pieces) != (pinned.size, pinned.end, pinned.pieces):
        view.close()
        raise SourceChanged(
            'source-spec: the live view opened now is not the one librbd was '
            'prepared on (its tables differ: the source, or this module\'s '
            'version, changed); abort the migration and prepare it again')
    return view
