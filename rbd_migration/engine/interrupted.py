"""Prepares, commits and aborts that librbd stopped half-way, found and
finished.

librbd's prepare moves the source to the trash and gives it its migration
header before it creates the target, which gets its own header last.  Its
commit drops the target's migration header before it removes the source;
its abort removes the target, restores the source from the trash (id
object, directory entry, then trash entry) and drops the source's migration
header last.  A client cut short anywhere in there (a mgr that fails over
during a prepare command or a commit or abort task) leaves a source that
``rbd migration`` no longer finds, or that librbd's own abort fails on for
good.  The source's migration header still names the target: that and its
state ("preparing" until the target is whole) tell the cases apart.
"""
import logging
import struct
from typing import Iterator, Optional, Tuple

import rados
import rbd

from ..errors import Busy, NotFound, TransientClusterError
from ..rbd_errors import name_taken, translate
from . import ondisk
from .cluster import Cluster
from .migration import ImageRef, MigrationInfo, ProgressFn

log = logging.getLogger(__name__)


def _name_holder(io: rados.Ioctx, name: str) -> Optional[str]:
    """The id that ``name`` stands for in ``io``: by its directory entry,
    else by its id object (a restore cut short may have made either)."""
    image_id = ondisk.directory_id(io, name)
    if image_id is not None:
        return image_id
    try:
        return ondisk.read_id_object(io, name)
    except rados.ObjectNotFound:
        return None


def _target(header: ondisk.MigrationHeader, pool: Optional[str]) -> ImageRef:
    """The target a source's migration header names; ``pool`` is None once
    its pool is gone."""
    return ImageRef(header.pool_id, pool if pool is not None else str(header.pool_id),
                    header.namespace, header.image_name, header.image_id)


class Interrupted:
    """Finds interrupted commits and aborts for status, and finishes them
    for the engine's commit and abort: from the cluster and the on-disk
    headers alone, below both."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    # -- finding them ------------------------------------------------------
    def find(self, io: rados.Ioctx, src_id: str, src_name: str) -> Optional[MigrationInfo]:
        """The migration librbd stopped half-way through finishing, if the
        source ``src_id`` in ``io``'s trash is left over from one."""
        header = ondisk.migration_header(io, src_id)
        if header is None or header.header_type != ondisk.HEADER_SOURCE:
            return None
        source = ImageRef(io.get_pool_id(), io.get_pool_name(), io.nspace,
                          src_name, src_id)
        try:
            with self.cluster.ioctx_by_id(header.pool_id, header.namespace) as dst_io:
                pool: Optional[str] = dst_io.get_pool_name()
                # An abort marks both headers "aborting" first, then removes
                # the target (header object before directory entry); a
                # commit drops the target's migration key, nothing else.
                gone = not ondisk.directory_has(dst_io, header.image_id) or \
                    not ondisk.header_exists(dst_io, header.image_id)
                if header.state == 'aborting' or gone:
                    action = 'abort'
                elif ondisk.migration_header(dst_io, header.image_id) is None:
                    # A target without its header: a prepare stopped before
                    # writing it, or a commit after dropping it.
                    action = 'prepare' if header.state == 'preparing' else 'commit'
                else:
                    return None  # a live migration; librbd answers for it
        except NotFound:
            pool, action, gone = None, 'abort', True
        dest = _target(header, pool)
        if action == 'prepare':
            return MigrationInfo(
                dest=dest, source=source, state='preparing', interrupted='prepare',
                state_description=f'prepare stopped before the target was whole; the '
                                  f'source {source} is still in the trash: run abort to '
                                  f'restore it')
        if action == 'abort':
            where = 'after removing the target' if gone else 'half-way'
            return MigrationInfo(
                dest=dest, source=source, state='aborting', interrupted='abort',
                state_description=f'abort stopped {where}; the source {source} is '
                                  f'still in the trash: run abort again to restore it')
        return MigrationInfo(
            dest=dest, source=source, state='committing', interrupted='commit',
            state_description=f'commit stopped after committing the target; the '
                              f'source {source} is still in the trash: run commit '
                              f'again to remove it')

    def by_source_name(self, io: rados.Ioctx, name: str) -> Optional[MigrationInfo]:
        src_id = ondisk.trashed_source_id(io, name)
        return self.find(io, src_id, name) if src_id else None

    def for_target(self, pool_id: int, image_id: Optional[str] = None,
                   name: Optional[str] = None,
                   namespace: str = '') -> Optional[MigrationInfo]:
        """The interrupted migration into the target with this id (or, once
        the target is gone, this name), found through its source."""
        for io, src_id, src_name in self._trashed_sources():
            h = ondisk.migration_header(io, src_id)
            if h is None or h.pool_id != pool_id:
                continue
            if h.image_id == image_id or (name is not None and h.image_name == name
                                          and h.namespace == namespace):
                return self.find(io, src_id, src_name)
        return None

    def restored_source(self, io: rados.Ioctx, source: ImageRef) -> Optional[MigrationInfo]:
        """The interrupted abort of a source already back under its name
        whose target is gone: only its migration header is left (see
        ``_drop_source_header``)."""
        header = ondisk.migration_header(io, source.id)
        if header is None or header.header_type != ondisk.HEADER_SOURCE:
            return None
        try:
            with self.cluster.ioctx_by_id(header.pool_id, header.namespace) as dst_io:
                if ondisk.header_exists(dst_io, header.image_id):
                    return None
                pool: Optional[str] = dst_io.get_pool_name()
        except NotFound:
            pool = None
        return MigrationInfo(
            dest=_target(header, pool), source=source, state='aborting', interrupted='abort',
            state_description=f'abort stopped after restoring the source {source}; it '
                              'stays read-only until its migration header is dropped: '
                              'run abort again to finish')

    def _trashed_sources(self) -> Iterator[Tuple[rados.Ioctx, str, str]]:
        """(ioctx, id, name) of every migration source in every rbd pool's
        and namespace's trash."""
        for pool_id in self.cluster.rbd_pool_ids():
            for _, ns, src_id, name in self.cluster.pool_sources(pool_id):
                try:
                    io = self.cluster.ioctx_by_id(pool_id, ns)
                except NotFound:
                    break  # the pool went away meanwhile
                with io:
                    yield io, src_id, name

    # -- finishing a commit ------------------------------------------------
    def finish_commit(self, dst: ImageRef, source: Optional[ImageRef]) -> None:
        """Remove a source an interrupted commit left in the trash.

        The source is found through its header, or -- if a retry already
        dropped the header -- as the one the task recorded when it was
        queued, still in the trash as a migration source.
        """
        info = self.for_target(dst.pool_id, dst.id)
        if info is not None and info.interrupted == 'commit' and info.source:
            source = info.source
        if source is None:
            return
        with self.cluster.ioctx_by_id(source.pool_id, source.namespace) as io:
            if (source.id, source.name) not in ondisk.trashed_migration_sources(io):
                return
            header = ondisk.migration_header(io, source.id)
            if header is not None and (header.image_id, header.pool_id) != (dst.id, dst.pool_id):
                return
            try:
                self._remove_source(io, source)
            except rbd.ImageBusy:
                # Still watched by the client that was cut short (a failed
                # mgr): its watch expires within a minute; retry then.
                raise TransientClusterError(
                    f'the source {source} of the committed migration to {dst} is still '
                    'open by a client that went away; retrying once its watch '
                    'expires') from None
            except (rbd.Error, rados.Error) as e:
                if (source.id, source.name) not in ondisk.trashed_migration_sources(io):
                    return  # gone meanwhile: what was left to do is done
                raise translate(e, f'removing the source {source} of the committed '
                                   f'migration to {dst}')

    def _remove_source(self, io: rados.Ioctx, source: ImageRef) -> None:
        """What librbd's commit does last: drop the source's migration
        header (it keeps the image read-only), its snapshots, then the
        image and its trash entry."""
        if ondisk.migration_header(io, source.id) is not None:
            io.execute(f'rbd_header.{source.id}', 'rbd', 'migration_remove', b'')
        self.cluster.remove_trashed(io, source.id)

    # -- finishing an abort ------------------------------------------------
    def finish_abort(self, dst: ImageRef, progress: ProgressFn,
                     source: Optional[ImageRef]) -> None:
        """The rest of an abort whose target librbd already removed.

        librbd's abort goes on from the source's side: it finds a migration
        source in the trash by name.  A source already out of the trash
        (``source``, recorded when the task was queued) only lacks the last
        step.  No target and no source left with a migration header means
        the abort is done.
        """
        info = self.for_target(dst.pool_id, dst.id)
        if info is not None and info.source is not None:
            if info.interrupted not in ('abort', 'prepare'):
                raise Busy(f'cannot abort {dst}: {info.state_description}')
            src = info.source
            with self.cluster.ioctx_by_id(src.pool_id, src.namespace) as io:
                if _name_holder(io, src.name) not in (None, src.id):
                    raise name_taken(f'aborting the migration of {dst}')
                try:
                    self.cluster.rbd.migration_abort(io, src.name, on_progress=progress)
                except rbd.Error as e:
                    raise translate(e, f'aborting the migration of {dst} from its '
                                       f'source {src}')
        elif source is not None:
            self._drop_source_header(dst, source)
        self._drop_target_remnants(dst)

    def remove_unprepared_target(self, io: rados.Ioctx, dst: ImageRef) -> bool:
        """Remove a target whose prepare stopped before librbd gave it its
        migration header, so that the abort goes on from the source's side
        (librbd's abort cannot open such a target).  It holds no data yet,
        only the snapshots and metadata copied from the source.  Whether it
        was one."""
        info = self.for_target(dst.pool_id, dst.id)
        if info is None or info.interrupted != 'prepare':
            return False
        log.warning('prepare of %s stopped before the target was whole; removing it', dst)
        try:
            with rbd.Image(io, image_id=dst.id) as img:
                self.cluster.remove_snapshots(img)
            self.cluster.rbd.remove(io, dst.name)
        except rbd.ImageNotFound:
            pass  # cut short while librbd created it: its remnants are dropped
        except rbd.Error as e:
            raise translate(e, f'removing the target {dst} of a prepare that stopped')
        return True

    def _drop_source_header(self, dst: ImageRef, source: ImageRef) -> None:
        """Drop the migration header of a source that an abort restored
        from the trash and then stopped.

        librbd cannot finish that abort itself: it restores the source from
        the trash first, finds no trash entry, and fails (ENOENT) on every
        try, leaving the source read-only for good.  The header is the only
        thing left; the class method that librbd's last step calls drops it
        and the image's "migrating" feature with it.
        """
        try:
            io = self.cluster.ioctx_by_id(source.pool_id, source.namespace)
        except NotFound:
            return
        with io:
            header = ondisk.migration_header(io, source.id)
            if header is None or header.header_type != ondisk.HEADER_SOURCE or \
                    (header.pool_id, header.image_id) != (dst.pool_id, dst.id):
                return
            log.warning('abort of %s stopped after restoring the source %s; '
                        'dropping its migration header', dst, source)
            try:
                io.execute(f'rbd_header.{source.id}', 'rbd', 'migration_remove', b'')
            except rados.Error as e:
                raise translate(e, f'finishing the abort of {dst} on its source {source}')

    def _drop_target_remnants(self, dst: ImageRef) -> None:
        """What a target removal cut short leaves once the header is gone:
        its id object and directory entries (``rbd ls`` would list a ghost)
        and its object map.  (Object maps of its snapshots are named by
        snapshot ids that only the gone header held.)"""
        try:
            io = self.cluster.ioctx_by_id(dst.pool_id, dst.namespace)
        except NotFound:
            return
        with io:
            if ondisk.header_exists(io, dst.id):
                return
            if ondisk.directory_id(io, dst.name) == dst.id:
                io.execute('rbd_directory', 'rbd', 'dir_remove_image',
                           ondisk.encode_string(dst.name) + ondisk.encode_string(dst.id))
            try:
                if ondisk.read_id_object(io, dst.name) == dst.id:
                    io.remove_object(f'rbd_id.{dst.name}')
            except rados.ObjectNotFound:
                pass
            try:
                io.remove_object(f'rbd_object_map.{dst.id}')
            except rados.ObjectNotFound:
                pass

    def purge_trashed_snapshots(self, io: rados.Ioctx, dst: ImageRef) -> bool:
        """Finish removing the target's snapshots that sit in the snapshot
        trash, as librbd's snapshot removal would: release the snapshot id
        in the data pool, drop its object map, drop it from the header.
        The image itself is read-only while aborting, so this goes below
        librbd.  Whether there was any."""
        try:
            with rbd.Image(io, image_id=dst.id, read_only=True) as img:
                trashed = [int(s['id']) for s in img.list_snaps()
                           if s.get('namespace') == rbd.RBD_SNAP_NAMESPACE_TYPE_TRASH]
                data_pool = int(img.data_pool_id())
        except rbd.Error:
            return False
        for snap_id in trashed:
            with self.cluster.ioctx_by_id(data_pool, dst.namespace) as data_io:
                try:
                    data_io.remove_self_managed_snap(snap_id)
                except rados.Error:
                    pass  # already released
            try:
                io.remove_object(f'rbd_object_map.{dst.id}.{snap_id:016x}')
            except rados.ObjectNotFound:
                pass
            io.execute(f'rbd_header.{dst.id}', 'rbd', 'snapshot_remove',
                       struct.pack('<Q', snap_id))
        return bool(trashed)
