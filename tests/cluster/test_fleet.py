"""Batches on the real cluster: a namespace of images with snapshots and
clones moved to another pool in one plan, checked byte for byte; the dry
run against what happened; scheduling limits observed through task states;
the execute window; a mgr failover in the middle.

Each test works in namespaces of its own (``rbd/<ns>`` to ``rbd2/<ns>``),
so other tests' images are never part of a batch, and removes them at the
end.  Images are small with 16 KiB objects: librbd copies object by object,
so an execute lasts long enough to be seen running without costing memory.
"""
import hashlib
import random
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import rados
import rbd

from qa.cluster import Cluster
from tests.clusterops import ACTIVE, mig, mig_refused, wait_module

MiB = 1 << 20
SIZE = 8 * MiB
ORDER = 14
FEATURES = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
            | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF
            | rbd.RBD_FEATURE_DEEP_FLATTEN)


class Place:
    """A namespace in a pool, or (with ``own_pool``) a pool, created for one
    test and removed after it."""

    def __init__(self, cluster: Cluster, r: rados.Rados, pool: str, ns: str,
                 own_pool: bool = False) -> None:
        self.cluster, self.r, self.own_pool = cluster, r, own_pool
        self.pool, self.ns = pool, '' if own_pool else ns
        if own_pool:
            cluster.ceph('osd', 'pool', 'create', pool, '8')
            cluster.rbd('pool', 'init', pool)
        self.io = r.open_ioctx(pool)
        if self.ns:
            rbd.RBD().namespace_create(self.io, self.ns)
            self.io.set_namespace(self.ns)

    @property
    def spec(self) -> str:
        return f'{self.pool}/{self.ns}' if self.ns else self.pool

    def image(self, name: str) -> str:
        return f'{self.spec}/{name}'

    def names(self) -> List[str]:
        return sorted(e['name'] for e in rbd.RBD().list2(self.io))

    def remove(self) -> List[str]:
        """Remove every image (clones before parents) and the namespace or
        pool; returns what could not be removed."""
        problems: List[str] = []
        for _ in range(4):
            problems = []
            for name in self.names():
                try:
                    with rbd.Image(self.io, name) as img:
                        for snap in list(img.list_snaps()):
                            if img.is_protected_snap(snap['name']):
                                img.unprotect_snap(snap['name'])
                            img.remove_snap(snap['name'])
                    rbd.RBD().remove(self.io, name)
                except rbd.Error as e:
                    problems.append(f'{self.spec}/{name}: {e}')
            if not self.names():
                break
        for entry in list(rbd.RBD().trash_list(self.io)):
            try:
                rbd.RBD().trash_remove(self.io, entry['id'], force=True)
            except rbd.Error as e:
                problems.append(f'{self.spec} trash {entry["name"]}: {e}')
        self.io.close()
        if self.own_pool:
            self.cluster.ceph('osd', 'pool', 'delete', self.pool, self.pool,
                              '--yes-i-really-really-mean-it')
        elif self.ns:
            with self.cluster_io() as io:
                try:
                    rbd.RBD().namespace_remove(io, self.ns)
                except rbd.Error as e:
                    problems.append(f'namespace {self.spec}: {e}')
        return problems

    def cluster_io(self) -> rados.Ioctx:
        return self.r.open_ioctx(self.pool)


def make_places(cluster: Cluster, r: rados.Rados, own_pools: bool) -> Iterator[Tuple[Place, Place]]:
    tag = uuid.uuid4().hex[:8]
    if own_pools:
        src = Place(cluster, r, f'fleet-src-{tag}', '', own_pool=True)
        dst = Place(cluster, r, f'fleet-dst-{tag}', '', own_pool=True)
    else:
        src = Place(cluster, r, 'rbd', f'fleet-{tag}')
        dst = Place(cluster, r, 'rbd2', f'fleet-{tag}')
    try:
        yield src, dst
    finally:
        for batch in mig(cluster, 'batch', 'status')['batches']:
            if (batch['source_pool'], batch['source_namespace']) == (src.pool, src.ns) \
                    and batch['finished'] is None:
                mig(cluster, 'batch', 'cancel', batch['id'])

        def ours(pool: str, ns: str) -> bool:
            return (pool, ns) in ((src.pool, src.ns), (dst.pool, dst.ns))

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:   # what librbd runs ends on its own
            tasks = mig(cluster, 'task', 'list')['tasks']
            if not [t for t in tasks if t['state'] in ACTIVE and ours(t['pool'], t['namespace'])]:
                break
            time.sleep(0.5)
        for m in mig(cluster, 'status')['migrations']:
            if ours(m['dest']['pool'], m['dest']['namespace']):
                task = mig(cluster, 'abort', dst.image(m['dest']['name']))['task']
                wait_ended(cluster, task['id'])
        problems = dst.remove() + src.remove()
        assert not problems, problems


@pytest.fixture
def places(cluster: Cluster, rados_handle: rados.Rados) -> Iterator[Tuple[Place, Place]]:
    """Namespaces of their own in rbd and rbd2."""
    yield from make_places(cluster, rados_handle, own_pools=False)


@pytest.fixture
def pools(cluster: Cluster, rados_handle: rados.Rados) -> Iterator[Tuple[Place, Place]]:
    """Two pools of their own: librbd 16.2 cannot migrate a parent with
    clones out of a namespace."""
    yield from make_places(cluster, rados_handle, own_pools=True)


def wait_ended(cluster: Cluster, task_id: str, timeout: float = 120) -> None:
    r = cluster.task_end(task_id, timeout)
    assert r.returncode in (0, 125), r.stderr


def write_image(io: rados.Ioctx, name: str, seed: int, snaps: int) -> None:
    """Random data at a few places, different before each snapshot."""
    rng = random.Random(seed)
    rbd.RBD().create(io, name, SIZE, order=ORDER, old_format=False, features=FEATURES)
    with rbd.Image(io, name) as img:
        for s in range(snaps + 1):
            for _ in range(3):
                img.write(rng.randbytes(256 << 10), rng.randrange(SIZE // (256 << 10))
                          * (256 << 10))
            if s < snaps:
                img.create_snap(f's{s}')


def fill_whole(io: rados.Ioctx, name: str, seed: int) -> None:
    """Every object written, so librbd has all of them to copy."""
    rng = random.Random(seed)
    with rbd.Image(io, name) as img:
        for off in range(0, SIZE, MiB):
            img.write(rng.randbytes(MiB), off)


def clone(io: rados.Ioctx, parent: str, snap: str, name: str, seed: int) -> None:
    with rbd.Image(io, parent) as img:
        if not img.is_protected_snap(snap):
            img.protect_snap(snap)
    rbd.RBD().clone(io, parent, snap, io, name, features=FEATURES, order=ORDER)
    with rbd.Image(io, name) as img:
        img.write(random.Random(seed).randbytes(512 << 10), MiB)


def digests(io: rados.Ioctx, name: str) -> Dict[str, str]:
    """sha256 of HEAD and every snapshot, read whole (as rbd export does)."""
    out = {}
    with rbd.Image(io, name, read_only=True) as head:
        snaps = [s['name'] for s in head.list_snaps()]
    for snap in [None] + snaps:
        h = hashlib.sha256()
        with rbd.Image(io, name, snapshot=snap, read_only=True) as img:
            size = img.size()
            for off in range(0, size, 4 * MiB):
                h.update(img.read(off, min(4 * MiB, size - off)))
        out[snap or 'HEAD'] = h.hexdigest()
    return out


def parent_of(io: rados.Ioctx, name: str) -> Optional[str]:
    with rbd.Image(io, name, read_only=True) as img:
        try:
            p = img.get_parent_image_spec()
        except rbd.ImageNotFound:
            return None
    ns = f"{p['pool_namespace']}/" if p['pool_namespace'] else ''
    return f"{p['pool_name']}/{ns}{p['image_name']}@{p['snap_name']}"


def watch_batch(cluster: Cluster, batch_id: str, timeout: float,
                on_poll: Callable[[Dict[str, Any], List[Dict[str, Any]]], None]
                = lambda b, t: None) -> Dict[str, Any]:
    """Poll batch status and the task list until the batch ends; ``on_poll``
    sees each pair.  Rides out a mgr restart (the command is refused while
    the module starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cluster.ceph('rbd', 'migration', 'batch', 'status', batch_id, '-f', 'json',
                         check=False, timeout=30)
        t = cluster.ceph('rbd', 'migration', 'task', 'list', '-f', 'json', check=False,
                         timeout=30)
        if r and t:
            import json
            batch, tasks = json.loads(r), json.loads(t)['tasks']
            on_poll(batch, tasks)
            if batch['batch']['finished'] is not None:
                return batch
        time.sleep(0.2)
    raise AssertionError(f'batch {batch_id} did not end within {timeout}s')


def make_fleet(src: Place) -> Tuple[List[str], Dict[str, str]]:
    """Twenty images: plain ones, some with snapshots, two parents with
    protected snapshots and five clones (one a clone of a clone).  Returns
    the names and each clone's parent image."""
    names, parents = [], {}
    for i in range(14):
        name = f'vm-{i:02d}'
        write_image(src.io, name, seed=i, snaps=i % 3)
        if i < 6:
            fill_whole(src.io, name, seed=100 + i)
        names.append(name)
    write_image(src.io, 'base-a', seed=50, snaps=1)
    write_image(src.io, 'base-b', seed=51, snaps=2)
    names += ['base-a', 'base-b']
    for name, parent, snap in [('a-clone-1', 'base-a', 's0'), ('a-clone-2', 'base-a', 's0'),
                               ('b-clone-1', 'base-b', 's1'), ('b-clone-2', 'base-b', 's0')]:
        clone(src.io, parent, snap, name, seed=len(names))
        names.append(name)
        parents[name] = parent
    with rbd.Image(src.io, 'a-clone-1') as img:
        img.create_snap('c0')
    clone(src.io, 'a-clone-1', 'c0', 'a-clone-1-child', seed=77)
    names.append('a-clone-1-child')
    parents['a-clone-1-child'] = 'a-clone-1'
    assert len(names) == 21
    return names, parents


def test_a_pool_moves_in_one_plan(cluster: Cluster, pools: Tuple[Place, Place]) -> None:
    src, dst = pools
    names, parents = make_fleet(src)
    busy_name = 'vm-13'
    before = {n: digests(src.io, n) for n in names}
    start = time.monotonic()

    with rbd.Image(src.io, busy_name):   # a client holds it open
        dry = mig(cluster, 'batch', 'prepare', src.spec, dst.spec, '--dry-run',
                  '--auto-commit', '--verify-before-commit')
        assert dst.names() == [], 'the dry run changed the target'
        assert all(b['source_pool'] != src.pool
                   for b in mig(cluster, 'batch', 'status')['batches'])
        plan = {p['image'].rsplit('/', 1)[1]: p for p in dry['plan']}
        assert sorted(plan) == sorted(names)
        assert plan[busy_name]['action'] == 'skip' and plan[busy_name]['in_use'], plan[busy_name]
        assert dry['to_migrate'] == 20 and dry['to_skip'] == 1
        assert plan['vm-02']['snapshots'] == 2 and plan['vm-02']['size'] == SIZE
        assert plan['base-a']['clones'] == [src.image('a-clone-1'), src.image('a-clone-2')]
        assert plan['base-a']['commit'].startswith('with --force')
        for child, parent in parents.items():
            assert plan[child]['after'] == parent
            assert plan[child]['order'] > plan[parent]['order']
        order = [p['image'].rsplit('/', 1)[1] for p in dry['plan']]

        with cluster.module_option('max_concurrent_tasks', '4'), \
                cluster.module_option('max_concurrent_executes_per_pool', '2'):
            created = mig(cluster, 'batch', 'prepare', src.spec, dst.spec,
                          '--auto-commit', '--verify-before-commit')
            batch_id = created['batch']['id']
            assert [p['image'] for p in created['plan']] == [p['image'] for p in dry['plan']]
            most = [0]
            failed_over = [False]
            done_before_failover = [0]

            def poll(batch: Dict[str, Any], tasks: List[Dict[str, Any]]) -> None:
                heavy = [t for t in tasks if t['state'] == 'running'
                         and t['action'] in ('execute', 'verify') and t['pool'] == dst.pool]
                most[0] = max(most[0], len(heavy))
                done = batch['batch']['counts'].get('done', 0)
                if not failed_over[0] and done >= 5:
                    failed_over[0] = True
                    done_before_failover[0] = done
                    cluster.ceph('mgr', 'fail')
                    wait_module(cluster)

            final = watch_batch(cluster, batch_id, 240, poll)
    elapsed = time.monotonic() - start

    items = {i['name']: i for i in final['items']}
    assert failed_over[0], 'the batch ended before the mgr could fail over'
    assert done_before_failover[0] < 20, 'the failover came after the last image'
    assert most[0] == 2, f'{most[0]} executes/verifies ran at once with a per-pool limit of 2'
    assert items[busy_name]['state'] == 'skipped', items[busy_name]
    not_done = {n: (i['state'], i['reason']) for n, i in items.items()
                if i['state'] != 'done' and n != busy_name}
    assert not not_done, (not_done, cluster.ceph('rbd', 'migration', 'task', 'list'))
    assert [i['name'] for i in final['items']] == order, 'the batch ran another order'
    # Clones started only after their parent was committed.
    for child, parent in parents.items():
        assert items[child]['started'] >= items[parent]['finished'], (items[child],
                                                                       items[parent])
    # Every image is equal, HEAD and snapshots, and the parent links followed.
    assert dst.names() == sorted(set(names) - {busy_name})
    assert src.names() == [busy_name]
    for name in set(names) - {busy_name}:
        assert digests(dst.io, name) == before[name], name
    for child, parent in parents.items():
        link = parent_of(dst.io, child)
        assert link is not None and link.startswith(f'{dst.image(parent)}@'), (child, link)
    health = cluster.ceph_json('health', 'detail').get('checks', {})
    assert dst.pool not in str(health.get('RBD_MIGRATION_FAILED', '')), health
    print(f'\n20 images moved in {elapsed:.1f}s (with one mgr failover)')


def test_execute_window_holds_and_releases(cluster: Cluster,
                                          places: Tuple[Place, Place]) -> None:
    src, dst = places
    names = [f'w-{i}' for i in range(4)]
    for i, name in enumerate(names):
        write_image(src.io, name, seed=200 + i, snaps=1)
        fill_whole(src.io, name, seed=300 + i)
    before = {n: digests(src.io, n) for n in names}
    now = time.gmtime()
    # A window that opened an hour ago and closes in an hour, in UTC, and one
    # that is closed now: two hours from now until three.
    open_now = f'{(now.tm_hour + 23) % 24:02d}:00-{(now.tm_hour + 2) % 24:02d}:00 UTC'
    closed_now = f'{(now.tm_hour + 2) % 24:02d}:00-{(now.tm_hour + 3) % 24:02d}:00 UTC'

    with cluster.module_option('max_concurrent_tasks', '1'), \
            cluster.module_option('execute_window', open_now):
        batch_id = mig(cluster, 'batch', 'prepare', src.spec, dst.spec,
                       '--auto-commit')['batch']['id']
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = mig(cluster, 'batch', 'status', batch_id)['batch']['counts']
            if counts.get('done', 0) >= 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError('no image was done within 60s with the window open')
        with cluster.module_option('execute_window', closed_now):
            time.sleep(3)    # what librbd runs now ends on its own
            held = mig(cluster, 'batch', 'status', batch_id)
            frozen = held['batch']['counts']
            time.sleep(4)
            later = mig(cluster, 'batch', 'status', batch_id)
            tasks = [t for t in mig(cluster, 'task', 'list')['tasks'] if t['namespace'] == src.ns]
            assert later['batch']['counts'] == frozen, (frozen, later['batch']['counts'])
            assert not [t for t in tasks if t['state'] == 'running' and t['action'] == 'execute']
            pending = [i for i in later['items'] if i['state'] == 'pending']
            assert pending, f'every image ended before the window closed: {later}'
            assert all('outside execute_window' in (i['waiting'] or '') for i in pending), \
                [i['waiting'] for i in pending]
            metrics = mig(cluster, 'metrics')
            assert any(b['id'] == batch_id for b in metrics['batches']), metrics
            events = cluster.ceph_json('progress', 'json').get('events', [])
            assert any(f'Migrating batch {batch_id} ' in e.get('message', '')
                       for e in events), f'no progress event for the batch: {events}'
            # Bad option values: the module says what is wrong, nothing starts.
            with cluster.module_option('execute_window', 'tonight'):
                time.sleep(2)
                bad = mig(cluster, 'batch', 'status', batch_id)
                assert bad['batch']['counts'] == frozen
                assert any((i['waiting'] or '').startswith('execute_window: ')
                           for i in bad['items']), bad['items']
        final = watch_batch(cluster, batch_id, 120)
    assert {i['state'] for i in final['items']} == {'done'}
    for name in names:
        assert digests(dst.io, name) == before[name], name


def test_batch_input_is_refused_with_one_line(cluster: Cluster,
                                             places: Tuple[Place, Place]) -> None:
    src, dst = places
    write_image(src.io, 'only', seed=1, snaps=0)
    for args, text in [
            ((src.spec, src.spec), 'dest_pool_spec: the same as the source'),
            ((src.spec, 'nopool'), "dest_pool_spec: pool 'nopool' does not exist"),
            (('rbd/a/b', dst.spec), 'source_pool_spec:'),
            ((src.spec, dst.spec, '--pattern', 'zz*'), 'no image in'),
            # A value of the form <argument>=<value> stays the value it is.
            ((src.spec, dst.spec, '--pattern', 'auto_commit=*'),
             "matches --pattern 'auto_commit=*'"),
            ((src.spec, dst.spec, '--verify-before-commit'), '--verify-before-commit goes with'),
            ((src.spec, dst.spec, '--object-size', '3K'), '--object-size'),
    ]:
        _, err = mig_refused(cluster, 'batch', 'prepare', *args)
        assert text in err, (args, err)
    _, err = mig_refused(cluster, 'batch', 'prepare', src.spec, dst.spec, '-i', '-',
                         inbuf='only\nghost\n')
    assert "image 'ghost'" in err, err
    _, err = mig_refused(cluster, 'batch', 'status', 'b999999')
    assert "batch 'b999999' does not exist" in err
    assert dst.names() == []


def test_parent_with_clones_in_a_namespace_is_skipped(cluster: Cluster,
                                                     places: Tuple[Place, Place]) -> None:
    """librbd 16.2 aborts the process preparing such a migration; the plan
    says so instead of taking the mgr down, and prepare refuses it."""
    src, dst = places
    write_image(src.io, 'base', seed=1, snaps=1)
    clone(src.io, 'base', 's0', 'kid', seed=2)
    dry = mig(cluster, 'batch', 'prepare', src.spec, dst.spec, '--dry-run')
    plan = {p['image']: p for p in dry['plan']}
    assert plan[src.image('base')]['action'] == 'skip', plan
    assert 'crashes migrating a parent out of a namespace' in plan[src.image('base')]['reason']
    assert plan[src.image('kid')]['action'] == 'migrate', plan
    code, err = mig_refused(cluster, 'prepare', src.image('base'), dst.image('base'))
    assert code == 95 and 'flatten its clones' in err, (code, err)
    assert dst.names() == []


def test_an_image_failing_outside_a_task_raises_health_until_acknowledged(
        cluster: Cluster, places: Tuple[Place, Place]) -> None:
    src, dst = places
    for i, name in enumerate(('keep', 'gone')):
        write_image(src.io, name, seed=400 + i, snaps=0)
    keep_before = digests(src.io, 'keep')
    hour = time.gmtime().tm_hour
    closed = f'{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00 UTC'
    with cluster.module_option('execute_window', closed):
        batch_id = mig(cluster, 'batch', 'prepare', src.spec, dst.spec,
                       '--auto-commit')['batch']['id']
        rbd.RBD().remove(src.io, 'gone')        # removed after the plan
    final = watch_batch(cluster, batch_id, 120)
    items = {i['name']: i for i in final['items']}
    assert items['keep']['state'] == 'done', items
    assert items['gone']['state'] == 'failed' and 'does not exist' in items['gone']['reason']
    checks = cluster.health_mentioning(src.image('gone'))
    detail = str(checks.get('RBD_MIGRATION_FAILED'))
    assert f'batch {batch_id}' in detail and 'batch cancel' in detail, checks
    answer = mig(cluster, 'batch', 'cancel', batch_id)
    assert 'no longer reported' in answer['message'], answer
    checks = cluster.health_mentioning(src.image('gone'), present=False)
    assert src.image('gone') not in str(checks.get('RBD_MIGRATION_FAILED')), checks
    assert digests(dst.io, 'keep') == keep_before
    assert dst.names() == ['keep']
