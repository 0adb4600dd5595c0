"""The live path: librbd's own migration API through python3-rbd.

Clients of the target get librbd's live semantics (reads of uncopied extents
redirect to the source, writes copy up).  This module adds what the API does
not: checks that name the image and the fix before librbd answers with a bare
errno, a status that holds up on full pools and under load, the commit guard
for descendants that the ``rbd`` CLI applies client-side, ``--flatten``, which
Pacific's bindings cannot pass (see ``commit``), and -- through
``interrupted`` -- commits and aborts that librbd stopped half-way.
"""
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import rados
import rbd

from ..errors import AlreadyExists, Busy, MigrationError, NotFound, NotMigrating
from ..images import ImageSpec, Layout
from ..secrets import mask_spec
from ..waits import Waits
from . import ondisk
from .interrupted import Interrupted
from .migration import ImageRef, MigrationInfo, ProgressFn
from ..rbd_errors import in_use, name_taken, translate

log = logging.getLogger(__name__)

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

#: Image metadata on a target whose migration was prepared with --flatten.
FLATTEN_KEY = 'rbd_migration.flatten'

def _status(header: 'ondisk.MigrationHeader', src: Tuple[int, str, str, str],
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


class LibrbdEngine:
    def __init__(self, cluster: rados.Rados) -> None:
        self.rados = cluster
        self.rbd = rbd.RBD()
        self._full: Dict[str, Dict[str, Any]] = {}
        self._full_checked = -1e9
        #: Per (pool id, namespace): set once a migration_status call that
        #: outlived its patience there returns.
        self._waiting: Dict[Tuple[int, str], threading.Event] = {}
        self.interrupted = Interrupted(self)

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

    def full_pools(self) -> Dict[str, Dict[str, Any]]:
        """Pools flagged full (quota or OSDs), by name, with their details;
        asked of the monitors at most every few seconds."""
        now = time.monotonic()
        if now - self._full_checked > 3.0:
            ret, out, _ = self.rados.mon_command(json.dumps(
                {'prefix': 'osd pool ls', 'detail': 'detail', 'format': 'json'}), b'',
                timeout=10)
            pools = json.loads(out) if ret == 0 else []
            self._full = {p['pool_name']: p for p in pools
                          if 'full' in str(p.get('flags_names', '')).split(',')}
            self._full_checked = now
        return self._full

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
        dest = ImageRef(dest_pool, self._pool_name(dest_pool),
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
                                   self._pool_name(st['source_pool_id']),
                                   st['source_pool_namespace'],
                                   st['source_image_name'], st['source_image_id'])
        else:
            info.source_spec = self.source_spec(dest)
        return info

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

    def rbd_pool_ids(self) -> List[int]:
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
            with waits.on(f'pool {self._pool_name(pool_id)}'):
                return self.pool_sources(pool_id)

        def listed(item: Tuple[int, str, str, str]) -> Optional[MigrationInfo]:
            pool_id, namespace, src_id, name = item
            try:
                with waits.on(f'pool {self._pool_name(pool_id)}'), \
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

    def namespaces(self, io: rados.Ioctx) -> List[str]:
        try:
            return list(self.rbd.namespace_list(io))
        except rbd.Error:
            return []

    def pool_sources(self, pool_id: int) -> List[Tuple[int, str, str, str]]:
        """(pool id, namespace, id, name) of the migration sources in the
        trash of one pool's namespaces."""
        try:
            with self.rados.open_ioctx2(pool_id) as io:
                found = []
                for ns in [''] + self.namespaces(io):
                    io.set_namespace(ns)
                    found += [(pool_id, ns, src_id, name)
                              for src_id, name in ondisk.trashed_migration_sources(io)]
                return found
        except rados.ObjectNotFound:
            return []  # the pool went away meanwhile

    def remove_trashed(self, io: rados.Ioctx, image_id: str,
                       progress: Optional[ProgressFn] = None) -> None:
        """Remove an image in the trash, with its snapshots (trash removal
        refuses an image that has any) -- also those an interrupted removal
        left in the snapshot trash, which only their id removes."""
        try:
            with rbd.Image(io, image_id=image_id) as img:
                self.remove_snapshots(img)
        except rbd.ImageNotFound:
            pass  # the header is gone already: only the trash entry is left
        self.rbd.trash_remove(io, image_id, force=True, on_progress=progress)

    @staticmethod
    def remove_snapshots(img: rbd.Image) -> None:
        """Every snapshot of ``img``, protected or not, and those in the
        snapshot trash (an interrupted removal left), which only their id
        removes."""
        for snap in list(img.list_snaps()):
            if snap.get('namespace') == rbd.RBD_SNAP_NAMESPACE_TYPE_TRASH:
                img.remove_snap_by_id(snap['id'])
                continue
            if img.is_protected_snap(snap['name']):
                img.unprotect_snap(snap['name'])
            img.remove_snap(snap['name'])

    # -- prepare -----------------------------------------------------------
    def prepare(self, src: ImageSpec, dst: ImageSpec, layout: Layout) -> MigrationInfo:
        with self.ioctx(src.pool, src.namespace, 'source_image_spec') as src_io, \
                self.ioctx(dst.pool, dst.namespace, 'dest_image_spec') as dst_io:
            self._check_data_pool(layout)
            self._check_source(src_io, src)
            layout.check_stripe(self._order(src_io, src), "the source's")
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
            layout.check_stripe(self.default_order(), "the cluster's rbd_default_order")
            try:
                self.rbd.migration_prepare_import(source_spec, dst_io, dst.name,
                                                  **_migration_kwargs(layout))
            except rbd.Error as e:
                raise translate(e, f'librbd refused the source-spec for {dst}')
        return self.status(dst)

    def default_order(self) -> int:
        """The object size librbd gives a new image that names none."""
        try:
            return int(self.rados.conf_get('rbd_default_order'))
        except (rados.Error, ValueError):
            return 22

    @staticmethod
    def _order(io: rados.Ioctx, src: ImageSpec) -> int:
        try:
            with rbd.Image(io, src.name, read_only=True) as img:
                return int(img.stat()['order'])
        except rbd.Error as e:
            raise translate(e, f"opening image '{src}'")

    def _check_data_pool(self, layout: Layout) -> None:
        if layout.data_pool and not self.rados.pool_exists(layout.data_pool):
            raise NotFound(f"--data-pool: pool {layout.data_pool!r} does not exist")

    def _check_source(self, io: rados.Ioctx, src: ImageSpec) -> None:
        # Migration first: a migration's source sits in the trash, where
        # opening it by name would say it does not exist.
        try:
            st = self._migration_status(io, src.name)
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
        """Execute; idempotent, so a task run again after a failover that
        cut it between librbd's end and the task's record of it completes
        (librbd refuses to execute an executed migration: EINVAL)."""
        with self.ioctx_by_id(dst.pool_id, dst.namespace) as io:
            try:
                self.rbd.migration_execute(io, dst.name, on_progress=progress)
            except rbd.InvalidArgument as e:
                if self._executed(io, dst):
                    return
                raise translate(e, f'executing the migration of {dst}')
            except rbd.Error as e:
                raise translate(e, f'executing the migration of {dst}')

    def _executed(self, io: rados.Ioctx, dst: ImageRef) -> bool:
        try:
            st = self._migration_status(io, dst.name)
        except rbd.Error:
            return False
        return bool(st.get('state') == rbd.RBD_IMAGE_MIGRATION_STATE_EXECUTED)

    def descendants(self, dst: ImageRef) -> List[str]:
        with self.ioctx_by_id(dst.pool_id, dst.namespace) as io:
            with rbd.Image(io, image_id=dst.id, read_only=True) as img:
                return [f"{d['pool']}/{d['pool_namespace'] + '/' if d['pool_namespace'] else ''}"
                        f"{d['image']}" for d in img.list_descendants()]

    def commit(self, dst: ImageRef, progress: ProgressFn, force: bool = False,
               source: Optional[ImageRef] = None) -> None:
        """Commit; then, if prepared with --flatten, flatten the target.

        A commit that librbd left half-done (target committed, source still
        in the trash) is finished by removing the source.

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
                    if self._migrating(io, dst):  # nothing committed yet
                        if isinstance(e, rbd.ImageBusy):
                            raise in_use(f'committing the migration of {dst}',
                                          dst) from None
                        raise translate(e, f'committing the migration of {dst}')
                    # librbd committed the target, then failed removing the
                    # source: finish that now rather than leave it half-done.
                    log.warning('commit of %s stopped after committing the target '
                                '(%s); removing the source', dst, e)
                    self.interrupted.finish_commit(dst, source)
            else:
                self.interrupted.finish_commit(dst, source)
            self._flatten_if_asked(io, dst, progress)

    def _migrating(self, io: rados.Ioctx, dst: ImageRef) -> bool:
        try:
            self._migration_status(io, dst.name)
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

    def abort(self, dst: ImageRef, progress: ProgressFn,
              source: Optional[ImageRef] = None) -> None:
        """Abort; idempotent, so a task retried after a failover finishes.
        ``source``, recorded when the task was queued, is what is left to
        restore once librbd removed the target and lost track of it."""
        try:
            self._abort_target(dst, progress)
            return
        except _TargetGone:
            pass
        self.interrupted.finish_abort(dst, progress, source)

    def _abort_target(self, dst: ImageRef, progress: ProgressFn) -> None:
        """librbd's abort, by the target; once more if it trips over what
        its own interrupted run left.

        Pacific's abort removes the target's snapshots by name; one whose
        removal was cut short already sits in the snapshot trash under
        another name, so every later abort fails with ENOENT on it.
        """
        try:
            io = self.ioctx_by_id(dst.pool_id, dst.namespace)
        except NotFound:
            raise _TargetGone() from None
        with io:
            for attempt in (1, 2):
                try:
                    self.rbd.migration_abort(io, dst.name, on_progress=progress)
                    return
                except rbd.ImageNotFound as e:
                    if not ondisk.directory_has(io, dst.id) or \
                            not ondisk.header_exists(io, dst.id):
                        raise _TargetGone() from None
                    if attempt == 2 or not self.interrupted.purge_trashed_snapshots(io, dst):
                        raise translate(e, f'aborting the migration of {dst}')
                except rbd.InvalidArgument as e:
                    # Not a migration target: its prepare may have stopped
                    # before librbd marked it one.
                    if self.interrupted.remove_unprepared_target(io, dst):
                        raise _TargetGone() from None
                    raise translate(e, f'aborting the migration of {dst}')
                except rbd.ImageBusy:
                    raise in_use(f'aborting the migration of {dst}', dst) from None
                except rbd.ImageExists:
                    raise name_taken(f'aborting the migration of {dst}') from None
                except rbd.Error as e:
                    raise translate(e, f'aborting the migration of {dst}')


class _TargetGone(Exception):
    """librbd's abort cannot find the target: it removed it already."""


def _migration_kwargs(layout: Layout) -> Dict[str, Any]:
    """Pacific's python3-rbd migration_prepare[_import] takes data_pool as
    bytes (RBD.create takes str)."""
    kwargs = dict(layout.librbd_kwargs())
    data_pool = kwargs.get('data_pool')
    if isinstance(data_pool, str):
        kwargs['data_pool'] = data_pool.encode()
    return kwargs


def _ns(io: rados.Ioctx) -> str:
    return f'{io.nspace}/' if io.nspace else ''
