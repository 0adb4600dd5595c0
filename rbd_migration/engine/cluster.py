"""The cluster as every engine layer reaches it: pools and namespaces by
name or id, images by name, the pools flagged full, and removal of images
in the trash with their snapshots.

The bottom of the librbd engine: it knows nothing of migrations beyond the
trash entries ``ondisk`` reads, so the layers above (``interrupted``, then
``status``, then the actions in ``librbd``) can all stand on it.
"""
import errno
import json
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import rados
import rbd

from ..errors import NotFound, TransientClusterError
from ..images import ImageSpec
from ..rbd_errors import translate
from . import ondisk
from .migration import ImageRef, ProgressFn

#: Seconds the pools' full flags are taken as read.
FULL_FLAGS_AGE = 3.0


class Cluster:
    """A librados handle and librbd's entry points, with the look-ups
    every engine layer makes."""

    def __init__(self, cluster: rados.Rados) -> None:
        self.rados = cluster
        self.rbd = rbd.RBD()
        self._full: Dict[str, Dict[str, Any]] = {}
        self._full_checked = -1e9

    # -- pools and namespaces ----------------------------------------------
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

    def rbd_pool_ids(self) -> List[int]:
        ids = []
        for io in self._rbd_pools():
            ids.append(io.get_pool_id())
            io.close()
        return ids

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

    def pool_name(self, pool_id: int) -> str:
        try:
            return str(self.rados.pool_reverse_lookup(pool_id))
        except rados.Error:
            return f'#{pool_id}'

    def namespaces(self, io: rados.Ioctx) -> List[str]:
        try:
            return list(self.rbd.namespace_list(io))
        except rbd.Error:
            return []

    def full_pools(self) -> Dict[str, Dict[str, Any]]:
        """Pools flagged full (quota or OSDs), by name, with their details;
        asked of the monitors at most every few seconds."""
        now = time.monotonic()
        if now - self._full_checked > FULL_FLAGS_AGE:
            ret, out, _ = self.rados.mon_command(json.dumps(
                {'prefix': 'osd pool ls', 'detail': 'detail', 'format': 'json'}), b'',
                timeout=10)
            pools = json.loads(out) if ret == 0 else []
            self._full = {p['pool_name']: p for p in pools
                          if 'full' in str(p.get('flags_names', '')).split(',')}
            self._full_checked = now
        return self._full

    def pool_applications(self, pool: str) -> List[str]:
        """The applications enabled on ``pool``, asked of the monitors: this
        client's OSD map can predate an ``rbd pool init`` for as long as it
        sends nothing to that pool's OSDs (they are what hand it newer
        maps)."""
        ret, out, err = self.rados.mon_command(json.dumps(
            {'prefix': 'osd pool application get', 'pool': pool, 'format': 'json'}), b'',
            timeout=10)
        if ret != 0:
            raise TransientClusterError(
                f"could not read the applications of pool '{pool}' from the monitors: "
                f'{err.strip() or errno.errorcode.get(-ret, ret)}; try again', -ret)
        return list(json.loads(out))

    def default_order(self) -> int:
        """The object size librbd gives a new image that names none."""
        try:
            return int(self.rados.conf_get('rbd_default_order'))
        except (rados.Error, ValueError):
            return 22

    # -- images ------------------------------------------------------------
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

    # -- the trash and snapshots -------------------------------------------
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


def _ns(io: rados.Ioctx) -> str:
    return f'{io.nspace}/' if io.nspace else ''
