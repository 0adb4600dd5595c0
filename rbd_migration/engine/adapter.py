"""The adapter path: imports librbd cannot read, done by our own readers.

The target is created under a private name and moved straight to the trash
(with a deferment far in the future, so no trash purge takes it), where no
client can open it by name while it is incomplete; our record reserves its
final name.  Execute copies through ``Copier``; commit restores the image
from the trash under its final name; abort removes it.  The record lives in
the mgr's store and the copy's checkpoint on the image itself, so a mgr
failover resumes from the checkpoint, not from zero.
"""
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import rados
import rbd

from ..context import SourceContext
from ..errors import AlreadyExists, InvalidArgument, NotFound, Unsupported
from ..formats import open_format
from ..formats.base import Format
from ..images import ImageSpec, Layout
from ..records import NewerRecord, Record
from ..secrets import mask_spec
from ..validators import Validators, check_unchanged
from . import ondisk
from .copier import Checkpoint, Copier, CopyOptions
from ..store import Store
from .librbd import LibrbdEngine
from .migration import ImageRef, MigrationInfo, ProgressFn
from ..rbd_errors import translate

RECORD_PREFIX = 'adapter/'
#: The name a target has until commit gives it its own.
PRIVATE_PREFIX = 'rbd_migration.'
PRIVATE_NAME = re.compile(re.escape(PRIVATE_PREFIX) + '[0-9a-f]{12}')
CHECKPOINT_KEY = 'rbd_migration.checkpoint'
TRASH_DEFERMENT = 100 * 365 * 86400  # never expires on its own
ADAPTER = 'adapter'
#: The layout of the import records this code writes (the first had no
#: version field and the same fields).
ADAPTER_RECORD_VERSION = 1
#: The layout of the copy checkpoint this code writes in the target's
#: metadata: a JSON object; version 1 was ``layer:offset`` text.
CHECKPOINT_VERSION = 2

log = logging.getLogger(__name__)


@dataclass
class ImportRecord(Record):
    """One import in progress on the adapter path, under its target's key."""

    KIND: ClassVar[str] = 'adapter import'
    VERSION: ClassVar[int] = ADAPTER_RECORD_VERSION

    #: The target, by its final name and the id it keeps.
    dest: ImageRef
    #: The source-spec as given (with its config:// references).
    spec: Dict[str, Any]
    #: 'prepared', 'executing' or 'executed'.
    state: str
    created: float = 0.0
    #: The name the target has in the trash until commit.
    private_name: str = ''
    #: What prepare saw of the source, checked before and after the copy.
    validators: Validators = field(default_factory=dict)
    #: Why the last execute stopped ('' when it did not fail).
    error: str = ''
    #: What the finished copy read and wrote.
    stats: Optional[Dict[str, int]] = None
    version: int = ADAPTER_RECORD_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.dest, dict):  # as read from the store
            self.dest = ImageRef(**self.dest)


@dataclass
class StoredCheckpoint(Record):
    """Where an interrupted copy resumes, as kept in the target's metadata."""

    KIND: ClassVar[str] = 'copy checkpoint'
    VERSION: ClassVar[int] = CHECKPOINT_VERSION

    layer: int = 0
    offset: int = 0
    version: int = CHECKPOINT_VERSION


def encode_checkpoint(cp: Checkpoint) -> str:
    return StoredCheckpoint(cp.layer, cp.offset).to_json()


def decode_checkpoint(text: Optional[str]) -> Checkpoint:
    """Where the copy resumes: from the start when there is no checkpoint
    or it cannot be trusted (copying again what is already written is
    always safe; skipping what is not never is)."""
    try:
        data = json.loads(text or '')
    except ValueError:
        return Checkpoint.decode(text)  # version 1's 'layer:offset' (or nothing)
    try:
        stored = StoredCheckpoint.from_dict(data)
    except NewerRecord as e:
        # A newer module may count layers or offsets otherwise: resuming at
        # its numbers could skip data never copied, so the copy starts over.
        log.warning('copying from the start: %s', e)
        return Checkpoint()
    except (TypeError, ValueError):
        return Checkpoint()
    if not all(type(n) is int and n >= 0 for n in (stored.layer, stored.offset)):
        return Checkpoint()
    return Checkpoint(stored.layer, stored.offset)


class AdapterEngine:
    def __init__(self, librbd: LibrbdEngine, store: Store) -> None:
        self.librbd = librbd
        self.store = store
        self.rbd = rbd.RBD()

    # -- records -----------------------------------------------------------
    def _key(self, ref: ImageRef) -> str:
        return RECORD_PREFIX + ref.key

    def _records(self) -> Tuple[List[ImportRecord], int]:
        """The records this code can read, and how many a newer module
        wrote (left alone: that module finds them again)."""
        out, newer = [], 0
        for key, text in self.store.get_store_prefix(RECORD_PREFIX).items():
            try:
                out.append(ImportRecord.from_json(text))
            except NewerRecord as e:
                log.warning('leaving import record %s alone: %s', key, e)
                newer += 1
            except (ValueError, TypeError):
                continue
        return out, newer

    def _save(self, record: ImportRecord) -> None:
        self.store.set_store(self._key(record.dest), record.to_json())

    def _record(self, ref: ImageRef) -> ImportRecord:
        text = self.store.get_store(self._key(ref))
        if not text:
            raise NotFound(f'{ref} is not an import in progress')
        try:
            return ImportRecord.from_json(text)
        except NewerRecord as e:
            raise Unsupported(f'{ref}: {e}; a newer rbd_migration module must '
                              'finish this import') from None

    def _info(self, record: ImportRecord) -> MigrationInfo:
        return MigrationInfo(dest=record.dest, state=record.state,
                             state_description=record.error,
                             source_spec=mask_spec(record.spec), path=ADAPTER)

    def find(self, spec: ImageSpec) -> Optional[MigrationInfo]:
        """The import whose final name is ``spec``, if one is in progress."""
        for record in self._records()[0]:
            if record.dest.spec == spec:
                return self._info(record)
        return None

    def list(self) -> List[MigrationInfo]:
        return [self._info(r) for r in self._records()[0]]

    # -- prepare -----------------------------------------------------------
    def prepare_import(self, spec: Mapping[str, Any], dst: ImageSpec, layout: Layout,
                       size: int, validators: Optional[Validators] = None) -> MigrationInfo:
        if self.find(dst) is not None:
            raise AlreadyExists(f"target image '{dst}' is reserved by an import in "
                                'progress; commit or abort it first')
        private = f'{PRIVATE_PREFIX}{uuid.uuid4().hex[:12]}'
        with self.librbd.ioctx(dst.pool, dst.namespace) as io:
            self.librbd._check_data_pool(layout)
            layout.check_stripe(self.librbd.default_order(),
                                "the cluster's rbd_default_order")
            try:
                self.rbd.create(io, private, size, old_format=False,
                                **layout.librbd_kwargs())
                with rbd.Image(io, private) as img:
                    image_id = img.id()
                    img.metadata_set(CHECKPOINT_KEY, encode_checkpoint(Checkpoint()))
                self.rbd.trash_move(io, private, delay=TRASH_DEFERMENT)
            except rbd.Error as e:
                self._discard(io, private)
                raise translate(e, f'creating the target {dst}')
            ref = ImageRef(io.get_pool_id(), dst.pool, dst.namespace, dst.name, image_id)
        record = ImportRecord(dest=ref, spec=dict(spec), state='prepared',
                              created=time.time(), private_name=private,
                              validators=validators or {})
        self._save(record)
        return self._info(record)

    def _discard(self, io: rados.Ioctx, private: str) -> None:
        """Undo a half-made target (a failed step leaves nothing behind)."""
        try:
            self.rbd.remove(io, private)
        except rbd.Error:
            pass

    # -- execute, commit, abort -------------------------------------------
    def execute(self, ref: ImageRef, progress: ProgressFn, ctx: SourceContext,
                options: CopyOptions) -> Dict[str, int]:
        record = self._record(ref)
        check_unchanged(record.spec, record.validators, ctx, 'before the copy')
        record.state, record.error = 'executing', ''
        self._save(record)

        def keep_going(done: int, total: int) -> bool:
            return progress(done, total) == 0

        with self.librbd.ioctx_by_id(ref.pool_id, ref.namespace) as io, \
                rbd.Image(io, image_id=ref.id) as img, \
                open_format(record.spec, ctx) as fmt:
            start = decode_checkpoint(_metadata(img, CHECKPOINT_KEY))
            options = options.fitted(int(img.stat()['obj_size']), fmt.read_size)

            def checkpoint(cp: Checkpoint) -> None:
                img.metadata_set(CHECKPOINT_KEY, encode_checkpoint(cp))

            stats = Copier(fmt, img, options, keep_going, checkpoint).run(start)
            _carry_over(fmt, img)
        # Only now is the copy known to be the source's as prepare saw it.
        check_unchanged(record.spec, record.validators, ctx, 'during the copy')
        record.state = 'executed'
        record.stats = asdict(stats)
        self._save(record)
        return asdict(stats)

    def commit(self, ref: ImageRef) -> None:
        record = self._record(ref)
        if record.state != 'executed':
            raise InvalidArgument(f'the import into {ref} is not executed yet '
                                  f'(state: {record.state})')
        with self.librbd.ioctx_by_id(ref.pool_id, ref.namespace) as io:
            try:
                with rbd.Image(io, image_id=ref.id) as img:
                    _metadata_remove(img, CHECKPOINT_KEY)
                self.rbd.trash_restore(io, ref.id, ref.name)
            except rbd.ImageExists:
                raise AlreadyExists(f"an image named '{ref}' appeared meanwhile; "
                                    'rename or remove it, then commit again') from None
            except rbd.Error as e:
                raise translate(e, f'restoring {ref} from the trash')
        self.store.set_store(self._key(ref), None)

    def abort(self, ref: ImageRef, progress: ProgressFn) -> None:
        self._record(ref)
        with self.librbd.ioctx_by_id(ref.pool_id, ref.namespace) as io:
            try:
                self.librbd.remove_trashed(io, ref.id, progress)
            except rbd.ImageNotFound:
                pass  # already gone
            except rbd.Error as e:
                raise translate(e, f'removing the target {ref}')
        self.store.set_store(self._key(ref), None)

    def sweep_orphans(self, before: float) -> List[str]:
        """Remove the targets that prepares created before ``before`` (this
        mgr's start) and never recorded: a failover between the create and
        the record leaves a private-named image, in the trash or not, that
        no command finds and that holds no data of anyone's.  Returns what
        it removed."""
        records, newer = self._records()
        if newer:
            return []  # their targets are unknown here: leave every image alone
        known = {(r.dest.pool_id, r.dest.namespace, r.dest.id) for r in records}
        removed = []
        for pool_id in self.librbd.rbd_pool_ids():
            with self.librbd.rados.open_ioctx2(pool_id) as io:
                for ns in [''] + self.librbd.namespaces(io):
                    io.set_namespace(ns)
                    for image_id, name, trashed in self._private_images(io):
                        if (pool_id, ns, image_id) in known or \
                                not self._created_before(io, image_id, before):
                            continue
                        if not trashed:  # cut before it went to the trash
                            self.rbd.trash_move(io, name, delay=0)
                        self.librbd.remove_trashed(io, image_id)
                        removed.append(f"{io.get_pool_name()}/{ns + '/' if ns else ''}{name}")
        return removed

    def _private_images(self, io: rados.Ioctx) -> List[Tuple[str, str, bool]]:
        """(id, name, in the trash) of private-named images."""
        found = [(image_id, name, True) for image_id, name in ondisk.trashed_images(io)
                 if PRIVATE_NAME.fullmatch(name)]
        for name in self.rbd.list(io):
            if PRIVATE_NAME.fullmatch(name):
                try:
                    with rbd.Image(io, name, read_only=True) as img:
                        found.append((str(img.id()), name, False))
                except rbd.ImageNotFound:
                    continue
        return found

    @staticmethod
    def _created_before(io: rados.Ioctx, image_id: str, before: float) -> bool:
        try:
            with rbd.Image(io, image_id=image_id, read_only=True) as img:
                return bool(img.create_timestamp().timestamp() < before)
        except rbd.ImageNotFound:
            return False

    def source_spec(self, ref: ImageRef) -> Dict[str, Any]:
        return dict(self._record(ref).spec)

    def fail(self, ref: ImageRef, error: str) -> None:
        """Note why the last execute stopped (shown by status)."""
        try:
            record = self._record(ref)
        except NotFound:
            return
        record.error = error
        self._save(record)


def _carry_over(fmt: Format, img: rbd.Image) -> None:
    """What an rbd export carries besides data: image-meta and protection."""
    for key, value in fmt.image_metadata().items():
        img.metadata_set(key, value)
    for name in fmt.protected_snapshots():
        if not img.is_protected_snap(name):
            img.protect_snap(name)


def _metadata(img: rbd.Image, key: str) -> Optional[str]:
    try:
        return str(img.metadata_get(key))
    except KeyError:
        return None


def _metadata_remove(img: rbd.Image, key: str) -> None:
    try:
        img.metadata_remove(key)
    except KeyError:
        pass
