"""A file source is read as the file that was checked, through the real mgr.

Whoever may run ``prepare`` chooses the path; the mgr reads it with its own
keys and file-system view.  A file swapped for a symlink to something outside
``file_source_roots`` (the mgr's keyring) after the check must never end up
in an image, and a file that shrinks while it is copied must fail the task
rather than import zeros.
"""
import contextlib
import errno
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import rados
import rbd

from qa.cluster import Cluster

MiB = 1 << 20


def _ceph(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, timeout=120)


def _task(cluster: Cluster, *command: str) -> str:
    return str(cluster.ceph_json('rbd', 'migration', *command)['task']['id'])


@pytest.fixture(scope='module')
def handle(cluster: Cluster) -> Iterator[rados.Rados]:
    assert cluster.state
    r = rados.Rados(conffile=cluster.state.conf, name='client.admin')
    r.connect()
    try:
        yield r
    finally:
        r.shutdown()


@pytest.fixture
def secret(tmp_path: Path) -> bytes:
    """A stand-in for the mgr's keyring, outside the roots: what must never
    be imported.  Returns its marker."""
    marker = b'FAKE-KEYRING-' + uuid.uuid4().hex.encode()
    (tmp_path / 'outside').mkdir()
    (tmp_path / 'outside' / 'keyring').write_bytes(marker * (32 * MiB // len(marker) + 1))
    return marker


def _source(roots: Path, size: int) -> bytes:
    data = os.urandom(size)
    (roots / 'disk.raw').write_bytes(data)
    return data


def _prepare(cluster: Cluster, name: str, roots: Path) -> Dict[str, Any]:
    spec = {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(roots / 'disk.raw')}}
    prepared = dict(cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only',
                                      f'rbd/{name}', '--source-spec', json.dumps(spec)))
    assert prepared['path'] == 'adapter', prepared
    assert any('again by name at execute' in r for r in prepared['probe']['reasons']), prepared
    return prepared


def _swap_for_symlink(roots: Path, target: Path) -> None:
    """Atomically, as an attacker would: the name never goes missing."""
    link = roots / 'swap.tmp'
    link.symlink_to(target)
    os.replace(link, roots / 'disk.raw')


def _target_bytes(handle: rados.Rados, prepared: Dict[str, Any]) -> bytes:
    """The whole target, hidden in the trash or not, read by its id."""
    dest = prepared['dest']
    with handle.open_ioctx(dest['pool']) as io:
        io.set_namespace(dest['namespace'])
        with rbd.Image(io, image_id=dest['id'], read_only=True) as img:
            return bytes(img.read(0, img.size()))


def _one_line(r: subprocess.CompletedProcess) -> str:
    message = r.stderr.strip()
    assert message and '\n' not in message and 'Traceback' not in message, message
    return message


@contextlib.contextmanager
def _slow_copy(cluster: Cluster) -> Iterator[None]:
    """An adapter copy at 4 MB/s, one 4 MiB chunk read ahead of what is
    written: most of a 32 MiB source is read well after the task shows
    progress."""
    with cluster.module_option('adapter_bandwidth_mbps', '4'), \
            cluster.module_option('adapter_concurrency', '1'):
        yield


def _abort(cluster: Cluster, name: str) -> None:
    r = _ceph(cluster, 'rbd', 'migration', 'abort', f'rbd/{name}', '-f', 'json')
    if r.returncode == 0:
        assert cluster.task_end(str(json.loads(r.stdout)['task']['id'])).returncode == 0


@pytest.mark.parametrize('when', ['before-execute', 'during-execute'])
def test_symlink_swapped_in_is_never_read(cluster: Cluster, handle: rados.Rados,
                                          roots: Path, tmp_path: Path, secret: bytes,
                                          when: str) -> None:
    """Swapped before the execute, the execute's own open refuses it; swapped
    while the copy runs, the copy keeps reading the file it opened.  Either
    way the image holds the original bytes or the task fails in one line --
    never the secret's."""
    name = f'safety-swap-{when}-{uuid.uuid4().hex[:6]}'
    data = _source(roots, 32 * MiB)
    slow = _slow_copy(cluster) if when == 'during-execute' else contextlib.nullcontext()
    with slow:
        try:
            prepared = _prepare(cluster, name, roots)
            if when == 'before-execute':
                _swap_for_symlink(roots, tmp_path / 'outside' / 'keyring')
            task = _task(cluster, 'execute', f'rbd/{name}')
            if when == 'during-execute':
                cluster.task_running(task, past=0.1)
                _swap_for_symlink(roots, tmp_path / 'outside' / 'keyring')
            r = cluster.task_end(task)
            image = _target_bytes(handle, prepared)
            assert secret not in image, 'the file swapped in was imported'
            if r.returncode == 0:
                assert image == data
            else:
                message = _one_line(r)
                assert 'stream.file_path' in message, message
                assert 'file_source_roots' in message, message
            if when == 'before-execute':
                assert r.returncode == errno.EPERM, r.stderr
        finally:
            _abort(cluster, name)


def test_file_shrinking_during_execute_fails_the_task(cluster: Cluster, roots: Path,
                                                      handle: rados.Rados) -> None:
    name = f'safety-shrink-{uuid.uuid4().hex[:6]}'
    _source(roots, 32 * MiB)
    with _slow_copy(cluster):
        try:
            prepared = _prepare(cluster, name, roots)
            task = _task(cluster, 'execute', f'rbd/{name}')
            cluster.task_running(task, past=0.1)
            os.truncate(roots / 'disk.raw', 1 * MiB)
            r = cluster.task_end(task)
            assert r.returncode == errno.ESTALE, (r.returncode, r.stderr)
            message = _one_line(r)
            assert 'stream.file_path' in message and 'shrank' in message, message
            assert 'do not change the image while it is imported' in message, message
            state = cluster.ceph_json('rbd', 'migration', 'status',
                                      f'rbd/{name}')['migrations'][0]
            assert state['state'] != 'executed', state
            assert state['state_text'].startswith('error: '), state
            assert prepared['dest']['id'] == state['dest']['id']
        finally:
            _abort(cluster, name)
