"""The mgr-facing layer: commands, options, serve/shutdown.

Thin on purpose: it parses the command, calls ``MigrationService``, the
batch service or the read side (``Reports``) and formats the answer.  Errors come back as ``MigrationError`` (one line, an
errno); anything else is a bug, logged with its traceback and answered with
one line.
"""
import errno
import json
import os
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Set, Tuple

import rados
import rbd
from mgr_module import MgrModule, MgrStandbyModule, NotifyType, Option

from .batch import Batch
from .errors import InvalidArgument, MigrationError, ModuleStarting
from .batch_service import BatchService
from .health import health_checks
from .dispatch import Dispatcher
from .images import ImageSpec, Layout
from .live.handover import close_inherited
from .progress import ProgressEvents
from . import render
from .reports import Reports
from .commands import CommandTable
from .secrets import collect_secrets, mask_text
from .engine.isolated import ChildClient, Children
from .service import MigrationService, Queued
from .settings import Settings
from .store import Mirror
from .tasks import RUNNING, Task

HandlerResult = Tuple[int, str, str]

#: Every command, declared once by its handler below.
command = CommandTable()


class Module(MgrModule):
    NOTIFY_TYPES: List[NotifyType] = []
    COMMANDS: List[Dict[str, str]] = []  # the table's, once its handlers are declared
    MODULE_OPTIONS = [
        Option('max_concurrent_tasks', type='int', default=2, min=1, max=64,
               desc='tasks (execute, commit, abort) that run at once; at most one per image',
               runtime=True),
        Option('max_concurrent_executes_per_pool', type='int', default=0, min=0, max=64,
               desc='executes (and verifies) that run at once in any one pool, source '
                    'or target; 0 for no limit beyond max_concurrent_tasks',
               runtime=True),
        Option('max_bandwidth_mbps', type='float', default=0.0, min=0.0,
               desc='MB/s all running executes copy together; no execute starts '
                    'while they copy this much (librbd executes cannot be slowed '
                    'once started; adapter-engine tasks share it); 0 for no limit',
               runtime=True),
        Option('execute_window', type='str', default='',
               desc='daily times in which executes and verifies may run, e.g. '
                    '"22:00-06:00" (mgr host local time) or "22:00-06:00 UTC", '
                    'several separated by commas; empty for any time',
               runtime=True),
        Option('retry_max_attempts', type='int', default=8, min=1, max=1000,
               desc='attempts of a task that fails transiently before it is failed',
               runtime=True),
        Option('retry_backoff', type='float', default=5.0, min=0.0,
               desc='seconds before the first retry; doubles with each attempt',
               runtime=True),
        Option('retry_max_backoff', type='float', default=300.0, min=0.0,
               desc='longest wait between two attempts, in seconds', runtime=True),
        Option('stall_warning_after', type='float', default=300.0, min=0.0,
               desc='seconds a running task may go without progress before it is '
                    'reported stalled (RBD_MIGRATION_STALLED); 0 turns this off',
               runtime=True),
        Option('adapter_concurrency', type='int', default=8, min=1, max=64,
               desc='chunks the adapter engine reads and writes at once, per task',
               runtime=True),
        Option('adapter_bandwidth_mbps', type='float', default=0.0, min=0.0,
               desc='MB/s each adapter-engine task writes at most; 0 for no limit',
               runtime=True),
        Option('keep_copy_buffers', type='bool', default=False,
               desc='let copies running in this mgr reuse freed 4 MiB buffers (raises '
                    "glibc's mmap and trim thresholds for the mgr process): fewer page "
                    "faults, but the mgr's memory keeps growing over many migrations; "
                    'turning it off takes a mgr restart',
               runtime=True),
        Option('status_max_age', type='float', default=2.0, min=0.0,
               desc='while tasks run, seconds old the migration listing of status may '
                    "be (it is refreshed in the background; the module's own changes "
                    'show at once); 0 lists afresh every time',
               runtime=True),
        Option('file_source_roots', type='str', default='',
               desc='directories (separated by ":") under which file sources may '
                    'be read; empty refuses file sources',
               runtime=True),
        Option('config_key_prefixes', type='str', default='rbd/',
               desc='config-key prefixes (separated by ":") that config:// references '
                    'in a source-spec may name; keys of the mgr, the monitors and '
                    'rbd-mirror are refused whatever this says',
               runtime=True),
        Option('http_redirect_origins', type='str', default='',
               desc='origins (scheme://host[:port], separated by spaces) to which an '
                    "HTTP source's redirects may lead besides its own; empty: "
                    'redirects stay on the URL\'s own server',
               runtime=True),
        Option('remote_cluster_conf_dir', type='str', default='/etc/ceph',
               desc='absolute directory on the mgr hosts in which a native source '
                    'naming cluster_name finds <name>.conf and '
                    '<name>.<client>.keyring',
               runtime=True),
        Option('command_wait', type='float', default=1.0, min=0.1, max=8.0,
               desc='seconds a command may hold the mgr\'s command thread; a command '
                    'still waiting on the cluster or a source then goes on in the '
                    'background and answers when repeated',
               runtime=True),
        Option('probe_timeout', type='float', default=60.0, min=1.0,
               desc='seconds the probe of a source may take in all (opening, '
                    'metadata, the first read) before prepare fails',
               runtime=True),
        Option('source_max_metadata_bytes', type='int', default=16777216,
               min=1 << 20, desc='bytes of metadata (qcow2 tables, indexes) one source '
                                 'may hold in the mgr\'s memory',
               runtime=True),
        Option('source_max_snapshots', type='int', default=512, min=1,
               desc='snapshots one source may have', runtime=True),
        Option('source_max_records', type='int', default=500000, min=1,
               desc='records one export or export-diff stream may hold', runtime=True),
        Option('source_max_chain_depth', type='int', default=16,
               min=1, desc='layers of a qcow2 backing chain', runtime=True),
        Option('live_imports', type='bool', default=True,
               desc='serve imports librbd cannot read itself to librbd as a view, so '
                    'that clients use the target from prepare on (false: such imports '
                    'stay hidden until commit)', runtime=True),
        Option('live_copy_by_module', type='bool', default=True,
               desc="copy a live import's data with the module's own readers, objects "
                    "no client wrote yet, before librbd's execute records the copy "
                    '(false: librbd reads all of it through the view, slower)',
               runtime=True),
        Option('live_endpoint_address', type='str', default='',
               desc="address the live endpoint listens on and librbd clients reach "
                    "it at (default: the active mgr's public address); it must be "
                    'reachable from every host that opens an imported image before '
                    'commit; takes effect when the module restarts'),
        Option('live_endpoint_port', type='int', default=9290, min=1, max=65535,
               desc='TCP port of the live endpoint; the same on every mgr host, as '
                    "the URL is kept in each live target's header"),
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.service: Optional[MigrationService] = None
        self.batches: Optional[BatchService] = None
        self.reports: Optional[Reports] = None
        self.events: Optional['ModuleEvents'] = None
        #: Batch failures as health last reported them.
        self._failures: List[str] = []
        self._bulk: Optional[rados.Rados] = None
        self.dispatcher = Dispatcher(lambda: Settings.read(self.get_module_option).command_wait)
        self._replacing = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def serve(self) -> None:
        self.events = events = ModuleEvents(self)
        self._bulk = self._bulk_client()
        children = Children(ChildClient(f'mgr.{self.get_mgr_id()}', self._own_conf()),
                            self._ceph_register_client, self._ceph_unregister_client)
        self.service = MigrationService(self.rados, Mirror(self), events,
                                        self.get_module_option, bulk=self._bulk,
                                        children=children,
                                        blocklisted=self._replace_task_client)
        self.batches = BatchService(self.service, events.batch_progress)
        self.reports = Reports(self.service, self.batches)
        self.dispatcher.waits = self.service.listing.waits
        self.service.queue.load()
        self.batches.load()
        self._start_live_endpoint()
        self._ready.set()
        threading.Thread(target=self._sweep, args=(time.time(),), daemon=True,
                         name='rbd_migration sweep').start()
        self.log.info('rbd_migration ready: %d task(s), %d batch(es) restored',
                      len(self.service.queue.list()), len(self.batches.book.batches))
        self.service.queue.run(self._stop, before=self._tick)

    def _start_live_endpoint(self) -> None:
        """Listen for librbd's reads of live imports' views, and serve
        those prepared before (by this mgr or the one before a failover)."""
        assert self.service is not None
        settings = Settings.read(self.get_module_option)
        host = settings.live_endpoint_address or self.get_mgr_ip()
        service = self.service

        def restore() -> None:
            restored = service.restore_views()
            if restored:
                self.log.info('serving %d live import view(s) again', restored)
        service.live.start(host, settings.live_endpoint_port, host, before_serving=restore)

    def _sweep(self, started: float) -> None:
        """Remove targets a failover left unrecorded (see sweep_orphans);
        in the background, as it reads every rbd pool's trash."""
        assert self.service is not None
        try:
            for what in self.service.adapter.sweep_orphans(started):
                self.log.warning('removed %s: a target whose prepare a failover cut '
                                 'before it was recorded', what)
            for what in self.service.intents.sweep(started, self._stop):
                self.log.warning('removed %s: a target whose import prepare a failover '
                                 'cut while librbd was making it', what)
        except (rados.Error, rbd.Error, MigrationError) as e:
            self.log.warning('looking for targets a failover left behind: %s', e)

    def _tick(self) -> None:
        assert self.batches is not None and self.service is not None
        assert self.reports is not None and self.events is not None
        self.batches.tick()
        failures = self.reports.failures()
        if failures != self._failures:
            self._failures = failures
            self.events.changed(self.service.queue.list())   # health
        self.reports.keep_listing_warm()

    def shutdown(self) -> None:
        self._stop.set()
        stopped = self.service.queue.shutdown() if self.service is not None else True
        if self.service is not None:
            self.service.live.stop()
        if self.service is not None and self.service.children is not None and stopped:
            self.service.children.close()   # else a task's child would die with its thread
        if self._bulk is not None and stopped:  # else a task still copies through it
            addrs = self._bulk.get_addrs()
            self._bulk.shutdown()
            self._ceph_unregister_client(addrs)
            self._bulk = None
        super().shutdown()

    def _bulk_client(self) -> rados.Rados:
        """The librados client the tasks copy through, apart from the one
        commands use.  Registered like the mgr's own, so a failover
        blocklists it and the next mgr takes over the images' locks at once."""
        conf = self._own_conf()
        try:
            client = rados.Rados(name=f'mgr.{self.get_mgr_id()}', conffile=os.devnull,
                                 conf=conf)
            client.connect()
        except rados.Error as e:
            self.log.warning("tasks share the mgr's messenger threads (%s): commands may "
                             'answer slowly while tasks copy', e)
            client = rados.Rados(context=self.get_context())
            client.connect()
        self._ceph_register_client(client.get_addrs())
        return client

    def _replace_task_client(self, client: rados.Rados) -> None:
        """A new client for the tasks once theirs was blocklisted (tasks
        that failed on it retry on the new one), as rbd_support does."""
        with self._replacing:
            if client is not self._bulk or self.service is None:
                return  # replaced already
            self.log.warning('the tasks\' librados client was blocklisted; replacing it')
            self._drop_client(client)
            self._bulk = self._bulk_client()
            self.service.use_clients(bulk=self._bulk)

    def _replace_command_client(self, client: Optional[rados.Rados]) -> None:
        """The same for the client commands use (the mgr's per-module one,
        which MgrModule makes anew once dropped)."""
        with self._replacing:
            if self.service is None or self.service.engine.rados is not client:
                return  # replaced already
            self.log.warning('the commands\' librados client was blocklisted; replacing it')
            MgrModule.shutdown(self)  # drops it; the ``rados`` property makes another
            self.service.use_clients(cluster=self.rados)

    def _drop_client(self, client: rados.Rados) -> None:
        try:
            addrs = client.get_addrs()
            client.shutdown()
            self._ceph_unregister_client(addrs)
        except rados.Error as e:
            self.log.warning('dropping a blocklisted client: %s', e)

    def _client_addrs(self) -> Dict[str, str]:
        """The module's librados clients, as ``ceph osd blocklist ls`` names
        them: which of the blocklisted are the module's."""
        svc = self._svc()
        return {'commands': str(svc.engine.rados.get_addrs()),
                'tasks': str(svc.bulk.rados.get_addrs())}

    def _own_conf(self) -> Dict[str, str]:
        """What a client of the module's own takes from the mgr's config."""
        conf = {k: str(v) for k, v in ((k, self.get_ceph_option(k))
                                       for k in OWN_CONTEXT_OPTIONS) if v not in (None, '')}
        conf['admin_socket'] = ''  # the mgr's socket stays the mgr's
        return conf

    def _svc(self) -> MigrationService:
        if not self._ready.wait(10) or self.service is None:
            raise ModuleStarting('the rbd_migration module is starting; try again')
        return self.service

    def _batches(self) -> BatchService:
        self._svc()
        assert self.batches is not None
        return self.batches

    def _reports(self) -> Reports:
        self._svc()
        assert self.reports is not None
        return self.reports

    # -- commands ----------------------------------------------------------
    def handle_command(self, inbuf: Optional[str], cmd: Dict[str, Any]) -> HandlerResult:
        """Every command runs off the mgr's command thread, which waits for
        it at most ``command_wait`` seconds (see dispatch.py)."""
        prefix = cmd['prefix']
        args = {k: v for k, v in cmd.items() if k not in ('prefix', 'format', 'target')}
        key = json.dumps([prefix, args, inbuf], sort_keys=True, default=str)
        return self.dispatcher.call(key, self._mask(_describe(cmd), cmd, inbuf),
                                    lambda call: self._answer(cmd, inbuf),
                                    subject=_subject(cmd))

    def _answer(self, cmd: Dict[str, Any], inbuf: Optional[str]) -> HandlerResult:
        fmt = cmd.get('format') or 'plain'
        client = self.service.engine.rados if self.service is not None else None
        handler = command[cmd['prefix']]
        try:
            result = handler.func(self, **handler.arguments(cmd, inbuf))
        except (rados.ConnectionShutdown, rbd.ConnectionShutdown):
            return self._blocklisted(client)
        except MigrationError as e:
            if e.errno == errno.ESHUTDOWN:
                return self._blocklisted(client)
            return -abs(e.errno), '', self._mask(str(e), cmd, inbuf)
        except Exception as e:
            self.log.error('%s failed: %s', cmd['prefix'],
                           self._mask(traceback.format_exc(), cmd, inbuf))
            return -errno.EIO, '', self._mask(f'internal error: {type(e).__name__}: {e}',
                                              cmd, inbuf)
        if fmt in ('json', 'json-pretty'):
            return 0, json.dumps(result, indent=2 if fmt == 'json-pretty' else None,
                                 sort_keys=True), ''
        return 0, handler.render(result), ''

    def _blocklisted(self, client: Optional[rados.Rados]) -> HandlerResult:
        self._replace_command_client(client)
        return (-errno.EAGAIN, '', "the module's librados client was blocklisted and "
                'has been replaced; run the command again')

    # Each handler's docstring is its command's help text.
    @command('rbd migration prepare', 'w', render.migration, changes='dest_image_spec')
    def _prepare(self, source_image_spec: Optional[str] = None,
                 dest_image_spec: Optional[str] = None, import_only: bool = False,
                 source_spec: Optional[str] = None, object_size: Optional[str] = None,
                 order: Optional[int] = None, features: Optional[str] = None,
                 stripe_unit: Optional[str] = None, stripe_count: Optional[int] = None,
                 data_pool: Optional[str] = None, flatten: bool = False,
                 inbuf: Optional[str] = None) -> Dict[str, Any]:
        """Prepare a live migration of an image (or, with --import-only, an
        import from a source-spec given with --source-spec or -i)"""
        if source_spec and inbuf:
            raise InvalidArgument('--source-spec and -i: give the source-spec one way')
        layout = Layout.parse(object_size=object_size, order=order, features=features,
                              stripe_unit=stripe_unit, stripe_count=stripe_count,
                              data_pool=data_pool, flatten=flatten)
        prepared = self._svc().prepare(source_image_spec, dest_image_spec, layout,
                                       import_only=import_only,
                                       source_spec=source_spec or inbuf)
        return self._reports().prepared(prepared)

    @command('rbd migration execute', 'w', render.message, changes='image_spec')
    def _execute(self, image_spec: str) -> Dict[str, Any]:
        """Copy a prepared migration in the background (a task)"""
        return _queued(self._svc().execute(image_spec))

    @command('rbd migration commit', 'w', render.message, changes='image_spec')
    def _commit(self, image_spec: str, force: bool = False,
                verified: bool = False) -> Dict[str, Any]:
        """Commit an executed migration (a task); --force when the image has
        descendants, --verified to require a passed verify"""
        return _queued(self._svc().commit(image_spec, force, verified))

    @command('rbd migration verify', 'w', render.message, changes='image_spec')
    def _verify(self, image_spec: str) -> Dict[str, Any]:
        """Compare an executed migration's target with its source, HEAD and
        every snapshot (a task)"""
        return _queued(self._svc().verify(image_spec))

    @command('rbd migration abort', 'w', render.message, changes='image_spec')
    def _abort(self, image_spec: str) -> Dict[str, Any]:
        """Abort a migration, restoring the source (a task)"""
        return _queued(self._svc().abort(image_spec))

    @command('rbd migration status', 'r', render.status)
    def _status(self, image_spec: Optional[str] = None) -> Dict[str, Any]:
        """Show migrations (all, or the one an image is part of) and tasks"""
        return dict(self._reports().status(image_spec), commands=self.dispatcher.running())

    @command('rbd migration batch prepare', 'w', render.plan, changes='batches')
    def _batch_prepare(self, source_pool_spec: str, dest_pool_spec: str,
                       pattern: Optional[str] = None, dry_run: bool = False,
                       auto_commit: bool = False, verify_before_commit: bool = False,
                       object_size: Optional[str] = None, order: Optional[int] = None,
                       features: Optional[str] = None, stripe_unit: Optional[str] = None,
                       stripe_count: Optional[int] = None, data_pool: Optional[str] = None,
                       flatten: bool = False, inbuf: Optional[str] = None) -> Dict[str, Any]:
        """Migrate many images from pool[/namespace] to another: all, those
        matching --pattern GLOB, or those listed one a line with -i FILE;
        --dry-run prints the plan and changes nothing"""
        layout = {'object_size': object_size, 'order': order, 'features': features,
                  'stripe_unit': stripe_unit, 'stripe_count': stripe_count,
                  'data_pool': data_pool, 'flatten': flatten}
        return self._batches().batch_prepare(
            source_pool_spec, dest_pool_spec, layout, pattern=pattern, listed=inbuf,
            dry_run=dry_run, auto_commit=auto_commit, verify=verify_before_commit)

    @command('rbd migration batch status', 'r', render.batch_status)
    def _batch_status(self, batch_id: Optional[str] = None) -> Dict[str, Any]:
        """Show batches, or one batch image by image"""
        return self._batches().batch_status(batch_id)

    @command('rbd migration batch cancel', 'w', render.message, changes='batches')
    def _batch_cancel(self, batch_id: str) -> Dict[str, Any]:
        """Start no more images of a batch; abort those not yet executing"""
        return self._batches().batch_cancel(batch_id)

    @command('rbd migration batch commit', 'w', render.message, changes='batches')
    def _batch_commit(self, batch_id: str) -> Dict[str, Any]:
        """Commit every executed image of a batch"""
        return self._batches().batch_commit(batch_id)

    @command('rbd migration metrics', 'r', render.metrics)
    def _metrics(self) -> Dict[str, Any]:
        """Task counts, bytes copied and copy rates (for graphs: -f json)"""
        return dict(self._reports().metrics(), clients=self._client_addrs())

    @command('rbd migration task list', 'r', render.task_list)
    def _task_list(self) -> Dict[str, Any]:
        """List migration tasks"""
        return self._reports().task_list()

    @command('rbd migration task cancel', 'w', render.message)
    def _task_cancel(self, task_id: str) -> Dict[str, Any]:
        """Cancel a queued or running migration task"""
        task = self._svc().task_cancel(task_id)
        return {'message': f'task {task.id} is {task.state}'
                           + (' (stops at the next progress step)' if task.state == RUNNING else ''),
                'task': task.to_dict()}

    @command('rbd migration task get', 'r', render.message)
    def _task_get(self, task_id: str) -> Dict[str, Any]:
        """Show one task; the exit status tells whether it completed (0), is
        still active (EAGAIN), failed or was cancelled"""
        return self._reports().task_get(task_id)

    @staticmethod
    def _mask(text: str, cmd: Dict[str, Any], inbuf: Optional[str]) -> str:
        """Mask every secret the command carried (and URL passwords), so no
        error or log line repeats one."""
        secrets: Set[str] = set()
        for candidate in (cmd.get('source_spec'), inbuf):
            try:  # deep nesting: RecursionError, not ValueError
                spec = json.loads(candidate) if candidate else None
                if isinstance(spec, dict):
                    secrets |= collect_secrets(spec)
            except (ValueError, RecursionError):
                continue
        return mask_text(text, secrets)


def _queued(queued: Queued) -> Dict[str, Any]:
    """What execute, commit, verify and abort answer."""
    return {'message': queued.message,
            'task': queued.task.to_dict() if queued.task is not None else None}


#: Arguments that name what a command is about, in the order looked for.
_OBJECT_ARGS = ('dest_image_spec', 'image_spec', 'source_image_spec', 'task_id',
                'batch_id', 'source_pool_spec')


def _describe(cmd: Dict[str, Any]) -> str:
    """A command as messages name it: ``prepare rbd/x``, ``task cancel 7``."""
    verb = cmd['prefix'].replace('rbd migration ', '', 1)
    target = next((str(cmd[a]) for a in _OBJECT_ARGS if cmd.get(a)), '')
    return f'{verb} {target}'.strip()


def _subject(cmd: Dict[str, Any]) -> Optional[str]:
    """What a command changes, so that two changes of one thing never run
    at once: an image, or the batch book; None for reads and task cancel
    (which only sets a flag and must never wait)."""
    arg = command[cmd['prefix']].changes
    if arg is None or arg == 'batches':
        return arg
    name = cmd.get(arg) or cmd.get('source_image_spec') or ''
    try:
        return str(ImageSpec.parse(str(name)))
    except MigrationError:
        return str(name)


#: What the tasks' client takes from the mgr's configuration; the rest comes
#: from the monitors' configuration database, as for any client.
OWN_CONTEXT_OPTIONS = ('mon_host', 'keyring', 'auth_client_required', 'ms_client_mode',
                       'ms_mon_client_mode', 'ms_bind_ipv4', 'ms_bind_ipv6')


Module.COMMANDS = command.descriptors()


class ModuleEvents:
    """Task events to the progress module and the health checks."""

    #: Tries, and seconds between them, to bring the progress events in step
    #: when the progress module does not take them (it may start after us).
    SYNC_TRIES = 30
    SYNC_DELAY = 2.0

    def __init__(self, module: Module) -> None:
        self.module = module
        self.progress_events = ProgressEvents(module.remote,
                                              max_attempts=self._max_attempts)
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        self._tries = 0

    def _max_attempts(self) -> int:
        return Settings.read(self.module.get_module_option).retry_max_attempts

    def started(self, task: Task) -> None:
        self.progress_events.started(task)

    def progress(self, task: Task) -> None:
        self.progress_events.progress(task)

    def finished(self, task: Task) -> None:
        self.progress_events.finished(task)

    def changed(self, tasks: List[Task]) -> None:
        """Health, then the progress events: on the queue's load this opens
        again the events of tasks that wait to retry or to resume."""
        reports = self.module.reports
        self.module.set_health_checks(health_checks(tasks,
                                                    reports.failures() if reports else []))
        if self.progress_events.sync(tasks):
            self._tries = 0
        else:
            self._sync_later()

    def _sync_later(self) -> None:
        """Right after a mgr starts, the progress module may not serve yet:
        try again a while later, a bounded number of times."""
        with self._lock:
            if self._timer is not None or self._tries >= self.SYNC_TRIES:
                return
            self._tries += 1
            self._timer = threading.Timer(self.SYNC_DELAY, self._sync_again)
            self._timer.daemon = True
            self._timer.start()

    def _sync_again(self) -> None:
        with self._lock:
            self._timer = None
        service = self.module.service
        if service is None or self.module._stop.is_set():
            return
        try:
            self.changed(service.queue.list())
        except Exception:  # a report, never a reason for the mgr to log a crash
            self.module.log.warning('progress events: %s', traceback.format_exc())

    def batch_progress(self, batch: Batch, fraction: Optional[float], message: str) -> None:
        self.progress_events.batch(batch.id, fraction, message)


class StandbyModule(MgrStandbyModule):
    """The module in a standby mgr: it serves nothing, but lets go at once
    of the live endpoint's listening socket a respawn handed it (see
    live/handover.py), so that no client waits on a socket nobody accepts
    from and the active mgr can bind the port."""

    MODULE_OPTIONS = list(Module.MODULE_OPTIONS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop = threading.Event()

    def serve(self) -> None:
        settings = Settings.read(self.get_module_option)
        host = settings.live_endpoint_address or self.get_mgr_ip()
        if close_inherited((host, settings.live_endpoint_port)):
            self.log.info('closed the live endpoint socket this mgr held as the '
                          'active one')
        self._stop.wait()

    def shutdown(self) -> None:
        self._stop.set()
