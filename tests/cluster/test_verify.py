"""verify: a passed verify proves the target; a difference is named; commit
--verified insists on it; verify before execute completes says so."""
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import rados
import rbd

from qa.cluster import Cluster


def _ceph(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, timeout=120)


def _rbd(cluster: Cluster, *args: str) -> None:
    assert cluster.state
    subprocess.run(['rbd', '--conf', cluster.state.conf, *args], check=True,
                   capture_output=True)


def _task(cluster: Cluster, *command: str) -> str:
    return str(cluster.ceph_json('rbd', 'migration', *command)['task']['id'])


def _image_with_snapshots(cluster: Cluster, name: str) -> None:
    _rbd(cluster, 'create', '--size', '48M', f'rbd/{name}')
    for i, snap in enumerate(('a', 'b')):
        _rbd(cluster, 'bench', '--io-type', 'write', '--io-size', '64K', '--io-total', '8M',
             '--io-pattern', 'rand', f'rbd/{name}')
        _rbd(cluster, 'snap', 'create', f'rbd/{name}@{snap}')
    _rbd(cluster, 'bench', '--io-type', 'write', '--io-size', '64K', '--io-total', '4M',
         '--io-pattern', 'rand', f'rbd/{name}')


def test_in_cluster_verify_passes_then_commit_verified(cluster: Cluster) -> None:
    name = f'ver-{uuid.uuid4().hex[:6]}'
    _image_with_snapshots(cluster, name)
    cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
    try:
        r = _ceph(cluster, 'rbd', 'migration', 'verify', f'rbd2/{name}')
        assert r.returncode == 22 and 'not executed yet' in r.stderr
        r = _ceph(cluster, 'rbd', 'migration', 'commit', '--verified', f'rbd2/{name}')
        assert r.returncode == 22
        assert cluster.task_end(_task(cluster, 'execute', f'rbd2/{name}')).returncode == 0
        r = _ceph(cluster, 'rbd', 'migration', 'commit', '--verified', f'rbd2/{name}')
        assert r.returncode == 22 and 'no passed verify' in r.stderr
        verify = _task(cluster, 'verify', f'rbd2/{name}')
        assert cluster.task_end(verify).returncode == 0
        tasks = cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
        result = next(t for t in tasks if t['id'] == verify)['result']
        assert result['equal'] and [l['name'] for l in result['layers']] == ['a', 'b', 'HEAD']
        assert result['bytes_compared'] > 0
        assert cluster.task_end(_task(cluster, 'commit', '--verified',
                                            f'rbd2/{name}')).returncode == 0
    finally:
        _ceph(cluster, 'rbd', 'migration', 'abort', f'rbd2/{name}')


def test_verify_names_a_difference(cluster: Cluster, tmp_path: Path) -> None:
    """A client write to the live target after execute shows at HEAD only."""
    name = f'ver-diff-{uuid.uuid4().hex[:6]}'
    _image_with_snapshots(cluster, name)
    cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
    try:
        assert cluster.task_end(_task(cluster, 'execute', f'rbd2/{name}')).returncode == 0
        assert cluster.state
        with rados.Rados(conffile=cluster.state.conf) as conn, \
                conn.open_ioctx('rbd2') as io, rbd.Image(io, name) as img:
            img.write(os.urandom(4096), 20 << 20)
        r = cluster.task_end(_task(cluster, 'verify', f'rbd2/{name}'))
        assert r.returncode == 74  # EBADMSG
        line = r.stderr.strip()
        assert '\n' not in line and 'HEAD: differs at 20971520+' in line
        assert "'a'" not in line and 'a: ' not in line
        health = cluster.ceph_json('health', 'detail')  # a failed verify is visible
        deadline = time.monotonic() + 30
        while 'RBD_MIGRATION_FAILED' not in health.get('checks', {}) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
            health = cluster.ceph_json('health', 'detail')
        assert 'RBD_MIGRATION_FAILED' in health['checks']
    finally:
        cluster.task_end(_task(cluster, 'abort', f'rbd2/{name}'))


def test_verify_an_adapter_import(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / 'disk.raw'
    with open(src, 'wb') as f:
        f.truncate(24 << 20)
        f.seek(3 << 20)
        f.write(os.urandom(2 << 20))
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', str(tmp_path))
    name = f'ver-imp-{uuid.uuid4().hex[:6]}'
    try:
        cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                     '--source-spec', json.dumps({
                         'type': 'raw', 'stream': {'type': 'file', 'file_path': str(src)},
                         'rbd_migration': {'engine': 'adapter'}}))
        assert cluster.task_end(_task(cluster, 'execute', f'rbd/{name}')).returncode == 0
        assert cluster.task_end(_task(cluster, 'verify', f'rbd/{name}')).returncode == 0
        assert cluster.task_end(_task(cluster, 'commit', '--verified',
                                            f'rbd/{name}')).returncode == 0
    finally:
        cluster.reset_module_option('file_source_roots')
        subprocess.run(['rbd', '--conf', cluster.state.conf, 'rm', '--no-progress',  # type: ignore
                        f'rbd/{name}'], capture_output=True)
