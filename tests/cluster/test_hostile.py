"""Hostile input at prepare: thousands of generated source-specs and
argument sets, each of which must either succeed or be refused with one
clear line (a ``MigrationError``, no traceback, no secret), and none of
which may leave an image, a trash entry, a task or a reservation behind.

Most examples drive ``MigrationService`` in-process against the real
cluster (a client.admin rados handle, a dict store, no-op events), which
makes thousands feasible; a few hundred go through the real mgr and the
``ceph`` command line.  The ``file`` stream's confinement to
``file_source_roots`` is also tested case by case.

Retries: the service builds its own ``SourceContext`` (5 attempts with
backoff, 30 s timeouts), so one example against a closed port costs about
3 s.  The property tests use a subclass whose only difference is a context
with one attempt and a 2 s timeout; the real context is exercised by a
small explicit set (``test_closed_port_with_the_real_retries``).
"""
import ast
import errno
import json
import os
import shutil
import stat
import string
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
import rados
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qa.cluster import REPO, Cluster
from tests.profile import THOROUGH, examples
from rbd_migration.batch_service import BatchService
from rbd_migration.context import SourceContext
from rbd_migration.errors import MigrationError
from rbd_migration.images import Layout
from rbd_migration.reports import Reports
from rbd_migration.service import MigrationService
from rbd_migration.tasks import ACTIVE, COMPLETED

#: Appears only where a secret belongs (URL password, S3 keys): no error
#: message may ever contain it.
SECRET = 'hostileSECRETmarker7f3a9'
POOLS = ('rbd', 'rbd2', 'ecdata')
NAMESPACE = 'hostns'
SOURCE_IMAGE = 'hostile-src'
SOURCE_SNAP = 'snap1'
#: A name no example is expected to leave behind; prepared ones are aborted.
FRESH = ('hostile-new', 'hostile.new-2', 'hostile_ü', 'hostile-' + 'n' * 90)

SETTINGS = dict(deadline=None, database=None, derandomize=not THOROUGH,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# -- The module's option defaults, read from module.py ------------------------

def _module_option_defaults() -> Dict[str, Any]:
    """``MODULE_OPTIONS`` defaults, parsed from module.py (which imports
    mgr_module and so cannot be imported outside ceph-mgr)."""
    tree = ast.parse(Path(REPO, 'rbd_migration', 'module.py').read_text())
    out: Dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'Option':
            name = ast.literal_eval(node.args[0])
            kw = {k.arg: k.value for k in node.keywords}
            out[name] = ast.literal_eval(kw['default'])
    assert {'max_concurrent_tasks', 'file_source_roots'} <= set(out), out
    return out


DEFAULTS = _module_option_defaults()


# -- An in-process service --------------------------------------------------

class DictStore(dict):
    def get_store(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.get(key, default)

    def set_store(self, key: str, val: Optional[str]) -> None:
        if val is None:
            self.pop(key, None)
        else:
            self[key] = val

    def get_store_prefix(self, prefix: str) -> Dict[str, str]:
        return {k: v for k, v in self.items() if k.startswith(prefix)}


class NoEvents:
    def started(self, task: Any) -> None: ...
    def progress(self, task: Any) -> None: ...
    def finished(self, task: Any) -> None: ...
    def changed(self, tasks: Any) -> None: ...


class FastRetryService(MigrationService):
    """The service with one attempt per request: a closed port costs
    milliseconds instead of seconds.  Nothing else differs."""

    def source_context(self, stop: Optional[threading.Event] = None) -> SourceContext:
        ctx = super().source_context(stop)
        ctx.retries, ctx.timeout = 1, 2.0
        return ctx


def _service(r: rados.Rados, roots: Path, fast: bool = True) -> MigrationService:
    options = dict(DEFAULTS, file_source_roots=str(roots))
    cls = FastRetryService if fast else MigrationService
    return cls(r, DictStore(), NoEvents(), options.__getitem__)


# -- What must not change -----------------------------------------------------

def _omap(io: rados.Ioctx, obj: str) -> Dict[str, bytes]:
    with rados.ReadOpCtx() as op:
        it, _ = io.get_omap_vals(op, '', '', 100000)
        try:
            io.operate_read_op(op, obj)
        except rados.ObjectNotFound:
            return {}
        return dict(it)


#: Per-namespace bookkeeping objects that librbd creates on first use and
#: keeps when they empty out; compared by their omap (empty = absent).
BOOKKEEPING = ('rbd_directory', 'rbd_trash', 'rbd_children')


def _settling(listed: Dict[str, List[Tuple[str, str]]]) -> Set[Tuple[str, str]]:
    """Data objects of images that no longer have a header (in any of the
    pools: a data pool holds no headers): what the OSDs still hold of images
    other tests removed, until they trim the removed snapshots' clones in
    the background.  They vanish at any moment."""
    headers = {(ns, key.split('.', 1)[1]) for objects in listed.values()
               for ns, key in objects if key.startswith('rbd_header.')}
    return {(ns, key) for objects in listed.values() for ns, key in objects
            if key.startswith('rbd_data.') and (ns, key.split('.')[1]) not in headers}


def cluster_state(r: rados.Rados) -> Dict[Any, Any]:
    """Every object of the pools images go to, in the namespaces these tests
    use, and the image directory, trash and children omaps of those
    namespaces.  Left out: the data objects of images already removed
    (see ``_settling``) and other namespaces, where other tests' leftovers
    settle."""
    listed: Dict[str, List[Tuple[str, str]]] = {}
    for pool in POOLS:
        with r.open_ioctx(pool) as io:
            io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
            listed[pool] = sorted((o.nspace, o.key) for o in io.list_objects()
                                  if o.nspace in ('', NAMESPACE))
    settling = _settling(listed)
    state: Dict[Any, Any] = {}
    for pool in POOLS:
        with r.open_ioctx(pool) as io:
            objects = [o for o in listed[pool] if o not in settling]
            # rbd_info: librbd's pool marker, which librbd itself writes the
            # first time it looks at a pool (the EC data pool, on the first
            # prepare that names it), whatever the outcome; not ours.
            state[pool] = [o for o in objects
                           if o[1] not in BOOKKEEPING and o[1] != 'rbd_info']
            for ns in sorted({ns for ns, key in objects if key in BOOKKEEPING}):
                io.set_namespace(ns)
                for obj in BOOKKEEPING:
                    omap = _omap(io, obj)
                    if omap:
                        state[(pool, ns, obj)] = omap
    return state


def _diff(before: Dict[Any, Any], after: Dict[Any, Any]) -> str:
    out = []
    for key in sorted(set(before) | set(after), key=str):
        b, a = before.get(key), after.get(key)
        if b == a:
            continue
        if isinstance(b, list) and isinstance(a, list):
            out.append(f'{key}: +{sorted(set(a) - set(b))} -{sorted(set(b) - set(a))}')
        else:
            out.append(f'{key}: {b!r} -> {a!r}')
    return '; '.join(out)[:3000]


def assert_unchanged(r: rados.Rados, before: Dict[Any, Any], what: str) -> None:
    after = cluster_state(r)
    if after != before:
        # A task may still be releasing objects: look once more.
        time.sleep(0.5)
        after = cluster_state(r)
    assert after == before, f'{what} left something behind: {_diff(before, after)}'


class Baseline:
    """The cluster state between examples, listed once per example: each
    example's 'after' is the next one's 'before'.  After a failure it moves
    on, so that one leftover fails one example, not every later one."""

    def __init__(self, r: rados.Rados, settle: float = 60) -> None:
        """Starts from a state that held still for a second: what earlier
        tests removed without waiting must not count against an example."""
        self.r = r
        self.state = cluster_state(r)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            time.sleep(1)
            now = cluster_state(r)
            if now == self.state:
                break
            self.state = now

    def check(self, what: str) -> None:
        before = self.state
        after = cluster_state(self.r)
        if after != before:
            time.sleep(0.5)
            after = cluster_state(self.r)
        self.state = after
        assert after == before, f'{what} left something behind: {_diff(before, after)}'


def check_error(e: MigrationError, *also_absent: str) -> str:
    message = str(e)
    assert message.strip(), f'{type(e).__name__} with an empty message'
    assert '\n' not in message and '\r' not in message, repr(message)
    assert 'Traceback' not in message, message
    assert SECRET not in message, message
    for text in also_absent:
        assert text not in message, message
    assert isinstance(e.errno, int) and e.errno > 0, (e.errno, message)
    return message


def _wait_task(svc: MigrationService, task_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = svc.queue.get(task_id)
        if task.state not in ACTIVE:
            assert task.state == COMPLETED, task.to_dict()
            return
        time.sleep(0.02)
    raise AssertionError(f'task {task_id} still active after {timeout}s')


def undo(svc: MigrationService, result: Dict[str, Any]) -> None:
    """Abort a prepare that succeeded, and check that the store then holds
    only the completed abort task."""
    text = json.dumps(result)
    assert SECRET not in text, text
    d = result['dest']
    ns = f"{d['namespace']}/" if d['namespace'] else ''
    task = svc.abort(f"{d['pool']}/{ns}{d['name']}").task
    assert task is not None
    _wait_task(svc, task.id)
    store = svc.store
    assert isinstance(store, DictStore)
    left = {k for k in store if not k.startswith('task/') and k != 'task_sequence'}
    assert not left, f'reservations or registrations left: {sorted(left)}'
    assert all(t.state == COMPLETED and t.action == 'abort' for t in svc.queue.list())


# -- The cluster and the files ------------------------------------------------

@pytest.fixture(scope='module')
def handle(cluster: Cluster) -> Iterator[rados.Rados]:
    assert cluster.state
    r = rados.Rados(conffile=cluster.state.conf, name='client.admin')
    r.connect()
    try:
        yield r
    finally:
        r.shutdown()


@pytest.fixture(scope='module')
def world(cluster: Cluster, handle: rados.Rados,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """Small real images under a root (and outside one), over HTTP, and an
    RBD image with a snapshot; everything removed afterwards."""
    assert cluster.state and cluster.state.http_root
    roots = tmp_path_factory.mktemp('hostile-roots')
    outside = tmp_path_factory.mktemp('hostile-outside')
    raw = roots / 'disk.raw'
    with open(raw, 'wb') as f:
        f.truncate(2 << 20)
        for mib in (0, 1):
            f.seek(mib << 20)
            f.write(os.urandom(64 << 10))
    subprocess.run(['qemu-img', 'convert', '-O', 'qcow2', str(raw),
                    str(roots / 'disk.qcow2')], check=True)
    text = outside / 'text.raw'
    text.write_bytes(b'hostile input compresses well. ' * (1 << 15))
    subprocess.run(['qemu-img', 'convert', '-c', '-O', 'qcow2', str(text),
                    str(roots / 'compressed.qcow2')], check=True)
    keyring = cluster.path('mgr.x', 'keyring')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-u', '-b', keyring,
                    '-F', 'raw', str(roots / 'escape.qcow2'), '1M'], check=True)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-u', '-b',
                    '../' + outside.name + '/text.raw', '-F', 'raw',
                    str(roots / 'escape-relative.qcow2'), '1M'], check=True)
    (roots / 'empty.raw').touch()
    (roots / 'subdir').mkdir()
    (roots / 'link-out').symlink_to(keyring)
    (roots / 'link-null').symlink_to('/dev/null')
    (roots / 'link-in').symlink_to(raw)
    (roots / 'link-dotdot').symlink_to('../' + outside.name + '/text.raw')
    os.mkfifo(roots / 'fifo')
    try:
        os.mknod(roots / 'null-device', stat.S_IFCHR | 0o600, os.makedev(1, 3))
        device: Optional[Path] = roots / 'null-device'
    except OSError:
        device = None
    www = Path(cluster.state.http_root) / f'hostile-{uuid.uuid4().hex[:8]}'
    www.mkdir()
    for name in ('disk.raw', 'disk.qcow2', 'compressed.qcow2'):
        shutil.copy(roots / name, www / name)

    rbd_ = ['rbd', '--conf', cluster.state.conf]
    subprocess.run([*rbd_, 'namespace', 'create', f'rbd/{NAMESPACE}'], capture_output=True)
    for leftover in (['snap', 'purge'], ['rm', '--no-progress']):  # of an interrupted run
        subprocess.run([*rbd_, *leftover, f'rbd/{SOURCE_IMAGE}'], capture_output=True)
    subprocess.run([*rbd_, 'create', '--size', '4M', f'rbd/{SOURCE_IMAGE}'], check=True)
    subprocess.run([*rbd_, 'bench', '--io-type', 'write', '--io-total', '1M',
                    '--io-size', '64K', f'rbd/{SOURCE_IMAGE}'], check=True,
                   capture_output=True)
    subprocess.run([*rbd_, 'snap', 'create', f'rbd/{SOURCE_IMAGE}@{SOURCE_SNAP}'],
                   check=True, capture_output=True)
    http = f'http://127.0.0.1:{cluster.state.http_port}'
    try:
        yield {'roots': roots, 'outside': outside, 'keyring': keyring,
               'device': device, 'http': http, 'www': f'{http}/{www.name}',
               'http_port': cluster.state.http_port,
               'mon_port': cluster.state.mon_port}
    finally:
        subprocess.run([*rbd_, 'snap', 'purge', f'rbd/{SOURCE_IMAGE}'], capture_output=True)
        subprocess.run([*rbd_, 'rm', '--no-progress', f'rbd/{SOURCE_IMAGE}'],
                       capture_output=True)
        subprocess.run([*rbd_, 'namespace', 'remove', f'rbd/{NAMESPACE}'], capture_output=True)
        shutil.rmtree(www, ignore_errors=True)


# -- Strategies ----------------------------------------------------------------

def _json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(),
                        st.integers(-2**70, 2**70),
                        st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 - 3, 2**64, 10**40]),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)


HOSTILE_TEXT = st.sampled_from([
    '', ' ', '/', '//', '.', '..', '../..', '\n', '\t', 'a\nb', '\x00', 'a\x00b',
    '\x7f', '\u202e', '\ufeff', '💥', 'é', 'x' * 300, 'y' * 5000, '-', '--x', '@',
    'a@b', '{}', '[]', '"', "'", '\\', '%00', '%2e%2e', '$(id)', '`id`', ';rm',
    'config://', 'config://rbd/hostile/none', 'null', 'true', '0', '-1',
])


def _paths(w: Dict[str, Any]) -> st.SearchStrategy:
    roots, outside = str(w['roots']), str(w['outside'])
    fixed = [
        f'{roots}/disk.raw', f'{roots}/disk.qcow2', f'{roots}/compressed.qcow2',
        f'{roots}/empty.raw', f'{roots}/subdir', f'{roots}/subdir/', f'{roots}/fifo',
        f'{roots}/link-out', f'{roots}/link-in', f'{roots}/link-null',
        f'{roots}/link-dotdot', f'{roots}/escape.qcow2', f'{roots}/escape-relative.qcow2',
        f'{roots}/missing.raw', f'{roots}/../{Path(outside).name}/text.raw',
        f'{roots}/subdir/../disk.raw', f'{roots}/./disk.raw', f'{roots}//disk.raw',
        f'{roots}/disk.raw/', f'{roots}/disk.raw/..', f'{roots}/' + 'z' * 300,
        f'{roots}/' + 'd/' * 2000 + 'x', roots, roots + '/', roots + '-sibling/disk.raw',
        f'{outside}/text.raw', w['keyring'], f'{roots}/../../' + w['keyring'].lstrip('/'),
        '/dev/null', '/dev/zero', '/dev/urandom', '/proc/self/environ', '/etc/passwd',
        '/', '//', '/..', '/../../etc/shadow', 'disk.raw', './disk.raw', '~/disk.raw',
        '', f'{roots}/disk.raw\n', f'{roots}/disk.raw\x00.txt', f'{roots}/ü.raw',
    ]
    if w['device']:
        fixed.append(str(w['device']))
    return st.one_of(st.sampled_from(fixed), HOSTILE_TEXT,
                     st.text(max_size=30).map(lambda t: f'{roots}/{t}'))


def _urls(w: Dict[str, Any], closed_port: bool = True) -> st.SearchStrategy:
    www, port = w['www'], w['http_port']
    fixed = [
        f'{www}/disk.raw', f'{www}/disk.qcow2', f'{www}/compressed.qcow2',
        f'{www}/missing.raw', f'{www}/', f'{www}', f'{www}/../../etc/passwd',
        f'{www}/%2e%2e/%2e%2e/etc/passwd', f'{www}/disk.raw?x=1', f'{www}/disk.raw#frag',
        f'{www}/disk.raw?X-Amz-Signature={SECRET}', f'{www}/private/disk.raw',
        f'http://user:{SECRET}@127.0.0.1:{port}/{Path(www).name}/disk.raw',
        f'http://user:{SECRET}@127.0.0.1:{port}/{Path(www).name}/missing.raw',
        f'http://:{SECRET}@127.0.0.1:{port}/x', f'http://us%40er:{SECRET}%2F@127.0.0.1:{port}/x',
        f'https://127.0.0.1:{port}/{Path(www).name}/disk.raw',   # TLS to a plain port
        f"http://127.0.0.1:{w['mon_port']}/x",                   # not HTTP at all
        f'HTTP://127.0.0.1:{port}/x', f'http:/127.0.0.1:{port}/x', 'http://', 'http:///x',
        'http://[::1', 'http://[zz]:1/x', 'http://127.0.0.1:99999/x', 'http://127.0.0.1:0/x',
        'http://127.0.0.1:-1/x', f'http://127.0.0.1:{port}/a b', f'http://127.0.0.1:{port}/\n',
        'ftp://127.0.0.1/disk.raw', 'file:///etc/passwd', f"file://{w['keyring']}",
        'gopher://127.0.0.1:70/', 'data:text/plain,hello', '//127.0.0.1/x', 'http//x',
        f'http://127.0.0.1:{port}/' + 'u' * 5000, f'http://ü.invalid:{port}/x',
    ]
    if closed_port:
        fixed += ['http://127.0.0.1:9/x.raw', f'http://user:{SECRET}@127.0.0.1:9/x',
                  'http://[::1]:9/x', 'http://127.0.0.1:9/bucket/key']
    return st.one_of(st.sampled_from(fixed), HOSTILE_TEXT)


def _base_specs(w: Dict[str, Any], closed_port: bool = True) -> List[Dict[str, Any]]:
    """Specs that work (but the s3 one, against a closed port unless
    ``closed_port`` is False, and the export ones, whose file is raw)."""
    roots, www = str(w['roots']), w['www']
    creds = f"http://user:{SECRET}@127.0.0.1:{w['http_port']}/{Path(www).name}"
    s3_port = 9 if closed_port else w['http_port']
    return [
        {'type': 'raw', 'stream': {'type': 'file', 'file_path': f'{roots}/disk.raw'}},
        {'type': 'qcow', 'stream': {'type': 'file', 'file_path': f'{roots}/disk.qcow2'}},
        {'type': 'qcow', 'stream': {'type': 'file', 'file_path': f'{roots}/compressed.qcow2'}},
        {'type': 'raw', 'stream': {'type': 'http', 'url': f'{www}/disk.raw'}},
        {'type': 'qcow', 'stream': {'type': 'http', 'url': f'{creds}/disk.qcow2'}},
        {'type': 'raw', 'stream': {'type': 'file', 'file_path': f'{roots}/disk.raw'},
         'snapshots': [{'type': 'raw', 'name': 'first',
                        'stream': {'type': 'file', 'file_path': f'{roots}/link-in'}}],
         'rbd_migration': {'engine': 'adapter'}},
        {'type': 'native', 'pool_name': 'rbd', 'image_name': SOURCE_IMAGE,
         'snap_name': SOURCE_SNAP},
        {'type': 'native', 'pool_id': 1, 'pool_namespace': '', 'image_name': SOURCE_IMAGE,
         'snap_id': 4},
        {'type': 'raw', 'stream': {'type': 's3', 'url': f'http://127.0.0.1:{s3_port}/bucket/key',
                                   'access_key': SECRET, 'secret_key': SECRET}},
        {'type': 'export', 'stream': {'type': 'file', 'file_path': f'{roots}/disk.raw'}},
        {'type': 'export-diff', 'stream': {'type': 'file', 'file_path': f'{roots}/disk.raw'},
         'name': 'base'},
    ]


def _nodes(node: Any, path: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    """Paths of every dict or list inside ``node``, ``node`` first."""
    out = []
    if isinstance(node, (dict, list)):
        out.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            out += _nodes(v, path + (k,))
    return out


def _get(node: Any, path: Tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_spec(draw: Any, w: Dict[str, Any], closed_port: bool = True) -> Any:
    spec = json.loads(json.dumps(draw(st.sampled_from(_base_specs(w, closed_port)))))
    values = {'file_path': _paths(w), 'url': _urls(w, closed_port),
              'type': st.one_of(st.sampled_from(
                  ['raw', 'qcow', 'native', 'export', 'export-diff', 'file', 'http', 's3',
                   'vmdk', 'RAW', 'raw ', '']), HOSTILE_TEXT),
              'pool_id': st.one_of(st.integers(-5, 5), st.sampled_from(
                  [2**63 - 1, 2**63, -2**63, '1', '01', '9' * 30, '', '-1', ' 1', '1.0'])),
              'snap_id': st.one_of(st.integers(-5, 10), st.sampled_from(
                  [2**64 - 3, 2**64 - 2, 2**64, '4', '18446744073709551613', '', 'x'])),
              'engine': st.sampled_from(['auto', 'librbd', 'adapter', 'other', '', 1]),
              # librbd takes names as C strings (this one crashed ceph-mgr)
              'image_name': st.sampled_from([f'{SOURCE_IMAGE}\x00junk', SOURCE_IMAGE + '/x',
                                             'nope', '']),
              'snap_name': st.sampled_from([f'{SOURCE_SNAP}\x00junk', 'nope', ''])}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        nodes = _nodes(spec)
        where = draw(st.sampled_from(nodes))
        target = _get(spec, where)
        op = draw(st.sampled_from(['replace', 'replace', 'delete', 'add', 'whole']))
        if op == 'whole':      # the node itself becomes something else
            if not where:
                spec = draw(_json_values())
                break
            _get(spec, where[:-1])[where[-1]] = draw(_json_values())
            continue
        if isinstance(target, list):
            if op == 'add' or not target:
                target.append(draw(st.one_of(_json_values(), st.sampled_from(
                    [dict(s) for s in _base_specs(w, closed_port)[:2]]))))
            else:
                del target[draw(st.integers(0, len(target) - 1))]
            continue
        if op == 'add' or not target:
            key = draw(st.one_of(st.sampled_from(
                ['file_path', 'url', 'stream', 'snapshots', 'name', 'extra', 'pool_name',
                 'pool_id', 'snap_name', 'snap_id', 'image_id', 'access_key',
                 'secret_key', 'rbd_migration', 'diffs', 'File_path', '']),
                st.text(max_size=6)))
            target[key] = draw(values.get(key, _json_values()))
            continue
        key = draw(st.sampled_from(sorted(target)))
        if op == 'delete':
            del target[key]
        else:
            target[key] = draw(st.one_of(values.get(key, _json_values()), _json_values(),
                                         HOSTILE_TEXT))
    return spec


def spec_text(w: Dict[str, Any], closed_port: bool = True) -> st.SearchStrategy:
    """A source-spec as text: mostly JSON of a mutated spec, sometimes
    mangled, sometimes anything at all."""
    doc = mutated_spec(w, closed_port)
    mangled = st.tuples(doc.map(json.dumps), st.integers(0, 400), st.sampled_from(
        ['', '}', ',', ' trailing', '\x00', '{"type": "raw", "type": "raw"}', 'NaN',
         '\n', ']]]'])).map(lambda t: t[0][:t[1]] + t[2])
    return st.one_of(doc.map(json.dumps), doc.map(json.dumps), doc.map(json.dumps),
                     mangled, st.text(max_size=40),
                     st.sampled_from(['', ' ', 'null', '[]', '"raw"', '1e999', 'NaN',
                                      '[' * 100000, '{"a":' * 50000, '9' * 5000,
                                      '{"type": "raw", "type": "qcow"}',
                                      '{"type": "raw", "stream": {"type": "file", '
                                      '"file_path": "/x", "file_path": "/y"}}']))


def image_specs(fresh_ok: bool = True) -> st.SearchStrategy:
    pools = st.one_of(st.sampled_from(['rbd', 'rbd2', 'ecdata', 'nopool', '.mgr', 'rbd ']),
                      HOSTILE_TEXT)
    namespaces = st.one_of(st.just(''), st.sampled_from([NAMESPACE, 'nons']), HOSTILE_TEXT)
    names = st.one_of(st.sampled_from(FRESH), st.just(SOURCE_IMAGE), HOSTILE_TEXT,
                      st.text(min_size=1, max_size=15),
                      st.sampled_from(['a' * 100, 'a' * 300, 'b' * 5000,
                                       f'{SOURCE_IMAGE}@{SOURCE_SNAP}',
                                       f'{SOURCE_IMAGE}\x00junk', 'rbd_directory',
                                       'rbd_trash', 'rbd_info', 'rbd_migration.x']))

    def join(parts: Tuple[Optional[str], Optional[str], str]) -> str:
        pool, ns, name = parts
        if pool is None:
            return name
        return f'{pool}/{name}' if ns is None else f'{pool}/{ns}/{name}'
    composed = st.tuples(st.one_of(st.none(), pools), st.one_of(st.none(), namespaces),
                         names).map(join)
    return st.one_of(st.none(), HOSTILE_TEXT, composed, composed, composed)


def _mostly_absent(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), st.none(), st.none(), values)


SIZES = _mostly_absent(st.one_of(st.sampled_from(
    ['4K', '8M', '32M', '64M', '1K', '3M', '0', '-1', 'abc', '4096', '4 M', '8MiB',
     '8mb', '1T', '9' * 40, '\n8M', '8M\n', '', '0x1000', '1e6', '512', '1B', '٤K']),
    st.text(max_size=6)))
FEATURES = _mostly_absent(st.one_of(st.sampled_from(
    ['layering', 'layering,exclusive-lock,object-map,fast-diff,deep-flatten',
     'exclusive-lock', 'layering,object-map', 'layering,journaling,exclusive-lock',
     'layering,striping', 'layering,,', ',', '', 'LAYERING', 'layering,bogus',
     'layering, exclusive-lock', 'layering;exclusive-lock']), st.text(max_size=10)))
INTS = _mostly_absent(st.one_of(st.integers(-5, 40), st.sampled_from(
    [2**31, 2**32 + 1, 2**63 - 1, -2**63])))
POOL_NAMES = _mostly_absent(st.one_of(st.sampled_from(
    ['ecdata', 'rbd2', 'rbd', 'nopool', '', ' ', '\x00', 'x' * 300, '.mgr']), HOSTILE_TEXT))


def layouts() -> st.SearchStrategy:
    """Layout options, each mostly absent (so that most examples get past
    Layout.parse and reach the cluster)."""
    return st.fixed_dictionaries({
        'object_size': SIZES, 'order': INTS, 'features': FEATURES,
        'stripe_unit': SIZES, 'stripe_count': INTS, 'data_pool': POOL_NAMES,
        'flatten': st.booleans()})


def quiet_layouts() -> st.SearchStrategy:
    """Layouts that are often absent altogether (imports: so that more
    examples reach the source)."""
    return st.one_of(st.just({}), layouts())


# -- The properties ------------------------------------------------------------

def _attempt(svc: MigrationService, layout_args: Dict[str, Any], source: Optional[str],
             dest: Optional[str], **kwargs: Any) -> Optional[Dict[str, Any]]:
    """prepare, answered as the command answers it; a refusal is checked
    and returns None."""
    try:
        layout = Layout.parse(**layout_args)
        prepared = svc.prepare(source, dest, layout, **kwargs)
    except MigrationError as e:
        check_error(e)
        return None
    return Reports(svc, BatchService(svc)).prepared(prepared)


#: Targets that prepare can create (every prepare that succeeds is aborted).
FRIENDLY_DESTS = ['rbd/hostile-new', 'rbd2/hostile.new-2', f'rbd/{NAMESPACE}/hostile_ü',
                  'hostile-' + 'n' * 90]


def friendly_specs(w: Dict[str, Any], closed_port: bool = True) -> st.SearchStrategy:
    return st.sampled_from([json.dumps(spec) for spec in _base_specs(w, closed_port)])


def test_generated_imports_succeed_or_fail_cleanly(handle: rados.Rados,
                                                   world: Dict[str, Any]) -> None:
    counts = {'ok': 0, 'refused': 0}
    baseline = Baseline(handle)

    @settings(max_examples=examples(quick=300, thorough=3000), **SETTINGS)
    @given(text=st.one_of(friendly_specs(world), spec_text(world)),
           dest=st.one_of(st.sampled_from(FRIENDLY_DESTS), image_specs()),
           second=image_specs(), layout=quiet_layouts(),
           shape=st.sampled_from(['dest', 'dest', 'dest', 'source', 'both', 'not-import']))
    def prop(text: str, dest: Optional[str], second: Optional[str],
             layout: Dict[str, Any], shape: str) -> None:
        svc = _service(handle, world['roots'])
        source, target = {'dest': (None, dest), 'source': (dest, None),
                          'both': (second, dest), 'not-import': (second, dest)}[shape]
        result = _attempt(svc, layout, source, target,
                          import_only=shape != 'not-import', source_spec=text)
        counts['ok' if result else 'refused'] += 1
        if result is not None:
            undo(svc, result)
        else:
            assert not svc.store, \
                f'a refused prepare wrote {sorted(svc.store.get_store_prefix(""))}'
        baseline.check('prepare')

    prop()
    print(f'\nimports: {counts}')
    # The generator does reach success (3% of the examples when last counted).
    assert counts['ok'] >= examples(quick=300, thorough=3000) // 40, counts


def test_generated_cluster_migrations_succeed_or_fail_cleanly(
        handle: rados.Rados, world: Dict[str, Any]) -> None:
    counts = {'ok': 0, 'refused': 0}
    baseline = Baseline(handle)
    sources = st.one_of(st.sampled_from([SOURCE_IMAGE, f'rbd/{SOURCE_IMAGE}']), image_specs())

    @example(source=SOURCE_IMAGE, dest='rbd2/hostile-new', layout={}, spec=None)
    @example(source=f'rbd/{SOURCE_IMAGE}', dest=None, spec=None,
             layout={'object_size': '8M', 'data_pool': 'ecdata', 'flatten': True})
    @settings(max_examples=examples(quick=100, thorough=900), **SETTINGS)
    @given(source=sources, dest=image_specs(), layout=layouts(),
           spec=st.one_of(st.none(), st.none(), st.text(max_size=5)))
    def prop(source: Optional[str], dest: Optional[str], layout: Dict[str, Any],
             spec: Optional[str]) -> None:
        svc = _service(handle, world['roots'])
        result = _attempt(svc, layout, source, dest, source_spec=spec)
        counts['ok' if result else 'refused'] += 1
        if result is not None:
            undo(svc, result)
        else:
            assert not svc.store, \
                f'a refused prepare wrote {sorted(svc.store.get_store_prefix(""))}'
        baseline.check('prepare')

    prop()
    print(f'\nin-cluster: {counts}')
    assert counts['ok'] >= 3, counts


def test_arbitrary_documents_are_refused_cleanly(handle: rados.Rados,
                                                 world: Dict[str, Any]) -> None:
    """Any JSON document, or any text, as the source-spec."""
    @settings(max_examples=examples(quick=200, thorough=1800), **SETTINGS)
    @given(doc=st.one_of(_json_values().map(json.dumps), st.text(max_size=200),
                         st.binary(max_size=60).map(lambda b: b.decode('latin-1'))))
    def prop(doc: str) -> None:
        svc = _service(handle, world['roots'])
        result = _attempt(svc, {}, None, 'rbd/hostile-doc', import_only=True, source_spec=doc)
        assert result is None  # none of these is a spec that can work
        assert not svc.store

    before = cluster_state(handle)
    prop()
    assert_unchanged(handle, before, 'arbitrary source-specs')


#: Inputs that once escaped as something else than one clear line; pinned
#: here because the generators find them only now and then.
#: (label, prepare arguments, layout arguments, what the message must say)
FOUND: List[Tuple[str, Tuple[Optional[str], Optional[str]], Dict[str, Any], str]] = [
    ('long-source-name', (f"rbd/{'b' * 5000}", 'rbd2/hostile-new'), {},
     'file name too long'),
    ('long-source-name-same-dest', (f"rbd/{'b' * 5000}", None), {}, 'file name too long'),
    ('long-import-target', (None, f"rbd/{'c' * 5000}"), {}, 'file name too long'),
    ('newline-in-image-spec', ('a\nb', None), {}, "'a\\nb' is not"),
    ('newline-in-target', (None, 'rbd/a\nb'), {}, "'rbd/a\\nb' is not"),
    ('nul-in-image-spec', (f'rbd/{SOURCE_IMAGE}\x00junk', 'rbd2/hostile-new'), {},
     'is not [pool/[namespace/]]image'),
    ('newline-in-object-size', (SOURCE_IMAGE, 'rbd2/hostile-new'),
     {'object_size': '3M\n'}, "'3M\\n' is not a power of two"),
    ('newline-in-bad-size', (SOURCE_IMAGE, 'rbd2/hostile-new'),
     {'object_size': 'x\ny'}, "'x\\ny' is not a size"),
    ('newline-in-stripe-unit', (SOURCE_IMAGE, 'rbd2/hostile-new'),
     {'object_size': '4K', 'stripe_unit': '\n8M', 'stripe_count': 2},
     'is larger than the object size'),
    ('newline-in-feature', (SOURCE_IMAGE, 'rbd2/hostile-new'),
     {'features': 'layering,a\nb'}, "unknown feature 'a\\nb'"),
    ('newline-in-data-pool', (SOURCE_IMAGE, 'rbd2/hostile-new'),
     {'data_pool': 'no\npool'}, "pool 'no\\npool' does not exist"),
]


@pytest.mark.parametrize('case', [f[0] for f in FOUND])
def test_found_inputs_fail_cleanly(handle: rados.Rados, world: Dict[str, Any],
                                   case: str) -> None:
    _, (source, dest), layout, expected = next(f for f in FOUND if f[0] == case)
    svc = _service(handle, world['roots'])
    before = cluster_state(handle)
    spec = json.dumps(_base_specs(world)[0]) if source is None else None
    with pytest.raises(MigrationError) as e:
        svc.prepare(source, dest, Layout.parse(**layout), import_only=source is None,
                    source_spec=spec)
    assert expected in check_error(e.value)
    assert not svc.store
    assert_unchanged(handle, before, case)


def test_deeply_nested_source_spec_through_the_mgr(cluster: Cluster, handle: rados.Rados,
                                                   world: Dict[str, Any]) -> None:
    """Masking the command's secrets parsed the source-spec once more, and a
    RecursionError there came back to the operator as a mgr traceback."""
    before = mgr_state(handle)
    for text in ('[' * 100000, '{"a":' * 50000, '[' * 2000 + ']' * 2000):
        for dest in ([], ['rbd/hostile-deep']):
            r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', *dest,
                      '-i', '-', inbuf=text)
            assert r.returncode == errno.EINVAL, r.stderr
            check_cli_refusal(r)
    assert mgr_state(handle) == before


# -- Through the real mgr and the ceph CLI ------------------------------------

def _ceph(cluster: Cluster, *args: str, inbuf: Optional[str] = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, inbuf=inbuf, timeout=timeout)


def _mgr_store(r: rados.Rados) -> Dict[str, str]:
    ret, out, err = r.mon_command(json.dumps({'prefix': 'config-key dump',
                                              'key': 'mgr/rbd_migration/'}), b'')
    assert ret == 0, err
    return dict(json.loads(out or b'{}'))


def mgr_state(r: rados.Rados) -> Tuple[Dict[Any, Any], Dict[str, str]]:
    """The cluster's objects and the mgr module's store, less its finished
    tasks; no task may be active."""
    store = _mgr_store(r)
    for key, value in store.items():
        if key.startswith('mgr/rbd_migration/task/'):
            assert json.loads(value)['state'] not in ACTIVE, value
    kept = {k: v for k, v in store.items()
            if not k.startswith('mgr/rbd_migration/task') and 'file_source_roots' not in k}
    return cluster_state(r), kept


def _wait_cli_task(cluster: Cluster, task_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = _ceph(cluster, 'rbd', 'migration', 'task', 'get', task_id)
        if r.returncode != errno.EAGAIN:
            assert r.returncode == 0, r.stderr
            return
        time.sleep(0.2)
    raise AssertionError(f'task {task_id} still active after {timeout}s')


@pytest.fixture(scope='module')
def mgr_roots(cluster: Cluster, world: Dict[str, Any]) -> Iterator[Path]:
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots',
                 str(world['roots']))
    try:
        yield world['roots']
    finally:
        cluster.reset_module_option('file_source_roots')


def _no_nul(s: Optional[str]) -> bool:
    return s is None or '\x00' not in s


def _cli_chars(value: Optional[str]) -> Optional[str]:
    """The ceph CLI takes only printable ASCII in a CephString argument
    (anything else is its own 'Invalid command', never sent to the mgr)."""
    return None if value is None else ''.join(c for c in value if c in string.printable)


def _cli_layout(layout: Dict[str, Any]) -> Dict[str, Any]:
    return {k: _cli_chars(v) if isinstance(v, str) else v for k, v in layout.items()}


def check_cli_refusal(r: subprocess.CompletedProcess, *absent: str) -> str:
    message = r.stderr.strip()
    assert r.returncode > 0, (r.returncode, message)
    assert message, 'a refusal without a message'
    assert 'Traceback' not in r.stderr and 'Traceback' not in r.stdout, r.stderr
    assert 'internal error' not in message, message
    if not message.startswith('Invalid command'):  # the CLI's own usage text
        assert '\n' not in message, message
    for text in (SECRET, *absent):
        assert text not in r.stderr and text not in r.stdout, message
    return message


class MgrBaseline:
    """Like Baseline, with the mgr module's store (less finished tasks)."""

    def __init__(self, r: rados.Rados) -> None:
        self.r = r
        self.state = mgr_state(r)

    def check(self, what: str) -> None:
        before = self.state
        after = mgr_state(self.r)
        if after != before:
            time.sleep(0.5)
            after = mgr_state(self.r)
        self.state = after
        assert after[1] == before[1], f'{what} changed the mgr store: {before[1]} -> {after[1]}'
        assert after[0] == before[0], f'{what} left behind: {_diff(before[0], after[0])}'


def _cli_arg(name: str, value: str) -> List[str]:
    # --name=value keeps a value starting with '-' a value; the CLI refuses
    # '--name=' though, so an empty value goes as a separate word.
    return [f'--{name}', ''] if value == '' else [f'--{name}={value}']


def test_generated_prepares_through_the_mgr(cluster: Cluster, handle: rados.Rados,
                                            world: Dict[str, Any], mgr_roots: Path) -> None:
    counts = {'ok': 0, 'refused': 0, 'cli': 0}
    baseline = MgrBaseline(handle)
    friendly = friendly_specs(world, closed_port=False)
    texts = st.one_of(st.none(), friendly, friendly,
                      spec_text(world, closed_port=False)).filter(_no_nul)
    fresh = st.sampled_from(FRIENDLY_DESTS[:2])
    names = st.one_of(fresh, fresh, image_specs()).map(_cli_chars)

    bases = [json.dumps(spec) for spec in _base_specs(world, closed_port=False)]

    # Examples that succeed, so that every run covers abort through the mgr.
    @example(source=None, dest='rbd/hostile-new', text=bases[0], import_only=True,
             via_inbuf=False, layout={})
    @example(source=None, dest='rbd2/hostile.new-2', text=bases[4], import_only=True,
             via_inbuf=True, layout={'object_size': '8M'})
    @example(source=SOURCE_IMAGE, dest='rbd2/hostile-new', text=None, import_only=False,
             via_inbuf=False, layout={'features': 'layering,exclusive-lock'})
    @settings(max_examples=examples(quick=40, thorough=360), **SETTINGS)
    @given(source=image_specs().map(_cli_chars), dest=names, text=texts,
           import_only=st.sampled_from([True, True, True, False]), via_inbuf=st.booleans(),
           layout=quiet_layouts().map(_cli_layout))
    def prop(source: Optional[str], dest: Optional[str], text: Optional[str],
             import_only: bool, via_inbuf: bool, layout: Dict[str, Any]) -> None:
        args = ['rbd', 'migration', 'prepare', '--format=json']
        if import_only:
            args += ['--import-only', *_cli_arg('dest_image_spec', dest or '')]
        else:
            for name, value in (('source_image_spec', source), ('dest_image_spec', dest)):
                if value is not None:
                    args += _cli_arg(name, value)
        inbuf = None
        if text is not None:
            if (via_inbuf and text) or len(text) > 60000 or _cli_chars(text) != text:
                args += ['-i', '-']
                inbuf = text
            else:
                args += _cli_arg('source_spec', text)
        for name, value in layout.items():
            if name == 'flatten':
                args += ['--flatten'] if value else []
            elif value is not None:
                args += _cli_arg(name, str(value))
        r = _ceph(cluster, *args, inbuf=inbuf)
        if r.returncode != 0:
            message = check_cli_refusal(r)
            counts['cli' if message.startswith('Invalid command') else 'refused'] += 1
        else:
            counts['ok'] += 1
            assert SECRET not in r.stdout
            d = json.loads(r.stdout)['dest']
            ns = f"{d['namespace']}/" if d['namespace'] else ''
            task = cluster.ceph_json('rbd', 'migration', 'abort',
                                     f"{d['pool']}/{ns}{d['name']}")['task']['id']
            _wait_cli_task(cluster, task)
        baseline.check('prepare')

    prop()
    print(f'\nthrough the mgr: {counts}')
    assert counts['ok'] >= 3 and counts['refused'] >= examples(quick=40, thorough=360) // 4, \
        counts


def test_nul_in_a_native_name_is_refused_not_a_mgr_crash(
        cluster: Cluster, handle: rados.Rados, world: Dict[str, Any]) -> None:
    """A JSON \\u0000 in a native image name used to reach librbd, which cut the
    name at the NUL and then crashed ceph-mgr (SIGSEGV in librbd)."""
    before = mgr_state(handle)
    for field in ('image_name', 'snap_name', 'pool_name'):
        spec = {'type': 'native', 'pool_name': 'rbd', 'image_name': SOURCE_IMAGE,
                'snap_name': SOURCE_SNAP}
        spec[field] += '\x00junk'
        r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', 'rbd/hostile-nul',
                  '--source-spec', json.dumps(spec), timeout=60)
        assert r.returncode == errno.EINVAL, r.stderr
        assert f'source-spec: {field}:' in check_cli_refusal(r)
    # An image spec with a NUL: librbd would read 'rbd/img\x00junk' as
    # rbd/img.  (Through the mgr the NUL never arrives: ceph-mgr hands the
    # module the argument cut at the NUL, so only the Python API sees it.)
    svc = _service(handle, world['roots'])
    for source, dest in ((f'rbd/{SOURCE_IMAGE}\x00junk', 'rbd2/hostile-nul'),
                         (f'rbd/{SOURCE_IMAGE}', 'rbd2/x\x00y')):
        with pytest.raises(MigrationError) as e:
            svc.prepare(source, dest, Layout.parse())
        assert 'is not [pool/[namespace/]]image' in check_error(e.value)
    r = _ceph(cluster, 'rbd', 'migration', 'status', timeout=60)
    assert r.returncode == 0, r.stderr
    assert mgr_state(handle) == before


# -- file streams: the mgr reads only under file_source_roots -----------------

def _file_cases(w: Dict[str, Any]) -> List[Tuple[str, str, List[str]]]:
    roots, outside, keyring = str(w['roots']), str(w['outside']), w['keyring']
    depth = '/'.join(['..'] * len(Path(roots).parts[1:]))
    roots_named = ['stream.file_path', 'file_source_roots']
    cases = [
        ('outside', '/etc/hostname', roots_named),
        ('dotdot', f'{roots}/../{Path(outside).name}/text.raw', roots_named),
        ('dotdot-to-keyring', f'{roots}/{depth}{keyring}', roots_named),
        ('symlink-outside', f'{roots}/link-out', roots_named + ['resolves to']),
        ('symlink-dotdot', f'{roots}/link-dotdot', roots_named),
        ('symlink-to-device', f'{roots}/link-null', roots_named),
        ('device', '/dev/null', roots_named),
        ('keyring', keyring, roots_named),
        ('admin-keyring', str(Path(keyring).parent.parent / 'keyring'), roots_named),
        ('proc', '/proc/self/environ', roots_named),
        ('backing-file-keyring', f'{roots}/escape.qcow2', ['file_source_roots']),
        ('backing-file-dotdot', f'{roots}/escape-relative.qcow2', ['file_source_roots']),
        ('sibling-prefix', roots + '-sibling/disk.raw', roots_named),
        ('directory', f'{roots}/subdir', ['stream.file_path', 'directory']),
        ('fifo', f'{roots}/fifo', ['stream.file_path', 'fifo']),
        ('empty', f'{roots}/empty.raw', ['empty']),
        ('relative', 'disk.raw', ['stream.file_path', 'absolute']),
    ]
    if w['device']:
        cases.append(('device-inside-roots', str(w['device']),
                      ['stream.file_path', 'character device']))
    return cases


FILE_CASES = ['outside', 'dotdot', 'dotdot-to-keyring', 'symlink-outside', 'symlink-dotdot',
              'symlink-to-device', 'device', 'keyring', 'admin-keyring', 'proc',
              'backing-file-keyring', 'backing-file-dotdot', 'sibling-prefix', 'directory',
              'fifo', 'empty', 'relative', 'device-inside-roots']


def _keys(cluster: Cluster) -> List[str]:
    """The secrets of the keyrings the cases point at."""
    out = []
    for path in (cluster.path('mgr.x', 'keyring'), cluster.path('keyring')):
        for line in Path(path).read_text().splitlines():
            if line.strip().startswith('key ='):
                out.append(line.split('=', 1)[1].strip())
    return out


@pytest.mark.parametrize('case', FILE_CASES)
def test_file_streams_stay_under_the_roots_via_the_mgr(
        cluster: Cluster, handle: rados.Rados, world: Dict[str, Any], mgr_roots: Path,
        case: str) -> None:
    found = [c for c in _file_cases(world) if c[0] == case]
    if not found:
        pytest.skip('cannot create a device node here')
    _, path, expected = found[0]
    kind = 'qcow' if path.endswith('.qcow2') else 'raw'
    spec = json.dumps({'type': kind, 'stream': {'type': 'file', 'file_path': path}})
    before = mgr_state(handle)
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', 'rbd/hostile-file',
              '--source-spec', spec, timeout=30)
    message = check_cli_refusal(r, *_keys(cluster))
    for phrase in expected:
        assert phrase in message, message
    assert mgr_state(handle) == before


@pytest.mark.parametrize('case', FILE_CASES)
def test_file_streams_stay_under_the_roots_in_process(
        cluster: Cluster, handle: rados.Rados, world: Dict[str, Any], case: str) -> None:
    found = [c for c in _file_cases(world) if c[0] == case]
    if not found:
        pytest.skip('cannot create a device node here')
    _, path, expected = found[0]
    kind = 'qcow' if path.endswith('.qcow2') else 'raw'
    spec = json.dumps({'type': kind, 'stream': {'type': 'file', 'file_path': path}})
    svc = _service(handle, world['roots'], fast=False)
    before = cluster_state(handle)
    with pytest.raises(MigrationError) as e:
        svc.prepare(None, 'rbd/hostile-file', Layout.parse(), import_only=True,
                    source_spec=spec)
    message = check_error(e.value, *_keys(cluster))
    for phrase in expected:
        assert phrase in message, message
    assert not svc.store
    assert_unchanged(handle, before, case)


def test_no_roots_refuses_every_file(handle: rados.Rados, world: Dict[str, Any]) -> None:
    options = dict(DEFAULTS)
    assert options['file_source_roots'] == ''
    for roots in ('', ':', '::'):
        options['file_source_roots'] = roots
        svc = MigrationService(handle, DictStore(), NoEvents(), options.__getitem__)
        with pytest.raises(MigrationError) as e:
            svc.prepare(None, 'rbd/hostile-file', Layout.parse(), import_only=True,
                        source_spec=json.dumps({'type': 'raw', 'stream': {
                            'type': 'file', 'file_path': str(world['roots'] / 'disk.raw')}}))
        assert 'file_source_roots' in check_error(e.value)


def test_closed_port_with_the_real_retries(cluster: Cluster, handle: rados.Rados,
                                           world: Dict[str, Any]) -> None:
    """The service's own context: a few attempts with backoff, then one line."""
    svc = _service(handle, world['roots'], fast=False)
    before = cluster_state(handle)
    for url in ('http://127.0.0.1:9/x.raw', f'http://user:{SECRET}@127.0.0.1:9/x.raw'):
        t0 = time.monotonic()
        with pytest.raises(MigrationError) as e:
            svc.prepare(None, 'rbd/hostile-closed', Layout.parse(), import_only=True,
                        source_spec=json.dumps({'type': 'raw', 'stream': {
                            'type': 'http', 'url': url}}))
        took = time.monotonic() - t0
        message = check_error(e.value)
        assert 'cannot connect to 127.0.0.1:9' in message and 'attempts' in message, message
        assert took < 15, took
    assert not svc.store
    assert_unchanged(handle, before, 'closed port')
