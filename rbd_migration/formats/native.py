"""An RBD image of this cluster, read through python3-rbd.

Follows librbd's native migration format as used by ``--import-only``: the
image is opened read-only at the source-spec's snapshot, because only a
snapshot stays still while it is copied.  That snapshot is HEAD for the
import; the user snapshots older than it (by snapshot id, which is creation
order) are the import's snapshots, oldest first.  Snapshots in the trash
namespace (deleted but kept for clones), group and mirror snapshots are left
out, as librbd's snapshot copy leaves them out.  ``snap_name`` names a user
snapshot; ``snap_id`` may name any snapshot, as in librbd.

The image may be in another cluster (upstream's fields): ``cluster_name``
(and ``client_name``, default ``client.admin``) finds ``<cluster>.conf`` and
``<cluster>.<client>.keyring`` in the operator's conf directory, or
``mon_host`` with ``key`` (the key may be a ``config://`` reference) names it
outright.  The module then connects to that cluster for as long as the
format is open -- one probe, one execute, one verify -- within
REMOTE_CONNECT seconds, with every operation bounded by REMOTE_OP_TIMEOUT,
and shuts the connection down on close.

A clone reads through to its parent (librbd does this for every read and for
``diff_iterate`` with ``include_parent``), so the import is a flattened copy:
the parent's allocated ranges are reported and read like the clone's own.

Every read goes to librbd, which is thread-safe: one image handle per
snapshot serves all threads.  Handles for older snapshots are opened on first
use, by image id, so a rename or a move to the trash (a live migration
source) after opening does not matter.
"""
import os
import threading
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Tuple)

import rados
import rbd

from ..context import SourceContext
from ..rbd_errors import translate
from ..errors import InvalidArgument, MigrationError, NotFound, SourceUnreachable
from .base import (Extent, ExtentKind, Format, FormatFeatures, Snapshot,
                   coalesce)

#: ``diff_iterate`` runs over windows of this size, so the extents of a large
#: image stream out (the copier starts early) and memory stays bounded by
#: what one window holds.
DIFF_WINDOW = 1 << 30

_USER = rbd.RBD_SNAP_NAMESPACE_TYPE_USER
_NAMESPACES = {rbd.RBD_SNAP_NAMESPACE_TYPE_USER: 'user',
               rbd.RBD_SNAP_NAMESPACE_TYPE_GROUP: 'group',
               rbd.RBD_SNAP_NAMESPACE_TYPE_TRASH: 'trash',
               rbd.RBD_SNAP_NAMESPACE_TYPE_MIRROR: 'mirror'}

Interval = Tuple[int, int]  # [start, end)

#: Seconds a connection to another cluster may take to come up.
REMOTE_CONNECT = 10
#: Seconds any one operation on another cluster may take (a frozen OSD or a
#: lost monitor there fails the read, which the task reports).
REMOTE_OP_TIMEOUT = 30


def _shown(value: object) -> str:
    """A value quoted in a message, kept on one line whatever it holds."""
    text = str(value)
    return f"'{text}'" if text.isprintable() else repr(text)


class NativeFormat(Format):
    """The image ``image`` (open read-only in ``ioctx``) at snapshot
    ``snap_id``.  Takes ownership of both and closes them with itself."""

    def __init__(self, ioctx: rados.Ioctx, image: rbd.Image, snap_id: Optional[int],
                 where: str, spec_field: str,
                 cluster: Optional[rados.Rados] = None) -> None:
        self._cluster = cluster   # another cluster's, owned; None: the mgr's
        self._ioctx = ioctx
        self._image = image
        self._where = where
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._handles: Dict[int, rbd.Image] = {}
        self._closed = False
        self.image_id: str = image.id()
        all_snaps = sorted(image.list_snaps(), key=lambda s: s['id'])
        if snap_id is None:
            # The image itself, every snapshot before it: how verify reads a
            # read-only migration source (never offered to the source-spec,
            # where librbd needs a snapshot to keep the source unchanged).
            head: Mapping[str, Any] = {}
            older = all_snaps
        else:
            found = next((s for s in all_snaps if s['id'] == snap_id), None)
            if found is None:
                raise self._no_snapshot(spec_field, snap_id)
            head = found
            try:
                image.set_snap_by_id(snap_id)
            except rbd.ImageNotFound:  # removed since it was listed
                raise self._no_snapshot(spec_field, snap_id) from None
            except rbd.Error as e:
                raise translate(e, f'source-spec: opening {where}') from None
            older = [s for s in all_snaps if s['id'] < snap_id]
        self.snap_id = snap_id
        self.snap_name: str = head.get('name', '')
        self._size: int = image.size()
        self._snapshots = [Snapshot(s['name'], s['size'], ident=str(s['id']))
                           for s in older
                           if s.get('namespace', _USER) == _USER]
        self.features = self._probe_features(head, older)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any],
                  ctx: SourceContext) -> 'NativeFormat':
        remote = connect_remote(spec, ctx)
        try:
            return cls._from_cluster(spec, ctx, remote)
        except BaseException:
            if remote is not None:
                remote.shutdown()
            raise

    @classmethod
    def _from_cluster(cls, spec: Mapping[str, Any], ctx: SourceContext,
                      remote: Optional[rados.Rados]) -> 'NativeFormat':
        cluster = remote if remote is not None else ctx.rados
        if cluster is None:
            raise ValueError('a native source needs SourceContext.rados')
        ioctx, location = _open_ioctx(cluster, spec)
        if remote is not None:
            location = f'{location} of cluster {remote_name(spec)}'
        try:
            image, where = _open_image(ioctx, location, spec)
            try:
                if 'snap_name' not in spec and 'snap_id' not in spec:
                    return cls(ioctx, image, None, where, '', remote)
                if 'snap_name' in spec:
                    snap_id = _user_snap_id(image, spec['snap_name'])
                    if snap_id is None:
                        raise NotFound(
                            f"source-spec: snap_name: image {_shown(where)} "
                            f"has no snapshot {_shown(spec['snap_name'])}; "
                            f"list its snapshots with `rbd snap ls {where}` "
                            f"(only user snapshots have names to give here; "
                            f"others take snap_id)")
                    field = 'snap_name'
                else:
                    snap_id, field = int(spec['snap_id']), 'snap_id'
                return cls(ioctx, image, snap_id, where, field, remote)
            except BaseException:
                image.close()
                raise
        except BaseException:
            ioctx.close()
            raise

    # -- errors ---------------------------------------------------------------

    def _no_snapshot(self, spec_field: str, snap_id: int) -> NotFound:
        return NotFound(
            f'source-spec: {spec_field}: image {_shown(self._where)} has no '
            f'snapshot with id {snap_id}; list its snapshots with '
            f'`rbd snap ls --all {self._where}`')

    def _failed(self, e: Exception, doing: str) -> MigrationError:
        return translate(e, f'source-spec: {doing} {self._where}')

    # -- features -------------------------------------------------------------

    def _probe_features(self, head: Mapping[str, Any],
                        older: List[Mapping[str, Any]]) -> FormatFeatures:
        """Nothing changes the copy path: librbd does the decoding.  The notes
        tell the operator what the import will and will not carry over."""
        features = FormatFeatures()
        try:
            parent = self._image.get_parent_image_spec()
        except rbd.ImageNotFound:
            parent = None
        except rbd.Error as e:
            raise self._failed(e, 'reading the parent of') from None
        if parent:
            ns = parent.get('pool_namespace')
            name = '/'.join(p for p in (parent.get('pool_name'), ns,
                                        parent.get('image_name')) if p)
            features.notes.append(
                f"a clone of {name}@{parent.get('snap_name')}: reads include "
                f"the parent's data, so the import is flattened")
        kind = head.get('namespace', _USER)
        if head and kind != _USER:
            features.notes.append(
                f'the source snapshot (id {head["id"]}) is a '
                f'{_NAMESPACES.get(kind, str(kind))} snapshot')
        skipped = [s for s in older if s.get('namespace', _USER) != _USER]
        if skipped:
            kinds = sorted({_NAMESPACES.get(s['namespace'],
                                            str(s['namespace']))
                            for s in skipped})
            features.notes.append(
                f"{len(skipped)} older {'/'.join(kinds)} snapshot"
                f"{'s are' if len(skipped) > 1 else ' is'} not imported "
                f"(only user snapshots are)")
        return features

    # -- Format interface -----------------------------------------------------

    def size(self, snap: Optional[Snapshot] = None) -> int:
        if snap is None:
            return self._size
        return self._snapshot(snap).size

    def snapshots(self) -> List[Snapshot]:
        return list(self._snapshots)

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """What is allocated at ``snap`` (HEAD: the source snapshot),
        including a parent's data.  A diff from the beginning reports
        allocated data only; should librbd report a range as not existing,
        it reads as zeros and is left out like any other gap."""
        return self._diff(snap, None, zeros=False)

    exact_diffs = True

    def changed_extents(self, prev: Optional[Snapshot],
                        snap: Optional[Snapshot]) -> Iterator[Extent]:
        return self.diff_extents(prev, snap)

    def diff_extents(self, from_snap: Optional[Snapshot],
                     to_snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        """What changed from ``from_snap`` (``None``: from nothing) to
        ``to_snap`` (``None``: HEAD), so the copier writes only that per
        snapshot: DATA where there are new bytes, ZERO where data was
        discarded or zeroed.  Ranges are in ``to_snap``'s size; a shrink
        shows as the smaller size, not as zeros."""
        if from_snap is not None:
            self._snapshot(from_snap)
            if to_snap is not None and \
                    int(from_snap.ident) >= int(self._snapshot(to_snap).ident):
                raise ValueError(f"diff from '{from_snap.name}' to "
                                 f"'{to_snap.name}': the first must be older")
        return self._diff(to_snap, from_snap, zeros=True)

    def read(self, offset: int, length: int,
             snap: Optional[Snapshot] = None) -> bytes:
        """Past the end of the image reads as zeros, as for a raw image."""
        if offset < 0 or length < 0:
            raise ValueError(f'bad read: offset={offset} length={length}')
        end = min(offset + length, self.size(snap))
        data = b''
        if offset < end:
            handle = self._handle(snap)
            try:
                data = handle.read(offset, end - offset)
            except rbd.Error as e:
                raise self._failed(e, f'reading {end - offset} bytes at '
                                      f'{offset} of') from None
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        """Release the image handles and the pool.  Call it once reads have
        returned: librbd does not survive closing an image under a read."""
        with self._open_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles + [self._image]:
            handle.close()
        self._ioctx.close()
        if self._cluster is not None:
            self._cluster.shutdown()

    # -- snapshots and handles ------------------------------------------------

    def _snapshot(self, snap: Snapshot) -> Snapshot:
        for known in self._snapshots:
            if known.ident == snap.ident and known.name == snap.name:
                return known
        raise ValueError(f"{self._where}@{self.snap_name} has no older user "
                         f"snapshot '{snap.name}' (id {snap.ident})")

    def _handle(self, snap: Optional[Snapshot]) -> rbd.Image:
        """The image at ``snap``, opened on first use.  Opening holds its own
        lock, not the one readers of open handles take, and ``close`` takes
        it too: librbd crashes on an image opened in a destroyed ioctx."""
        snap_id = None if snap is None else int(self._snapshot(snap).ident)
        with self._lock:
            self._check_open()
            if snap_id is None:
                return self._image
            handle = self._handles.get(snap_id)
        if handle is not None:
            return handle
        with self._open_lock:
            with self._lock:
                self._check_open()
                handle = self._handles.get(snap_id)
            if handle is None:
                handle = self._open_at(snap_id)
                with self._lock:
                    self._handles[snap_id] = handle
        return handle

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f'{self._where}: the format is closed')

    def _open_at(self, snap_id: int) -> rbd.Image:
        try:
            if self.image_id:
                handle = rbd.Image(self._ioctx, image_id=self.image_id,
                                   read_only=True)
            else:  # an old-format image has no id
                handle = rbd.Image(self._ioctx, self._image.get_name(),
                                   read_only=True)
        except rbd.Error as e:
            raise self._failed(e, 'reopening') from None
        try:
            handle.set_snap_by_id(snap_id)
        except rbd.Error as e:
            handle.close()
            raise self._failed(e, f'opening snapshot id {snap_id} of') \
                from None
        except BaseException:
            handle.close()
            raise
        return handle

    # -- diffs ----------------------------------------------------------------

    def _diff(self, snap: Optional[Snapshot], from_snap: Optional[Snapshot],
              zeros: bool) -> Iterator[Extent]:
        handle = self._handle(snap)
        size = self.size(snap)
        from_name = from_snap.name if from_snap is not None else None

        def windows() -> Iterator[Extent]:
            for start in range(0, size, DIFF_WINDOW):
                end = min(start + DIFF_WINDOW, size)
                data, zero = _diff_window(handle, start, end, from_name,
                                          self._failed)
                yield from _extents(data, zero if zeros else [])
        return coalesce(windows())


def _diff_window(handle: rbd.Image, start: int, end: int,
                 from_name: Optional[str],
                 failed: Callable[[Exception, str], MigrationError]
                 ) -> Tuple[List[Interval], List[Interval]]:
    """``diff_iterate`` over ``[start, end)``: (existing, not existing)
    ranges, clipped to the window, in the order librbd reported them."""
    data: List[Interval] = []
    zero: List[Interval] = []

    def seen(offset: int, length: int, exists: bool) -> int:
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            (data if exists else zero).append((lo, hi))
        return 0

    try:
        handle.diff_iterate(start, end - start, from_name, seen,
                            include_parent=True, whole_object=False)
    except rbd.Error as e:
        raise failed(e, f'listing allocated ranges {start}..{end} of') \
            from None
    return data, zero


def _union(intervals: Iterable[Interval]) -> List[Interval]:
    out: List[Interval] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _subtract(ranges: List[Interval], holes: List[Interval]) -> List[Interval]:
    """``ranges`` minus ``holes``; both sorted and disjoint."""
    out: List[Interval] = []
    i = 0
    for lo, hi in ranges:
        while i < len(holes) and holes[i][1] <= lo:
            i += 1
        j = i
        while j < len(holes) and holes[j][0] < hi:
            if holes[j][0] > lo:
                out.append((lo, holes[j][0]))
            lo = max(lo, holes[j][1])
            j += 1
        if lo < hi:
            out.append((lo, hi))
    return out


def _extents(data: Iterable[Interval],
             zero: Iterable[Interval]) -> List[Extent]:
    """Ascending, non-overlapping extents.  Where librbd reports a range both
    ways, DATA wins: reading it costs a read but can never lose bytes."""
    data_u = _union(data)
    zero_u = _subtract(_union(zero), data_u)
    out = [Extent(lo, hi - lo, ExtentKind.DATA) for lo, hi in data_u]
    out += [Extent(lo, hi - lo, ExtentKind.ZERO) for lo, hi in zero_u]
    out.sort(key=lambda e: e.offset)
    return out


# -- opening ------------------------------------------------------------------


def remote_name(spec: Mapping[str, Any]) -> str:
    """The other cluster as messages name it (never with its key)."""
    return _shown(spec.get('cluster_name') or spec.get('mon_host'))


def connect_remote(spec: Mapping[str, Any], ctx: SourceContext) -> Optional[rados.Rados]:
    """A connection to the other cluster the spec names, or None for this
    one.  Nothing of this cluster's configuration is read: the conf and
    keyring are the other cluster's (``cluster_name``) or the monitors and
    key come from the spec (``mon_host``)."""
    if 'cluster_name' not in spec and 'mon_host' not in spec:
        return None
    client = str(spec.get('client_name') or 'client.admin')
    conf = {'client_mount_timeout': str(REMOTE_CONNECT),
            'rados_mon_op_timeout': str(REMOTE_OP_TIMEOUT),
            'rados_osd_op_timeout': str(REMOTE_OP_TIMEOUT),
            'log_to_stderr': 'false', 'err_to_stderr': 'false'}
    if 'cluster_name' in spec:
        name = str(spec['cluster_name'])
        conffile = os.path.join(ctx.remote_conf_dir, f'{name}.conf')
        keyring = os.path.join(ctx.remote_conf_dir, f'{name}.{client}.keyring')
        for path, what in ((conffile, 'conf'), (keyring, 'keyring')):
            if not os.path.isfile(path):
                raise NotFound(
                    f'source-spec: cluster_name: no {what} {path!r}; put the other '
                    f"cluster's {name}.conf and {name}.{client}.keyring in "
                    f'{ctx.remote_conf_dir} on the mgr hosts')
        conf['keyring'] = keyring
        cluster = rados.Rados(name=client, clustername=name, conffile=conffile, conf=conf)
    else:
        conf.update(mon_host=str(spec['mon_host']), key=str(spec['key']),
                    keyring='')
        cluster = rados.Rados(name=client, conf=conf)
    ctx.check()
    try:
        cluster.connect(timeout=min(REMOTE_CONNECT, ctx.connect_limit))
    except rados.Error as e:
        cluster.shutdown()
        which = 'cluster_name' if 'cluster_name' in spec else 'mon_host/key'
        if isinstance(e, (rados.PermissionDeniedError, rados.InvalidArgumentError)):
            raise InvalidArgument(
                f'source-spec: {which}: cluster {remote_name(spec)} refused '
                f'{client} ({type(e).__name__}); check client_name and its key') from None
        raise SourceUnreachable(
            f'source-spec: {which}: cannot connect to cluster {remote_name(spec)} as '
            f'{client} within {REMOTE_CONNECT}s ({type(e).__name__})') from None
    return cluster


def _open_ioctx(cluster: rados.Rados,
                spec: Mapping[str, Any]) -> Tuple[rados.Ioctx, str]:
    """The pool (and namespace) the spec names, and ``pool[/namespace]``
    for messages."""
    try:
        if 'pool_name' in spec:
            pool = str(spec['pool_name'])
            try:
                ioctx = cluster.open_ioctx(pool)
            except rados.ObjectNotFound:
                raise NotFound(
                    f'source-spec: pool_name: pool {_shown(pool)} does not '
                    f'exist; list pools with `ceph osd pool ls`') from None
        else:
            pool_id = int(spec['pool_id'])
            try:
                ioctx = cluster.open_ioctx2(pool_id)
            except rados.ObjectNotFound:
                raise NotFound(
                    f'source-spec: pool_id: no pool has id {pool_id}; list '
                    f'pool ids with `ceph osd pool ls detail`') from None
            pool = ioctx.get_pool_name()
    except rados.Error as e:
        raise translate(e, 'source-spec: opening the source pool') from None
    namespace = str(spec.get('pool_namespace') or '')
    if not namespace:
        return ioctx, pool
    try:
        exists = rbd.RBD().namespace_exists(ioctx, namespace)
        if not exists:
            raise NotFound(
                f'source-spec: pool_namespace: namespace {_shown(namespace)} '
                f'does not exist in pool {_shown(pool)}; list them with '
                f'`rbd namespace ls {pool}`')
        ioctx.set_namespace(namespace)
    except rbd.Error as e:
        ioctx.close()
        raise translate(e, f'source-spec: opening namespace {pool}/'
                           f'{namespace}') from None
    except BaseException:
        ioctx.close()
        raise
    return ioctx, f'{pool}/{namespace}'


def _open_image(ioctx: rados.Ioctx, location: str,
                spec: Mapping[str, Any]) -> Tuple[rbd.Image, str]:
    """The image, read-only, at HEAD for now; by id when the spec gives one
    (as librbd does: a live migration source sits in the trash, where only
    its id finds it)."""
    name = str(spec['image_name'])
    where = f'{location}/{name}'
    image_id = spec.get('image_id')
    try:
        if image_id:
            return rbd.Image(ioctx, image_id=str(image_id),
                             read_only=True), where
        return rbd.Image(ioctx, name, read_only=True), where
    except rbd.ImageNotFound:
        if image_id:
            raise NotFound(
                f'source-spec: image_id: no image has id {_shown(image_id)} '
                f'in {_shown(location)}; see the id with `rbd info '
                f'{where}` or, for an image in the trash, `rbd trash ls '
                f'--all {location}`') from None
        raise NotFound(
            f'source-spec: image_name: image {_shown(where)} does not exist; '
            f'list images with `rbd ls {location}`, or give image_id for '
            f'an image in the trash') from None
    except rbd.Error as e:
        raise translate(e, f'source-spec: opening {where}') from None


def _user_snap_id(image: rbd.Image, name: str) -> Optional[int]:
    """The id of the user snapshot ``name``: librbd looks names up in the
    user namespace only."""
    for snap in image.list_snaps():
        if snap['name'] == name and snap.get('namespace', _USER) == _USER:
            return int(snap['id'])
    return None
