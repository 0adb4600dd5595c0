"""A migration's status, read so that it holds up: librbd's
migration_status where it answers in time, the images' migration headers
where it would wait (a full pool, a pool where an earlier call still
waits), and ``interrupted`` for what librbd stopped half-way and no longer
reports.  Also the listing of every migration in the cluster.
"""
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import rados
import rbd

from ..errors import MigrationError, NotFound, NotMigrating
from ..images import ImageSpec
from ..rbd_errors import translate
from ..secrets import mask_spec
from ..waits import Waits
from . import ondisk
from .cluster import Cluster
from .interrupted import Interrupted
from .migration import ImageRef, MigrationInfo

#: Migrations whose headers a status listing reads at once.
LIST_CONCURRENCY = 8

STATES = {
    rbd.RBD_IMAGE_MIGRATION_STATE_UNKNOWN: 'unknown',
    rbd.RBD_IMAGE_MIGRATION_STATE_ERROR: 'error',
    rbd.RBD_IMAGE_MIGRATION_STATE_PREPARING: 'preparing',
    rbd.RBD_IMAGE_MIGRATION_STATE_PREPARED: 'prepared',
    rbd.RBD_IMAGE_MIGRATION_STATE_EXECUTING: 'executing',
    rbd.RBD_IMAGE_MIGRATION_STATE_EXECUTED: 'executed',
    rbd.RBD_IMAGE_MIGRATION_STATE_ABORTING: 'aborting',
}


def _status(header: ondisk.MigrationHeader, src: Tuple[int, str, str, str],
            dst: Tuple[int, str, str, str]) -> Dict[str, Any]:
    """A migration_status dict: state from ``header``; source and target
    as (pool id, namespace, name, id)."""
    state = {v: k for k, v in STATES.items()}.get(header.state,
                                                  rbd.RBD_IMAGE_MIGRATION_STATE_UNKNOWN)
    return {'source_pool_id': src[0], 'source_pool_namespace': src[1],
            'source_image_name': src[2], 'source_image_id': src[3],
            'dest_pool_id': dst[0], 'dest_pool_namespace': dst[1],
            'dest_image_name': dst[2], 'dest_image_id': dst[3],
            'state': state, 'state_description': header.state_description}


class StatusReader(Cluster):
    """The cluster, and what it says of its migrations."""

    def __init__(self, cluster: rados.Rados) -> None:
        super().__init__(cluster)
        #: Per (pool id, namespace): set once a migration_status call that
        #: outlived its patience there returns.
        self._waiting: Dict[Tuple[int, str], threading.Event] = {}
        self.interrupted = Interrupted(self)

    def status(self, spec: ImageSpec) -> MigrationInfo:
        """The migration that ``spec`` (its source or its target) is part of."""
        with self.ioctx(spec.pool, spec.namespace) as io:
            try:
                st = self._migration_status(io, spec.name)
            except rbd.ImageNotFound:
                image_id = ondisk.directory_id(io, spec.name)
                if image_id is not None:
                    ref = ImageRef(io.get_pool_id(), spec.pool, spec.namespace,
                                   spec.name, image_id)
                    return self.interrupted.restored_source(io, ref) or self._unavailable(ref)
                info = (self.interrupted.by_source_name(io, spec.name)
                        or self.interrupted.for_target(io.get_pool_id(), name=spec.name,
                                                        namespace=spec.namespace))
                if info is None:
                    raise NotFound(f"image '{spec}' does not exist") from None
                return info
            except (rbd.InvalidArgument, rbd.ReadOnlyImage) as e:
                # ReadOnlyImage: librbd cannot open a target whose abort
                # stopped after marking it "aborting".
                image_id = ondisk.directory_id(io, spec.name)
                info = (self.interrupted.for_target(io.get_pool_id(), image_id)
                        if image_id else self.interrupted.by_source_name(io, spec.name))
                if info is not None:
                    return info
                if isinstance(e, rbd.ReadOnlyImage):
                    raise translate(e, f'reading the migration status of {spec}')
                raise NotMigrating(f"image '{spec}' is not being migrated; "
                                   f'prepare a migration first') from None
            except rbd.Error as e:
                raise translate(e, f'reading the migration status of {spec}')
        return self._info(st)

    def _migration_status(self, io: rados.Ioctx, name: str) -> Dict[str, Any]:
        """librbd's migration_status, kept away from what crashes it.

        Given a name that only a trash entry still holds, librbd opens that
        migration source; if a half-done commit already removed the
        source's header, Pacific's librbd segfaults -- taking the whole mgr
        with it.  Such a source is as good as gone: say so without asking.
        """
        image_id = ondisk.directory_id(io, name)
        src_id = ondisk.trashed_source_id(io, name) if image_id is None else None
        if src_id is not None and ondisk.migration_header(io, src_id) is None:
            raise rbd.ImageNotFound(f'{name}: a migration source being removed')
        waiting = self._waiting.get((io.get_pool_id(), io.nspace))
        if io.get_pool_name() in self.full_pools() or (waiting and not waiting.is_set()):
            return self._status_from_headers(io, name, image_id)
        return self._patient_status(io, name, image_id)

    #: Seconds a command waits for librbd's migration_status.
    STATUS_PATIENCE = 5.0

    def _patient_status(self, io: rados.Ioctx, name: str,
                        image_id: Optional[str]) -> Dict[str, Any]:
        """librbd's migration_status, given ``STATUS_PATIENCE`` seconds.

        On a pool that filled up since its flags were read, librbd waits
        for a write that cannot happen.  The command then answers from the
        headers, and the pool is not asked again until that call returns.
        The call gets its own I/O context: the caller's is closed on return.
        """
        where = (io.get_pool_id(), io.nspace)
        box: Dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                with self.rados.open_ioctx2(where[0]) as own:
                    own.set_namespace(where[1])
                    box['status'] = dict(self.rbd.migration_status(own, name))
            except (rbd.Error, rados.Error) as e:
                box['error'] = e
            finally:
                done.set()

        threading.Thread(target=call, name=f'migration_status {name}', daemon=True).start()
        if not done.wait(self.STATUS_PATIENCE):
            self._waiting[where] = done
            return self._status_from_headers(io, name, image_id)
        if 'error' in box:
            raise box['error']
        return box['status']

    def _status_from_headers(self, io: rados.Ioctx, name: str,
                             image_id: Optional[str]) -> Dict[str, Any]:
        """What migration_status says, read from the images' migration
        headers.  On a full pool librbd's migration_status waits for a write
        that cannot happen -- and a module command that waits stalls every
        command after it."""
        here = (io.get_pool_id(), io.nspace)
        if image_id is not None:
            header = ondisk.migration_header(io, image_id)
            if header is None or header.header_type != ondisk.HEADER_TARGET:
                raise rbd.InvalidArgument(f'{name}: not a migration target')
            return _status(header, header.names, here + (name, image_id))
        src_id = ondisk.trashed_source_id(io, name)
        header = ondisk.migration_header(io, src_id) if src_id else None
        if header is None or src_id is None:
            raise rbd.ImageNotFound(f'{name}: no such image')
        return _status(header, here + (name, src_id), header.names)

    def _listed(self, io: rados.Ioctx, src_id: str, name: str) -> Optional[MigrationInfo]:
        """The migration of a source found in the trash, from the headers
        alone.  librbd's migration_status opens both images; while copies
        run, each open waits behind their I/O, and listing a few migrations
        took seconds.  None if it was committed or aborted meanwhile."""
        header = ondisk.migration_header(io, src_id)
        if header is None:
            return None
        try:
            with self.ioctx_by_id(header.pool_id, header.namespace) as dst_io:
                target = ondisk.migration_header(dst_io, header.image_id)
        except NotFound:
            target = None
        if target is None or header.state == 'aborting':
            return self.interrupted.find(io, src_id, name)
        here = (io.get_pool_id(), io.nspace)
        return self._info(_status(target, here + (name, src_id), header.names),
                          exact_pools=True)

    def _unavailable(self, dest: ImageRef) -> MigrationInfo:
        """A target that exists but that librbd cannot open: its migration
        source is gone or unreadable (librbd opens the source with it)."""
        return MigrationInfo(
            dest=dest, state='error', source_unavailable=True,
            state_description='librbd cannot open the migration source (no such '
                              'file, image or object); restore the source or abort '
                              'the migration')

    def _info(self, st: Dict[str, Any], exact_pools: bool = False) -> MigrationInfo:
        """``st`` as a MigrationInfo; ``exact_pools`` when its pool ids come
        from the migration headers, not from librbd (one read less)."""
        dest_pool = st['dest_pool_id'] if exact_pools else self._pool_holding(
            st['dest_image_id'], st['dest_pool_namespace'], st['dest_pool_id'])
        dest = ImageRef(dest_pool, self.pool_name(dest_pool),
                        st['dest_pool_namespace'], st['dest_image_name'],
                        st['dest_image_id'])
        info = MigrationInfo(dest=dest, state=STATES.get(st['state'], 'unknown'),
                             state_description=st.get('state_description') or '')
        if info.state == 'unknown' and self._header_state(dest) == 'aborting':
            # librbd reports an abort under way as "unknown"; if no task of
            # ours runs it, it was interrupted.
            info.state, info.interrupted = 'aborting', 'abort'
            info.state_description = 'abort stopped half-way: run abort again'
        if st['source_pool_id'] >= 0:
            info.source = ImageRef(st['source_pool_id'],
                                   self.pool_name(st['source_pool_id']),
                                   st['source_pool_namespace'],
                                   st['source_image_name'], st['source_image_id'])
        else:
            info.source_spec = self.source_spec(dest)
        return info

    def target_status(self, ref: ImageRef) -> MigrationInfo:
        """The migration of the target ``ref``, from the images' migration
        headers alone, as on a full pool (``_status_from_headers``): no
        open of the target, which opens its source too."""
        with self.ioctx_by_id(ref.pool_id, ref.namespace) as io:
            return self._info(self._status_from_headers(io, ref.name, ref.id))

    def _header_state(self, ref: ImageRef) -> Optional[str]:
        try:
            with self.ioctx_by_id(ref.pool_id, ref.namespace) as io:
                header = ondisk.migration_header(io, ref.id)
        except NotFound:
            return None
        return header.state if header else None

    def verify_source_spec(self, info: MigrationInfo) -> Dict[str, Any]:
        """How our adapters read this migration's source: an in-cluster
        source is the image in the trash, by id, at HEAD with all its
        snapshots; an import's source is its source-spec, unmasked."""
        if info.source is not None:
            s = info.source
            return {'type': 'native', 'pool_id': s.pool_id, 'pool_namespace': s.namespace,
                    'image_name': s.name, 'image_id': s.id}
        return self._source_spec(info.dest)

    def _pool_holding(self, image_id: str, namespace: str, hint: int) -> int:
        """The pool whose image directory lists ``image_id``.

        Pacific's python3-rbd ``migration_status`` reports the source's pool
        id as ``dest_pool_id``, so the reported id is only a first guess.
        """
        pools = [hint] + [p for p in self.rbd_pool_ids() if p != hint]
        for pool_id in pools:
            try:
                with self.ioctx_by_id(pool_id, namespace) as io:
                    if ondisk.directory_has(io, image_id):
                        return pool_id
            except (MigrationError, rados.Error):
                continue
        return hint

    def source_spec(self, dest: ImageRef) -> Optional[Dict[str, Any]]:
        """An import's source-spec, secrets masked."""
        try:
            return mask_spec(self._source_spec(dest))
        except (rbd.Error, ValueError, NotFound):
            return None

    def _source_spec(self, dest: ImageRef) -> Dict[str, Any]:
        """An import's source-spec, read from the target's migration
        header: opening the image would wait on a full pool."""
        with self.ioctx_by_id(dest.pool_id, dest.namespace) as io:
            header = ondisk.migration_header(io, dest.id)
            if header is not None and header.source_spec:
                return dict(json.loads(header.source_spec))
            with rbd.Image(io, image_id=dest.id, read_only=True) as img:
                spec = img.migration_source_spec()
        # python3-rbd returns it parsed; older bindings return text.
        return dict(json.loads(spec) if isinstance(spec, str) else spec)

    def list_migrations(self, known: Iterator[ImageRef] = iter(()),
                        waits: Optional[Waits] = None) -> List[MigrationInfo]:
        """Every migration in every rbd pool and namespace.

        In-cluster migrations are found through their source, which sits in
        the pool's trash with source "migration"; import-only migrations
        leave no trash entry, so the caller names those it prepared.  Each
        pool's reads are announced on ``waits``, so that a caller that stops
        waiting can name the pool that does not answer.
        """
        waits = waits or Waits()

        def sources_of(pool_id: int) -> List[Tuple[int, str, str, str]]:
            with waits.on(f'pool {self.pool_name(pool_id)}'):
                return self.pool_sources(pool_id)

        def listed(item: Tuple[int, str, str, str]) -> Optional[MigrationInfo]:
            pool_id, namespace, src_id, name = item
            try:
                with waits.on(f'pool {self.pool_name(pool_id)}'), \
                        self.ioctx_by_id(pool_id, namespace) as io:
                    return self._listed(io, src_id, name)
            except NotFound:
                return None  # its pool went away meanwhile

        def known_status(ref: ImageRef) -> Optional[MigrationInfo]:
            try:
                with waits.on(f'pool {ref.pool}'):
                    return self.status(ref.spec)
            except MigrationError:
                return None

        # Each pool and each migration costs a few small reads that wait on
        # the OSDs, behind whatever else they are busy with; several at once
        # keep the answer quick while migrations copy.
        found: Dict[str, MigrationInfo] = {}
        with ThreadPoolExecutor(max_workers=LIST_CONCURRENCY,
                                thread_name_prefix='rbd_migration list') as pool:
            sources = [source for sources in pool.map(sources_of, self.rbd_pool_ids())
                       for source in sources]
            for info in pool.map(listed, sources):
                if info is not None:
                    found[info.dest.id] = info
            rest = [ref for ref in known if ref.id not in found]
            for info in pool.map(known_status, rest):
                if info is not None:
                    found[info.dest.id] = info
        return sorted(found.values(), key=lambda i: (str(i.dest)))
