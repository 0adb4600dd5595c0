"""What librbd keeps in RADOS objects, read directly where python3-rbd
cannot tell us: the image directory without opening images, the trash with
its "migration" entries (Pacific's ``RBD.trash_list`` raises on them), the
migration header a source keeps after its target is gone, and an image's
layout without opening it (which for a live import opens its source too);
and the one thing written directly: object maps flagged invalid.

Each decoder follows the encoding in Ceph's ``cls_rbd_types``: an
``ENCODE_START`` preamble (u8 version, u8 compat, u32 length), then the
fields in order; strings are a u32 length and bytes, integers little-endian.
"""
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import rados

TRASH_SOURCE_MIGRATION = 2

#: cls::rbd::MigrationHeaderType
HEADER_SOURCE, HEADER_TARGET = 1, 2

#: cls::rbd::MigrationState, as python3-rbd names them.
MIGRATION_STATES = {0: 'error', 1: 'preparing', 2: 'prepared', 3: 'executing',
                    4: 'executed', 5: 'aborting'}


@dataclass
class MigrationHeader:
    """The ``migration`` key of an image header: on a source it names the
    target, on a target the source."""
    header_type: int
    pool_id: int
    namespace: str
    image_name: str
    image_id: str
    state: str
    #: Why the migration is in its state (librbd's execute errors, say).
    state_description: str = ''
    #: An import's source-spec JSON (empty for an in-cluster migration).
    source_spec: str = ''

    @property
    def names(self) -> Tuple[int, str, str, str]:
        """The other image, as (pool id, namespace, name, id)."""
        return (self.pool_id, self.namespace, self.image_name, self.image_id)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str:
        length = self.take('<I')
        text = self.data[self.pos:self.pos + length]
        if len(text) != length:
            raise ValueError('string runs past the end')
        self.pos += length
        return text.decode()

    def preamble(self) -> None:
        self.pos += 6


def decode_trash_spec(value: bytes) -> Tuple[int, str]:
    """(source, name) of an encoded cls::rbd::TrashImageSpec."""
    r = _Reader(value)
    r.preamble()
    source = r.take('<B')
    return source, r.string()


def decode_migration_header(value: bytes) -> MigrationHeader:
    """An encoded cls::rbd::MigrationSpec, up to its state."""
    r = _Reader(value)
    r.preamble()
    header_type = r.take('<B')
    pool_id = r.take('<q')
    namespace, name, image_id = r.string(), r.string(), r.string()
    for _ in range(r.take('<I')):  # snap_seqs: u64 -> u64
        r.pos += 16
    r.pos += 8 + 1 + 1  # overlap, flatten, mirroring
    state = r.take('<B')
    description = source_spec = ''
    if r.pos < len(r.data):  # since v2
        description = r.string()
        if r.pos < len(r.data):  # since v3, after the mirror image mode
            r.pos += 1
            source_spec = r.string()
    return MigrationHeader(header_type, pool_id, namespace, name, image_id,
                           MIGRATION_STATES.get(state, 'unknown'), description, source_spec)


def _omap_get(io: rados.Ioctx, oid: str, key: str) -> Optional[bytes]:
    with rados.ReadOpCtx() as op:
        it, _ = io.get_omap_vals_by_keys(op, (key,))
        try:
            io.operate_read_op(op, oid)
        except rados.ObjectNotFound:
            return None
        for _k, value in it:
            return bytes(value)
    return None


def directory_has(io: rados.Ioctx, image_id: str) -> bool:
    """Whether the pool's (namespace's) ``rbd_directory`` lists the image."""
    return _omap_get(io, 'rbd_directory', f'id_{image_id}') is not None


def directory_id(io: rados.Ioctx, name: str) -> Optional[str]:
    """The id of the image named ``name``, without opening it."""
    value = _omap_get(io, 'rbd_directory', f'name_{name}')
    if value is None or len(value) < 4:
        return None
    return _Reader(value).string()


def decode_u64(value: bytes) -> int:
    return int(struct.unpack('<Q', value)[0])


def decode_string(value: bytes) -> str:
    return _Reader(value).string()


def encode_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack('<I', len(data)) + data


def read_id_object(io: rados.Ioctx, name: str) -> str:
    """The image id an ``rbd_id.<name>`` object holds (an encoded string)."""
    return _Reader(io.read(f'rbd_id.{name}', 4096)).string()


def header_exists(io: rados.Ioctx, image_id: str) -> bool:
    try:
        io.stat(f'rbd_header.{image_id}')
        return True
    except rados.ObjectNotFound:
        return False


def header_size(io: rados.Ioctx, image_id: str) -> Optional[int]:
    """The image's size (its head's), from its header's ``size`` key: no
    open, which for a live import's target would open its source too."""
    value = _omap_get(io, f'rbd_header.{image_id}', 'size')
    if value is None or len(value) != 8:
        return None
    return decode_u64(value)


def header_values(io: rados.Ioctx, image_id: str, keys: Tuple[str, ...]) -> Dict[str, bytes]:
    """Some keys of an image's header, as cls_rbd keeps them (absent keys
    are left out; an absent header reads as no keys)."""
    with rados.ReadOpCtx() as op:
        it, _ = io.get_omap_vals_by_keys(op, keys)
        try:
            io.operate_read_op(op, f'rbd_header.{image_id}')
        except rados.ObjectNotFound:
            return {}
        return {str(k): bytes(v) for k, v in it}


#: librbd's feature bit and image flags (include/rbd/features.h, rbd_types.h).
FEATURE_OBJECT_MAP = 1 << 3
FLAGS_MAPS_INVALID = 1 | 2   # object map invalid, fast-diff invalid
#: CEPH_NOSNAP: the image's head, to cls_rbd.
HEAD_SNAP_ID = (1 << 64) - 2


def flag_object_maps_invalid(io: rados.Ioctx, image_id: str) -> None:
    """Flag the image's object maps (its head's and every snapshot's)
    invalid with cls_rbd ``set_flags``, as librbd does with a map it cannot
    trust: clients then read objects rather than the map.  Nothing to do
    for an image without object maps."""
    header = f'rbd_header.{image_id}'
    value = _omap_get(io, header, 'features')
    if value is None or len(value) != 8 or not decode_u64(value) & FEATURE_OBJECT_MAP:
        return
    for snap_id in [HEAD_SNAP_ID] + list(snapshot_ids(io, image_id)):
        io.execute(header, 'rbd', 'set_flags',
                   struct.pack('<QQQ', FLAGS_MAPS_INVALID, FLAGS_MAPS_INVALID, snap_id))


def snapshot_ids(io: rados.Ioctx, image_id: str) -> Iterator[int]:
    """The ids of an image's snapshots, from its header's ``snapshot_<id>``
    keys (the id in 16 hex digits)."""
    header = f'rbd_header.{image_id}'
    start = ''
    while True:
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, start, 'snapshot_', 1024)
            io.operate_read_op(op, header)
            keys = [str(k) for k, _v in it]
        for key in keys:
            yield int(key[len('snapshot_'):], 16)
        if len(keys) < 1024:
            return
        start = keys[-1]


def migration_header(io: rados.Ioctx, image_id: str) -> Optional[MigrationHeader]:
    """The image's migration header, or None if it takes part in none."""
    value = _omap_get(io, f'rbd_header.{image_id}', 'migration')
    if value is None:
        return None
    try:
        return decode_migration_header(value)
    except (ValueError, struct.error, UnicodeDecodeError):
        return None


def trashed_migration_sources(io: rados.Ioctx) -> List[Tuple[str, str]]:
    """(id, name) of the images in the trash as migration sources."""
    return [(image_id, name) for image_id, (source, name) in _trash(io)
            if source == TRASH_SOURCE_MIGRATION]


def trashed_images(io: rados.Ioctx) -> List[Tuple[str, str]]:
    """(id, name) of every image in the trash, whatever moved it there
    (python3-rbd's trash_list fails on some listings: IndexError)."""
    return [(image_id, name) for image_id, (_, name) in _trash(io)]


def trashed_source_id(io: rados.Ioctx, name: str) -> Optional[str]:
    """The id of the migration source named ``name`` in the trash, if any."""
    return next((i for i, n in trashed_migration_sources(io) if n == name), None)


def _trash(io: rados.Ioctx) -> Iterator[Tuple[str, Tuple[int, str]]]:
    start = ''
    while True:
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, start, 'id_', 1024)
            try:
                io.operate_read_op(op, 'rbd_trash')
            except rados.ObjectNotFound:
                return
            batch = [(str(k), bytes(v)) for k, v in it]
        for key, value in batch:
            try:
                yield key[len('id_'):], decode_trash_spec(value)
            except (ValueError, struct.error, UnicodeDecodeError):
                continue
        if len(batch) < 1024:
            return
        start = batch[-1][0]
