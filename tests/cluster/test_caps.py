"""Who may do what: a client with read-only mgr caps sees migrations and
tasks (``status``, ``task list``, ``task get``) but every command that
changes something (``prepare``, ``execute``, ``commit``, ``abort``,
``verify``, ``task cancel``) is refused with EACCES and changes nothing; a
client with ``mgr 'allow rw'`` may do them."""
import errno
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from qa.cluster import Cluster

RO, RW = 'client.ro', 'client.rw'
CAPS = {RO: ['mon', 'allow r', 'mgr', 'allow r', 'osd', 'allow r'],
        RW: ['mon', 'allow r', 'mgr', 'allow rw', 'osd', 'allow r']}


def _ceph(cluster: Cluster, *args: str, who: Tuple[str, str] = ('', ''),
          timeout: float = 60) -> subprocess.CompletedProcess:
    assert cluster.state
    name, keyring = who
    auth = ['--name', name, '--keyring', keyring] if name else []
    return cluster.run_ceph(*args, timeout=timeout, auth=auth)


def _state(cluster: Cluster) -> Tuple[Any, ...]:
    """What a refused command must leave as it was (read as client.admin)."""
    assert cluster.state
    rbd = ['rbd', '--conf', cluster.state.conf]
    images = [subprocess.run([*rbd, 'ls', '-l', pool], capture_output=True,
                             text=True).stdout for pool in ('rbd', 'rbd2')]
    trash = [subprocess.run([*rbd, 'trash', 'ls', '--all', pool], capture_output=True,
                            text=True).stdout for pool in ('rbd', 'rbd2')]
    status = cluster.ceph_json('rbd', 'migration', 'status')
    status.pop('listed')  # when the listing was read: differs every time
    return images, trash, status


@pytest.fixture(scope='module')
def clients(cluster: Cluster,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Tuple[str, str]]]:
    d = tmp_path_factory.mktemp('caps')
    out = {}
    try:
        for name, caps in CAPS.items():
            _ceph(cluster, 'auth', 'rm', name)  # leftovers with other caps
            keyring = str(d / f'{name}.keyring')
            cluster.ceph('auth', 'get-or-create', name, *caps, '-o', keyring)
            out[name] = (name, keyring)
        yield out
    finally:
        for name in CAPS:
            _ceph(cluster, 'auth', 'rm', name)


@pytest.fixture(scope='module')
def migration(cluster: Cluster,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, str]]:
    """An import prepared and executed by client.admin, with its task."""
    d = tmp_path_factory.mktemp('caps-images')
    raw = d / 'disk.raw'
    with open(raw, 'wb') as f:
        f.truncate(8 << 20)
        f.write(os.urandom(1 << 20))
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', str(d))
    name = f'rbd/caps-{uuid.uuid4().hex[:8]}'
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'file', 'file_path': str(raw)}})
    try:
        cluster.ceph('rbd', 'migration', 'prepare', '--import-only', name,
                     '--source-spec', spec)
        task = cluster.ceph_json('rbd', 'migration', 'execute', name)['task']['id']
        assert cluster.task_end(task).returncode == 0
        yield {'image': name, 'task': str(task), 'spec': spec, 'dir': str(d)}
    finally:
        r = _ceph(cluster, 'rbd', 'migration', 'abort', name, '-f', 'json')
        if r.returncode == 0:
            cluster.task_end(json.loads(r.stdout)['task']['id'])
        cluster.reset_module_option('file_source_roots')


def test_read_only_client_reads(cluster: Cluster, clients: Dict[str, Tuple[str, str]],
                                migration: Dict[str, str]) -> None:
    ro = clients[RO]
    image, task = migration['image'], migration['task']
    for args in (['status'], ['status', image], ['status', '-f', 'json'], ['task', 'list'],
                 ['task', 'list', '-f', 'json'], ['task', 'get', task]):
        r = _ceph(cluster, 'rbd', 'migration', *args, who=ro)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout.strip(), args
    mine = json.loads(_ceph(cluster, 'rbd', 'migration', 'status', image, '-f', 'json',
                            who=ro).stdout)
    assert mine == cluster.ceph_json('rbd', 'migration', 'status', image)
    got = json.loads(_ceph(cluster, 'rbd', 'migration', 'task', 'get', task, '-f', 'json',
                           who=ro).stdout)
    assert got['task']['id'] == task and got['task']['state'] == 'completed'
    # An unknown task is an answer too, not a permission problem.
    r = _ceph(cluster, 'rbd', 'migration', 'task', 'get', 'no-such-task', who=ro)
    assert r.returncode == errno.ENOENT and 'access denied' not in r.stderr, r.stderr


def _writes(migration: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    image, task = migration['image'], migration['task']
    return [
        ('prepare', ['prepare', 'rbd/caps-src', 'rbd2/caps-dst']),
        ('prepare-import', ['prepare', '--import-only', 'rbd/caps-new', '--source-spec',
                            migration['spec']]),
        ('execute', ['execute', image]),
        ('commit', ['commit', image]),
        ('commit-force', ['commit', image, '--force']),
        ('abort', ['abort', image]),
        ('verify', ['verify', image]),
        ('task-cancel', ['task', 'cancel', task]),
        ('task-cancel-unknown', ['task', 'cancel', 'no-such-task']),
    ]


WRITES = ['prepare', 'prepare-import', 'execute', 'commit', 'commit-force', 'abort',
          'verify', 'task-cancel', 'task-cancel-unknown']


@pytest.mark.parametrize('command', WRITES)
def test_read_only_client_cannot_change_anything(cluster: Cluster,
                                                 clients: Dict[str, Tuple[str, str]],
                                                 migration: Dict[str, str],
                                                 command: str) -> None:
    args = dict(_writes(migration))[command]
    before = _state(cluster)
    r = _ceph(cluster, 'rbd', 'migration', *args, who=clients[RO])
    assert r.returncode == errno.EACCES, (r.returncode, r.stdout, r.stderr)
    assert 'access denied' in r.stderr and 'Traceback' not in r.stderr
    assert r.stdout == ''
    time.sleep(0.3)  # anything queued by mistake would show by now
    assert _state(cluster) == before


def test_read_only_client_cannot_prepare_from_input_file(
        cluster: Cluster, clients: Dict[str, Tuple[str, str]], migration: Dict[str, str],
        tmp_path: Path) -> None:
    spec = tmp_path / 'spec.json'
    spec.write_text(migration['spec'])
    before = _state(cluster)
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', 'rbd/caps-inbuf',
              '-i', str(spec), who=clients[RO])
    assert r.returncode == errno.EACCES, r.stderr
    assert _state(cluster) == before


def test_read_write_client_may_change(cluster: Cluster, clients: Dict[str, Tuple[str, str]],
                                      migration: Dict[str, str]) -> None:
    rw = clients[RW]
    name = f'rbd/caps-rw-{uuid.uuid4().hex[:8]}'
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', name,
              '--source-spec', migration['spec'], '-f', 'json', who=rw)
    assert r.returncode == 0, r.stderr
    try:
        r = _ceph(cluster, 'rbd', 'migration', 'execute', name, '-f', 'json', who=rw)
        assert r.returncode == 0, r.stderr
        task = json.loads(r.stdout)['task']['id']
        r = _ceph(cluster, 'rbd', 'migration', 'task', 'cancel', task, who=rw)
        assert r.returncode == 0, r.stderr   # cancelled, or already done
        cluster.task_end(task)
        r = _ceph(cluster, 'rbd', 'migration', 'status', name, '-f', 'json', who=rw)
        assert r.returncode == 0 and json.loads(r.stdout)['migrations'], r.stderr
    finally:
        r = _ceph(cluster, 'rbd', 'migration', 'abort', name, '-f', 'json', who=rw)
        assert r.returncode == 0, r.stderr
        assert cluster.task_end(json.loads(r.stdout)['task']['id']).returncode == 0
    r = _ceph(cluster, 'rbd', 'migration', 'status', name, who=rw)
    assert r.returncode == errno.ENOENT, (r.returncode, r.stderr)
