"""``rbd export --export-format 2`` files: a whole image with its snapshots.

Following Ceph's doc/dev/rbd-export.rst and src/tools/rbd/action/Export.cc
(``do_export_v2``) and Import.cc (what ``rbd import --export-format 2``
accepts).  The file is::

    "rbd image v2\\n"
    image header records, each a u8 tag, a le64 length and that many bytes:
        'O' order, 'T' features, 'U' stripe unit, 'C' stripe count (le64
        each; 'F' image format too, in the doc though rbd never writes it),
        'M' one image-meta pair (le32 length + key, le32 length + value);
        unknown tags are skipped by their length
    'E'
    "rbd image diffs v2\\n"
    le64 number of diffs: one per snapshot, oldest first, then HEAD
    the diffs, back to back, each a v2 ``rbd export-diff`` stream: the first
        from nothing, each next from the snapshot the one before ends at,
        the last (no to-snap) up to HEAD

Note that rbd writes HEAD's diff from the image's HEAD even when asked to
export ``img@snap``: such a file still ends at HEAD.

The source-spec is ``{"type": "export", "stream": {...}}``.  Opening reads
the record headers through the stream (payloads are skipped by offset) and
keeps, per snapshot, where each written range lies in the file; everything
else (composition, extents, exact diffs) is ``layered.LayeredFormat``.
The counts the file gives are bounded by the context's ``SourceLimits``
before they are acted on: the diffs by ``snapshots``, the records (image
header ones included) by ``records``, the index and the image-meta pairs
by ``metadata_bytes``.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set

from ..context import SourceContext
from ..errors import InvalidArgument
from ..streams import open_stream
from ..streams.base import Stream
from .detect import DIFF_BANNER_V2, IMAGE_BANNER_V2, IMAGE_DIFFS_BANNER_V2
from .detect import SNIFF_LENGTH as SNIFF
from .detect import sniff as known_type
from .export_records import RecordReader, Where, parse_diff
from .layered import Layer, LayeredFormat
from .runs import IndexBudget, normalize

TAG_ORDER = ord('O')
TAG_FORMAT = ord('F')
TAG_FEATURES = ord('T')
TAG_STRIPE_UNIT = ord('U')
TAG_STRIPE_COUNT = ord('C')
TAG_META = ord('M')
TAG_END = ord('E')

#: Read as a le64 whatever their length says, as ``rbd import`` does.
_U64_FIELDS = {TAG_ORDER: 'order', TAG_FEATURES: 'features',
               TAG_STRIPE_UNIT: 'stripe_unit',
               TAG_STRIPE_COUNT: 'stripe_count'}

#: One image-meta pair is read into memory; real ones are config values of
#: a few bytes, so a larger one means a corrupt length.
MAX_META_RECORD = 16 << 20
#: The smallest diff: its banner and the end tag.
_MIN_DIFF = len(DIFF_BANNER_V2) + 1
#: What one image-meta pair costs in memory besides its bytes (two str
#: objects and a dict slot), charged to the metadata budget.
_META_OVERHEAD = 160


@dataclass
class ImageMeta:
    """The image header: what ``rbd import`` would create the image with."""

    order: Optional[int] = None
    format: Optional[int] = None
    features: Optional[int] = None
    stripe_unit: Optional[int] = None
    stripe_count: Optional[int] = None
    #: image-meta (``rbd image-meta set``); values decoded from UTF-8 with
    #: surrogateescape, so ``value.encode('utf-8', 'surrogateescape')``
    #: gives the original bytes whatever they are.
    metadata: Dict[str, str] = field(default_factory=dict)


class ExportV2Format(LayeredFormat):
    """An ``rbd export --export-format 2`` file: its snapshots, HEAD, and
    the image header (:meth:`image_meta`)."""

    def __init__(self, layers: List[Layer], where: Where,
                 meta: ImageMeta, ctx: Optional[SourceContext] = None) -> None:
        super().__init__(layers, where, ctx)
        self._meta = meta

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'ExportV2Format':
        stream = open_stream(spec['stream'], ctx)
        try:
            return cls.open(stream, ctx=ctx)
        except BaseException:
            stream.close()
            raise

    @classmethod
    def open(cls, stream: Stream, spec_field: str = 'stream',
             ctx: Optional[SourceContext] = None) -> 'ExportV2Format':
        """Index ``stream``; the format owns it from then on."""
        ctx = ctx if ctx is not None else SourceContext()
        where = Where(spec_field, stream)
        end = stream.size()
        head = stream.read(0, SNIFF)
        if not head.startswith(IMAGE_BANNER_V2):
            raise InvalidArgument(
                f"source-spec: type: 'export', but "
                f"{stream.description or 'the image'} does not start with "
                f"{IMAGE_BANNER_V2!r}; {_suggest(known_type(head))}")
        reader = RecordReader(where, len(IMAGE_BANNER_V2), end, ctx,
                              IndexBudget(ctx.limits))
        meta = _parse_header(reader)
        reader.settle(0)   # the pairs were charged as they came
        at = reader.pos
        banner = reader.take(len(IMAGE_DIFFS_BANNER_V2), at,
                             'the diffs banner')
        if banner != IMAGE_DIFFS_BANNER_V2:
            raise where.corrupt(at, f'expected {IMAGE_DIFFS_BANNER_V2!r}, '
                                    f'found {banner!r}')
        at = reader.pos
        count = reader.u64(at, 'the number of diffs')
        if not 0 < count <= (end - reader.pos) // _MIN_DIFF:
            raise where.corrupt(at, f'the number of diffs, {count}, is '
                                    f'impossible in a file of {end} bytes')
        if count - 1 > ctx.limits.snapshots:   # one per snapshot, then HEAD
            raise InvalidArgument(f'{where}: ' + ctx.limits.refuse(
                'snapshots', 'the export (snapshots)', count - 1))
        return cls(_read_diffs(reader, count), where, meta, ctx)

    def image_metadata(self) -> Dict[str, str]:
        return dict(self._meta.metadata)

    def image_meta(self) -> Dict[str, Any]:
        """Order, features, stripe unit and count (those the file gives) and
        the image-meta pairs under 'metadata', so that the target can be
        created and configured as ``rbd import`` would."""
        m = self._meta
        out: Dict[str, Any] = {
            name: value for name, value in
            (('order', m.order), ('format', m.format),
             ('features', m.features), ('stripe_unit', m.stripe_unit),
             ('stripe_count', m.stripe_count)) if value is not None}
        out['metadata'] = dict(m.metadata)
        return out


def _suggest(kind: Optional[str]) -> str:
    if kind == 'export-diff':
        return 'it is an `rbd export-diff` file: use "type": "export-diff"'
    if kind == 'qcow':
        return 'it holds a qcow image: use "type": "qcow"'
    return ('`rbd export` without --export-format 2 writes a raw image: use '
            '"type": "raw"')


def _parse_header(reader: RecordReader) -> ImageMeta:
    """The image header records, read as ``rbd import`` reads them: known
    ones by their layout (the length is only a bound for 'M' strings),
    unknown ones skipped by their length; 'F', which rbd documents but never
    writes nor reads, is kept when it holds a le64."""
    meta = ImageMeta()
    while True:
        at = reader.pos
        reader.next_record()
        tag = reader.u8(at, 'an image header tag')
        if tag == TAG_END:
            return meta
        name = (f"the '{chr(tag)}' record" if 0x21 <= tag < 0x7f
                else f'the {tag:#04x} record')
        length = reader.u64(at, name)
        if tag in _U64_FIELDS:
            setattr(meta, _U64_FIELDS[tag], reader.u64(at, name))
        elif tag == TAG_FORMAT and length == 8:
            meta.format = reader.u64(at, name)
        elif tag == TAG_META:
            limit = min(length, MAX_META_RECORD)
            key = reader.string(at, f'the key of {name}', limit)
            value = reader.string(at, f'the value of {name}', limit)
            reader.budget.charge(len(key) + len(value) + _META_OVERHEAD,
                                 reader.where, 'the image-meta pairs (bytes)')
            meta.metadata[key.decode('utf-8', 'surrogateescape')] = \
                value.decode('utf-8', 'surrogateescape')
        else:
            reader.skip(length, at, name)


def _read_diffs(reader: RecordReader, count: int) -> List[Layer]:
    """The diffs, checked to form the chain rbd writes: the first from
    nothing, each next from where the one before ends, every one but the
    last ending at a snapshot of a name not seen before."""
    where = reader.where
    layers: List[Layer] = []
    names: Set[str] = set()
    size = 0
    for index in range(count):
        reader.ctx.check()
        at = reader.pos
        diff = parse_diff(reader, index, size)
        if diff.version != 2:
            raise where.corrupt(at, 'a version 1 diff inside an export; '
                                    'exports embed version 2 diffs')
        before = layers[-1].name if layers else None
        if diff.from_snap != before:
            expected = f"'{before}'" if before is not None else 'nothing'
            found = (f"'{diff.from_snap}'" if diff.from_snap is not None
                     else 'nothing')
            raise where.corrupt(at, f'diff {index} of {count} starts from '
                                    f'{found}, expected {expected}')
        if diff.to_snap is None and index < count - 1:
            raise where.corrupt(at, f'diff {index} of {count} ends at HEAD, '
                                    f'which only the last may do')
        if diff.to_snap is not None and diff.to_snap in names:
            raise where.corrupt(at, f"snapshot '{diff.to_snap}' appears "
                                    f'twice')
        if diff.to_snap is not None:
            names.add(diff.to_snap)
        if index == 0 and diff.size is None:
            raise where.corrupt(at, 'the first diff has no size record')
        size = size if diff.size is None else diff.size
        layers.append(Layer(diff.to_snap, size, where.stream,
                            normalize(diff.records, where, reader.budget),
                            diff.protected))
    return layers
