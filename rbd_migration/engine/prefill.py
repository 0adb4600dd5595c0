"""A live import's data copied by the module's own readers, under librbd.

librbd's execute of a live import reads the source through the view, over
HTTP, an object at a time: 1.3 to 1.6 s for a 1 GiB vmdk that the hidden
path's copier moves in 0.8 to 0.9 s (measured; librbd's execute of a plain
qcow2 from nginx takes as long, so the bound is librbd's reading, not the
view).  So the module's copier fills the target's objects first, with
cls_rbd's ``sparse_copyup``: the OSD writes an object's data only if the
object does not exist yet, in one operation, which is what librbd's own
copy-up of an object does.  An object a client wrote first keeps the
client's data; a client's write after it lands on top (librbd's write to an
object it believes absent copies up through the view first, which the OSD
then ignores).  What librbd's execute would do next is walk every object
to find it there, then record the migration as executed: the module records
it (``LibrbdEngine.record_executed``).

What librbd cannot know: objects filled behind its back are absent from
the target's object maps.  Usually there are none until execute (prepare
turns fast-diff off, and librbd turns the object map off with it); where
there is one (an operator turned it on), a client holding the image's
exclusive lock caches it and reads those objects from the view (the same
bytes, slower).  So the execute flags the maps invalid as it records the
migration executed, then turns fast-diff on again and rebuilds them once
(a maintenance operation librbd hands to the lock owner:
``LibrbdEngine.rebuild_object_maps``), HEAD's and those of snapshots
clients took meanwhile; after commit, with no source below, every object
is where the maps say, or the maps are flagged and not trusted.

Taken only where that holds simply (``reason_not``): a source without
snapshots (a target snapshot's objects need copy-ups under that snapshot's
context, which only the lock owner can order against clients' writes), a
target of the source's size and without fancy striping (one object, one
range of the image).

``LiveExecute`` is the whole of a live execute (this copy, the rebuild,
the executed state, fast-diff on again), handed in a portable form to the
task's child process (isolated.py), which reads the source under the
mgr's rules with a client of its own.
"""
import struct
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import rados

from ..context import SourceContext, config_key_reader
from ..errors import NotFound
from ..formats import open_format
from ..formats.base import Format
from ..rbd_errors import translate
from . import ondisk
from .copier import Checkpoint, Copier, CopyOptions, CopyStats, Write
from .librbd import LibrbdEngine
from .migration import ImageRef, ProgressFn

#: The part of a live execute's progress that is the module's copy; the rest
#: is the object maps' rebuild (a few percent of the time).
FILL_SHARE = 0.9
#: The steps of progress reported within one share.
_STEPS = 1 << 20


@dataclass(frozen=True)
class ObjectLayout:
    """Where a target's data objects are, as its header says."""

    data_pool_id: int
    namespace: str
    prefix: str
    object_size: int
    size: int
    stripe_unit: int
    stripe_count: int
    snapshots: int

    @classmethod
    def read(cls, io: rados.Ioctx, ref: ImageRef) -> 'ObjectLayout':
        """From the target's header, as cls_rbd keeps it: opening the
        image would open a live import's source too (the view, 0.03 s)."""
        values = ondisk.header_values(io, ref.id, (
            'size', 'order', 'object_prefix', 'stripe_unit', 'stripe_count', 'data_pool_id'))
        if not {'size', 'order', 'object_prefix'} <= set(values):
            raise NotFound(f'the header of {ref} is gone or incomplete')
        object_size = 1 << values['order'][0]
        data_pool = struct.unpack('<q', values['data_pool_id'])[0] \
            if 'data_pool_id' in values else -1
        return cls(data_pool_id=data_pool if data_pool >= 0 else ref.pool_id,
                   namespace=ref.namespace,
                   prefix=ondisk.decode_string(values['object_prefix']),
                   object_size=object_size, size=ondisk.decode_u64(values['size']),
                   stripe_unit=ondisk.decode_u64(values['stripe_unit'])
                   if 'stripe_unit' in values else object_size,
                   stripe_count=ondisk.decode_u64(values['stripe_count'])
                   if 'stripe_count' in values else 1,
                   snapshots=sum(1 for _ in ondisk.snapshot_ids(io, ref.id)))

    def object_name(self, number: int) -> str:
        return f'{self.prefix}.{number:016x}'


def reason_not(fmt: Format, layout: ObjectLayout) -> Optional[str]:
    """Why the module cannot fill this target itself (librbd copies all)."""
    if fmt.snapshots():
        return 'the source has snapshots'
    if layout.snapshots:
        return 'the target has snapshots'
    if fmt.size() != layout.size:
        return 'the target was resized'
    if layout.stripe_count != 1 or layout.stripe_unit != layout.object_size:
        return 'the target is striped'
    return None


def sparse_copyup_input(extents: List[Tuple[int, bytes]]) -> bytes:
    """cls_rbd's ``sparse_copyup`` input: the extents as a map of offset to
    length (u32 count, then u64 pairs), then their data, one after another,
    as a bufferlist (u32 length, bytes); little-endian, as Ceph encodes."""
    head = [struct.pack('<I', len(extents))]
    head.extend(struct.pack('<QQ', off, len(data)) for off, data in extents)
    total = sum(len(data) for _, data in extents)
    return b''.join([*head, struct.pack('<I', total), *(data for _, data in extents)])


class ObjectFill(Copier):
    """The copier, writing each object's runs with one ``sparse_copyup``.
    It copies HEAD only (see ``reason_not``) and keeps no checkpoint: run
    again after an interruption, it reads everything again and leaves the
    objects already there as they are."""

    #: An object's second copy-up would find it there and write nothing.
    WHOLE_CHUNKS = True

    def __init__(self, fmt: Format, layout: ObjectLayout, ioctx: rados.Ioctx,
                 options: CopyOptions, progress: Callable[[int, int], bool]) -> None:
        super().__init__(fmt, _Fixed(layout.size), options, progress, lambda cp: None)
        self.layout = layout
        self.ioctx = ioctx

    def _writes(self, runs: List[Tuple[int, bytes]]) -> List[Write]:
        """One write per object, its payload joined from views of the
        chunk's buffer: the join is the one copy made here."""
        size = self.layout.object_size
        objects: Dict[int, List[Tuple[int, bytes]]] = {}
        for off, run in runs:
            view = memoryview(run)
            pos = 0
            while pos < len(run):
                number, inside = divmod(off + pos, size)
                n = min(len(run) - pos, size - inside)
                objects.setdefault(number, []).append((inside, view[pos:pos + n]))
                pos += n
        return [Write(number * size, sum(len(d) for _, d in extents),
                      sparse_copyup_input(extents))
                for number, extents in sorted(objects.items())]

    def _issue(self, write: Write, done: Callable[[Any], None]) -> None:
        self.ioctx.aio_execute(self.layout.object_name(write.offset // self.layout.object_size),
                               'rbd', 'sparse_copyup', write.data, 0,
                               oncomplete=lambda completion, _out: done(completion))


class _Fixed:
    """The part of an image the copier asks about on a HEAD-only copy."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def list_snaps(self) -> List[Dict[str, Any]]:
        return []


def fill(engine: LibrbdEngine, ref: ImageRef, fmt: Format, options: CopyOptions,
         progress: Callable[[int, int], bool]) -> Tuple[Optional[str], Optional[CopyStats]]:
    """Fill ``ref``'s objects from ``fmt``: (None, what was copied), or
    (why not, None) with nothing written."""
    with engine.ioctx_by_id(ref.pool_id, ref.namespace) as io:
        try:
            layout = ObjectLayout.read(io, ref)
        except rados.Error as e:
            raise translate(e, f'reading the layout of {ref}')
    why = reason_not(fmt, layout)
    if why is not None:
        return why, None
    with engine.ioctx_by_id(layout.data_pool_id, layout.namespace) as data:
        copier = ObjectFill(fmt, layout, data, options.fitted(layout.object_size, fmt.read_size),
                            progress)
        return None, copier.run(Checkpoint())


@dataclass
class LiveExecute:
    """A live import's execute: the module's copy of the source (``spec``;
    None: librbd copies it all, for ``why_not``), then the migration
    recorded as executed (``LibrbdEngine.execute_live``).
    Run in the mgr or, rebuilt from its ``portable`` form, in the task's
    child process (isolated.py), which has its own client and no GIL to
    share with the mgr's commands."""

    spec: Optional[Dict[str, Any]]
    why_not: str
    context: SourceContext
    #: ``config_key_prefixes``: the config-keys the source-spec may name.
    key_prefixes: List[str]
    options: CopyOptions
    #: Prepare turned the target's fast-diff off (LibrbdEngine.pause_fast_diff).
    resume_fast_diff: bool

    def portable(self) -> Dict[str, Any]:
        return {'spec': self.spec, 'why_not': self.why_not,
                'context': self.context.portable(), 'key_prefixes': self.key_prefixes,
                'options': asdict(self.options), 'resume_fast_diff': self.resume_fast_diff}

    @classmethod
    def rebuilt(cls, portable: Dict[str, Any], client: rados.Rados) -> 'LiveExecute':
        """Its portable form read in another process, reading sources and
        config-keys through ``client`` as the mgr would."""
        prefixes = list(portable['key_prefixes'])
        return cls(spec=portable['spec'], why_not=str(portable['why_not']),
                   context=SourceContext.rebuilt(portable['context'], client,
                                                 config_key_reader(client, prefixes)),
                   key_prefixes=prefixes, options=CopyOptions(**portable['options']),
                   resume_fast_diff=bool(portable['resume_fast_diff']))

    def run(self, engine: LibrbdEngine, ref: ImageRef, progress: ProgressFn,
            after_copy: Callable[[], None] = lambda: None) -> Dict[str, Any]:
        """Copy, then execute; what the task's result says of who copied.
        ``after_copy`` is called once the module copied it all."""
        why: Optional[str] = self.why_not
        stats: Optional[CopyStats] = None
        if self.spec is not None:
            share = within(progress, 0.0, FILL_SHARE)
            with open_format(self.spec, self.context) as fmt:
                why, stats = fill(engine, ref, fmt, self.options,
                                  lambda done, total: share(done, total) == 0)
            if stats is not None:
                after_copy()
        rest = within(progress, FILL_SHARE, 1.0) if stats is not None else progress
        engine.execute_live(ref, rest, stats is not None, self.resume_fast_diff)
        if stats is None:
            return {'copied_by': 'librbd', 'why': why}
        return {'copied_by': 'rbd_migration', **asdict(stats)}


def within(progress: ProgressFn, low: float, high: float) -> ProgressFn:
    """``progress`` for one part of a task: its (done, total) shown between
    ``low`` and ``high`` of the whole, so the whole never goes back."""
    def part(done: int, total: int) -> int:
        fraction = low + (high - low) * min(done, total) / max(total, 1)
        return progress(int(fraction * _STEPS), _STEPS)
    return part
