"""The migration lifecycle through the real ceph-mgr: prepare, execute,
commit, abort, status and tasks, checked byte for byte against what the
``rbd`` CLI and python3-rbd see.

Every test names its images with a fresh suffix and removes whatever it
created (aborting migrations it left behind) even when it fails, so the
shared cluster stays clean.  Images are small (memstore keeps them in RAM);
the ones that must keep an execute busy for a few seconds use 64 or 16 KiB objects,
which makes librbd's deep copy slow per byte without costing memory.
"""
import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest
import rados
import rbd

from qa.cluster import Cluster
from tests.clusterops import ACTIVE, ceph_run, mig, mig_refused, wait_module

MiB = 1 << 20
POOLS = ('rbd', 'rbd2')


# -- running the CLIs ----------------------------------------------------------


def conf(cluster: Cluster) -> str:
    assert cluster.state
    return cluster.state.conf





def rbd_cli(cluster: Cluster, *args: str, timeout: float = 120) -> str:
    r = subprocess.run(['rbd', '--conf', conf(cluster), *args],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f'rbd {" ".join(args)}: {r.stderr.strip()}')
    return r.stdout


def rbd_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(rbd_cli(cluster, *args, '--format', 'json'))


def rbd_ls(cluster: Cluster, pool: str) -> List[str]:
    return sorted(rbd_json(cluster, 'ls', pool))


def trash_ls(cluster: Cluster, pool: str) -> List[Dict[str, Any]]:
    return rbd_json(cluster, 'trash', 'ls', '--all', pool)


def export_sha(cluster: Cluster, spec: str,
               patches: Optional[Dict[int, bytes]] = None) -> str:
    """sha256 of ``rbd export SPEC -``, streamed; ``patches`` (offset ->
    bytes) overlay the stream, to compute what an image should read after
    writes."""
    h = hashlib.sha256()
    pos = 0
    with subprocess.Popen(['rbd', '--conf', conf(cluster), 'export', '--no-progress',
                           spec, '-'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout and proc.stderr
        while True:
            chunk = proc.stdout.read(4 * MiB)
            if not chunk:
                break
            if patches:
                buf = bytearray(chunk)
                for off, data in patches.items():
                    lo, hi = max(off, pos), min(off + len(data), pos + len(buf))
                    if lo < hi:
                        buf[lo - pos:hi - pos] = data[lo - off:hi - off]
                chunk = bytes(buf)
            h.update(chunk)
            pos += len(chunk)
        err = proc.stderr.read().decode(errors='replace')
    assert proc.returncode == 0, f'rbd export {spec}: {err.strip()}'
    return h.hexdigest()


def image_hashes(cluster: Cluster, spec: str, snaps: Sequence[str]) -> Dict[str, str]:
    """sha256 of HEAD and of each snapshot (two exports at a time)."""
    specs = {'HEAD': spec, **{snap: f'{spec}@{snap}' for snap in snaps}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(export_sha, cluster, v) for k, v in specs.items()}
        return {k: f.result() for k, f in futures.items()}


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(4 * MiB), b''):
            h.update(chunk)
    return h.hexdigest()


def fill(cluster: Cluster, spec: str, size: int) -> None:
    """Write every byte of the first ``size`` bytes (rbd bench, sequential)."""
    rbd_cli(cluster, 'bench', '--io-type', 'write', '--io-pattern', 'seq',
            '--io-size', '4M', '--io-total', str(size), spec)


def write_random(io: rados.Ioctx, name: str, extents: Sequence[Tuple[int, int]],
                 seed: int) -> Dict[int, bytes]:
    """Random bytes at each (offset, length) extent; returns what was written."""
    rng = random.Random(seed)
    written = {}
    with rbd.Image(io, name) as img:
        for off, length in extents:
            data = rng.randbytes(length)
            img.write(data, off)
            written[off] = data
    return written


def spread(size: int, count: int, length: int, seed: int) -> List[Tuple[int, int]]:
    """``count`` extents of ``length`` bytes at random 64 KiB-aligned offsets."""
    rng = random.Random(seed)
    slots = (size - length) // (64 << 10)
    return [(rng.randrange(slots) * (64 << 10), length) for _ in range(count)]


# -- migration state -------------------------------------------------------------


def task_of(cluster: Cluster, task_id: str) -> Dict[str, Any]:
    for task in mig(cluster, 'task', 'list')['tasks']:
        if task['id'] == task_id:
            return task
    raise AssertionError(f'task {task_id} is not in task list')


def wait_task(cluster: Cluster, task_id: str, timeout: float = 120) -> Dict[str, Any]:
    """Poll ``task get`` (exit EAGAIN while active) until the task ends;
    return it as ``task list`` shows it.  Rides out a mgr failover."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = ceph_run(cluster, 'rbd', 'migration', 'task', 'get', task_id,
                         '-f', 'json', timeout=30)
        except subprocess.TimeoutExpired:
            r = None
        if r is not None and r.returncode != errno.EAGAIN:
            try:
                task = task_of(cluster, task_id)
            except (AssertionError, subprocess.TimeoutExpired):
                task = None  # the mgr is restarting
            if task is not None and task['state'] not in ACTIVE:
                if task['state'] == 'completed':
                    assert r.returncode == 0, (task, r.stderr)
                else:
                    assert r.returncode != 0, (task, r.stdout)
                return task
        if time.monotonic() > deadline:
            raise AssertionError(f'task {task_id} still not finished after {timeout}s: '
                                 f'{r.stderr.strip() if r else "no answer"}')
        time.sleep(0.3)


def run_task(cluster: Cluster, *args: str, timeout: float = 120) -> Dict[str, Any]:
    """Submit a task command (execute, commit, abort) and wait for it to
    complete."""
    out = mig(cluster, *args)
    assert out['task'] is not None, out
    task = wait_task(cluster, out['task']['id'], timeout)
    assert task['state'] == 'completed', f'{" ".join(args)}: {task}'
    return task


def find_migration(cluster: Cluster, pool: str, name: str) -> Optional[Dict[str, Any]]:
    """The migration in ``status`` (all of them) whose source or target is
    pool/name."""
    for m in mig(cluster, 'status')['migrations']:
        for end in (m['dest'], m['source']):
            if end and end['pool'] == pool and end['name'] == name:
                return m
    return None


def check_status_agrees(cluster: Cluster, spec: str, state: str,
                        source: Optional[str] = None) -> Dict[str, Any]:
    """``status SPEC``, ``status`` of all and ``rbd status SPEC`` say the same."""
    out = mig(cluster, 'status', spec)
    assert len(out['migrations']) == 1, out
    m = out['migrations'][0]
    assert m['state'] == state, m
    assert m['state_text'] == state, m
    librbd = rbd_json(cluster, 'status', spec)['migration']
    assert librbd['state'] == state, librbd
    assert (librbd['dest_pool_name'], librbd['dest_image_name'], librbd['dest_image_id']) \
        == (m['dest']['pool'], m['dest']['name'], m['dest']['id']), (librbd, m)
    if source is not None:
        assert not m['import_only'], m
        assert (librbd['source_pool_name'], librbd['source_image_name'],
                librbd['source_image_id']) \
            == (m['source']['pool'], m['source']['name'], m['source']['id']), (librbd, m)
        assert f"{m['source']['pool']}/{m['source']['name']}" == source, m
        # Named by its source, the migration is the same one.
        by_source = mig(cluster, 'status', source)['migrations']
        assert [x['dest']['id'] for x in by_source] == [m['dest']['id']], by_source
    listed = [x for x in mig(cluster, 'status')['migrations']
              if x['dest']['id'] == m['dest']['id']]
    assert len(listed) == 1 and listed[0]['state'] == state, listed
    return m


def assert_not_migrating(cluster: Cluster, spec: str) -> None:
    pool, name = spec.split('/')
    assert find_migration(cluster, pool, name) is None
    _, err = mig_refused(cluster, 'status', spec)
    assert 'not being migrated' in err, err
    assert 'migration' not in rbd_json(cluster, 'status', spec)


def cluster_state(cluster: Cluster) -> Dict[str, Any]:
    """What a refused command must leave exactly as it was."""
    status = mig(cluster, 'status')
    return {
        'images': {p: rbd_ls(cluster, p) for p in POOLS},
        'trash': {p: sorted((e['id'], e['name']) for e in trash_ls(cluster, p))
                  for p in POOLS},
        'migrations': sorted(json.dumps(m, sort_keys=True) for m in status['migrations']),
        'tasks': sorted((t['id'], t['state']) for t in status['tasks']),
    }


# -- fixtures ------------------------------------------------------------------


class Janitor:
    """Names, creates and, at the end, removes a test's images."""

    def __init__(self, cluster: Cluster, r: rados.Rados) -> None:
        self.cluster = cluster
        self.rados = r
        self.rbd = rbd.RBD()
        self.images: List[Tuple[str, str]] = []
        self.files: List[str] = []

    def ioctx(self, pool: str) -> rados.Ioctx:
        return self.rados.open_ioctx(pool)

    def name(self, pool: str, prefix: str) -> str:
        name = f'lt-{prefix}-{uuid.uuid4().hex[:8]}'
        self.images.append((pool, name))
        return name

    def create(self, pool: str, prefix: str, size: int, **kwargs: Any) -> str:
        name = self.name(pool, prefix)
        with self.ioctx(pool) as io:
            self.rbd.create(io, name, size, **kwargs)
        return name

    def clone(self, parent_pool: str, parent: str, snap: str, pool: str,
              prefix: str) -> str:
        name = self.name(pool, prefix)
        with self.ioctx(parent_pool) as pio, self.ioctx(pool) as io:
            self.rbd.clone(pio, parent, snap, io, name,
                           features=rbd.RBD_FEATURE_LAYERING
                           | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                           | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF
                           | rbd.RBD_FEATURE_DEEP_FLATTEN)
        return name

    def cleanup(self) -> None:
        problems: List[str] = []
        specs = {f'{p}/{n}' for p, n in self.images}
        # Tasks of ours that still run: cancel, then let them end.
        try:
            tasks = mig(self.cluster, 'task', 'list')['tasks']
        except AssertionError as e:
            tasks = []
            problems.append(str(e))
        for task in tasks:
            if task['image_spec'] in specs and task['state'] in ACTIVE:
                ceph_run(self.cluster, 'rbd', 'migration', 'task', 'cancel', task['id'])
                try:
                    wait_task(self.cluster, task['id'], timeout=180)
                except AssertionError as e:
                    problems.append(str(e))
        problems += self._abort_adapter_imports(specs)
        # Migrations left behind: abort them (restores sources, drops targets).
        for pool, name in reversed(self.images):
            with self.ioctx(pool) as io:
                try:
                    self.rbd.migration_status(io, name)
                except rbd.Error:
                    continue
                try:
                    self.rbd.migration_abort(io, name)
                except rbd.Error as e:
                    problems.append(f'aborting the migration of {pool}/{name}: {e}')
        # Images, children before parents: a few passes settle the order.
        left = list(reversed(self.images))
        for _ in range(4):
            failed = []
            for pool, name in left:
                try:
                    self._remove(pool, name)
                except rbd.Error as e:
                    failed.append((pool, name, e))
            left = [(p, n) for p, n, _ in failed]
            if not left:
                break
        problems += [f'removing {p}/{n}: {e}' for p, n, e in failed] if left else []
        mine = set(self.images)
        for pool in POOLS:
            for entry in trash_ls(self.cluster, pool):
                if (pool, entry['name']) in mine:
                    try:
                        rbd_cli(self.cluster, 'trash', 'rm', '--no-progress',
                                f"{pool}/{entry['id']}")
                    except RuntimeError as e:
                        problems.append(str(e))
        for path in self.files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        assert not problems, 'cleanup left things behind: ' + '; '.join(problems)

    def _abort_adapter_imports(self, specs: Set[str]) -> List[str]:
        """Imports of ours the module's reader serves: only the module can
        abort them (librbd knows nothing of them)."""
        r = ceph_run(self.cluster, 'rbd', 'migration', 'status', '-f', 'json')
        if r.returncode != 0:
            return [f'status: {r.stderr.strip()}']
        problems = []
        for m in json.loads(r.stdout)['migrations']:
            spec = f"{m['dest']['pool']}/{m['dest']['name']}"
            if m.get('path') != 'adapter' or spec not in specs:
                continue
            try:
                run_task(self.cluster, 'abort', spec, timeout=180)
            except AssertionError as e:
                problems.append(f'aborting the import into {spec}: {e}')
        return problems

    def _remove(self, pool: str, name: str) -> None:
        with self.ioctx(pool) as io:
            try:
                img = rbd.Image(io, name)
            except rbd.ImageNotFound:
                return
            with img:
                for snap in list(img.list_snaps()):
                    if img.is_protected_snap(snap['name']):
                        img.unprotect_snap(snap['name'])
                    img.remove_snap(snap['name'])
            self.rbd.remove(io, name)


@pytest.fixture
def janitor(cluster: Cluster, rados_handle: rados.Rados) -> Iterator[Janitor]:
    j = Janitor(cluster, rados_handle)
    try:
        yield j
    finally:
        j.cleanup()


def snapshot(io: rados.Ioctx, name: str, snap: str, protect: bool = False) -> None:
    with rbd.Image(io, name) as img:
        img.create_snap(snap)
        if protect:
            img.protect_snap(snap)


# -- in-cluster moves ----------------------------------------------------------


def test_move_between_pools_keeps_every_snapshot(cluster: Cluster, janitor: Janitor) -> None:
    size = 200 * MiB
    a = janitor.create('rbd', 'move-src', size)
    b = janitor.name('rbd2', 'move-dst')
    snaps = ['s1', 's2', 's3']
    with janitor.ioctx('rbd') as io:
        for i, snap in enumerate(snaps):
            # Different extents each time, and offset 0 every time, so each
            # snapshot differs from the last.
            write_random(io, a, [(0, MiB)] + spread(size, 6, 2 * MiB, seed=i), seed=100 + i)
            snapshot(io, a, snap)
        write_random(io, a, [(0, MiB)] + spread(size, 4, 2 * MiB, seed=9), seed=109)
    before = image_hashes(cluster, f'rbd/{a}', snaps)
    assert len(set(before.values())) == 4, 'the snapshots should all differ'

    prepared = mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
    assert prepared['state'] == 'prepared' and prepared['state_text'] == 'prepared', prepared
    assert not prepared['import_only'] and prepared['source_spec'] is None, prepared
    assert (prepared['source']['pool'], prepared['source']['name']) == ('rbd', a), prepared
    assert (prepared['dest']['pool'], prepared['dest']['name']) == ('rbd2', b), prepared
    check_status_agrees(cluster, f'rbd2/{b}', 'prepared', source=f'rbd/{a}')
    assert a not in rbd_ls(cluster, 'rbd') and b in rbd_ls(cluster, 'rbd2')
    assert a in [e['name'] for e in trash_ls(cluster, 'rbd')], 'the source waits in the trash'
    # Live: before any copy, the target already reads as the source.
    assert export_sha(cluster, f'rbd2/{b}') == before['HEAD']

    task = run_task(cluster, 'execute', f'rbd2/{b}')
    assert task['action'] == 'execute' and task['progress'] == 1.0, task
    m = check_status_agrees(cluster, f'rbd2/{b}', 'executed', source=f'rbd/{a}')
    assert m['task']['id'] == task['id'], m

    run_task(cluster, 'commit', f'rbd2/{b}')
    assert a not in rbd_ls(cluster, 'rbd')
    assert a not in [e['name'] for e in trash_ls(cluster, 'rbd')], 'the source stays in the trash'
    assert b in rbd_ls(cluster, 'rbd2')
    assert_not_migrating(cluster, f'rbd2/{b}')
    assert image_hashes(cluster, f'rbd2/{b}', snaps) == before
    assert [s['name'] for s in rbd_json(cluster, 'snap', 'ls', f'rbd2/{b}')] == snaps


@pytest.mark.parametrize('args, expect', [
    (['--object-size', '8M'], {'order': 23, 'object_size': 8 * MiB}),
    (['--stripe-unit', '64K', '--stripe-count', '4'],
     {'stripe_unit': 64 << 10, 'stripe_count': 4}),
    (['--data-pool', 'ecdata'], {'data_pool': 'ecdata'}),
], ids=['object-size', 'striping', 'ec-data-pool'])
def test_layout_change_keeps_the_name(cluster: Cluster, janitor: Janitor,
                                      args: List[str], expect: Dict[str, Any]) -> None:
    size = 64 * MiB
    x = janitor.create('rbd', 'layout', size)
    with janitor.ioctx('rbd') as io:
        write_random(io, x, spread(size, 4, MiB, seed=1), seed=1)
        snapshot(io, x, 'before')
        write_random(io, x, spread(size, 4, MiB, seed=2), seed=2)
    before = image_hashes(cluster, f'rbd/{x}', ['before'])
    old_info = rbd_json(cluster, 'info', f'rbd/{x}')
    for key, value in expect.items():
        assert old_info.get(key) != value, f'the source has {key}={value} already'

    prepared = mig(cluster, 'prepare', f'rbd/{x}', *args)
    assert (prepared['dest']['pool'], prepared['dest']['name']) == ('rbd', x), prepared
    assert (prepared['source']['pool'], prepared['source']['name']) == ('rbd', x), prepared
    assert prepared['dest']['id'] != prepared['source']['id'], prepared
    check_status_agrees(cluster, f'rbd/{x}', 'prepared')
    run_task(cluster, 'execute', f'rbd/{x}')
    check_status_agrees(cluster, f'rbd/{x}', 'executed')
    run_task(cluster, 'commit', f'rbd/{x}')

    info = rbd_json(cluster, 'info', f'rbd/{x}')
    for key, value in expect.items():
        assert info.get(key) == value, f'{key}: {info}'
    assert info['id'] == prepared['dest']['id']
    assert rbd_ls(cluster, 'rbd').count(x) == 1
    assert x not in [e['name'] for e in trash_ls(cluster, 'rbd')]
    assert_not_migrating(cluster, f'rbd/{x}')
    assert image_hashes(cluster, f'rbd/{x}', ['before']) == before


# -- clones and parents --------------------------------------------------------


def make_parent_and_clone(cluster: Cluster, janitor: Janitor) -> Tuple[str, str]:
    size = 64 * MiB
    parent = janitor.create('rbd', 'parent', size)
    with janitor.ioctx('rbd') as io:
        write_random(io, parent, spread(size, 8, MiB, seed=3), seed=3)
        snapshot(io, parent, 'base', protect=True)
        write_random(io, parent, [(0, MiB)], seed=4)  # the parent's HEAD moves on
    child = janitor.clone('rbd', parent, 'base', 'rbd', 'clone')
    with janitor.ioctx('rbd') as io:
        write_random(io, child, spread(size, 3, MiB, seed=5), seed=5)
    return parent, child


@pytest.mark.parametrize('flatten', [False, True], ids=['keep-parent', 'flatten'])
def test_clone_parent_link(cluster: Cluster, janitor: Janitor, flatten: bool) -> None:
    parent, child = make_parent_and_clone(cluster, janitor)
    before = export_sha(cluster, f'rbd/{child}')
    assert rbd_json(cluster, 'info', f'rbd/{child}')['parent']['image'] == parent
    target = janitor.name('rbd2', 'clone-dst')

    mig(cluster, 'prepare', f'rbd/{child}', f'rbd2/{target}',
        *(['--flatten'] if flatten else []))
    check_status_agrees(cluster, f'rbd2/{target}', 'prepared', source=f'rbd/{child}')
    run_task(cluster, 'execute', f'rbd2/{target}')
    check_status_agrees(cluster, f'rbd2/{target}', 'executed', source=f'rbd/{child}')
    run_task(cluster, 'commit', f'rbd2/{target}')

    info = rbd_json(cluster, 'info', f'rbd2/{target}')
    children = rbd_json(cluster, 'children', f'rbd/{parent}@base')
    if flatten:
        assert 'parent' not in info, f'--flatten left a parent: {info}'
        assert children == [], children
    else:
        p = info.get('parent')
        assert p and (p['pool'], p['image'], p['snapshot']) == ('rbd', parent, 'base'), info
        assert [(c['pool'], c['image']) for c in children] == [('rbd2', target)], children
    assert export_sha(cluster, f'rbd2/{target}') == before
    assert child not in rbd_ls(cluster, 'rbd')
    assert_not_migrating(cluster, f'rbd2/{target}')


def test_parent_with_clones_commits_only_with_force(cluster: Cluster,
                                                    janitor: Janitor) -> None:
    parent, child = make_parent_and_clone(cluster, janitor)
    child_before = export_sha(cluster, f'rbd/{child}')
    parent_before = image_hashes(cluster, f'rbd/{parent}', ['base'])
    target = janitor.name('rbd2', 'parent-dst')

    mig(cluster, 'prepare', f'rbd/{parent}', f'rbd2/{target}')
    run_task(cluster, 'execute', f'rbd2/{target}')
    tasks_before = mig(cluster, 'task', 'list')['tasks']

    code, err = mig_refused(cluster, 'commit', f'rbd2/{target}')
    assert code == errno.EBUSY, (code, err)
    assert f'rbd/{child}' in err, f'the refusal should name the clone: {err}'
    assert '--force' in err, err
    assert mig(cluster, 'task', 'list')['tasks'] == tasks_before, 'a refused commit queued a task'
    check_status_agrees(cluster, f'rbd2/{target}', 'executed', source=f'rbd/{parent}')

    run_task(cluster, 'commit', f'rbd2/{target}', '--force')
    assert parent not in rbd_ls(cluster, 'rbd')
    assert parent not in [e['name'] for e in trash_ls(cluster, 'rbd')]
    assert image_hashes(cluster, f'rbd2/{target}', ['base']) == parent_before
    link = rbd_json(cluster, 'info', f'rbd/{child}')['parent']
    assert (link['pool'], link['image'], link['snapshot']) == ('rbd2', target, 'base'), link
    assert export_sha(cluster, f'rbd/{child}') == child_before
    assert_not_migrating(cluster, f'rbd2/{target}')


# -- abort ---------------------------------------------------------------------


@pytest.mark.parametrize('after', ['prepare', 'execute'])
def test_abort_restores_the_source(cluster: Cluster, janitor: Janitor, after: str) -> None:
    size = 64 * MiB
    a = janitor.create('rbd', 'abort-src', size)
    with janitor.ioctx('rbd') as io:
        write_random(io, a, spread(size, 6, MiB, seed=6), seed=6)
        snapshot(io, a, 'snap')
        write_random(io, a, spread(size, 6, MiB, seed=7), seed=7)
    before = image_hashes(cluster, f'rbd/{a}', ['snap'])
    source_id = rbd_json(cluster, 'info', f'rbd/{a}')['id']
    b = janitor.name('rbd2', 'abort-dst')

    mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
    if after == 'execute':
        run_task(cluster, 'execute', f'rbd2/{b}')
        check_status_agrees(cluster, f'rbd2/{b}', 'executed', source=f'rbd/{a}')
    task = run_task(cluster, 'abort', f'rbd2/{b}')
    assert task['action'] == 'abort', task

    assert a in rbd_ls(cluster, 'rbd')
    assert rbd_json(cluster, 'info', f'rbd/{a}')['id'] == source_id
    assert b not in rbd_ls(cluster, 'rbd2')
    for pool in POOLS:
        assert not {a, b} & {e['name'] for e in trash_ls(cluster, pool)}, pool
    assert_not_migrating(cluster, f'rbd/{a}')
    _, err = mig_refused(cluster, 'status', f'rbd2/{b}')
    assert 'does not exist' in err, err
    assert image_hashes(cluster, f'rbd/{a}', ['snap']) == before


# -- import-only from a file ---------------------------------------------------


@pytest.fixture
def source_file(tmp_path: Any) -> Tuple[str, str]:
    """A directory of our own and a raw image file in it (random data)."""
    directory = tmp_path / f'import-{uuid.uuid4().hex[:8]}'
    directory.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(directory, 0o755)
    path = directory / 'disk.raw'
    rng = random.Random(11)
    with open(path, 'wb') as f:
        for _ in range(24):
            f.write(rng.randbytes(MiB))
    return str(directory), str(path)


def check_import_status(cluster: Cluster, spec: str, state: str) -> Dict[str, Any]:
    """``status SPEC`` and ``status`` of all agree on an import the module's
    reader serves; librbd knows nothing of it, and its target stays out of
    ``rbd ls`` until the commit."""
    out = mig(cluster, 'status', spec)
    assert len(out['migrations']) == 1, out
    m = out['migrations'][0]
    assert (m['state'], m['state_text'], m['path']) == (state, state, 'adapter'), m
    listed = [x for x in mig(cluster, 'status')['migrations']
              if x['dest']['id'] == m['dest']['id']]
    assert len(listed) == 1 and listed[0]['state'] == state, listed
    pool, name = spec.split('/')
    assert name not in rbd_ls(cluster, pool)
    return m


def test_import_only_from_a_raw_file(cluster: Cluster, janitor: Janitor,
                                     source_file: Tuple[str, str], tmp_path: Any) -> None:
    directory, path = source_file
    want = file_sha(path)
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'file', 'file_path': path}})
    spec_file = tmp_path / 'spec.json'
    spec_file.write_text(spec)
    inline = janitor.name('rbd', 'import-inline')
    from_file = janitor.name('rbd2', 'import-file')

    with cluster.module_option('file_source_roots', directory):
        for target, how in ((f'rbd/{inline}', ['--source-spec', spec]),
                            (f'rbd2/{from_file}', ['-i', str(spec_file)])):
            prepared = mig(cluster, 'prepare', '--import-only', target, *how)
            assert prepared['import_only'] and prepared['source'] is None, prepared
            assert prepared['state'] == 'prepared', prepared
            assert prepared['source_spec']['type'] == 'raw', prepared
            assert prepared['source_spec']['stream']['file_path'] == path, prepared
            # librbd would open the file again by name at execute; the
            # module's reader keeps the file it checked open.
            assert prepared['path'] == 'adapter', prepared
            assert any('again by name at execute' in r
                       for r in prepared['probe']['reasons']), prepared
            check_import_status(cluster, target, 'prepared')
            run_task(cluster, 'execute', target)
            check_import_status(cluster, target, 'executed')
            run_task(cluster, 'commit', target)
            assert_not_migrating(cluster, target)
            assert rbd_json(cluster, 'info', target)['size'] == os.path.getsize(path)
            assert export_sha(cluster, target) == want, f'{target} differs from {path}'
    assert os.path.exists(path), 'an import must leave its source alone'


def test_import_only_file_refused_without_roots(cluster: Cluster, janitor: Janitor,
                                                source_file: Tuple[str, str]) -> None:
    _, path = source_file
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'file', 'file_path': path}})
    target = janitor.name('rbd', 'import-refused')
    with cluster.module_option('file_source_roots', None):
        before = cluster_state(cluster)
        _, err = mig_refused(cluster, 'prepare', '--import-only', f'rbd/{target}',
                             '--source-spec', spec)
        assert 'file_source_roots' in err, err
        assert cluster_state(cluster) == before
    assert target not in rbd_ls(cluster, 'rbd')


# -- clients and the running copy ----------------------------------------------


def wait_running(cluster: Cluster, task_id: str, min_progress: float = 0.0,
                 timeout: float = 60) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = task_of(cluster, task_id)
        if task['state'] == 'running' and task['progress'] > min_progress:
            return task
        assert task['state'] in ACTIVE, f'task ended before it could be observed: {task}'
        time.sleep(0.1)
    raise AssertionError(f'task {task_id} did not get going in {timeout}s')


def slow_source(cluster: Cluster, janitor: Janitor, prefix: str, size: int,
                snaps: Sequence[str] = (), order: int = 16) -> str:
    """An image with small objects (64 KiB by default), every byte written,
    random data at a few places (different before each snapshot): librbd
    deep-copies object by object, so this takes seconds without costing much
    memory."""
    name = janitor.create('rbd', prefix, size, order=order)
    fill(cluster, f'rbd/{name}', size)
    with janitor.ioctx('rbd') as io:
        for i, snap in enumerate(snaps):
            write_random(io, name, spread(size, 4, MiB, seed=20 + i), seed=20 + i)
            snapshot(io, name, snap)
        write_random(io, name, spread(size, 4, MiB, seed=29), seed=29)
    return name


def test_client_writes_to_the_target_during_execute(cluster: Cluster,
                                                    janitor: Janitor) -> None:
    size = 256 * MiB
    snaps = ['s1', 's2']
    a = slow_source(cluster, janitor, 'live-src', size, snaps)
    b = janitor.name('rbd2', 'live-dst')
    rng = random.Random(31)
    writes = {off: rng.randbytes(64 << 10)
              for off in (5 * MiB + 4096, 128 * MiB, size - (64 << 10))}
    before = image_hashes(cluster, f'rbd/{a}', snaps)
    want_head = export_sha(cluster, f'rbd/{a}', patches=writes)
    assert want_head != before['HEAD']

    mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
    task_id = mig(cluster, 'execute', f'rbd2/{b}')['task']['id']
    wait_running(cluster, task_id)
    with janitor.ioctx('rbd2') as io, rbd.Image(io, b) as img:
        for off, data in writes.items():
            img.write(data, off)
        img.flush()
        for off, data in writes.items():
            assert img.read(off, len(data)) == data
    during = task_of(cluster, task_id)
    assert during['state'] == 'running' and during['progress'] < 1.0, \
        f'the execute ended before the client wrote; make it slower: {during}'
    # While it runs, status and rbd status both say executing.
    m = mig(cluster, 'status', f'rbd2/{b}')['migrations'][0]
    assert m['state'] == 'executing' and m['state_text'].startswith('executing ('), m
    assert m['task']['id'] == task_id, m
    assert rbd_json(cluster, 'status', f'rbd2/{b}')['migration']['state'] == 'executing'

    task = wait_task(cluster, task_id)
    assert task['state'] == 'completed', task
    run_task(cluster, 'commit', f'rbd2/{b}')
    after = image_hashes(cluster, f'rbd2/{b}', snaps)
    assert after['HEAD'] == want_head, 'the client writes are not in HEAD'
    assert {s: after[s] for s in snaps} == {s: before[s] for s in snaps}, \
        'the snapshots changed'


def test_execute_resumes_after_mgr_fail(cluster: Cluster, janitor: Janitor) -> None:
    size = 128 * MiB
    a = slow_source(cluster, janitor, 'failover-src', size, order=14)
    b = janitor.name('rbd2', 'failover-dst')
    before = export_sha(cluster, f'rbd/{a}')
    mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
    epoch = cluster.ceph_json('mgr', 'stat')['epoch']

    task_id = mig(cluster, 'execute', f'rbd2/{b}')['task']['id']
    wait_running(cluster, task_id, min_progress=0.02)
    failed_at = time.time()
    cluster.ceph('mgr', 'fail')
    wait_module(cluster)
    assert cluster.ceph_json('mgr', 'stat')['epoch'] > epoch

    task = wait_task(cluster, task_id, timeout=180)
    assert (task['finished'] or failed_at) >= failed_at, \
        f'the execute ended before the mgr failed; make it slower: {task}'
    assert task['state'] == 'completed', task
    assert task['attempts'] >= 1, task
    assert task['started'] > failed_at, f'the task did not run again after the failover: {task}'
    health = cluster.ceph_json('health', 'detail')
    assert 'MGR_MODULE_ERROR' not in health.get('checks', {}), health
    check_status_agrees(cluster, f'rbd2/{b}', 'executed', source=f'rbd/{a}')
    run_task(cluster, 'commit', f'rbd2/{b}')
    assert export_sha(cluster, f'rbd2/{b}') == before


def test_concurrency_limit_and_progress_events(cluster: Cluster, janitor: Janitor) -> None:
    size = 128 * MiB
    pairs = []
    for i in range(3):
        a = slow_source(cluster, janitor, f'queue{i}-src', size)
        b = janitor.name('rbd2', f'queue{i}-dst')
        mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
        pairs.append((a, b))

    with cluster.module_option('max_concurrent_tasks', '1'):
        submitted = [mig(cluster, 'execute', f'rbd2/{b}')['task'] for _, b in pairs]
        ids = [t['id'] for t in submitted]
        assert len(set(ids)) == 3, ids
        most_running = 0
        saw_queued = any(t['state'] == 'queued' for t in submitted)
        in_progress: set = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tasks = mig(cluster, 'task', 'list')['tasks']
            running = [t for t in tasks if t['state'] == 'running']
            most_running = max(most_running, len(running))
            ours = [t for t in tasks if t['id'] in ids]
            saw_queued |= any(t['state'] == 'queued' for t in ours)
            if not any(t['state'] in ACTIVE for t in ours):
                break
            events = cluster.ceph_json('progress', 'json').get('events', [])
            for _, b in pairs:
                if any(b in e.get('message', '') for e in events):
                    in_progress.add(b)
            time.sleep(0.1)
        else:
            raise AssertionError('the three executes did not finish in 120s')
        if not in_progress:
            # Executes quicker than the polling still left their events,
            # completed, with the image's name.
            done = cluster.ceph_json('progress', 'json').get('completed', [])
            in_progress = {b for _, b in pairs
                           if any(b in e.get('message', '') for e in done)}

    final = {t['id']: t for t in mig(cluster, 'task', 'list')['tasks'] if t['id'] in ids}
    assert all(t['state'] == 'completed' for t in final.values()), final
    assert most_running == 1, f'{most_running} tasks ran at once with max_concurrent_tasks=1'
    assert saw_queued, 'no task was ever seen waiting its turn'
    spans = sorted((t['started'], t['finished']) for t in final.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.05, f'tasks overlapped: {spans}'
    assert in_progress, 'no running execute showed up in ceph progress json'
    for _, b in pairs:
        check_status_agrees(cluster, f'rbd2/{b}', 'executed')


def test_repeat_execute_and_cancel(cluster: Cluster, janitor: Janitor) -> None:
    size = 128 * MiB
    a = slow_source(cluster, janitor, 'cancel-src', size, order=14)
    b = janitor.name('rbd2', 'cancel-dst')
    before = export_sha(cluster, f'rbd/{a}')
    mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')

    first = mig(cluster, 'execute', f'rbd2/{b}')
    again = mig(cluster, 'execute', f'rbd2/{b}')
    task_id = first['task']['id']
    assert again['task']['id'] == task_id, (first, again)
    assert 'already queued' in again['message'], again

    wait_running(cluster, task_id, min_progress=0.02)
    # librbd ignores the progress callback's answer, so its execute runs in
    # a child process the module kills: cancel stops it, and an execute run
    # again completes the copy.
    # (A copy this quick may end before the cancel lands: test_bounded
    # holds one on a slow source for that.)
    assert mig(cluster, 'task', 'cancel', task_id)['task']['id'] == task_id
    if wait_task(cluster, task_id)['state'] == 'cancelled':
        rerun = mig(cluster, 'execute', f'rbd2/{b}')['task']['id']
        assert rerun != task_id
        assert wait_task(cluster, rerun)['state'] == 'completed'
    else:
        assert wait_task(cluster, task_id)['state'] == 'completed'
    check_status_agrees(cluster, f'rbd2/{b}', 'executed', source=f'rbd/{a}')
    run_task(cluster, 'commit', f'rbd2/{b}')
    assert export_sha(cluster, f'rbd2/{b}') == before


def test_cancel_a_queued_execute(cluster: Cluster, janitor: Janitor) -> None:
    """A queued task is cancelled at once; executing again completes it."""
    a = slow_source(cluster, janitor, 'cq-src', 64 * MiB, order=14)
    b = janitor.name('rbd2', 'cq-dst')
    mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/max_concurrent_tasks', '1')
    blocker_src = slow_source(cluster, janitor, 'cq-blk', 128 * MiB, order=14)
    blocker = janitor.name('rbd2', 'cq-blk-dst')
    try:
        mig(cluster, 'prepare', f'rbd/{blocker_src}', f'rbd2/{blocker}')
        first = mig(cluster, 'execute', f'rbd2/{blocker}')['task']['id']
        queued = mig(cluster, 'execute', f'rbd2/{b}')['task']
        assert queued['state'] == 'queued', queued
        assert mig(cluster, 'task', 'cancel', queued['id'])['task']['state'] == 'cancelled'
        assert wait_task(cluster, first)['state'] == 'completed'
        again = mig(cluster, 'execute', f'rbd2/{b}')['task']
        assert again['id'] != queued['id']
        assert wait_task(cluster, again['id'])['state'] == 'completed'
    finally:
        cluster.reset_module_option('max_concurrent_tasks')


# -- bad input -----------------------------------------------------------------


@pytest.fixture(scope='module')
def scene(cluster: Cluster, rados_handle: rados.Rados) -> Iterator[Dict[str, str]]:
    """A plain image, an existing image in rbd2 and a prepared migration."""
    j = Janitor(cluster, rados_handle)
    try:
        plain = j.create('rbd', 'bad-plain', 64 * MiB)
        existing = j.create('rbd2', 'bad-existing', 16 * MiB)
        msrc = j.create('rbd', 'bad-msrc', 64 * MiB)
        with j.ioctx('rbd') as io:
            write_random(io, plain, spread(64 * MiB, 2, MiB, seed=40), seed=40)
            write_random(io, msrc, spread(64 * MiB, 2, MiB, seed=41), seed=41)
        mdst = j.name('rbd2', 'bad-mdst')
        mig(cluster, 'prepare', f'rbd/{msrc}', f'rbd2/{mdst}')
        yield {'plain': f'rbd/{plain}', 'existing': f'rbd2/{existing}',
               'msrc': f'rbd/{msrc}', 'mdst': f'rbd2/{mdst}',
               'new': f'rbd2/lt-bad-new-{uuid.uuid4().hex[:8]}',
               'missing': f'rbd/lt-bad-missing-{uuid.uuid4().hex[:8]}',
               'nopool': f'lt-nopool-{uuid.uuid4().hex[:8]}'}
    finally:
        j.cleanup()


BAD_INPUT: List[Tuple[str, Callable[[Dict[str, str]], List[str]], List[str]]] = [
    ('unknown-image', lambda s: ['prepare', s['missing'], s['new']],
     ['does not exist', '{missing}']),
    ('unknown-source-pool', lambda s: ['prepare', f"{s['nopool']}/img", s['new']],
     ["pool '{nopool}' does not exist"]),
    ('unknown-dest-pool', lambda s: ['prepare', s['plain'], f"{s['nopool']}/img"],
     ["pool '{nopool}' does not exist"]),
    ('unknown-data-pool', lambda s: ['prepare', s['plain'], s['new'],
                                     '--data-pool', s['nopool']],
     ['--data-pool', '{nopool}']),
    ('already-migrating', lambda s: ['prepare', s['msrc'], s['new']],
     ['already being migrated', '{mdst}']),
    ('target-already-migrating', lambda s: ['prepare', s['mdst'], s['new']],
     ['is the target of a migration from']),
    ('target-exists', lambda s: ['prepare', s['plain'], s['existing']],
     ['already exists', '{existing}']),
    ('object-size-3M', lambda s: ['prepare', s['plain'], s['new'], '--object-size', '3M'],
     ['--object-size', 'power of two']),
    ('order-40', lambda s: ['prepare', s['plain'], s['new'], '--order', '40'],
     ['--order', '40']),
    ('stripe-unit-alone', lambda s: ['prepare', s['plain'], s['new'], '--stripe-unit', '64K'],
     ['--stripe-count']),
    ('stripe-count-alone', lambda s: ['prepare', s['plain'], s['new'], '--stripe-count', '4'],
     ['--stripe-unit']),
    ('unknown-feature', lambda s: ['prepare', s['plain'], s['new'],
                                   '--features', 'layering,teleport'],
     ['--features', 'teleport']),
    ('bad-image-spec', lambda s: ['prepare', 'a/b/c/d', s['new']],
     ['source_image_spec', 'a/b/c/d']),
    ('execute-not-migrating', lambda s: ['execute', s['plain']],
     ['not being migrated', '{plain}']),
    ('commit-not-migrating', lambda s: ['commit', s['plain']],
     ['not being migrated']),
    ('abort-not-migrating', lambda s: ['abort', s['plain']],
     ['not being migrated']),
    ('execute-missing-image', lambda s: ['execute', s['missing']],
     ['does not exist']),
    ('commit-before-executed', lambda s: ['commit', s['mdst']],
     ['not executed', 'execute']),
    ('import-invalid-json', lambda s: ['prepare', '--import-only', s['new'],
                                       '--source-spec', '{"type": "raw", "stream": '],
     ['JSON']),
    ('import-unknown-type', lambda s: ['prepare', '--import-only', s['new'], '--source-spec',
                                       json.dumps({'type': 'vmdk', 'stream': {
                                           'type': 'file', 'file_path': '/tmp/x.vmdk'}})],
     ['vmdk']),
    ('import-unknown-stream', lambda s: ['prepare', '--import-only', s['new'], '--source-spec',
                                         json.dumps({'type': 'raw', 'stream': {
                                             'type': 'ftp', 'url': 'ftp://x/y'}})],
     ['ftp']),
    ('import-without-spec', lambda s: ['prepare', '--import-only', s['new']],
     ['--source-spec']),
    ('task-cancel-unknown', lambda s: ['task', 'cancel', '999999'],
     ["'999999' does not exist"]),
    ('task-get-unknown', lambda s: ['task', 'get', '999999'],
     ["'999999' does not exist"]),
]


@pytest.mark.parametrize('args, expect', [(a, e) for _, a, e in BAD_INPUT],
                         ids=[i for i, _, _ in BAD_INPUT])
def test_bad_input_is_refused_and_changes_nothing(
        cluster: Cluster, scene: Dict[str, str],
        args: Callable[[Dict[str, str]], List[str]], expect: List[str]) -> None:
    before = cluster_state(cluster)
    _, err = mig_refused(cluster, *args(scene))
    for text in expect:
        text = text.format(**scene)
        assert text.lower() in err.lower(), f'{text!r} not in {err!r}'
    assert cluster_state(cluster) == before


def test_a_pool_without_the_rbd_application_is_refused(cluster: Cluster,
                                                      scene: Dict[str, str]) -> None:
    """Its images no listing finds: the migration would show under another
    pool's name, and an abort could not find its target.  Taken once
    ``rbd pool init`` ran."""
    pool = f'plain-{uuid.uuid4().hex[:6]}'
    cluster.ceph('osd', 'pool', 'create', pool, '8')
    try:
        before = cluster_state(cluster)
        for args in (['prepare', scene['plain'], f'{pool}/x'],
                     ['prepare', '--import-only', f'{pool}/x', '--source-spec', json.dumps(
                         {'type': 'native', 'pool_name': 'rbd', 'image_name': 'x',
                          'snap_name': 's'})]):
            code, err = mig_refused(cluster, *args)
            assert code == errno.EINVAL, (code, err)
            assert f"pool '{pool}' is not an rbd pool" in err and 'rbd pool init' in err, err
        assert cluster_state(cluster) == before
        # As the error says: the module's client, which read the pool's
        # map before, takes the pool once it is initialized.
        rbd_cli(cluster, 'pool', 'init', pool)
        mig(cluster, 'prepare', scene['plain'], f'{pool}/x')
        run_task(cluster, 'abort', f'{pool}/x')
        after = cluster_state(cluster)
        del after['tasks'], before['tasks']  # the abort's
        assert after == before
    finally:
        cluster.ceph('osd', 'pool', 'rm', pool, pool, '--yes-i-really-really-mean-it')


def test_prepare_refused_while_the_source_is_open(cluster: Cluster, janitor: Janitor,
                                                  rados_handle: rados.Rados) -> None:
    a = janitor.create('rbd', 'open-src', 64 * MiB)
    b = janitor.name('rbd2', 'open-dst')
    with janitor.ioctx('rbd') as io:
        write_random(io, a, [(0, MiB)], seed=50)
        with rbd.Image(io, a) as img:  # read-write: a watcher, as a VM would be
            img.write(b'busy', 0)
            before = cluster_state(cluster)
            code, err = mig_refused(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')
            assert code == errno.EBUSY, (code, err)
            assert f'client.{rados_handle.get_instance_id()}' in err, \
                f'the error should name the watcher: {err}'
            assert cluster_state(cluster) == before
    # With the client gone, the same prepare goes through.
    assert mig(cluster, 'prepare', f'rbd/{a}', f'rbd2/{b}')['state'] == 'prepared'
