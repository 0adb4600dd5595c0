#!/usr/bin/python3
"""A throw-away one-node Ceph cluster with rbd_migration loaded.

    qa/cluster.py start --dir DIR [--rgw] [--http] [--osds 3] [--osd-size 3G]
    qa/cluster.py status --dir DIR
    qa/cluster.py env --dir DIR          # shell exports: eval "$(qa/cluster.py env --dir DIR)"
    qa/cluster.py stop --dir DIR [--purge]
    qa/cluster.py install [--tests]      # apt-get what is missing (root)

Everything lives under DIR (config, keys, daemon data, logs, pid files,
sockets) and every port is picked free at start, so two clusters run side by
side without noticing each other.  ``stop`` ends only processes whose pid
files are under DIR and whose command line names DIR.

Memstore OSDs keep data in RAM: size test images to ``--osd-size``.
"""
import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_SRC = os.path.join(REPO, 'rbd_migration')
STOCK_MODULES = '/usr/share/ceph/mgr'
#: The ceph CLI's exit code for a module command that goes on in the background.
EINPROGRESS = 115

PACKAGES = [
    'ceph-mon', 'ceph-mgr', 'ceph-osd', 'ceph-common', 'python3-rados',
    'python3-rbd', 'python3-requests', 'python3-boto3', 'python3-jsonschema',
    'python3-zstandard', 'radosgw', 'nginx-light', 'qemu-utils',
    'qemu-block-extra', 'python3-libnbd', 'nbdkit', 'libdeflate0',
]
# What the test suite needs on top.
TEST_PACKAGES = ['tox', 'python3-pytest', 'python3-pytest-xdist', 'python3-pytest-timeout',
                 'python3-hypothesis', 'ceph-mgr-dashboard', 'openssl']
# A binary each package provides, to tell cheaply whether it is installed.
_PROBES = {'ceph-mon': '/usr/bin/ceph-mon', 'ceph-mgr': '/usr/bin/ceph-mgr',
           'ceph-osd': '/usr/bin/ceph-osd', 'ceph-common': '/usr/bin/ceph',
           'radosgw': '/usr/bin/radosgw', 'nginx-light': '/usr/sbin/nginx',
           'qemu-utils': '/usr/bin/qemu-img',
           'qemu-block-extra':
               '/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so'}

S3_ACCESS_KEY = 'rbdmigrationtest'
S3_SECRET_KEY = 'rbdmigrationtestsecret0123456789'
S3_BUCKET = 'images'
#: OSDs the EC data pool ``ecdata`` (k=2, m=1, one shard per OSD) needs;
#: a cluster of fewer has no such pool.
EC_SHARDS = 3
#: Seconds one rbd CLI call may take in tests and benches before it fails.
RBD_CLI_LIMIT = 300.0


def _option_text(value: Any) -> str:
    """A default from ``ceph mgr dump`` as ``ceph config set`` takes it."""
    text = str(value)
    return text.lower() if text in ('True', 'False') else text


def log(msg: str) -> None:
    print(f'[cluster] {msg}', file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def missing_packages(packages: List[str]) -> List[str]:
    missing = []
    for pkg in packages:
        probe = _PROBES.get(pkg)
        if probe and os.path.exists(probe):
            continue
        if probe is None and subprocess.run(
                ['dpkg-query', '-W', '-f=${Status}', pkg],
                capture_output=True, text=True).stdout.endswith(' installed'):
            continue
        missing.append(pkg)
    return missing


def install_packages(tests: bool = False) -> None:
    missing = missing_packages(PACKAGES + (TEST_PACKAGES if tests else []))
    if not missing:
        return
    log(f'installing {" ".join(missing)}')
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    subprocess.run(['apt-get', 'update', '-q'], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(['apt-get', 'install', '-y', '-q', *missing], check=True,
                   env=env, stdout=subprocess.DEVNULL)


@dataclass
class ClusterState:
    """What ``start`` decided; saved as DIR/cluster.json for the others."""

    dir: str
    fsid: str
    mon_port: int
    osds: int
    osd_size: int
    rgw_port: Optional[int] = None
    http_port: Optional[int] = None
    http_root: Optional[str] = None
    #: Where the module serves live imports' views (a free port per cluster,
    #: so that clusters side by side do not take each other's).
    live_port: Optional[int] = None
    extra: Dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> str:
        return os.path.join(self.dir, 'ceph.conf')

    @property
    def keyring(self) -> str:
        return os.path.join(self.dir, 'keyring')

    def env(self) -> Dict[str, str]:
        out = {'CEPH_CONF': self.conf, 'CEPH_KEYRING': self.keyring,
               'RBD_MIGRATION_CLUSTER_DIR': self.dir}
        if self.rgw_port:
            out.update(RBD_MIGRATION_S3_URL=f'http://127.0.0.1:{self.rgw_port}',
                       RBD_MIGRATION_S3_BUCKET=S3_BUCKET,
                       RBD_MIGRATION_S3_ACCESS_KEY=S3_ACCESS_KEY,
                       RBD_MIGRATION_S3_SECRET_KEY=S3_SECRET_KEY)
        if self.http_port:
            out.update(RBD_MIGRATION_HTTP_URL=f'http://127.0.0.1:{self.http_port}',
                       RBD_MIGRATION_HTTP_ROOT=self.http_root or '')
        return out


#: Send every ceph command through the CLI, as the tests did before the
#: command client existed (set RBD_MIGRATION_TEST_CLI=1 to compare).
CLI_ALWAYS = os.environ.get('RBD_MIGRATION_TEST_CLI') == '1'


class CommandClient:
    """``ceph ARGS`` over one librados client kept open, answering exactly
    as the CLI does (exit status, stdout, stderr).

    The ceph CLI is a Python program that connects anew each time: about a
    third of a second of CPU per command, which a polling test pays
    thousands of times.  This parses ARGS with the CLI's own parser
    (ceph_argparse, against the cluster's command descriptions) and sends
    them with its own ``json_command``; what it does not know (global
    options other than --format and -i) it leaves to the CLI: ``run``
    then answers None.  Tests whose subject is the CLI call it directly.
    """

    def __init__(self, conf: str) -> None:
        self.conf = conf
        self._lock = threading.Lock()
        self._handle: Any = None
        self._sigdict: Optional[Dict[str, Dict[str, Any]]] = None

    def run(self, args: Sequence[str], inbuf: Optional[str],
            timeout: float) -> 'Optional[subprocess.CompletedProcess[str]]':
        import ceph_argparse
        parsed = _split_globals(args, inbuf)
        if parsed is None:
            return None
        words, fmt, data = parsed
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            valid = ceph_argparse.validate_command(self._commands(words), words, False)
            if not valid:  # descriptions may have changed (a module loaded)
                errors.truncate(0)
                valid = ceph_argparse.validate_command(self._commands(words, fresh=True),
                                                       words, False)
        if not valid:
            return subprocess.CompletedProcess(
                ['ceph', *args], 22, '', errors.getvalue() + 'Error EINVAL: invalid command\n')
        if fmt:
            valid['format'] = fmt
        try:
            ret, outbuf, outs = ceph_argparse.json_command(
                self._client(), argdict=valid, inbuf=(data or '').encode(),
                timeout=max(1, int(timeout)))
        except Exception as e:
            if 'timed out' in str(e):
                raise subprocess.TimeoutExpired(['ceph', *args], timeout) from None
            raise
        out = outbuf.decode('utf-8', 'replace')
        if fmt and fmt.startswith('json'):
            out = '\n' + out
        if ret < 0:
            err = f"Error {errno.errorcode.get(-ret, 'Unknown')}: {outs}\n"
        else:
            err = f'{outs}\n' if outs else ''
        return subprocess.CompletedProcess(['ceph', *args], abs(ret), out, err)

    def _client(self) -> Any:
        with self._lock:
            if self._handle is None:
                import rados
                handle = rados.Rados(conffile=self.conf)
                handle.connect(timeout=30)
                self._handle = handle
            return self._handle

    def _commands(self, words: Sequence[str], fresh: bool = False) -> Dict[str, Any]:
        """The descriptions of the commands whose first word is ``words``'s:
        validating against all ~750 took 40 to 60 ms per command, more than
        most commands take to answer."""
        import ceph_argparse
        if self._sigdict is None or fresh:
            ret, outbuf, outs = ceph_argparse.json_command(
                self._client(), prefix='get_command_descriptions', timeout=60)
            if ret:
                raise RuntimeError(f'get_command_descriptions: {outs}')
            sigdict = ceph_argparse.parse_json_funcsigs(outbuf.decode('utf-8'), 'cli')
            self._sigdict = {}
            for name, cmd in sigdict.items():
                first = cmd['sig'][0].typeargs.get('prefix', '') if cmd['sig'] else ''
                self._sigdict.setdefault(first, {})[name] = cmd
        assert self._sigdict is not None
        return self._sigdict.get(words[0] if words else '', {})


_COMMAND_CLIENTS: Dict[str, CommandClient] = {}


def _split_globals(args: Sequence[str], inbuf: Optional[str]
                   ) -> Optional[Tuple[List[str], Optional[str], Optional[str]]]:
    """(command words, --format, input) as the CLI takes them from ARGS;
    None for global options this does not handle."""
    words: List[str] = []
    fmt: Optional[str] = None
    data = inbuf
    it = iter(args)
    for arg in it:
        if arg in ('-f', '--format'):
            fmt = next(it)
        elif arg.startswith('--format='):
            fmt = arg.split('=', 1)[1]
        elif arg in ('-i', '--in-file'):
            name = next(it)
            if name != '-':
                with open(name) as f:
                    data = f.read()
        elif arg.startswith('-') and not arg.startswith('--') and len(arg) == 2:
            return None  # another short global option (-s, -w, ...)
        elif arg in ('--conf', '-c', '--id', '--name', '--keyring', '--connect-timeout',
                     '--cluster', '--user', '-o', '--out-file'):
            return None
        else:
            words.append(arg)
    return words, fmt, data


class Cluster:
    """Start, inspect and stop one cluster rooted at a directory."""

    def __init__(self, directory: str) -> None:
        self.dir = os.path.abspath(directory)
        self.state: Optional[ClusterState] = None
        path = os.path.join(self.dir, 'cluster.json')
        if os.path.exists(path):
            with open(path) as f:
                self.state = ClusterState(**json.load(f))

    # -- helpers -----------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def _save(self) -> None:
        assert self.state
        with open(self.path('cluster.json'), 'w') as f:
            json.dump(asdict(self.state), f, indent=2)

    @property
    def commands(self) -> 'CommandClient':
        """The ceph commands of this process, over one client kept open."""
        assert self.state
        client = _COMMAND_CLIENTS.get(self.state.conf)
        if client is None:
            client = _COMMAND_CLIENTS[self.state.conf] = CommandClient(self.state.conf)
        return client

    def ceph(self, *args: str, inbuf: Optional[str] = None,
             check: bool = True, timeout: float = 60) -> str:
        """Run the ceph CLI against this cluster; return stdout."""
        r = self.run_ceph(*args, inbuf=inbuf, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f'ceph {" ".join(args)}: {r.stderr.strip()}')
        return r.stdout

    def run_ceph(self, *args: str, inbuf: Optional[str] = None, timeout: float = 60,
                 auth: Sequence[str] = ()) -> 'subprocess.CompletedProcess[str]':
        """The ceph CLI's whole answer.  A module command still running
        after the module's command_wait answers EINPROGRESS and goes on in
        the background; it is repeated, as the module asks, until it gives
        its own answer (within ``timeout``)."""
        assert self.state
        deadline = time.monotonic() + timeout
        while True:
            left = max(1.0, deadline - time.monotonic())
            r = None if auth or CLI_ALWAYS else self.commands.run(args, inbuf, left)
            if r is None:
                r = subprocess.run(['ceph', '--conf', self.state.conf, *auth, *args],
                                   input=inbuf, capture_output=True, text=True,
                                   timeout=left)
            if r.returncode != EINPROGRESS or args[:1] != ('rbd',) or \
                    time.monotonic() > deadline:
                return r
            time.sleep(0.2)

    def ceph_json(self, *args: str) -> Any:
        return json.loads(self.ceph(*args, '--format', 'json'))

    def module_defaults(self) -> Dict[str, str]:
        """rbd_migration's option defaults, as the running mgr declares them."""
        for module in self.ceph_json('mgr', 'dump')['available_modules']:
            if module['name'] == 'rbd_migration':
                return {name: _option_text(opt.get('default_value', ''))
                        for name, opt in module['module_options'].items()}
        return {}

    def reset_module_option(self, name: str) -> None:
        """mgr/rbd_migration/NAME back to its default, for the running module
        too: a running Pacific mgr keeps serving a removed module option's
        last value, so the default is set before the option is removed."""
        key = f'mgr/rbd_migration/{name}'
        self.ceph('config', 'set', 'mgr', key, self.module_defaults().get(name, ''))
        self.ceph('config', 'rm', 'mgr', key)

    @contextlib.contextmanager
    def module_option(self, name: str, value: Optional[str]) -> Iterator[None]:
        """mgr/rbd_migration/NAME set to ``value`` (None: its default) while
        in the block, then as it was."""
        key = f'mgr/rbd_migration/{name}'
        old = [e['value'] for e in self.ceph_json('config', 'dump')
               if e['name'] == key and e['section'] == 'mgr']
        if value is None:
            self.reset_module_option(name)
        else:
            self.ceph('config', 'set', 'mgr', key, value)
        time.sleep(1)  # the mgr learns of config changes asynchronously
        try:
            yield
        finally:
            if old:
                self.ceph('config', 'set', 'mgr', key, old[0])
            else:
                self.reset_module_option(name)
            time.sleep(1)

    def rbd(self, *args: str, timeout: float = RBD_CLI_LIMIT) -> str:
        """Run the rbd CLI against this cluster; return stdout.  A CLI
        still waiting after ``timeout`` fails with the cluster's health
        (a full OSD makes writes wait for ever)."""
        assert self.state
        try:
            r = subprocess.run(['rbd', '--conf', self.state.conf, *args],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f'rbd {" ".join(args)}: no answer within {timeout:g} s; '
                               f'health: {self._health()}') from None
        if r.returncode != 0:
            raise RuntimeError(f'rbd {" ".join(args)}: {r.stderr.strip()}')
        return r.stdout

    def _health(self) -> str:
        r = self.run_ceph('health', 'detail', timeout=15)
        return ' | '.join(r.stdout.strip().splitlines()[:6]) or r.stderr.strip()

    def image_sha(self, spec: str) -> str:
        """sha256 of an image (or image@snap) as `rbd export` streams it."""
        assert self.state
        proc = subprocess.Popen(['rbd', '--conf', self.state.conf, 'export',
                                 '--no-progress', spec, '-'], stdout=subprocess.PIPE)
        assert proc.stdout
        h = hashlib.sha256()
        for chunk in iter(lambda: proc.stdout.read(1 << 20), b''):  # type: ignore
            h.update(chunk)
        if proc.wait() != 0:
            raise RuntimeError(f'rbd export {spec} failed')
        return h.hexdigest()

    def health_mentioning(self, text: str, present: bool = True, timeout: float = 30,
                          check: str = 'RBD_MIGRATION_FAILED') -> Dict[str, Any]:
        """Health checks once ``check``'s detail does (or no longer does)
        mention ``text``, or at the timeout.  The mgr reports health with
        its beacon, every few seconds; other tests' tasks may be listed too,
        so a test only ever looks for its own image."""
        deadline = time.monotonic() + timeout
        while True:
            checks = dict(self.ceph_json('health', 'detail').get('checks', {}))
            detail = ' '.join(d.get('message', '') for d in
                              checks.get(check, {}).get('detail', []))
            if (text in detail) == present or time.monotonic() > deadline:
                return checks
            time.sleep(0.5)

    def task_end(self, task_id: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """The final `task get` of a module task, riding out mgr restarts
        (EAGAIN while active; EINVAL, EOPNOTSUPP, ETIMEDOUT while the module
        (re)starts; EINPROGRESS while the mgr is slow to answer)."""
        assert self.state
        deadline = time.monotonic() + timeout
        last = ''
        while time.monotonic() < deadline:
            r = self.run_ceph('rbd', 'migration', 'task', 'get', task_id, timeout=120)
            if r.returncode not in (11, 22, 95, 110, EINPROGRESS):
                return r
            last = (r.stdout + r.stderr).strip() or last
            time.sleep(0.3)
        raise AssertionError(f'task {task_id} still active after {timeout}s; last said: {last}')

    def task_running(self, task_id: str, past: float = 0.02, timeout: float = 120) -> None:
        """Wait until a module task runs and is ``past`` that far along;
        fail if it ends first."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
            t = next(t for t in tasks if t['id'] == task_id)
            if t['state'] == 'running' and t['progress'] > past:
                return
            if t['state'] in ('completed', 'failed', 'cancelled'):
                raise AssertionError(f'task {task_id} ended too soon: {t}')
            if time.monotonic() > deadline:
                others = [(o['id'], o['action'], o['image_spec'], o['state']) for o in tasks
                          if o['state'] in ('running', 'queued', 'waiting to retry')]
                raise AssertionError(f'task {task_id} did not get going: {t}; '
                                     f'active tasks: {others}')
            time.sleep(0.2)

    def _run(self, *argv: str) -> None:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f'{" ".join(argv)}: {r.stderr.strip()}')

    def _wait(self, what: str, cond: Any, timeout: float = 60,
              interval: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                last = e
            time.sleep(interval)
        raise RuntimeError(f'timed out waiting for {what}'
                           + (f': {last}' if last else ''))

    # -- start -------------------------------------------------------------
    def start(self, osds: int = 3, osd_size: int = 3 << 30,
              rgw: bool = False, http: bool = False,
              http_root: Optional[str] = None) -> ClusterState:
        if self.state and self.running():
            raise RuntimeError(f'a cluster is already running in {self.dir}')
        shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ('out', 'run', 'mgr-modules'):
            os.makedirs(self.path(sub))
        self.state = ClusterState(dir=self.dir, fsid=str(uuid.uuid4()),
                                  mon_port=free_port(), osds=osds,
                                  osd_size=osd_size, live_port=free_port())
        if rgw:
            self.state.rgw_port = free_port()
        if http:
            self.state.http_port = free_port()
            self.state.http_root = os.path.abspath(http_root or self.path('www'))
        self._save()
        t0 = time.monotonic()
        self._write_conf()
        self._link_modules()
        # Independent steps overlap: the mgr loads modules while OSDs boot,
        # pools are created before the OSDs are up, RGW creates its pools
        # while ours initialise.
        self._timed(self._start_mon)
        self._timed(self._start_mgr)
        with ThreadPoolExecutor(max_workers=4) as pool:
            osds_up = pool.submit(self._timed, self._start_osds)
            self._timed(self._create_pools)
            osds_up.result()
            later = [pool.submit(self._timed, self._init_rbd_pools)]
            if rgw:
                later.append(pool.submit(self._timed, self._start_rgw))
            if http:
                later.append(pool.submit(self._timed, self._start_nginx))
            self._timed(self.wait_module)
            for f in later:
                f.result()
        self._wait('all PGs active+clean', self.pgs_clean, timeout=120)
        log(f'ready in {time.monotonic() - t0:.1f}s')
        return self.state

    def _timed(self, step: Any) -> None:
        t = time.monotonic()
        step()
        log(f'{step.__name__.strip("_")}: {time.monotonic() - t:.1f}s')

    def _write_conf(self) -> None:
        s = self.state
        assert s
        d = self.dir
        conf = f"""[global]
fsid = {s.fsid}
mon host = v2:127.0.0.1:{s.mon_port}
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/keyring
run dir = {d}/run
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 5
mon warn on insecure global id reclaim allowed = false
mon warn on insecure global id reclaim = false
osd crush chooseleaf type = 0
mon debug no require bluestore for ec overwrites = true

[mon]
mon data = {d}/mon.$id
mon cluster log file = {d}/out/cluster.log
log file = {d}/out/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
keyring = {d}/keyring

[mgr]
mgr data = {d}/mgr.$id
mgr module path = {d}/mgr-modules
log file = {d}/out/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
keyring = {d}/mgr.$id/keyring

[osd]
osd data = {d}/osd.$id
osd objectstore = memstore
memstore device bytes = {s.osd_size}
osd op num shards = 2
osd op num threads per shard = 1
log file = {d}/out/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
keyring = {d}/osd.$id/keyring
"""
        if s.rgw_port:
            conf += self._rgw_conf()
        with open(self.path('ceph.conf'), 'w') as f:
            f.write(conf)

    def _rgw_conf(self) -> str:
        s = self.state
        assert s and s.rgw_port
        d = self.dir
        return f"""
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{s.rgw_port} tcp_nodelay=1
rgw data = {d}/rgw.a
log file = {d}/out/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
keyring = {d}/rgw.keyring
rgw dns name = 127.0.0.1
"""

    def _link_modules(self) -> None:
        """The stock modules plus this checkout's package, all as links, so
        an edit shows after a mgr restart."""
        for name in os.listdir(STOCK_MODULES):
            if name != 'rbd_migration':
                os.symlink(os.path.join(STOCK_MODULES, name),
                           self.path('mgr-modules', name))
        os.symlink(MODULE_SRC, self.path('mgr-modules', 'rbd_migration'))

    def _start_mon(self) -> None:
        s = self.state
        assert s
        kr = self.path('keyring')
        self._run('ceph-authtool', '--create-keyring', kr, '--gen-key',
                  '-n', 'mon.', '--cap', 'mon', 'allow *')
        self._run('ceph-authtool', kr, '--gen-key', '-n', 'client.admin',
                  '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *',
                  '--cap', 'mgr', 'allow *', '--cap', 'mds', 'allow *')
        monmap = self.path('monmap')
        self._run('monmaptool', '--create', '--fsid', s.fsid, '--addv', 'a',
                  f'[v2:127.0.0.1:{s.mon_port}]', monmap)
        self._run('ceph-mon', '--conf', s.conf, '-i', 'a', '--mkfs',
                  '--monmap', monmap, '--keyring', kr)
        self._run('ceph-mon', '--conf', s.conf, '-i', 'a')
        self._wait('the monitor', lambda: self.ceph('mon', 'stat', timeout=10))

    def _start_mgr(self) -> None:
        s = self.state
        assert s
        os.makedirs(self.path('mgr.x'))
        self.ceph('auth', 'get-or-create', 'mgr.x', 'mon', 'allow profile mgr',
                  'osd', 'allow *', 'mds', 'allow *',
                  '-o', self.path('mgr.x', 'keyring'))
        if s.live_port:
            self.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/live_endpoint_port',
                      str(s.live_port), '--force')
        self._run('ceph-mgr', '--conf', s.conf, '-i', 'x')
        self.ceph('mgr', 'module', 'enable', 'rbd_migration', '--force')

    def _start_osds(self) -> None:
        s = self.state
        assert s
        with ThreadPoolExecutor(max_workers=s.osds) as pool:
            for f in [pool.submit(self._start_osd) for _ in range(s.osds)]:
                f.result()
        self._wait(f'{s.osds} OSDs up',
                   lambda: self.ceph_json('osd', 'stat')['num_up_osds'] == s.osds)

    def _start_osd(self) -> None:
        s = self.state
        assert s
        osd_uuid = str(uuid.uuid4())
        secret = subprocess.run(['ceph-authtool', '--gen-print-key'],
                                capture_output=True, text=True,
                                check=True).stdout.strip()
        osd_id = self.ceph('osd', 'new', osd_uuid, '-i', '-',
                           inbuf=json.dumps({'cephx_secret': secret})).strip()
        data = self.path(f'osd.{osd_id}')
        os.makedirs(data)
        with open(os.path.join(data, 'keyring'), 'w') as f:
            f.write(f'[osd.{osd_id}]\n\tkey = {secret}\n')
        self._run('ceph-osd', '--conf', s.conf, '-i', osd_id, '--mkfs',
                  '--osd-uuid', osd_uuid)
        self._run('ceph-osd', '--conf', s.conf, '-i', osd_id)

    def _create_pools(self) -> None:
        for pool in ('rbd', 'rbd2'):
            self.ceph('osd', 'pool', 'create', pool, '8')
        assert self.state
        if self.state.osds < EC_SHARDS:
            return      # its PGs could never be clean: no EC data pool
        self.ceph('osd', 'erasure-code-profile', 'set', 'ec21', 'k=2', 'm=1',
                  'crush-failure-domain=osd')
        self.ceph('osd', 'pool', 'create', 'ecdata', '8', '8', 'erasure', 'ec21')
        self.ceph('osd', 'pool', 'set', 'ecdata', 'allow_ec_overwrites', 'true')
        self.ceph('osd', 'pool', 'application', 'enable', 'ecdata', 'rbd')

    def _init_rbd_pools(self) -> None:
        procs = [subprocess.Popen(['rbd', '--conf', self.path('ceph.conf'),
                                   'pool', 'init', pool])
                 for pool in ('rbd', 'rbd2')]
        try:
            if any(p.wait(RBD_CLI_LIMIT) for p in procs):
                raise RuntimeError('rbd pool init failed')
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            raise RuntimeError(f'rbd pool init: no answer within {RBD_CLI_LIMIT:g} s; '
                               f'health: {self._health()}') from None

    def ensure_rgw(self) -> int:
        """Start RGW, its test user and bucket on this running cluster unless
        RGW runs already (a cluster started without ``--rgw``, or whose RGW
        died); return its port."""
        s = self.state
        assert s, f'no cluster in {self.dir}'
        if s.rgw_port and 'client.rgw.a' in self.pids():
            return s.rgw_port
        if not s.rgw_port:
            s.rgw_port = free_port()
            self._save()
        with open(s.conf) as f:
            has_section = '[client.rgw.a]' in f.read()
        if not has_section:
            with open(s.conf, 'a') as f:
                f.write(self._rgw_conf())
        self._timed(self._start_rgw)
        return s.rgw_port

    def _start_rgw(self) -> None:
        s = self.state
        assert s
        os.makedirs(self.path('rgw.a'), exist_ok=True)
        self.ceph('auth', 'get-or-create', 'client.rgw.a', 'mon', 'allow rw',
                  'osd', 'allow rwx', '-o', self.path('rgw.keyring'))
        self._run('radosgw', '--conf', s.conf, '-n', 'client.rgw.a')
        admin = ('radosgw-admin', '--conf', s.conf)
        if subprocess.run([*admin, 'user', 'info', '--uid=rbdmigration'],
                          capture_output=True).returncode != 0:
            self._run(*admin, 'user', 'create', '--uid=rbdmigration',
                      '--display-name=rbd_migration tests',
                      f'--access-key={S3_ACCESS_KEY}',
                      f'--secret={S3_SECRET_KEY}')
        import boto3  # Debian's python3-boto3
        from botocore.config import Config
        s3 = boto3.client('s3', endpoint_url=f'http://127.0.0.1:{s.rgw_port}',
                          aws_access_key_id=S3_ACCESS_KEY,
                          aws_secret_access_key=S3_SECRET_KEY,
                          region_name='us-east-1',
                          config=Config(s3={'addressing_style': 'path'},
                                        signature_version='s3v4',
                                        retries={'max_attempts': 1}))

        def bucket() -> bool:
            try:
                s3.create_bucket(Bucket=S3_BUCKET)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                pass
            except Exception as e:  # connection refused while RGW starts
                raise RuntimeError(str(e))
            return True
        self._wait('RGW and its bucket', bucket, timeout=60, interval=0.5)

    def _start_nginx(self) -> None:
        s = self.state
        assert s and s.http_root and s.http_port
        port = s.http_port
        os.makedirs(s.http_root, exist_ok=True)
        tmp = self.path('nginx')
        os.makedirs(tmp)
        conf = self.path('nginx.conf')
        with open(conf, 'w') as f:
            f.write(f"""daemon on;
# Workers as root: the served directory may sit under private (0700) ones.
user root;
pid {self.path('run', 'nginx.pid')};
error_log {self.path('out', 'nginx.error.log')};
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {self.path('out', 'nginx.access.log')};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{s.http_port};
        root {s.http_root};
        max_ranges 16;
        # Any path with a /private/ folder is refused: a 403 to test against.
        location ~ /private/ {{ deny all; }}
    }}
}}
""")
        self._run('nginx', '-c', conf, '-p', tmp)

        def answers() -> bool:
            with socket.create_connection(('127.0.0.1', port), 1):
                return True
        self._wait('nginx', lambda: self._try(answers))

    @staticmethod
    def _try(fn: Any) -> bool:
        try:
            return bool(fn())
        except OSError:
            return False

    def kill_daemon(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one of this cluster's daemons (e.g. 'mgr.x', 'osd.1') and
        wait until it is gone: every process started for it, not only the
        one in its pid file (a daemon forks, and a mgr re-executes itself)."""
        kind, ident = name.split('.', 1)
        pids = set(self._processes(kind, ident))
        if name in self.pids():
            pids.add(self.pids()[name])
        if not pids:
            raise RuntimeError(f'{name} is not running in {self.dir}')
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._wait(f'{name} to stop', lambda: not any(
                os.path.exists(f'/proc/{p}') and not _is_zombie(p) for p in pids),
                timeout=60)

    def _processes(self, kind: str, ident: str) -> List[int]:
        """Pids of ceph-<kind> processes started with this cluster's conf."""
        out = []
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            try:
                with open(f'/proc/{entry}/cmdline', 'rb') as f:
                    argv = f.read().decode(errors='replace').split('\0')
            except OSError:
                continue
            if argv and argv[0].endswith(f'ceph-{kind}') and self.dir in ' '.join(argv) \
                    and ident in argv and '--mkfs' not in argv:
                out.append(int(entry))
        return out

    def start_daemon(self, name: str) -> None:
        """Start a daemon of this cluster again after ``kill_daemon``."""
        s = self.state
        assert s
        kind, ident = name.split('.', 1)
        binary = {'mgr': 'ceph-mgr', 'osd': 'ceph-osd', 'mon': 'ceph-mon'}[kind]
        self._wait(f'{name} to be gone before it starts again',
                   lambda: not self._processes(kind, ident), timeout=30)
        # The kernel may still hold the killed daemon's pid-file lock for a
        # moment; the new daemon then exits at once: try again.
        for _ in range(10):
            self._run(binary, '--conf', s.conf, '-i', ident)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and name not in self.pids():
                time.sleep(0.2)
            if name in self.pids():
                break
            time.sleep(1)
        if kind == 'osd':
            self._wait(f'{name} up', lambda: int(ident) in [
                o['osd'] for o in self.ceph_json('osd', 'dump')['osds'] if o['up']])
        if kind == 'mgr':
            self.wait_module()

    def wait_module(self) -> None:
        self._wait('the rbd_migration module',
                   lambda: self.ceph('rbd', 'migration', 'status', '--format',
                                     'json', timeout=15) is not None,
                   timeout=90, interval=0.5)

    # -- status and stop ---------------------------------------------------
    def pgs_clean(self) -> bool:
        st = self.ceph_json('pg', 'stat')['pg_summary']
        total = st.get('num_pgs', 0)
        clean = sum(s['num'] for s in st.get('num_pg_by_state', [])
                    if s['name'] == 'active+clean')
        return total > 0 and clean == total

    def pids(self) -> Dict[str, int]:
        """Live processes started for this cluster, by daemon name."""
        out: Dict[str, int] = {}
        run = self.path('run')
        if not os.path.isdir(run):
            return out
        for name in os.listdir(run):
            if not name.endswith('.pid'):
                continue
            try:
                with open(os.path.join(run, name)) as f:
                    pid = int(f.read().strip())
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    cmdline = f.read().decode(errors='replace')
            except (OSError, ValueError):
                continue
            # Only ours: the command line names this cluster's files.
            if self.dir in cmdline:
                out[name[:-4]] = pid
        return out

    def running(self) -> bool:
        return bool(self.pids())

    def status(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {'dir': self.dir, 'daemons': self.pids()}
        if self.state and info['daemons']:
            try:
                info['health'] = self.ceph_json('health')['status']
                info['rbd_migration'] = self.ceph_json(
                    'rbd', 'migration', 'status')
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                info['error'] = str(e)
            info['env'] = self.state.env()
        return info

    def stop(self, purge: bool = False) -> None:
        pids = self.pids()
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while pids and time.monotonic() < deadline:
            pids = {n: p for n, p in pids.items() if os.path.exists(f'/proc/{p}')
                    and not _is_zombie(p)}
            time.sleep(0.1)
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if purge:
            shutil.rmtree(self.dir, ignore_errors=True)

    def enable_dashboard(self, user: str, password: str, timeout: float = 120) -> str:
        """The dashboard on 127.0.0.1 without TLS, with an administrator
        ``user``; returns its URL.  Enabling a module respawns the mgr: this
        returns once the new one serves the dashboard and rbd_migration."""
        if not os.path.isdir(self.path('mgr-modules', 'dashboard')):
            raise RuntimeError('the dashboard module is not installed (apt-get install '
                               'ceph-mgr-dashboard, then start the cluster again)')
        services = self.ceph_json('mgr', 'services')
        if 'dashboard' not in services:
            for key, value in (('ssl', 'false'), ('server_addr', '127.0.0.1'),
                               ('server_port', str(free_port()))):
                self.ceph('config', 'set', 'mgr', f'mgr/dashboard/{key}', value)
            self.ceph('mgr', 'module', 'enable', 'dashboard')
            self._wait('the dashboard', lambda: 'dashboard' in self.ceph_json(
                'mgr', 'services'), timeout=timeout, interval=1)
            self.wait_module()
        self.ceph('dashboard', 'ac-user-delete', user, check=False)
        self.ceph('dashboard', 'ac-user-create', user, '-i', '-', 'administrator',
                  inbuf=password)
        return str(self.ceph_json('mgr', 'services')['dashboard'])


def _is_zombie(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(') ', 1)[1].startswith('Z')
    except OSError:
        return True


def parse_size(text: str) -> int:
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
    text = text.strip().upper().rstrip('IB')
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    inst = sub.add_parser('install')
    inst.add_argument('--tests', action='store_true',
                      help='also what the test suite needs')
    for name in ('start', 'stop', 'status', 'env'):
        sp = sub.add_parser(name)
        sp.add_argument('--dir', default=os.environ.get(
            'RBD_MIGRATION_CLUSTER_DIR', '/tmp/rbd-migration-cluster'))
        if name == 'start':
            sp.add_argument('--osds', type=int, default=3)
            sp.add_argument('--osd-size', type=parse_size, default=3 << 30)
            sp.add_argument('--rgw', action='store_true', help='start RGW (S3)')
            sp.add_argument('--http', action='store_true', help='start nginx')
            sp.add_argument('--http-root', help='directory nginx serves')
            sp.add_argument('--no-install', action='store_true',
                            help='do not apt-get install missing packages')
        if name == 'stop':
            sp.add_argument('--purge', action='store_true',
                            help='also remove the directory')
    args = p.parse_args(argv)
    if args.cmd == 'install':
        install_packages(tests=args.tests)
        return 0
    cluster = Cluster(args.dir)
    if args.cmd == 'start':
        if not args.no_install:
            install_packages()
        try:
            state = cluster.start(osds=args.osds, osd_size=args.osd_size,
                                  rgw=args.rgw, http=args.http,
                                  http_root=args.http_root)
        except Exception:
            log(f'start failed; logs are in {cluster.path("out")}; stopping')
            cluster.stop()
            raise
        print_env(state.env())
    elif args.cmd == 'env':
        if not cluster.state:
            log(f'no cluster in {cluster.dir}')
            return 1
        print_env(cluster.state.env())
    elif args.cmd == 'status':
        print(json.dumps(cluster.status(), indent=2))
        return 0 if cluster.running() else 1
    elif args.cmd == 'stop':
        cluster.stop(purge=args.purge)
    return 0


def print_env(env: Dict[str, str]) -> None:
    for k, v in env.items():
        print(f'export {k}={v}')


if __name__ == '__main__':
    sys.exit(main())
