"""What each command does, as plain methods over a rados handle and a KV
store, so tests and scripts drive it without a mgr.

The rules that keep operators out of trouble live here: what may be queued
in which migration state, that repeating a command returns the same task,
that abort cancels a running execute.  What status and the other reads say
is reports.py's.
"""
import errno
import json
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import rados
import rbd

from .context import SourceContext, config_key_reader
from .engine import isolated, ondisk, prefill
from .engine.adapter import AdapterEngine
from .engine.buffers import give_back_free_memory, keep_copy_buffers
from .engine.copier import CopyOptions
from .engine.librbd import LibrbdEngine
from .engine.migration import ImageRef, MigrationInfo
from .errors import (AlreadyExists, Busy, InvalidArgument, MigrationError, NotFound,
                     NotMigrating, PermissionDenied, PoolFull, SourceChanged, SourceGone,
                     TransientClusterError, Unsupported)
from .formats import open_format
from .images import ImageSpec, Layout
from .intents import Intents
from .listing import Listing
from .live.imports import LIVE, LiveImports, ViewRecord
from .metrics import MeteredEvents, RateMeter
from .live.pinned import Pinned
from .live.view import QcowView
from .probe import ADAPTER, ProbeReport, probe
from .records import NewerRecord
from .secrets import mask_spec
from .rbd_errors import translate
from .registrations import Registration, Registrations
from .schedule import Limits, must_pause, wait_reason
from .settings import OptionGetter, Settings
from .source_spec import native_spec, parse_source_spec, spec_summary
from .validators import Validators, check_unchanged, read_validators
from .store import Store
from .tasks import COMPLETED, RUNNING, Events, Task, TaskAction, TaskQueue
from .verify import summary as verify_summary
from .verify import verify as run_verify

NAMESPACED_PARENT = ('{image} has {clones} clone(s), and librbd 16.2 crashes migrating a '
                     'parent out of a namespace; flatten its clones (rbd flatten) '
                     'first, or migrate it with a Ceph release that has this fixed')

#: Reads a module option by name.


@dataclass
class Prepared:
    """A migration prepare made, and for an import what its probe found."""

    info: MigrationInfo
    probe: Optional[Dict[str, Any]] = None


@dataclass
class Queued:
    """What a command that queues a task did: the task (the one already
    active when repeated; None when there was nothing to do), and the
    sentence that says so."""

    task: Optional[Task]
    message: str


log = logging.getLogger(__name__)


class MigrationService:
    def __init__(self, cluster: rados.Rados, store: Store, events: Events,
                 option: OptionGetter, bulk: Optional[rados.Rados] = None,
                 children: Optional[isolated.Children] = None,
                 blocklisted: Callable[[rados.Rados], None] = lambda client: None) -> None:
        self.store = store
        self.registrations = Registrations(store)
        self.use_clients(cluster, bulk if bulk is not None else cluster)
        #: Told when a task finds its client blocklisted, to replace it.
        self.blocklisted = blocklisted
        self.option = option
        #: How librbd's executes run in child processes; None: in the mgr.
        self.children = children
        self.meter = RateMeter()
        #: The endpoint live imports are served from (started by the module).
        self.live = LiveImports(self.source_context)
        self.listing = Listing(self._scan)
        self.queue = TaskQueue(
            store, self._run, MeteredEvents(events, self.meter),
            settings=self.settings,
            diagnose=self.diagnose,
            gate=self.wait_reason,
            pause=lambda task, settings: self._interruptible(task) and must_pause(
                task, Limits.of(settings), time.time()))

    def use_clients(self, cluster: Optional[rados.Rados] = None,
                    bulk: Optional[rados.Rados] = None) -> None:
        """Commands use ``cluster``; tasks move data on ``bulk``, a client of
        their own: a status read sent on the client an execute writes
        through queues behind megabytes of its writes on every OSD
        connection.  Called again with a new client when one was
        blocklisted (another client broke an image lock it held, or an
        operator blocklisted it): a blocklisted client fails every call."""
        if cluster is not None:
            self.engine = LibrbdEngine(cluster)
            self.adapter = AdapterEngine(self.engine, self.store)
            self.intents = Intents(self.store, self.engine)
        if bulk is not None:
            self.bulk = LibrbdEngine(bulk)
            self.bulk_adapter = AdapterEngine(self.bulk, self.store)

    def settings(self) -> Settings:
        """The module's options now (an operator may change them at run time)."""
        return Settings.read(self.option)

    def limits(self) -> Limits:
        """The scheduling options, read afresh (they change at run time)."""
        return Limits.of(self.settings())

    def wait_reason(self, task: Task, running: List[Task],
                    settings: Optional[Settings] = None) -> Optional[str]:
        """Why ``task`` may not start now beside ``running`` (window, per-pool
        and bandwidth limits, as ``settings`` set them); None when it may."""
        limits = self.limits() if settings is None else Limits.of(settings)
        return wait_reason(task, running, limits, time.time(), self.meter.rate)

    # -- prepare -----------------------------------------------------------
    def prepare(self, source: Optional[str], dest: Optional[str], layout: Layout,
                import_only: bool = False,
                source_spec: Optional[str] = None) -> 'Prepared':
        if import_only:
            return self._prepare_import(source, dest, layout, source_spec)
        if source_spec:
            raise InvalidArgument('--source-spec goes with --import-only')
        if not source:
            raise InvalidArgument('source_image_spec: missing; name the image to migrate')
        src = ImageSpec.parse(source, 'source_image_spec')
        dst = ImageSpec.parse(dest, 'dest_image_spec') if dest else src
        self._refuse_reserved(dst)
        self._refuse_not_rbd(dst)
        self._refuse_full(dst, layout)
        self._refuse_namespaced_parent(src)
        self._child_ahead()
        info = self.engine.prepare(src, dst, layout)
        self._register(info, layout)
        self.listing.replace(info.dest.id, info)
        return Prepared(info)

    def _prepare_import(self, source: Optional[str], dest: Optional[str],
                        layout: Layout, text: Optional[str]) -> 'Prepared':
        # `prepare --import-only <dest>`: the one positional names the target;
        # `prepare --import-only <pool/image@snap> <dest>`, as rbd takes it,
        # names a native source and the target.
        target = dest or source
        if dest and source:
            if text:
                raise InvalidArgument('--import-only takes the source as a source-spec or '
                                      'as IMAGE@SNAP before the target, not both')
            text = json.dumps(native_spec(source))
        if not target:
            raise InvalidArgument('dest_image_spec: missing; name the image to create')
        if not text or not text.strip():
            raise InvalidArgument("--source-spec: missing; give it inline "
                                  "(--source-spec '<JSON>') or as a file (-i FILE)")
        if layout.flatten:
            raise InvalidArgument('--flatten: an import has no parent to flatten')
        spec = parse_source_spec(text)
        dst = ImageSpec.parse(target, 'dest_image_spec')
        if self.engine.exists(dst):
            raise AlreadyExists(f"target image '{dst}' already exists; choose "
                                'another name or remove it first')
        self._refuse_reserved(dst)
        self._refuse_not_rbd(dst)
        self._refuse_full(dst, layout)
        limit = self.settings().probe_timeout
        what = spec_summary(spec)
        with self.listing.waits.on(f'the source, {what}'):
            ctx = self.source_context().bounded(
                limit, f'the probe of {what} (probe_timeout {limit:g} s)')
            report = probe(spec, ctx, self._object_size(layout))
            validators = read_validators(spec, ctx)
        if report.path == ADAPTER:
            view = self._live_view(spec, report)
            if view is not None:
                return self._prepare_live(spec, dst, layout, report, validators, view)
            info = self.adapter.prepare_import(spec, dst, layout, report.size, validators)
        else:
            self._child_ahead()
            with self.intents.held(dst):
                info = self.engine.prepare_import(json.dumps(spec), dst, layout)
            self._register(info, layout, report.to_dict(), validators)
            self.listing.replace(info.dest.id, info)
        return Prepared(info, report.to_dict())

    def _child_ahead(self) -> None:
        """An execute child started now, ready for the execute that follows
        a prepare librbd executes (live or not; hidden imports copy in the
        mgr): a task takes it instead of starting Python, the imports and a
        connection (isolated.Children)."""
        if self.children is not None:
            self.children.warm()

    def _live_view(self, spec: Dict[str, Any],
                   report: ProbeReport) -> Optional[Tuple[QcowView, Pinned]]:
        """The view a live import serves, or None (and why, in the report)
        when the import is to stay hidden until commit."""
        hidden = self.live.why_hidden(spec, self.settings().live_imports)
        if hidden is None:
            try:
                with self.listing.waits.on(f'the source, {spec_summary(spec)}'):
                    return self.live.open_view(spec)
            except InvalidArgument as e:
                hidden = str(e).removeprefix('source-spec: ')
        report.hidden = hidden
        return None

    def _prepare_live(self, spec: Dict[str, Any], dst: ImageSpec, layout: Layout,
                      report: ProbeReport, validators: Validators,
                      opened: Tuple[QcowView, Pinned]) -> 'Prepared':
        """librbd's import-only migration on the view: clients get the
        target from now on.  A failed prepare stops serving the view."""
        view, pinned = opened
        self._child_ahead()
        try:
            record = self.live.serve(view, pinned, spec, validators)
        except BaseException:
            view.close()
            raise
        try:
            with self.intents.held(dst):
                info = self.engine.prepare_import(
                    json.dumps(self.live.source_spec(record.token)), dst, layout)
        except BaseException:
            self.live.remove(record.token)
            raise
        report.path = LIVE
        record.fast_diff = self._pause_fast_diff(info.dest)
        self._register(info, layout, report.to_dict(), validators, record)
        info = self._as_live(info, record)
        self.listing.replace(info.dest.id, info)
        return Prepared(info, report.to_dict())

    def _pause_fast_diff(self, dest: ImageRef) -> bool:
        """Before any client opens the target (engine/librbd.py says why);
        a client's crash on a block status is librbd's, so a failure here
        is a warning, not a failed prepare."""
        try:
            return self.engine.pause_fast_diff(dest)
        except (rados.Error, rbd.Error) as e:
            log.warning('%s: could not turn fast-diff off until execute (%s); QEMU clients '
                        'asking block status of it may crash until then', dest, e)
            return False

    def _as_live(self, info: MigrationInfo, record: ViewRecord) -> MigrationInfo:
        """A live import as status shows it: the source it imports, not
        the endpoint's URL (whose token is the view's only lock)."""
        info.path = LIVE
        info.source_spec = mask_spec(record.spec)
        return info

    def _annotated(self, info: MigrationInfo) -> MigrationInfo:
        """``info`` as librbd reports it, told apart when it is a live import."""
        record = self._view_record(info.dest)
        return self._as_live(info, record) if record is not None else info

    def _view_record(self, dest: ImageRef) -> Optional[ViewRecord]:
        try:
            registration = self.registrations.get(dest)
        except NewerRecord:
            return None
        if registration is None or not registration.view:
            return None
        return ViewRecord.from_dict(registration.view)

    def restore_views(self) -> int:
        """Serve every live import's view again (the module started, as
        after a failover); how many."""
        count = 0
        for ref in self._registered():
            record = self._view_record(ref)
            if record is not None:
                self.live.restore(record)
                count += 1
        return count

    def _object_size(self, layout: Layout) -> int:
        """The object size the target will have."""
        if layout.order is not None:
            return 1 << layout.order
        try:
            return 1 << int(self.engine.rados.conf_get('rbd_default_order'))
        except (rados.Error, TypeError, ValueError):
            return 4 << 20

    def _refuse_namespaced_parent(self, src: ImageSpec) -> None:
        """librbd 16.2 aborts the whole process (an assertion in
        cls_client::remove_child) when it prepares the migration of an
        image that has clones and lives in a namespace: that would take the
        mgr down, so it is refused here.  Clones in namespaces, and parents
        moving into one, migrate fine."""
        if not src.namespace:
            return
        try:
            with self.engine.ioctx(src.pool, src.namespace, 'source_image_spec') as io, \
                    rbd.Image(io, src.name, read_only=True) as img:
                clones = [c for c in img.list_children2() if not c.get('trash')]
        except rbd.Error:
            return  # the engine's own checks name what is wrong
        if clones:
            raise Unsupported(NAMESPACED_PARENT.format(image=src, clones=len(clones)))

    def _refuse_reserved(self, dst: ImageSpec) -> None:
        if self.adapter.find(dst) is not None:
            raise AlreadyExists(f"target image '{dst}' is reserved by an import in "
                                'progress; commit or abort it first')

    def _refuse_not_rbd(self, dst: ImageSpec) -> None:
        """A pool without the rbd application holds no image any listing
        finds: its migration would show under another pool's name and an
        abort could not find its target.  (A data pool holds no image.)"""
        with self.engine.ioctx(dst.pool, '', 'dest_image_spec') as io:
            try:
                apps = io.application_list()
            except rados.Error:
                apps = []
        if 'rbd' not in apps and 'rbd' not in self.engine.pool_applications(dst.pool):
            raise InvalidArgument(
                f"dest_image_spec: pool '{dst.pool}' is not an rbd pool (no rbd "
                f'application); initialize it with rbd pool init {dst.pool}, then '
                'prepare again')

    def _refuse_full(self, dst: ImageSpec, layout: Layout) -> None:
        """A full pool takes no writes: prepare would wait, and with it
        every module command after it."""
        full = self.engine.full_pools()
        for pool in [dst.pool] + ([layout.data_pool] if layout.data_pool else []):
            if pool in full:
                what = ('reached its quota' if 'full_quota' in
                        str(full[pool].get('flags_names', '')) else 'is full')
                raise PoolFull(f'pool {pool} {what}; raise its quota (ceph osd pool '
                               f'set-quota) or add space, then prepare again')

    def imports(self) -> List[MigrationInfo]:
        """The adapter engine's imports, read from their records (always
        current, unlike the listing of librbd's migrations)."""
        return self.adapter.list()

    def find(self, image: str) -> MigrationInfo:
        """The migration ``image`` takes part in, on either path."""
        spec = ImageSpec.parse(image)
        with self.listing.waits.on(f'pool {spec.pool}'):
            return self.adapter.find(spec) or self._annotated(self.engine.status(spec))

    # -- what the batch service reads and does beside the commands ------------
    def ioctx(self, pool: str, namespace: str = '', what: str = '') -> rados.Ioctx:
        """An I/O context on the commands' client; ``what`` names the
        argument in errors."""
        return self.engine.ioctx(pool, namespace, what)

    def ioctx_by_id(self, pool_id: int, namespace: str = '') -> rados.Ioctx:
        return self.engine.ioctx_by_id(pool_id, namespace)

    def image_ref(self, pool: str, namespace: str, name: str) -> ImageRef:
        """The image standing under ``name`` now."""
        with self.engine.ioctx(pool, namespace) as io:
            return self.engine.ref(io, name)

    def descendants(self, ref: ImageRef) -> List[str]:
        """The target's descendants, trashed ones too."""
        return self.engine.descendants(ref)

    def abort_prepare(self, info: MigrationInfo) -> None:
        """Undo, in the caller's thread, a prepare a failover stopped inside
        librbd: its target holds no data yet."""
        self.engine.abort(info.dest, lambda done, total: 0, source=info.source)

    def tasks(self) -> List[Task]:
        return self.queue.list()

    def task(self, task_id: str) -> Optional[Task]:
        """The task, or None once it is no longer kept."""
        return self.queue.tasks.get(task_id)

    def latest_task(self, image_key: str) -> Optional[Task]:
        return self.queue.latest_for(image_key)

    def waiting_reason(self, task_id: str) -> Optional[str]:
        """Why a queued task waits, as of the last scheduling pass."""
        return self.queue.waiting.get(task_id)

    def copy_options(self) -> CopyOptions:
        """Per-task bandwidth: ``adapter_bandwidth_mbps``, and at most an
        equal share of ``max_bandwidth_mbps`` among the running executes."""
        s = self.settings()
        bandwidth = s.adapter_bandwidth_mbps * 1e6
        total = s.max_bandwidth_mbps * 1e6
        if total > 0:
            running = sum(1 for t in self.queue.running_tasks() if t.action == 'execute')
            share = total / max(1, running)
            bandwidth = min(bandwidth, share) if bandwidth > 0 else share
        return CopyOptions(window=s.adapter_concurrency, bandwidth=bandwidth)

    def source_context(self, stop: Optional[threading.Event] = None) -> SourceContext:
        """How the mgr may read sources: file streams only under
        ``file_source_roots`` (the mgr must not read its own keyring),
        config:// keys only under ``config_key_prefixes``, redirects only to
        ``http_redirect_origins``, metadata within the ``source_max_*``
        limits; reads end when ``stop`` is set."""
        s = self.settings()
        return SourceContext(allowed_file_roots=s.file_roots,
                             config_key=config_key_reader(self.engine.rados, s.key_prefixes),
                             rados=self.engine.rados, redirect_origins=s.redirect_origins,
                             limits=s.source_limits, remote_conf_dir=s.remote_conf_dir, stop=stop)

    def _register(self, info: MigrationInfo, layout: Layout,
                  probe_report: Optional[Dict[str, Any]] = None,
                  validators: Optional[Validators] = None,
                  view: Optional[ViewRecord] = None) -> None:
        self.registrations.save(Registration(
            dest=info.dest, prepared=time.time(), layout=layout.describe(),
            probe=probe_report, validators=validators or {},
            view=view.to_dict() if view is not None else None))

    def layout_of(self, dest: ImageRef) -> Dict[str, Any]:
        """The layout options prepare recorded for a librbd-path migration,
        as status shows them; empty when nothing was, or when a newer
        module wrote the record."""
        try:
            record = self.registrations.get(dest)
        except NewerRecord:
            return {}
        return dict(record.layout) if record is not None else {}

    def _registration(self, dest: ImageRef, action: str) -> Optional[Registration]:
        """The registration ``action`` goes by.  A newer module's may hold
        what this code cannot check (why commit must wait), so the action
        is refused rather than run without it."""
        try:
            return self.registrations.get(dest)
        except NewerRecord as e:
            raise Unsupported(f'cannot {action} {dest}: {e}; a newer rbd_migration '
                              'module must do it') from None

    def _unregister(self, dest: ImageRef) -> None:
        """Forget a migration that ended; a live import's view is no
        longer served."""
        record = self._view_record(dest)
        self.registrations.remove(dest)
        if record is not None:
            self.live.remove(record.token)

    def _registered(self) -> List[ImageRef]:
        return self.registrations.refs()

    # -- tasks -------------------------------------------------------------
    def execute(self, image: str, batch: Optional[str] = None) -> 'Queued':
        info = self.find(image)
        _refuse_unavailable(info, 'execute')
        if info.state == 'executed':
            return Queued(None, f'the migration of {info.dest} is already executed; '
                                'commit it')
        self._refuse_other_action(info, 'execute')
        options: Dict[str, Any] = {'size': self._size(info.dest), 'batch': batch}
        if info.source is not None:
            options['source_pool'] = info.source.pool
        return self._submit('execute', info, self._execute_message(info), options)

    def _size(self, ref: ImageRef) -> Optional[int]:
        """The target's size, for bytes-copied metrics; None if unknown.
        Read from its header: opening a live import's target opens its
        source as well, the view, on the command's path (40 ms of the
        90 to 100 ms a live execute took to answer)."""
        try:
            with self.engine.ioctx_by_id(ref.pool_id, ref.namespace) as io:
                return ondisk.header_size(io, ref.id)
        except (rados.Error, MigrationError):
            return None

    def _require_executed(self, info: MigrationInfo, action: str) -> None:
        _refuse_unavailable(info, action)
        if info.state == 'executed':
            return
        active = self.queue.active_for(info.dest.key)
        if active and active.action == 'execute':
            raise InvalidArgument(
                f'the migration of {info.dest} is still executing (task '
                f'{active.id}, {active.progress:.0%}); {action} it once the '
                f'execute completes (ceph rbd migration task get {active.id})')
        raise InvalidArgument(
            f'the migration of {info.dest} is not executed yet (state: '
            f'{info.state}); run ceph rbd migration execute {info.dest} first')

    def verify(self, image: str, batch: Optional[str] = None) -> 'Queued':
        info = self.find(image)
        self._require_executed(info, 'verify')
        self._refuse_other_action(info, 'verify')
        return self._submit('verify', info, f'Verifying migration of {info.dest}',
                            {'size': self._size(info.dest), 'batch': batch})

    def _passed_verify(self, info: MigrationInfo) -> bool:
        """A verify completed after the last execute of this migration."""
        tasks = [t for t in self.queue.list() if t.image_key == info.dest.key]
        verified = [t for t in tasks if t.action == 'verify' and t.state == COMPLETED]
        executed = [t.finished or 0 for t in tasks if t.action == 'execute']
        return bool(verified) and (verified[-1].started or 0) >= max(executed, default=0)

    def commit(self, image: str, force: bool = False,
               verified: bool = False, batch: Optional[str] = None) -> 'Queued':
        info = self.find(image)
        _refuse_interrupted(info, 'commit')
        # A commit librbd already began goes on whatever the source did.
        registered = None if info.interrupted else self._registration(info.dest, 'commit')
        if registered is not None and registered.source_changed:
            raise SourceChanged(f'cannot commit {info.dest}: {registered.source_changed}')
        if info.interrupted != 'commit':
            self._require_executed(info, 'commit')
        self._refuse_other_action(info, 'commit')
        # A commit librbd already began (interrupted) can only be finished.
        if verified and not info.interrupted and not self._passed_verify(info):
            raise InvalidArgument(
                f'commit --verified: {info.dest} has no passed verify since its '
                f'last execute; run ceph rbd migration verify {info.dest} first')
        if not force and info.path != ADAPTER and not info.interrupted:
            children = self.engine.descendants(info.dest)
            if children:
                raise Busy(f"{info.dest} has descendants ({', '.join(children)}); "
                           'make sure no client has them open read-only, then '
                           'commit with --force')
        # The source is recorded so that a retry can still find it in the
        # trash should librbd's commit stop half-way (see LibrbdEngine.commit).
        source = asdict(info.source) if info.source is not None else None
        return self._submit('commit', info, f'Committing migration of {info.dest}',
                            {'force': bool(force), 'source': source, 'batch': batch})

    def abort(self, image: str) -> 'Queued':
        info = self.find(image)
        _refuse_interrupted(info, 'abort')
        active = self.queue.active_for(info.dest.key)
        if active and active.action == 'commit':
            raise Busy(f'a commit of {info.dest} is under way (task {active.id}); '
                       'it cannot be aborted')
        if active and active.action in ('execute', 'verify') and self._interruptible(active):
            self.queue.cancel(active.id)
        # As for commit: a retry finishes an abort that librbd stopped after
        # restoring the source, which no trash entry leads to any more.
        source = asdict(info.source) if info.source is not None else None
        return self._submit('abort', info, f'Aborting migration of {info.dest}',
                            {'source': source})

    def _refuse_other_action(self, info: MigrationInfo, action: str) -> None:
        active = self.queue.active_for(info.dest.key)
        if active and active.action != action:
            raise Busy(f'a {active.action} task ({active.id}) is {active.state} '
                       f'for {info.dest}; wait for it or cancel it first')

    def _execute_message(self, info: MigrationInfo) -> str:
        if info.source is not None:
            return f'Migrating image {info.source} to {info.dest}'
        what = spec_summary(info.source_spec) if info.source_spec else 'source'
        return f'Importing {what} into {info.dest}'

    def _submit(self, action: str, info: MigrationInfo, message: str,
                options: Optional[Dict[str, Any]] = None) -> 'Queued':
        d = info.dest
        options = dict(options or {}, path=info.path)
        task, created = self.queue.submit(action, d.pool_id, d.pool, d.namespace,
                                          d.id, d.name, message, options)
        self.queue.schedule()
        verb = 'queued' if created else 'already queued'
        return Queued(task, f'{action} of {d} {verb} as task {task.id}')

    def _run(self, task: Task, report: Callable[[int, int], bool]) -> Optional[Dict[str, Any]]:
        ref = task.ref

        def progress(done: int, total: int) -> int:
            return 0 if report(done, total) else -errno.ECANCELED

        if task.action in ('execute', 'verify') and self.settings().keep_copy_buffers:
            keep_copy_buffers()
        client = self.bulk.rados
        try:
            return self._run_action(task, ref, progress, report)
        except (rados.ConnectionShutdown, rbd.ConnectionShutdown):
            self.blocklisted(client)
            raise TransientClusterError(
                f"{task.action} of {ref}: the tasks' librados client was blocklisted; "
                'retrying on a new one', errno.ESHUTDOWN)
        except MigrationError as e:
            if e.errno == errno.ESHUTDOWN:  # the task's client was blocklisted
                self.blocklisted(client)
            raise
        finally:
            # Commit and abort end a live import's view, whose windows and
            # decoding threads' arenas the heap keeps otherwise.
            if task.action in ('execute', 'verify', 'commit', 'abort'):
                give_back_free_memory()

    def _run_action(self, task: Task, ref: ImageRef, progress: Callable[[int, int], int],
                    report: Callable[[int, int], bool]) -> Optional[Dict[str, Any]]:
        """The task's action on its migration's path, from ACTIONS."""
        path = task.options.get('path')
        path = path if path in (ADAPTER, LIVE) else LIBRBD
        try:
            run = ACTIONS[(path, task.action)]
        except KeyError:
            raise InvalidArgument(f'unknown task action {task.action!r}') from None
        return run(self, Step(task, ref, progress, report, self.queue.stop_event(task.id)))

    # -- the actions, one a path ----------------------------------------------
    def _librbd_execute(self, step: 'Step') -> Dict[str, Any]:
        executed = False
        try:
            result = self._execute_librbd(step.task, step.ref, step.progress)
            if result.get('copied_by') != 'rbd_migration' and self._sparsify_live(step.ref):
                result['sparsified'] = True
            executed = True
            return result
        finally:
            self._relist(step.ref, from_headers=executed)

    def _sparsify_live(self, ref: ImageRef) -> bool:
        """A live import of a source that says nothing of its zeros (raw)
        got them written as data by librbd: they are given back, as the
        adapter engine and ``rbd import`` never write them (nor does the
        module's own copy: not called after it, as it reads every byte of
        the target).  (Where a client wrote zeros over the source's data,
        librbd keeps the object rather than expose the source below it:
        measured.)  Whether it ran."""
        view = self._view_record(ref)
        if view is None or not view.sparsify:
            return False
        try:
            with self.bulk.ioctx_by_id(ref.pool_id, ref.namespace) as io, \
                    rbd.Image(io, image_id=ref.id) as img:
                img.sparsify(SPARSE_SIZE)
        except (rbd.Error, rados.Error) as e:
            raise translate(e, f'making the copy of {ref} sparse') from None
        return True

    def _librbd_commit(self, step: 'Step') -> None:
        try:
            self.bulk.commit(step.ref, step.progress, force=bool(step.task.options.get('force')),
                             source=_recorded_source(step.task))
            self._unregister(step.ref)
        finally:
            self._relist(step.ref)

    def _librbd_abort(self, step: 'Step') -> None:
        try:
            self.bulk.abort(step.ref, step.progress, source=_recorded_source(step.task))
            self._unregister(step.ref)
        finally:
            self._relist(step.ref)

    def _adapter_execute(self, step: 'Step') -> Optional[Dict[str, Any]]:
        return self.bulk_adapter.execute(step.ref, step.progress,
                                         self.source_context(step.stop), self.copy_options())

    def _adapter_commit(self, step: 'Step') -> None:
        self.bulk_adapter.commit(step.ref)

    def _adapter_abort(self, step: 'Step') -> None:
        self.bulk_adapter.abort(step.ref, step.progress)

    def _verify(self, step: 'Step') -> Dict[str, Any]:
        return self._run_verify(step.ref, step.task.options.get('path'), step.report, step.stop)

    def _interruptible(self, task: Task) -> bool:
        """Whether a task stops when cancelled.  librbd calls our progress
        callback but ignores what it returns, so its own commit and abort run
        to the end once started, and so does its execute unless it runs in a
        child process the module can kill; queued tasks, verify and the
        adapter engine's tasks stop at once."""
        return (task.state != RUNNING or task.action == 'verify'
                or task.options.get('path') == ADAPTER
                or (task.action == 'execute' and self.children is not None))

    def _execute_librbd(self, task: Task, ref: ImageRef,
                        progress: Callable[[int, int], int]) -> Dict[str, Any]:
        """librbd's execute, in the task's child process (started first, so
        that it starts Python and connects while the source is looked at),
        between two looks at the source: librbd zero-fills what a shrunken
        file no longer has and reads a rewritten object as it is now, and
        says neither.  A live import's data is copied by the module first,
        where it can be (``_live_execute``); the result says who copied
        it."""
        with self._child(task) as child:
            record = self._registration(ref, 'execute')
            checked = record if record is not None and record.validators else None
            spec = None
            if checked is not None:
                spec = (checked.view['spec'] if checked.view else
                        self.engine.verify_source_spec(self.engine.status(ref.spec)))
                check_unchanged(spec, checked.validators,
                                self.source_context(self.queue.stop_event(task.id)),
                                'before the copy')
            view = (ViewRecord.from_dict(record.view) if record is not None and record.view
                    else None)
            live = self._live_execute(task, view) if view is not None else None
            if child is not None:
                result = child.execute(ref, progress, live)
            elif live is None:
                self.bulk.execute(ref, progress)
                result = {}
            else:
                result = live.run(self.bulk, ref, progress)
        if checked is not None and spec is not None:
            try:
                check_unchanged(spec, checked.validators, self.source_context(),
                                'during the copy')
            except SourceChanged as e:
                checked.source_changed = str(e)
                self.registrations.save(checked)
                raise
        return result

    def _child(self, task: Task) -> ContextManager[Optional[isolated.Child]]:
        """The process librbd's execute runs in (None: it runs in the mgr)."""
        if self.children is None:
            return nullcontext()
        return self.children.child(self.queue.stop_event(task.id))

    def _live_execute(self, task: Task, view: ViewRecord) -> prefill.LiveExecute:
        """How a live import's execute goes: its data copied by the
        module's own readers into the objects no client wrote yet
        (engine/prefill.py), unless the ``live_copy_by_module`` option is
        off, then recorded by librbd."""
        settings = self.settings()
        by_module = settings.live_copy_by_module
        return prefill.LiveExecute(
            spec=view.spec if by_module else None,
            why_not='' if by_module else 'the live_copy_by_module option is off',
            context=self.source_context(self.queue.stop_event(task.id)),
            key_prefixes=settings.key_prefixes, options=self.copy_options(),
            resume_fast_diff=view.fast_diff)

    def _relist(self, ref: ImageRef, from_headers: bool = False) -> None:
        """Put the migration a librbd task changed, read afresh, in the
        listing before the task is seen to end (adapter-engine imports are
        listed from their records, always current).  ``from_headers``: read
        from the images' headers, not by opening the target through librbd,
        which would open its source too (a live import's view: 0.03 s); for
        an execute that succeeded, whose source was just read whole."""
        try:
            info: Optional[MigrationInfo] = (
                self.engine.target_status(ref) if from_headers else self.engine.status(ref.spec))
        except (NotMigrating, NotFound):
            info = None
        except (MigrationError, rados.Error, rbd.Error):
            self.listing.changed()  # the next status lists afresh
            return
        if info is not None and info.dest.id != ref.id:
            info = None  # the name now stands for another migration's image
        if info is not None:
            info = self._annotated(info)
        self.listing.replace(ref.id, info)

    def _run_verify(self, ref: ImageRef, path: Optional[str],
                    report: Callable[[int, int], bool],
                    stop: threading.Event) -> Dict[str, Any]:
        ctx = self.source_context(stop)
        view = self._view_record(ref) if path == LIVE else None
        if path == ADAPTER:
            spec = self.adapter.source_spec(ref)
        elif view is not None:
            spec = view.spec
        else:
            info = self.engine.status(ref.spec)
            spec = self.engine.verify_source_spec(info)
        window = self.settings().adapter_concurrency
        with open_format(spec, ctx) as source, \
                self.bulk.ioctx_by_id(ref.pool_id, ref.namespace) as io:
            def open_target(snap: Optional[str]) -> Any:
                return rbd.Image(io, image_id=ref.id, snapshot=snap, read_only=True)
            return verify_summary(run_verify(source, open_target, report, window))

    def diagnose(self, task: Task) -> str:
        """Why a running task may not move.  librbd's writes wait without a
        word while the target pool (or its data pool) is full, so the pools'
        flags are the first place to look."""
        pools = self.engine.full_pools()
        ref = task.ref
        data_pool = self.layout_of(ref).get('data_pool')
        for name in [task.pool] + ([data_pool] if data_pool else []):
            pool = pools.get(name, {})
            flags = set(str(pool.get('flags_names', '')).split(','))
            if 'full_quota' in flags:
                which = 'max_bytes' if pool.get('quota_max_bytes') else 'max_objects'
                return (f'pool {name} reached its quota ({which} '
                        f"{pool.get('quota_' + which)}); writes wait until it is "
                        f'raised: ceph osd pool set-quota {name} {which} <more>')
            if 'full' in flags:
                return (f'pool {name} is full (its OSDs reached the full ratio); '
                        'writes wait until space is added or freed: ceph health detail')
        return ''

    def task_cancel(self, task_id: str) -> Task:
        """Cancel a task: at once if queued, at its next progress step if
        running; refused for what librbd runs and cannot interrupt."""
        task = self.queue.get(task_id)
        if not self._interruptible(task):
            raise Busy(f'task {task.id} ({task.action} of {task.image_spec}) is running in '
                       "librbd, which cannot interrupt it; it ends on its own (abort the "
                       'migration afterwards to undo an execute)')
        return self.queue.cancel(task_id)

    def _scan(self) -> List[MigrationInfo]:
        """Every migration librbd's path holds, read from the cluster."""
        infos = self.engine.list_migrations(iter(self._registered()), self.listing.waits)
        self._forget_finished(infos)
        return [self._annotated(info) for info in infos]

    def _forget_finished(self, infos: List[MigrationInfo]) -> None:
        """Drop registry entries of migrations committed or aborted by other
        means (the rbd CLI)."""
        live = {i.dest.id for i in infos}
        for ref in self._registered():
            if ref.id not in live and not self.queue.active_for(ref.key):
                try:
                    self.engine.status(ref.spec)
                except NotMigrating:
                    self._unregister(ref)
                except MigrationError:
                    pass

LIBRBD = 'librbd'
#: The smallest run of zeros a live import's copy gives back (as ``rbd
#: import``'s default --sparse-size).
SPARSE_SIZE = 4096


@dataclass
class Step:
    """What a task's action runs with."""

    task: Task
    ref: ImageRef
    #: librbd's progress callback (its return value is ignored by librbd).
    progress: Callable[[int, int], int]
    #: The queue's: False once the task must stop.
    report: Callable[[int, int], bool]
    stop: threading.Event


#: Every task action, by the path its migration takes.
ACTIONS: Dict[Tuple[str, str], Callable[[MigrationService, Step], Optional[Dict[str, Any]]]] = {
    (LIBRBD, TaskAction.EXECUTE): MigrationService._librbd_execute,
    (LIBRBD, TaskAction.COMMIT): MigrationService._librbd_commit,
    (LIBRBD, TaskAction.ABORT): MigrationService._librbd_abort,
    (LIBRBD, TaskAction.VERIFY): MigrationService._verify,
    (ADAPTER, TaskAction.EXECUTE): MigrationService._adapter_execute,
    (ADAPTER, TaskAction.COMMIT): MigrationService._adapter_commit,
    (ADAPTER, TaskAction.ABORT): MigrationService._adapter_abort,
    (ADAPTER, TaskAction.VERIFY): MigrationService._verify,
    # librbd runs a live import; ending it also ends serving its view.
    (LIVE, TaskAction.EXECUTE): MigrationService._librbd_execute,
    (LIVE, TaskAction.COMMIT): MigrationService._librbd_commit,
    (LIVE, TaskAction.ABORT): MigrationService._librbd_abort,
    (LIVE, TaskAction.VERIFY): MigrationService._verify,
}


def _recorded_source(task: Task) -> Optional[ImageRef]:
    """The source a commit or abort task recorded when it was queued."""
    source = task.options.get('source')
    return ImageRef(**source) if isinstance(source, dict) else None


def _refuse_interrupted(info: MigrationInfo, action: str) -> None:
    """A migration librbd stopped half-way through a commit or abort can
    only go on with that same action; one stopped half-way through its
    prepare only with abort."""
    way_out = 'abort' if info.interrupted == 'prepare' else info.interrupted
    if info.interrupted and way_out != action:
        raise Busy(f'cannot {action} {info.dest}: {info.state_description}')


def _refuse_unavailable(info: MigrationInfo, action: str) -> None:
    _refuse_interrupted(info, action)
    if info.source_unavailable:
        raise SourceGone(
            f'cannot {action} {info.dest}: {info.state_description}')
