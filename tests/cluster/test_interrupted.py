"""Commits and aborts that librbd stopped half-way.

librbd's commit drops the target's migration header before it removes the
source; its abort removes the target before it restores the source.  A mgr
that fails over in between (``ceph mgr fail`` during a commit or abort task
does it) leaves a source in the trash that ``rbd migration`` no longer finds
and ``rbd trash`` refuses.  Each test builds that state exactly as librbd
leaves it, with rados, then checks that status shows it, that only the
interrupted action may go on, and that running it again finishes the job.
"""
import errno
import json
import os
import random
import struct
import subprocess
import time
import uuid
from typing import Callable, Dict, Tuple

import pytest
import rados
import rbd

from qa.cluster import Cluster
from tests.profile import rounds
from rbd_migration.engine import ondisk
from rbd_migration.engine.librbd import LibrbdEngine
from rbd_migration.engine.migration import ImageRef
from rbd_migration.errors import MigrationError

ROUNDS = rounds(quick=1, thorough=10)


def _migration(cluster: Cluster, execute: bool = True) -> Tuple[str, Dict[str, str]]:
    """A migration rbd/<name> -> rbd2/<name> with a snapshot, executed."""
    name = f'intr-{uuid.uuid4().hex[:8]}'
    cluster.rbd('create', '--size', '64M', f'rbd/{name}')
    for total in ('32M', '16M'):
        cluster.rbd('bench', '--io-type', 'write', '--io-size', '4M', '--io-total', total,
                    '--io-pattern', 'rand', f'rbd/{name}')
        if total == '32M':
            cluster.rbd('snap', 'create', f'rbd/{name}@s1')
    sums = {'s1': cluster.image_sha(f'rbd/{name}@s1'), 'HEAD': cluster.image_sha(f'rbd/{name}')}
    cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
    if execute:
        task = cluster.ceph_json('rbd', 'migration', 'execute', f'rbd2/{name}')['task']
        assert cluster.task_end(str(task['id'])).returncode == 0
    return name, sums


def _ids(cluster: Cluster, name: str) -> Tuple[str, str]:
    """(source id, target id) of the migration of ``name``."""
    mig = cluster.ceph_json('rbd', 'migration', 'status', f'rbd2/{name}')['migrations'][0]
    return mig['source']['id'], mig['dest']['id']


def _remove_target(rados_handle: rados.Rados, name: str, image_id: str) -> None:
    """What librbd's abort has done before it restores the source."""
    with rados_handle.open_ioctx('rbd2') as io:
        for obj in list(io.list_objects()):
            if obj.key == f'rbd_id.{name}' or image_id in obj.key:
                io.remove_object(obj.key)
        with rados.WriteOpCtx() as op:
            io.remove_omap_keys(op, (f'name_{name}', f'id_{image_id}'))
            io.operate_write_op(op, 'rbd_directory')


def _drop_migration_header(rados_handle: rados.Rados, pool: str, image_id: str) -> None:
    """What librbd's commit does to the target before it removes the source."""
    with rados_handle.open_ioctx(pool) as io:
        io.execute(f'rbd_header.{image_id}', 'rbd', 'migration_remove', b'')


def _trash(cluster: Cluster, pool: str) -> str:
    return cluster.rbd('trash', 'ls', '--all', pool)


def _mgr_pid(cluster: Cluster) -> int:
    return cluster.pids()['mgr.x']


def _refused(cluster: Cluster, *command: str) -> str:
    """stderr of a command that must be refused with EBUSY, in one line."""
    assert cluster.state
    r = cluster.run_ceph(*command)
    assert r.returncode == 16, (command, r.returncode, r.stderr)
    assert r.stderr.strip().count('\n') == 0 and 'Traceback' not in r.stderr
    return r.stderr


def _finish(cluster: Cluster, action: str, spec: str, dst_id: str, *flags: str) -> None:
    """Run ``action`` through the module; the migration is gone after it."""
    task = cluster.ceph_json('rbd', 'migration', action, *flags, spec)['task']
    assert cluster.task_end(str(task['id'])).returncode == 0
    assert not [m for m in cluster.ceph_json('rbd', 'migration', 'status')['migrations']
                if m['dest']['id'] == dst_id]


def _assert_kept(cluster: Cluster, kept: str, sums: Dict[str, str]) -> None:
    """``kept`` holds the source's data, and no trash holds anything of it."""
    assert cluster.image_sha(f'{kept}@s1') == sums['s1']
    assert cluster.image_sha(kept) == sums['HEAD']
    features = json.loads(cluster.rbd('info', '--format', 'json', kept))['features']
    assert 'migrating' not in features, f'{kept} still migrating: {features}'
    name = kept.split('/')[-1]
    assert name not in _trash(cluster, 'rbd') + _trash(cluster, 'rbd2')


def test_interrupted_abort_shows_and_finishes(cluster: Cluster,
                                              rados_handle: rados.Rados) -> None:
    name, sums = _migration(cluster)
    src_id, dst_id = _ids(cluster, name)
    _remove_target(rados_handle, name, dst_id)

    listed = [m for m in cluster.ceph_json('rbd', 'migration', 'status')['migrations']
              if m['dest']['id'] == dst_id]
    assert len(listed) == 1 and listed[0]['interrupted'] == 'abort', listed
    assert listed[0]['state_text'].startswith('interrupted: abort stopped')
    for spec in (f'rbd/{name}', f'rbd2/{name}'):
        mig = cluster.ceph_json('rbd', 'migration', 'status', spec)['migrations'][0]
        assert mig['interrupted'] == 'abort' and mig['source']['id'] == src_id, (spec, mig)

    for action in ('commit', 'execute', 'verify'):
        assert 'run abort again' in _refused(cluster, 'rbd', 'migration', action,
                                             f'rbd2/{name}')

    _finish(cluster, 'abort', f'rbd/{name}', dst_id)
    _assert_kept(cluster, f'rbd/{name}', sums)


def test_prepare_stopped_before_the_target_was_whole_is_aborted(
        cluster: Cluster, rados_handle: rados.Rados) -> None:
    """librbd's prepare gives the target its migration header last: a mgr
    that fails over just before leaves the source in the trash, marked
    "preparing", and a target librbd's abort cannot open.  Only abort goes
    on, and it restores the source."""
    name, sums = _migration(cluster, execute=False)
    src_id, dst_id = _ids(cluster, name)
    _drop_migration_header(rados_handle, 'rbd2', dst_id)
    with rados_handle.open_ioctx('rbd') as io:
        io.execute(f'rbd_header.{src_id}', 'rbd', 'migration_set_state',
                   struct.pack('<B', 1) + ondisk.encode_string(''))   # preparing
    with pytest.raises(RuntimeError, match='Invalid argument'):
        cluster.rbd('migration', 'abort', f'rbd2/{name}')   # librbd alone

    for spec in (f'rbd/{name}', f'rbd2/{name}'):
        mig = cluster.ceph_json('rbd', 'migration', 'status', spec)['migrations'][0]
        assert mig['interrupted'] == 'prepare', (spec, mig)
        assert (mig['source']['id'], mig['dest']['id']) == (src_id, dst_id), mig
    listed = [m for m in cluster.ceph_json('rbd', 'migration', 'status')['migrations']
              if m['dest']['id'] == dst_id]
    assert [m['interrupted'] for m in listed] == ['prepare'], listed
    for action in ('commit', 'execute'):
        assert 'run abort' in _refused(cluster, 'rbd', 'migration', action, f'rbd2/{name}')

    _finish(cluster, 'abort', f'rbd2/{name}', dst_id)
    _assert_kept(cluster, f'rbd/{name}', sums)
    assert name not in cluster.rbd('ls', 'rbd2').split()
    with rados_handle.open_ioctx('rbd2') as io:
        _assert_no_objects(io, dst_id)


def test_interrupted_commit_shows_and_finishes(cluster: Cluster,
                                               rados_handle: rados.Rados) -> None:
    name, sums = _migration(cluster)
    src_id, dst_id = _ids(cluster, name)
    _drop_migration_header(rados_handle, 'rbd2', dst_id)
    # This is the state librbd cannot get out of by itself:
    r = cluster.ceph('rbd', 'migration', 'status', f'rbd2/{name}', '--format', 'json')
    assert '"interrupted": "commit"' in r

    mig = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{name}')['migrations'][0]
    assert mig['interrupted'] == 'commit' and mig['dest']['id'] == dst_id
    assert 'run commit again' in _refused(cluster, 'rbd', 'migration', 'abort', f'rbd2/{name}')

    # No verify ran; a commit librbd already began is finished all the same
    # (a batch that verifies before commit asks with --verified).
    _finish(cluster, 'commit', f'rbd2/{name}', dst_id, '--verified')
    _assert_kept(cluster, f'rbd2/{name}', sums)


def test_source_half_removed_does_not_crash_the_mgr(cluster: Cluster,
                                                   rados_handle: rados.Rados) -> None:
    """A commit stopped while librbd was removing the source leaves a trash
    entry without an image header; Pacific's librbd segfaults when asked
    for the migration status of such a name.  The module never asks, and a
    commit retried with the source it recorded removes the leftover."""
    name, sums = _migration(cluster)
    src_id, dst_id = _ids(cluster, name)
    _drop_migration_header(rados_handle, 'rbd2', dst_id)
    with rados_handle.open_ioctx('rbd') as io:
        io.remove_object(f'rbd_header.{src_id}')
    pid = _mgr_pid(cluster)

    cluster.ceph_json('rbd', 'migration', 'status')
    for spec in (f'rbd/{name}', f'rbd2/{name}'):
        cluster.ceph('rbd', 'migration', 'status', spec, check=False)
    cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}-again',
                 check=False)
    assert _mgr_pid(cluster) == pid, 'the mgr restarted'
    assert src_id in _trash(cluster, 'rbd')

    engine = LibrbdEngine(rados_handle)
    with rados_handle.open_ioctx('rbd2') as io:
        dst = ImageRef(io.get_pool_id(), 'rbd2', '', name, dst_id)
    with rados_handle.open_ioctx('rbd') as io:
        src = ImageRef(io.get_pool_id(), 'rbd', '', name, src_id)
    engine.commit(dst, lambda done, total: 0, source=src)
    assert src_id not in _trash(cluster, 'rbd')
    assert cluster.image_sha(f'rbd2/{name}') == sums['HEAD']


#: Runs librbd's commit or abort of rbd2/<name>, printing each progress step.
_FINISHER = '''
import sys, rados, rbd
action, conf, name = sys.argv[1:4]
r = rados.Rados(conffile=conf); r.connect()
io = r.open_ioctx('rbd2')
def step(done, total):
    print(done, total, flush=True)
    return 0
getattr(rbd.RBD(), 'migration_' + action)(io, name, on_progress=step)
print('finished', flush=True)
'''


def _kill_late(cluster: Cluster, action: str, name: str, delay: float) -> None:
    """librbd's ``action`` in a client killed ``delay`` seconds after its
    last progress step: in the 20 ms or so after it librbd removes
    snapshots, headers and directory entries, which no step shows."""
    assert cluster.state
    proc = subprocess.Popen(['/usr/bin/python3', '-c', _FINISHER, action,
                             cluster.state.conf, name],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout
    for line in proc.stdout:
        parts = line.split()  # librbd's last step is total - 1
        if parts[0] == 'finished' or int(parts[0]) >= int(parts[1]) - 1:
            break
    time.sleep(delay)
    proc.kill()
    proc.wait()


def _retrying(step: Callable[[], None], timeout: float = 90) -> None:
    """``step`` retried on a transient error, as the task queue would: the
    killed client's watch keeps its images busy until it expires."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return step()
        except MigrationError as e:
            if not e.transient or time.monotonic() > deadline:
                raise
            time.sleep(3)


def _assert_no_objects(io: rados.Ioctx, image_id: str, timeout: float = 60) -> None:
    """No object of the removed image is left.  A data object cloned for a
    snapshot stays listed until the OSDs trim the removed snapshot, which
    they do in the background and, on memstore, paced as for a disk
    (minutes behind other tests' removals); its head is gone at once, and a
    head is what a leak would leave."""
    def head(key: str) -> bool:
        try:
            io.stat(key)
            return True
        except rados.ObjectNotFound:
            return False   # a whiteout: only snapshot clones wait for trimming

    deadline = time.monotonic() + timeout
    while True:
        left = [o.key for o in io.list_objects() if image_id in o.key and head(o.key)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left


@pytest.mark.parametrize('action', ['abort', 'commit'])
def test_client_killed_while_finishing_then_resumed(cluster: Cluster, rados_handle: rados.Rados,
                                                     action: str) -> None:
    """Whatever point librbd's commit or abort was killed at, running it
    again through the engine ends with exactly the image it should: the
    source restored (abort) or the target alone (commit), equal to the
    source, and nothing left in the trash."""
    engine = LibrbdEngine(rados_handle)
    rng = random.Random(action)
    for _ in range(ROUNDS):
        name, sums = _migration(cluster)
        src_id, dst_id = _ids(cluster, name)
        _kill_late(cluster, action, name, rng.uniform(0, 0.025))
        with rados_handle.open_ioctx('rbd') as io:
            src = ImageRef(io.get_pool_id(), 'rbd', '', name, src_id)
        with rados_handle.open_ioctx('rbd2') as io:
            dst = ImageRef(io.get_pool_id(), 'rbd2', '', name, dst_id)
        if action == 'abort':
            _retrying(lambda: engine.abort(dst, lambda done, total: 0, source=src))
            kept, gone = f'rbd/{name}', f'rbd2/{name}'
        else:
            _retrying(lambda: engine.commit(dst, lambda done, total: 0, source=src))
            kept, gone = f'rbd2/{name}', f'rbd/{name}'
        _assert_kept(cluster, kept, sums)
        assert name not in cluster.rbd('ls', gone.split('/')[0]).split()
        gone_id = dst_id if action == 'abort' else src_id
        with rados_handle.open_ioctx(gone.split('/')[0]) as io:
            _assert_no_objects(io, gone_id)


def _restore_source_partly(rados_handle: rados.Rados, name: str, src_id: str,
                           out_of_trash: bool) -> None:
    """What librbd's abort has done when stopped while restoring the
    source: its id object and directory entry are back, its trash entry is
    still there unless ``out_of_trash``, and its migration header is."""
    with rados_handle.open_ioctx('rbd') as io:
        io.write_full(f'rbd_id.{name}', ondisk.encode_string(src_id))
        io.execute('rbd_directory', 'rbd', 'dir_add_image',
                   ondisk.encode_string(name) + ondisk.encode_string(src_id))
        if out_of_trash:
            io.execute('rbd_trash', 'rbd', 'trash_remove', ondisk.encode_string(src_id))


@pytest.mark.parametrize('out_of_trash', [False, True], ids=['in-trash', 'out-of-trash'])
def test_abort_stopped_while_restoring_the_source_finishes(cluster: Cluster,
                                                           rados_handle: rados.Rados,
                                                           out_of_trash: bool) -> None:
    """The source's name already taken by the source itself is no name
    clash; a source out of the trash but still carrying its migration
    header, which librbd's own abort fails on for good, is found by its
    name and finished."""
    name, sums = _migration(cluster)
    src_id, dst_id = _ids(cluster, name)
    _remove_target(rados_handle, name, dst_id)
    _restore_source_partly(rados_handle, name, src_id, out_of_trash)
    if out_of_trash:
        assert src_id not in _trash(cluster, 'rbd')
        with pytest.raises(RuntimeError, match='No such file'):
            cluster.rbd('migration', 'abort', f'rbd/{name}')  # librbd alone
    mig = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{name}')['migrations'][0]
    assert mig['interrupted'] == 'abort', mig
    assert (mig['source']['id'], mig['dest']['id']) == (src_id, dst_id), mig
    _finish(cluster, 'abort', f'rbd/{name}' if out_of_trash else f'rbd2/{name}', dst_id)
    _assert_kept(cluster, f'rbd/{name}', sums)
    assert name not in cluster.rbd('ls', 'rbd2').split()


def _spread_source(cluster: Cluster, rados_handle: rados.Rados, name: str) -> Dict[str, str]:
    """A source whose removal takes a while: a snapshot and a few hundred
    objects, so that librbd's commit spends a good part of a second
    between committing the target and removing the source."""
    with rados_handle.open_ioctx('rbd') as io:
        rbd.RBD().create(io, name, 1 << 30)
    with rados_handle.open_ioctx('rbd') as io, rbd.Image(io, name) as img:
        for index in range(256):
            img.write(os.urandom(4096), index << 22)
        img.create_snap('s1')
        for index in range(0, 256, 2):
            img.write(os.urandom(4096), (index << 22) + 8192)
    return {'s1': cluster.image_sha(f'rbd/{name}@s1'), 'HEAD': cluster.image_sha(f'rbd/{name}')}


def _fail_over_once_committed(rados_handle: rados.Rados, dst_id: str, src_id: str) -> bool:
    """``mgr fail`` as soon as librbd has committed the target and before
    it removed the source; False if the commit ended unseen in between."""
    with rados_handle.open_ioctx('rbd2') as dst_io, rados_handle.open_ioctx('rbd') as src_io:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ondisk.migration_header(dst_io, dst_id) is None:
                hit = src_id in dict(ondisk.trashed_migration_sources(src_io))
                ret, _, err = rados_handle.mon_command(json.dumps({'prefix': 'mgr fail'}), b'')
                assert ret == 0, err
                return hit
            time.sleep(0.002)
    raise AssertionError('the commit did not reach the target within 60 s')


def test_mgr_failed_over_between_target_and_source_finishes_the_commit(
        cluster: Cluster, rados_handle: rados.Rados) -> None:
    """The failover the state above comes from: the module's commit task,
    cut after librbd committed the target, runs again on the next mgr and
    removes the source."""
    hits = 0
    for round_no in range(rounds(quick=2, thorough=6)):
        name = f'intr-fo-{round_no}-{uuid.uuid4().hex[:6]}'
        sums = _spread_source(cluster, rados_handle, name)
        cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
        task = cluster.ceph_json('rbd', 'migration', 'execute', f'rbd2/{name}')['task']
        assert cluster.task_end(str(task['id'])).returncode == 0
        src_id, dst_id = _ids(cluster, name)
        commit = cluster.ceph_json('rbd', 'migration', 'commit', f'rbd2/{name}')['task']
        hits += _fail_over_once_committed(rados_handle, dst_id, src_id)
        cluster.wait_module()
        end = cluster.task_end(str(commit['id']))
        assert end.returncode == 0 and 'completed' in end.stdout, end.stdout + end.stderr
        assert not [m for m in cluster.ceph_json('rbd', 'migration', 'status')['migrations']
                    if m['dest']['id'] == dst_id]
        _assert_kept(cluster, f'rbd2/{name}', sums)
    assert hits, 'no round failed the mgr over between the target and the source'


def test_execute_run_again_on_an_executed_migration_completes(
        cluster: Cluster, rados_handle: rados.Rados) -> None:
    """A failover between librbd's end of an execute and the task's record
    of it runs the task again: that run completes (librbd alone would
    refuse, EINVAL), and a migration not yet executed is still executed."""
    engine = LibrbdEngine(rados_handle)
    name, sums = _migration(cluster)
    src_id, dst_id = _ids(cluster, name)
    with rados_handle.open_ioctx('rbd2') as io:
        dst = ImageRef(io.get_pool_id(), 'rbd2', '', name, dst_id)
    with pytest.raises(rbd.InvalidArgument):
        with rados_handle.open_ioctx('rbd2') as io:
            rbd.RBD().migration_execute(io, name)
    engine.execute(dst, lambda done, total: 0)
    assert engine.status(dst.spec).state == 'executed'
    _finish(cluster, 'commit', f'rbd2/{name}', dst_id)
    _assert_kept(cluster, f'rbd2/{name}', sums)


class _CommitStopsAfterTheTarget:
    """librbd as it behaves when its commit fails after committing the
    target (the source cannot be removed): the target's migration header
    is dropped, then the call fails."""

    def __init__(self, real: rbd.RBD, rados_handle: rados.Rados, dst_id: str) -> None:
        self.real, self.rados_handle, self.dst_id = real, rados_handle, dst_id

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def migration_commit(self, io: rados.Ioctx, name: str, **kwargs: object) -> None:
        _drop_migration_header(self.rados_handle, 'rbd2', self.dst_id)
        raise rbd.IOError('removing the source failed', errno=5)


def test_commit_that_fails_after_the_target_removes_the_source(
        cluster: Cluster, rados_handle: rados.Rados) -> None:
    """Whatever error librbd's commit ends with once the target is
    committed, the same attempt removes the source: nothing is left half
    done for another attempt (or an operator) to find."""
    engine = LibrbdEngine(rados_handle)
    name, sums = _migration(cluster)
    src_id, dst_id = _ids(cluster, name)
    with rados_handle.open_ioctx('rbd2') as io:
        dst = ImageRef(io.get_pool_id(), 'rbd2', '', name, dst_id)
    with rados_handle.open_ioctx('rbd') as io:
        src = ImageRef(io.get_pool_id(), 'rbd', '', name, src_id)
    engine.rbd = _CommitStopsAfterTheTarget(engine.rbd, rados_handle, dst_id)
    engine.commit(dst, lambda done, total: 0, source=src)
    _assert_kept(cluster, f'rbd2/{name}', sums)
    assert name not in cluster.rbd('ls', 'rbd').split()
    cluster.ceph('rbd', 'migration', 'status')   # and the module lists nothing stale


def test_import_prepare_cut_by_a_failover_leaves_no_target(
        cluster: Cluster, rados_handle: rados.Rados) -> None:
    """librbd's import prepare copies each snapshot onto the target before
    it writes the target's migration header: a failover in between left a
    plain image that no command found and that held the name.  The next
    mgr removes it, and the name can be prepared again."""
    name = f'intr-cut-{uuid.uuid4().hex[:6]}'
    with rados_handle.open_ioctx('rbd') as io:
        rbd.RBD().create(io, name, 8 << 20)
        with rbd.Image(io, name) as img:
            for n in range(24):
                img.create_snap(f's{n}')
    spec = json.dumps({'type': 'native', 'pool_name': 'rbd', 'image_name': name,
                       'snap_name': 's23'})
    assert cluster.state
    subprocess.run(['ceph', '--conf', cluster.state.conf, 'rbd', 'migration', 'prepare',
                    '--import-only', '--source_spec', spec, f'rbd2/{name}'],
                   capture_output=True, timeout=60)
    with rados_handle.open_ioctx('rbd2') as dst_io:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, 'the prepare made no snapshot in 60 s'
            try:
                with rbd.Image(dst_io, name, read_only=True) as img:
                    if len(list(img.list_snaps())) >= 2:
                        break
            except rbd.ImageNotFound:
                pass
            time.sleep(0.05)
        ret, _, err = rados_handle.mon_command(json.dumps({'prefix': 'mgr fail'}), b'')
        assert ret == 0, err
        cluster.wait_module()
        deadline = time.monotonic() + 150
        while name in rbd.RBD().list(dst_io):
            assert time.monotonic() < deadline, f'rbd2/{name} is still there after 150 s'
            time.sleep(1)
    # The sweep drops its note just after it removed the image: wait for
    # both, within the same bound.
    while [k for k in cluster.ceph_json('config-key', 'ls')
           if k.startswith('mgr/rbd_migration/preparing/')]:
        assert time.monotonic() < deadline, 'the prepare note is still there after 150 s'
        time.sleep(0.5)
    r = cluster.run_ceph('rbd', 'migration', 'status', f'rbd2/{name}')
    assert r.returncode == errno.ENOENT, r.stderr
