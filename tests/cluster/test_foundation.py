"""The module runs inside the real ceph-mgr."""
import json
import os
import subprocess
import time

from qa.cluster import Cluster


def test_module_enabled_and_healthy(cluster: Cluster) -> None:
    modules = cluster.ceph_json('mgr', 'module', 'ls')
    assert 'rbd_migration' in modules['enabled_modules']
    health = cluster.ceph_json('health', 'detail')
    assert 'MGR_MODULE_ERROR' not in health.get('checks', {}), health


def test_status_json_and_plain(cluster: Cluster) -> None:
    out = cluster.ceph_json('rbd', 'migration', 'status')
    assert isinstance(out['migrations'], list)
    assert isinstance(out['tasks'], list)
    plain = cluster.ceph('rbd', 'migration', 'status')
    assert plain.strip()


def test_options_declared(cluster: Cluster) -> None:
    out = cluster.ceph('config', 'help', 'mgr/rbd_migration/max_concurrent_tasks')
    assert 'max_concurrent_tasks' in out


def test_survives_mgr_fail(cluster: Cluster) -> None:
    before = cluster.ceph_json('mgr', 'stat')['epoch']
    cluster.ceph('mgr', 'fail')
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if cluster.ceph_json('mgr', 'stat')['epoch'] > before:
                json.loads(cluster.ceph('rbd', 'migration', 'status', '-f',
                                        'json', timeout=10))
                break
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            pass
        time.sleep(0.5)
    else:
        raise AssertionError('the module did not answer after mgr fail')
    assert 'rbd_migration' in cluster.ceph_json('mgr', 'module', 'ls')['enabled_modules']


def test_second_cluster_side_by_side(cluster: Cluster, tmp_path) -> None:
    """A second cluster starts, answers and stops without touching ours."""
    assert cluster.state
    ours = cluster.pids()
    other = Cluster(str(tmp_path / 'second'))
    try:
        state = other.start()
        assert state.mon_port != cluster.state.mon_port
        assert other.ceph_json('rbd', 'migration', 'status')['migrations'] == []
        assert other.ceph_json('status')['fsid'] != cluster.ceph_json('status')['fsid']
    finally:
        other.stop()
    assert not other.running()
    assert cluster.pids() == ours
    assert all(os.path.exists(f'/proc/{p}') for p in ours.values())
