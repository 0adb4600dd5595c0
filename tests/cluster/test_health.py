"""Failures are visible and recoverable: a task that fails for good shows in
its state, in ``status`` and as the RBD_MIGRATION_FAILED health warning;
abort clears it and leaves nothing behind."""
import json
import os
import subprocess
import uuid
from pathlib import Path

from qa.cluster import Cluster


def _ceph(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, timeout=60)


def _images(cluster: Cluster) -> str:
    assert cluster.state
    return subprocess.run(['rbd', '--conf', cluster.state.conf, 'ls', 'rbd'],
                          capture_output=True, text=True, check=True).stdout


def _import(cluster: Cluster, path: Path, name: str) -> None:
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'file', 'file_path': str(path)}})
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                 '--source-spec', spec)


def _raw(path: Path, size: int) -> Path:
    with open(path, 'wb') as f:
        for _ in range(size // (4 << 20)):
            f.write(os.urandom(4 << 20))
    return path


def test_failed_task_raises_health_until_abort(cluster: Cluster, roots: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    busy, victim = f'busy-{tag}', f'victim-{tag}'
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/max_concurrent_tasks', '1')
    try:
        _import(cluster, _raw(roots / 'busy.raw', 1 << 30), busy)
        _import(cluster, _raw(roots / 'victim.raw', 8 << 20), victim)
        first = cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/{busy}')['task']
        second = cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/{victim}')['task']
        assert second['state'] == 'queued'
        (roots / 'victim.raw').unlink()  # its source vanishes while it waits
        r = cluster.task_end(second['id'])
        assert r.returncode != 0
        assert r.stderr.strip().count('\n') == 0 and 'Traceback' not in r.stderr
        assert f'rbd/{victim}' in r.stderr and 'failed' in r.stderr

        mig = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{victim}')['migrations'][0]
        assert mig['state_text'].startswith('error: ')
        checks = cluster.health_mentioning(f'rbd/{victim}')
        assert 'RBD_MIGRATION_FAILED' in checks
        detail = ' '.join(d['message'] for d in checks['RBD_MIGRATION_FAILED']['detail'])
        assert f'rbd/{victim}' in detail

        abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/{victim}')['task']
        assert cluster.task_end(abort['id']).returncode == 0
        checks = cluster.health_mentioning(f'rbd/{victim}', present=False)
        assert f'rbd/{victim}' not in json.dumps(checks)
        assert victim not in _images(cluster)
        assert cluster.task_end(first['id']).returncode == 0
    finally:
        cluster.reset_module_option('max_concurrent_tasks')
        # Removing the 1 GiB target takes a while: later tests compare the
        # pool's objects before and after what they do.
        for name in (busy, victim):
            r = _ceph(cluster, 'rbd', 'migration', 'abort', f'rbd/{name}', '--format', 'json')
            if r.returncode == 0:
                cluster.task_end(str(json.loads(r.stdout)['task']['id']))


def test_vanished_source_is_named_and_abort_recovers(cluster: Cluster, roots: Path) -> None:
    """A file source, read by the module's own reader: the execute's task
    fails naming the file, status shows the error, abort clears it."""
    name = f'gone-{uuid.uuid4().hex[:8]}'
    _import(cluster, _raw(roots / 'gone.raw', 8 << 20), name)
    (roots / 'gone.raw').unlink()
    task = cluster.ceph_json('rbd', 'migration', 'execute', f'rbd/{name}')['task']
    r = cluster.task_end(task['id'])
    assert r.returncode != 0
    assert r.stderr.strip().count('\n') == 0 and 'Traceback' not in r.stderr
    assert 'stream.file_path' in r.stderr and str(roots / 'gone.raw') in r.stderr
    assert 'does not exist' in r.stderr
    mig = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{name}')['migrations'][0]
    assert mig['state_text'].startswith('error: '), mig
    abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/{name}')['task']
    assert cluster.task_end(abort['id']).returncode == 0
    assert name not in _images(cluster)
    assert not [m for m in cluster.ceph_json('rbd', 'migration', 'status')['migrations']
                if m['dest']['name'] == name]


def test_vanished_librbd_source_is_named_and_abort_recovers(cluster: Cluster) -> None:
    """A source librbd reads (over HTTP; file sources go to the module's
    reader): librbd cannot open the target any more, which execute names."""
    assert cluster.state and cluster.state.http_root
    name = f'gone-{uuid.uuid4().hex[:8]}'
    served = _raw(Path(cluster.state.http_root) / f'{name}.raw', 8 << 20)
    try:
        spec = json.dumps({'type': 'raw', 'stream': {
            'type': 'http', 'url': f'http://127.0.0.1:{cluster.state.http_port}/{served.name}'}})
        prepared = cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only',
                                     f'rbd/{name}', '--source-spec', spec)
        assert prepared['path'] == 'librbd', prepared
    finally:
        served.unlink()
    r = _ceph(cluster, 'rbd', 'migration', 'execute', f'rbd/{name}')
    assert r.returncode != 0
    assert r.stderr.strip().count('\n') == 0
    assert 'cannot open the migration source' in r.stderr and 'abort' in r.stderr
    # Of this image: a listing of all may answer from before the execute
    # when a busy cluster takes longer than command_wait to list.
    status = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{name}')
    ours = [m for m in status['migrations'] if m['dest']['name'] == name]
    assert ours and ours[0]['state'] == 'error'
    abort = cluster.ceph_json('rbd', 'migration', 'abort', f'rbd/{name}')['task']
    assert cluster.task_end(abort['id']).returncode == 0
    assert name not in _images(cluster)
