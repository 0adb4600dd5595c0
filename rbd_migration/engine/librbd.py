"""The live path: librbd's own migration API through python3-rbd.

Clients of the target get librbd's live semantics (reads of uncopied extents
redirect to the source, writes copy up).  This module adds what the API does
not: checks that turn librbd's bare errnos into one-line errors naming the
image and the fix, the commit guard for descendants that the ``rbd`` CLI
applies client-side, and ``--flatten``, which Pacific's bindings cannot pass
(see ``commit``).
"""
import errno
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import rados
import rbd

from ..errors import (AlreadyExists, Busy, Cancelled, InvalidArgument,
                      MigrationError, NotFound, PermissionDenied, Unsupported)
from ..images import ImageSpec, Layout
from ..secrets import mask_spec

#: Called with (done, total); a non-zero return cancels the librbd operation.
ProgressFn = Callable[[int, int], int]

STATES = {
    rbd.RBD_IMAGE_MIGRATION_STATE_UNKNOWN: 'unknown',
    rbd.RBD_IMAGE_MIGRATION_STATE_ERROR: 'error',
    rbd.RBD_IMAGE_MIGRATION_STATE_PREPARING: 'preparing',
    rbd.RBD_IMAGE_MIGRATION_STATE_PREPARED: 'prepared',
    rbd.RBD_IMAGE_MIGRATION_STATE_EXECUTING: 'executing',
    rbd.RBD_IMAGE_MIGRATION_STATE_EXECUTED: 'executed',
    rbd.RBD_IMAGE_MIGRATION_STATE_ABORTING: 'aborting',
}

#: Image metadata on a target whose migration was prepared with --flatten.
FLATTEN_KEY = 'rbd_migration.flatten'

# cls_rbd's trash entry source for an image moved there by migration.
_TRASH_SOURCE_MIGRATION = 2


class TransientError(MigrationError):
    """The cluster could not do it now (timeout, full, connection lost)."""

    transient = True

    def __init__(self, message: str, code: int = errno.EAGAIN) -> None:
        super().__init__(message)
        self.errno = code


_KINDS = {
    errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists, errno.EBUSY: Busy,
    errno.EINVAL: InvalidArgument, errno.ERANGE: InvalidArgument,
    errno.EDOM: InvalidArgument, errno.EROFS: InvalidArgument,
    errno.ENAMETOOLONG: InvalidArgument,
    errno.EOPNOTSUPP: Unsupported, errno.ENOSYS: Unsupported,
    errno.EACCES: PermissionDenied, errno.EPERM: PermissionDenied,
    errno.ECANCELED: Cancelled,
}


def translate(e: Exception, doing: str) -> MigrationError:
    """A librbd/librados exception as an operator-facing error."""
    code = abs(getattr(e, 'errno', None) or errno.EIO)
    reason = errno.errorcode.get(code, str(code))
    text = f'{doing}: {_strerror(code)} ({reason})'
    kind = _KINDS.get(code)
    if kind is None:
        return TransientError(text, code)
    err = kind(text)
    err.errno = code
    return err


def _strerror(code: int) -> str:
    import os
    return os.strerror(code).lower()


@dataclass(frozen=True)
class ImageRef:
    pool_id: int
    pool: str
    namespace: str
    name: str
    id: str

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.pool, self.namespace, self.name)

    def __str__(self) -> str:
        return str(self.spec)


@dataclass
class MigrationInfo:
    dest: ImageRef
    state: str
    state_description: str
    source: Optional[ImageRef] = None
    #: For import-only migrations: the source-spec with secrets masked.
    source_spec: Optional[Dict[str, Any]] = None
    #: librbd cannot open the source, so it cannot open the target either;
    #: only abort (or restoring the source) gets out of this.
    source_unavailable: bool = False
    #: Which engine serves it: librbd's live migration, or our adapters.
    path: str = 'librbd'

    @property
    def import_only(self) -> bool:
        return self.source is None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['import_only'] = self.import_only
        return d


class LibrbdEngine:
    def __init__(self, cluster: rados.Rados) -> None:
        self.rados = cluster
        self.rbd = rbd.RBD()

    # -- pools and images --------------------------------------------------
    def ioctx(self, pool: str, namespace: str = '', what: str = '') -> rados.Ioctx:
        """An I/O context for ``pool``/``namespace``; ``what`` names the
        argument in errors (e.g. 'dest_image_spec')."""
        where = f'{what}: ' if what else ''
        try:
            io = self.rados.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise NotFound(f"{where}pool '{pool}' does not exist") from None
        if namespace:
            if not self.rbd.namespace_exists(io, namespace):
                io.close()
                raise NotFound(f"{where}namespace '{pool}/{namespace}' does not exist; "
                               f"create it with rbd namespace create {pool}/{namespace}")
            io.set_namespace(namespace)
        return io

    def ioctx_by_id(self, pool_id: int, namespace: str = '') -> rados.Ioctx:
        try:
            io = self.rados.open_ioctx2(pool_id)
        except rados.ObjectNotFound:
            raise NotFound(f'pool id {pool_id} does not exist') from None
        io.set_namespace(namespace)
        return io

    def ref(self, io: rados.Ioctx, name: str) -> ImageRef:
        try:
            with rbd.Image(io, name, read_only=True) as img:
                image_id = img.id()
        except rbd.ImageNotFound:
            raise NotFound(f"image '{io.get_pool_name()}/{_ns(io)}{name}' does not exist") from None
        except rbd.Error as e:
            raise translate(e, f"opening image '{io.get_pool_name()}/{_ns(io)}{name}'")
        return ImageRef(io.get_pool_id(), io.get_pool_name(), io.nspace, name, image_id)

    def exists(self, spec: ImageSpec) -> bool:
        with self.ioctx(spec.pool, spec.namespace) as io:
            try:
                with rbd.Image(io, spec.name, read_only=True):
                    return True
            except rbd.ImageNotFound:
                return False
            except rbd.Error as e:
                raise translate(e, f"opening image '{spec}'")

    # -- status ------------------------------------------------------------
    def status(self, spec: ImageSpec) -> MigrationInfo:
        """The migration that ``spec`` (its source or its target) is part of."""
        with self.ioctx(spec.pool, spec.namespace) as io:
            try:
                st = self.rbd.migration_status(io, spec.name)
            except rbd.ImageNotFound:
                image_id = _directory_id(io, spec.name)
                if image_id is None:
                    raise NotFound(f"image '{spec}' does not exist") from None
                return self._unavailable(ImageRef(io.get_pool_id(), spec.pool,
                                                  spec.namespace, spec.name, image_id))
            except rbd.InvalidArgument:
                raise NotMigrating(f"image '{spec}' is not being migrated; "
                                   f'prepare a migration first') from None
            except rbd.Error as e:
                raise translate(e, f'reading the migration status of {spec}')
        return self._info(st)

    def _unavailable(self, dest: ImageRef) -> MigrationInfo:
        """A target that exists but that librbd cannot open: its migration
        source is gone or unreadable (librbd opens the source with it)."""
        return MigrationInfo(
            dest=dest, state='error', source_unavailable=True,
            state_description='librbd cannot open the migration source (no such '
                              'file, image or object); restore the source or abort '
                              'the migration')

    def _info(self, st: Dict[str, Any]) -> MigrationInfo:
        dest_pool = self._pool_holding(st['dest_image_id'], st['dest_pool_namespace'],
                                       st['dest_pool_id'])
        dest = ImageRef(dest_pool, self._pool_name(dest_pool),
                        st['dest_pool_namespace'], st['dest_image_name'],
                        st['dest_image_id'])
        info = MigrationInfo(dest=dest, state=STATES.get(st['state'], 'unknown'),
                             state_description=st.get('state_description') or '')
        if st['source_pool_id'] >= 0:
            info.source = ImageRef(st['source_pool_id'],
                                   self._pool_name(st['source_pool_id']),
                                   st['source_pool_namespace'],
                                   st['source_image_name'], st['source_image_id'])
        else:
            info.source_spec = self.source_spec(dest)
        return info

    def verify_source_spec(self, info: MigrationInfo) -> Dict[str, Any]:
        """How our adapters read this migration's source: an in-cluster
        source is the image in the trash, by id, at HEAD with all its
        snapshots; an import's source is its source-spec, unmasked."""
        if info.source is not None:
            s = info.source
            return {'type': 'native', 'pool_id': s.pool_id, 'pool_namespace': s.namespace,
                    'image_name': s.name, 'image_id': s.id}
        with self.ioctx_by_id(info.dest.pool_id, info.dest.namespace) as io:
            with rbd.Image(io, image_id=info.dest.id, read_only=True) as img:
                spec = img.migration_source_spec()
        return dict(json.loads(spec) if isinstance(spec, str) else spec)

    def _pool_holding(self, image_id: str, namespace: str, hint: int) -> int:
        """The pool whose image directory lists ``image_id``.

        Pacific's python3-rbd ``migration_status`` reports the source's pool
        id as ``dest_pool_id``, so the reported id is only a first guess.
        """
        pools = [hint] + [p for p in self._rbd_pool_ids() if p != hint]
        for pool_id in pools:
            try:
                with self.ioctx_by_id(pool_id, namespace) as io:
                    if _directory_has(io, image_id):
                        return pool_id
            except (MigrationError, rados.Error):
                continue
        return hint

    def _rbd_pool_ids(self) -> List[int]:
        ids = []
        for io in self._rbd_pools():
            ids.append(io.get_pool_id())
            io.close()
        return ids

    def _pool_name(self, pool_id: int) -> str:
        try:
            return str(self.rados.pool_reverse_lookup(pool_id))
        except rados.Error:
            return f'#{pool_id}'

    def source_spec(self, dest: ImageRef) -> Optional[Dict[str, Any]]:
        with self.ioctx_by_id(dest.pool_id, dest.namespace) as io:
            try:
                with rbd.Image(io, image_id=dest.id, read_only=True) as img:
                    spec = img.migration_source_spec()
                # python3-rbd returns it parsed; older bindings return text.
                return mask_spec(json.loads(spec) if isinstance(spec, str) else spec)
            except (rbd.Error, ValueError):
                return None

    def list_migrations(self, known: Iterator[ImageRef] = iter(())) -> List[MigrationInfo]:
        """Every migration in every rbd pool and namespace.

        In-cluster migrations are found through their source, which sits in
        the pool's trash with source "migration"; import-only migrations
        leave no trash entry, so the caller names those it prepared.
        """
        found: Dict[str, MigrationInfo] = {}
        for io_pool in self._rbd_pools():
            for ns in [''] + self._namespaces(io_pool):
                io_pool.set_namespace(ns)
                for name in self._trashed_migration_sources(io_pool):
                    try:
                        info = self._info(self.rbd.migration_status(io_pool, name))
                    except rbd.Error:
                        continue  # committed or aborted meanwhile
                    found[info.dest.id] = info
            io_pool.close()
        for ref in known:
            if ref.id in found:
                continue
            try:
                info = self.status(ref.spec)
            except MigrationError:
                continue
            found[info.dest.id] = info
        return sorted(found.values(), key=lambda i: (str(i.dest)))

    def _rbd_pools(self) -> Iterator[rados.Ioctx]:
        for pool in self.rados.list_pools():
            io = self.rados.open_ioctx(pool)
            try:
                apps = io.application_list()
            except rados.Error:
                apps = []
            if 'rbd' in apps:
                yield io
            else:
                io.close()

    def _namespaces(self, io: rados.Ioctx) -> List[str]:
        try:
            return list(self.rbd.namespace_list(io))
        except rbd.Error:
            return []

    def _trashed_migration_sources(self, io: rados.Ioctx) -> List[str]:
        """Names of images in the trash because they are migration sources.

        Read from the ``rbd_trash`` omap directly: Pacific's ``RBD.trash_list``
        raises IndexError on entries whose source is "migration".
        """
        names = []
        with rados.ReadOpCtx() as op:
            it, _ = io.get_omap_vals(op, '', 'id_', 1024)
            try:
                io.operate_read_op(op, 'rbd_trash')
            except rados.ObjectNotFound:
                return []
            for _key, value in it:
                source, name = _decode_trash_spec(value)
                if source == _TRASH_SOURCE_MIGRATION:
                    names.append(name)
        return names

    # -- prepare -----------------------------------------------------------
    def prepare(self, src: ImageSpec, dst: ImageSpec, layout: Layout) -> MigrationInfo:
        with self.ioctx(src.pool, src.namespace, 'source_image_spec') as src_io, \
                self.ioctx(dst.pool, dst.namespace, 'dest_image_spec') as dst_io:
            self._check_data_pool(layout)
            self._check_source(src_io, src)
            if dst != src:
                self._check_free(dst_io, dst)
            try:
                self.rbd.migration_prepare(src_io, src.name, dst_io, dst.name,
                                           **_migration_kwargs(layout))
            except rbd.Error as e:
                raise translate(e, f'preparing the migration of {src} to {dst}')
            if layout.flatten:
                self._mark_flatten(dst_io, dst)
        return self.status(dst)

    def prepare_import(self, source_spec: str, dst: ImageSpec,
                       layout: Layout) -> MigrationInfo:
        with self.ioctx(dst.pool, dst.namespace) as dst_io:
            self._check_data_pool(layout)
            self._check_free(dst_io, dst)
            try:
                self.rbd.migration_prepare_import(source_spec, dst_io, dst.name,
                                                  **_migration_kwargs(layout))
            except rbd.Error as e:
                raise translate(e, f'librbd refused the source-spec for {dst}')
        return self.status(dst)

    def _check_data_pool(self, layout: Layout) -> None:
        if layout.data_pool and not self.rados.pool_exists(layout.data_pool):
            raise NotFound(f"--data-pool: pool {layout.data_pool!r} does not exist")

    def _check_source(self, io: rados.Ioctx, src: ImageSpec) -> None:
        # Migration first: a migration's source sits in the trash, where
        # opening it by name would say it does not exist.
        try:
            st = self.rbd.migration_status(io, src.name)
        except rbd.Error:
            st = None
        if st is not None:
            info = self._info(st)
            if info.dest.spec == src:
                other = (f'from {info.source}' if info.source is not None
                         else 'of an import')
                raise Busy(f"image '{src}' is the target of a migration {other} "
                           f'(state {info.state}); commit or abort that migration first')
            raise Busy(f"image '{src}' is already being migrated "
                       f"(to {info.dest}, state {info.state}); commit or abort "
                       f'that migration first')
        try:
            with rbd.Image(io, src.name, read_only=True) as img:
                watchers = list(img.watchers_list())
        except rbd.ImageNotFound:
            raise NotFound(f"image '{src}' does not exist") from None
        except rbd.Error as e:
            raise translate(e, f"opening image '{src}'")
        if watchers:
            who = ', '.join(f"client.{w['id']} at {w['addr']}" for w in watchers)
            raise Busy(f"image '{src}' is open by {who}; stop those clients "
                       f'(e.g. shut the VM down) before prepare')

    def _check_free(self, io: rados.Ioctx, dst: ImageSpec) -> None:
        try:
            with rbd.Image(io, dst.name, read_only=True):
                pass
        except rbd.ImageNotFound:
            return
        except rbd.Error as e:
            raise translate(e, f"opening image '{dst}'")
        raise AlreadyExists(f"target image '{dst}' already exists; choose "
                            f'another name or remove it first')

    def _mark_flatten(self, io: rados.Ioctx, dst: ImageSpec) -> None:
        with rbd.Image(io, dst.name) as img:
            img.metadata_set(FLATTEN_KEY, 'true')

    # -- execute, commit, abort -------------------------------------------
    def execute(self, dst: ImageRef, progress: ProgressFn) -> None:
        with self.ioctx_by_id(dst.pool_id, dst.namespace) as io:
            try:
                self.rbd.migration_execute(io, dst.name, on_progress=progress)
            except rbd.Error as e:
                raise translate(e, f'executing the migration of {dst}')

    def descendants(self, dst: ImageRef) -> List[str]:
        with self.ioctx_by_id(dst.pool_id, dst.namespace) as io:
            with rbd.Image(io, image_id=dst.id, read_only=True) as img:
                return [f"{d['pool']}/{d['pool_namespace'] + '/' if d['pool_namespace'] else ''}"
                        f"{d['image']}" for d in img.list_descendants()]

    def commit(self, dst: ImageRef, progress: ProgressFn, force: bool = False) -> None:
        """Commit; then, if prepared with --flatten, flatten the target.

        Pacific's python3-rbd cannot pass RBD_IMAGE_OPTION_FLATTEN to
        ``migration_prepare``, so a target prepared with --flatten keeps the
        source's parent link until commit and is flattened by librbd right
        after it, in the same task.  The end state is the one ``rbd
        migration prepare --flatten`` gives: a target with no parent.  The
        step is idempotent, so a task retried after a failover finishes it.
        """
        with self.ioctx_by_id(dst.pool_id, dst.namespace) as io:
            if self._migrating(io, dst):
                if not force:
                    children = self.descendants(dst)
                    if children:
                        raise Busy(f"{dst} has descendants ({', '.join(children)}); "
                                   'make sure no client has them open read-only, '
                                   'then commit with --force')
                try:
                    self.rbd.migration_commit(io, dst.name, on_progress=progress)
                except rbd.Error as e:
                    raise translate(e, f'committing the migration of {dst}')
            self._flatten_if_asked(io, dst, progress)

    def _migrating(self, io: rados.Ioctx, dst: ImageRef) -> bool:
        try:
            self.rbd.migration_status(io, dst.name)
            return True
        except rbd.InvalidArgument:
            return False
        except rbd.Error as e:
            raise translate(e, f'reading the migration status of {dst}')

    def _flatten_if_asked(self, io: rados.Ioctx, dst: ImageRef,
                          progress: ProgressFn) -> None:
        try:
            with rbd.Image(io, image_id=dst.id) as img:
                try:
                    img.metadata_get(FLATTEN_KEY)
                except KeyError:
                    return
                try:
                    img.flatten(on_progress=progress)
                except rbd.InvalidArgument:
                    pass  # no parent: nothing to flatten
                img.metadata_remove(FLATTEN_KEY)
        except rbd.Error as e:
            raise translate(e, f'flattening {dst} after commit')

    def abort(self, dst: ImageRef, progress: ProgressFn) -> None:
        with self.ioctx_by_id(dst.pool_id, dst.namespace) as io:
            try:
                self.rbd.migration_abort(io, dst.name, on_progress=progress)
            except rbd.Error as e:
                raise translate(e, f'aborting the migration of {dst}')


def _migration_kwargs(layout: Layout) -> Dict[str, Any]:
    """Pacific's python3-rbd migration_prepare[_import] takes data_pool as
    bytes (RBD.create takes str)."""
    kwargs = dict(layout.librbd_kwargs())
    data_pool = kwargs.get('data_pool')
    if isinstance(data_pool, str):
        kwargs['data_pool'] = data_pool.encode()
    return kwargs


class NotMigrating(InvalidArgument):
    """The image exists but takes part in no migration."""


def _directory_get(io: rados.Ioctx, key: str) -> Optional[bytes]:
    """A value of the pool's (namespace's) ``rbd_directory`` omap."""
    with rados.ReadOpCtx() as op:
        it, _ = io.get_omap_vals_by_keys(op, (key,))
        try:
            io.operate_read_op(op, 'rbd_directory')
        except rados.ObjectNotFound:
            return None
        for _k, value in it:
            return bytes(value)
    return None


def _directory_has(io: rados.Ioctx, image_id: str) -> bool:
    return _directory_get(io, f'id_{image_id}') is not None


def _directory_id(io: rados.Ioctx, name: str) -> Optional[str]:
    """The id of the image named ``name``, without opening it."""
    value = _directory_get(io, f'name_{name}')
    if value is None or len(value) < 4:
        return None
    (length,) = struct.unpack_from('<I', value, 0)
    return value[4:4 + length].decode()


def _ns(io: rados.Ioctx) -> str:
    return f'{io.nspace}/' if io.nspace else ''


def _decode_trash_spec(value: bytes) -> 'tuple[int, str]':
    """(source, name) of an encoded cls::rbd::TrashImageSpec.

    Layout: ENCODE_START header (u8 version, u8 compat, u32 length), then
    u8 source, then the name as u32 length + bytes, then timestamps.
    """
    source = value[6]
    (length,) = struct.unpack_from('<I', value, 7)
    return source, value[11:11 + length].decode()
