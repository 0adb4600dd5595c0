"""``status`` while tasks run: answered from a listing that the mgr keeps
young in the background, in which the module's own changes show at once,
and which is not read afresh while it is young enough."""
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict, List


from qa.cluster import Cluster


def _rbd(cluster: Cluster, *args: str) -> None:
    assert cluster.state
    subprocess.run(['rbd', '--conf', cluster.state.conf, *args], check=True,
                   capture_output=True, timeout=120)


def _status(cluster: Cluster) -> Dict[str, Any]:
    return dict(cluster.ceph_json('rbd', 'migration', 'status'))


def _listed(status: Dict[str, Any]) -> Dict[str, str]:
    """Listed migrations' target names and states."""
    return {m['dest']['name']: m['state'] for m in status['migrations']}


def _task(cluster: Cluster, *command: str) -> str:
    return str(cluster.ceph_json('rbd', 'migration', *command)['task']['id'])


def test_status_while_a_task_runs(cluster: Cluster, roots: Path) -> None:
    run = uuid.uuid4().hex[:6]
    slow, ours, theirs = f'listing-slow-{run}', f'listing-ours-{run}', f'listing-theirs-{run}'
    path = roots / f'{slow}.raw'
    with open(path, 'wb') as f:
        for _ in range(16):
            f.write(os.urandom(4 << 20))
    spec = {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(path)},
            'rbd_migration': {'engine': 'adapter'}}
    for name in (ours, theirs):
        _rbd(cluster, 'create', '--size', '8M', f'rbd/{name}')
    cleanup: List[List[str]] = []
    with cluster.module_option('adapter_bandwidth_mbps', '1'), \
            cluster.module_option('status_max_age', '600'):
        try:
            cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{slow}',
                         '--source-spec', json.dumps(spec))
            cleanup.append(['abort', f'rbd/{slow}'])
            running = _task(cluster, 'execute', f'rbd/{slow}')
            cluster.task_running(running, past=0.0)
            first = _status(cluster)
            assert first['listed']['age'] >= 0, first

            # A migration prepared through the module shows at once.
            cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{ours}', f'rbd2/{ours}')
            cleanup.append(['abort', f'rbd2/{ours}'])
            assert _listed(_status(cluster)).get(ours) == 'prepared'

            # One prepared with rbd, outside the module, shows once the
            # listing is read again -- not before, while it is young.
            _rbd(cluster, 'migration', 'prepare', f'rbd/{theirs}', f'rbd2/{theirs}')
            cleanup.append(['abort', f'rbd2/{theirs}'])
            cached = _status(cluster)
            assert theirs not in _listed(cached), cached
            with cluster.module_option('status_max_age', '0'):
                assert _listed(_status(cluster)).get(theirs) == 'prepared'

            # A task's change shows as soon as the task is seen to end.
            done = _task(cluster, 'execute', f'rbd2/{ours}')
            assert cluster.task_end(done).returncode == 0
            assert _listed(_status(cluster)).get(ours) == 'executed'
            done = _task(cluster, 'abort', f'rbd2/{ours}')
            assert cluster.task_end(done).returncode == 0
            cleanup.remove(['abort', f'rbd2/{ours}'])
            after = _status(cluster)
            assert ours not in _listed(after) and slow in _listed(after), after
            assert any(t['id'] == running and t['state'] == 'running'
                       for t in after['tasks']), after['tasks']
        finally:
            for action, spec_ in cleanup:
                if spec_.startswith('rbd2/') and theirs in spec_:
                    _rbd(cluster, 'migration', 'abort', spec_)
                    continue
                task = _task(cluster, action, spec_)
                assert cluster.task_end(task).returncode == 0
            for name in (ours, theirs):
                _rbd(cluster, 'rm', '--no-progress', f'rbd/{name}')
