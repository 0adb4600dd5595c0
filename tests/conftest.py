"""Shared fixtures.

Cluster tests run against a real one-node Ceph cluster brought up once per
run (once per worker under ``pytest -n``) by ``qa/cluster.py``.  Set ``RBD_MIGRATION_CLUSTER_DIR`` to the directory
of a cluster you started yourself to reuse it across runs (it is then left
running); otherwise the fixture starts one in a temporary directory and
always stops it.
"""
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
import rados

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qa.cluster import Cluster  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_exception_interact(node: pytest.Collector | pytest.Item) -> None:
    """pytest-timeout (tox.ini's --timeout) stops a test's timer once the
    test fails, for a debugger's sake: start it again, so that a teardown
    that hangs after a failure (cleanup waiting on a dead OSD) is bounded
    too."""
    if not isinstance(node, pytest.Item) or node.config.getoption('usepdb'):
        return
    try:
        from pytest_timeout import _get_item_settings
    except ImportError:
        return
    settings = _get_item_settings(node)
    if settings.timeout:
        node.config.pluginmanager.hook.pytest_timeout_set_timer(item=node, settings=settings)


@pytest.fixture(scope='session')
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reuse = os.environ.get('RBD_MIGRATION_CLUSTER_DIR')
    if reuse and int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:
        pytest.fail(f'RBD_MIGRATION_CLUSTER_DIR={reuse} is one cluster for several '
                    'workers, whose tests fail its mgr over and change its options; '
                    'run with -n 0, or unset it')
    if reuse:
        existing = Cluster(reuse)
        if not existing.running():
            pytest.fail(f'RBD_MIGRATION_CLUSTER_DIR={reuse} names no running '
                        'cluster; start one with qa/cluster.py start --dir '
                        f'{reuse} --http --rgw, or unset it')
        hidden_imports_by_default(existing)
        yield existing
        return
    c = Cluster(str(tmp_path_factory.mktemp('cluster')))
    try:
        c.start(http=True, osd_size=4 << 30)
        hidden_imports_by_default(c)
        yield c
    finally:
        c.stop()


def hidden_imports_by_default(c: Cluster) -> None:
    """The suite's imports take the adapter engine's hidden path, which the
    most tests were written for and which stays an operator's choice; the
    live path's tests (test_live.py) turn ``live_imports`` on for theirs."""
    c.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/live_imports', 'false')


@pytest.fixture(scope='session')
def rgw(cluster: Cluster) -> Cluster:
    """The cluster with RGW, its test user and bucket running: started on
    first use, since most cluster tests never touch S3."""
    cluster.ensure_rgw()
    return cluster


@pytest.fixture
def roots(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    """A directory file sources may be read from (``file_source_roots``)."""
    d = tmp_path / 'images'
    d.mkdir()
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', str(d))
    yield d
    cluster.reset_module_option('file_source_roots')


@pytest.fixture(scope='module')
def rados_handle(cluster: Cluster) -> Iterator[rados.Rados]:
    """A librados client of the test cluster, for checks the CLIs cannot do."""
    assert cluster.state
    r = rados.Rados(conffile=cluster.state.conf)
    r.connect()
    try:
        yield r
    finally:
        r.shutdown()
