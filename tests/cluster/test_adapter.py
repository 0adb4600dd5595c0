"""The adapter engine: imports librbd cannot read (compressed and layered
qcow2, URL credentials) or is asked not to (sparse raw), with snapshots,
sparseness, a hidden target, reserved names, abort and resume."""
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from qa.cluster import Cluster
from tests.clusterops import wait_task


def _ceph(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, timeout=120)


def _rbd(cluster: Cluster, *args: str) -> str:
    assert cluster.state
    return subprocess.run(['rbd', '--conf', cluster.state.conf, *args],
                          capture_output=True, text=True, check=True).stdout


def _wait(cluster: Cluster, task: str, timeout: float = 300) -> None:
    wait_task(cluster, task, timeout)


def _task(cluster: Cluster, *command: str) -> str:
    return str(cluster.ceph_json('rbd', 'migration', *command)['task']['id'])


def _sha_rbd(cluster: Cluster, spec: str) -> str:
    assert cluster.state
    proc = subprocess.Popen(['rbd', '--conf', cluster.state.conf, 'export', '--no-progress',
                             spec, '-'], stdout=subprocess.PIPE)
    assert proc.stdout
    h = hashlib.sha256()
    for chunk in iter(lambda: proc.stdout.read(1 << 20), b''):  # type: ignore
        h.update(chunk)
    assert proc.wait() == 0
    return h.hexdigest()


def _sha_qemu(image: Path, snapshot: Optional[str] = None) -> str:
    out = image.with_suffix('.ref')
    cmd = ['qemu-img', 'convert', '-O', 'raw']
    if snapshot:
        cmd += ['-l', f'snapshot.name={snapshot}']
    subprocess.run([*cmd, str(image), str(out)], check=True)
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


def _qemu_io(image: Path, *commands: str) -> None:
    args = ['qemu-io']
    for c in commands:
        args += ['-c', c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


@pytest.fixture(scope='module')
def images(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp('adapter-images')
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', str(d))
    yield d
    cluster.reset_module_option('file_source_roots')


def _prepare(cluster: Cluster, name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    return dict(cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only',
                                  f'rbd/{name}', '--source-spec', json.dumps(spec)))


def _import(cluster: Cluster, name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    prepared = _prepare(cluster, name, spec)
    assert prepared['path'] == 'adapter', prepared
    assert name not in _rbd(cluster, 'ls', 'rbd').split()  # hidden until commit
    _wait(cluster, _task(cluster, 'execute', f'rbd/{name}'))
    status = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{name}')
    assert status['migrations'][0]['state'] == 'executed'
    assert name not in _rbd(cluster, 'ls', 'rbd').split()
    _wait(cluster, _task(cluster, 'commit', f'rbd/{name}'))
    assert name in _rbd(cluster, 'ls', 'rbd').split()
    return prepared


def _remove(cluster: Cluster, name: str) -> None:
    subprocess.run(['rbd', '--conf', cluster.state.conf, 'snap', 'purge', f'rbd/{name}'],  # type: ignore
                   capture_output=True)
    subprocess.run(['rbd', '--conf', cluster.state.conf, 'rm', '--no-progress',  # type: ignore
                    f'rbd/{name}'], capture_output=True)


def _snaps(cluster: Cluster, name: str) -> List[str]:
    return [s['name'] for s in json.loads(_rbd(cluster, 'snap', 'ls', '--format', 'json',
                                               f'rbd/{name}'))]


@pytest.mark.parametrize('compression', ['zlib', 'zstd'])
def test_compressed_qcow2_with_snapshots(cluster: Cluster, images: Path, compression: str) -> None:
    base = images / f'plain-{compression}.qcow2'
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', str(base), '32M'], check=True,
                   capture_output=True)
    _qemu_io(base, 'write -P 0x11 0 3M', 'write -P 0x22 9M 1M')
    subprocess.run(['qemu-img', 'snapshot', '-c', 'one', str(base)], check=True)
    _qemu_io(base, 'write -P 0x33 1M 2M', 'write -z 9M 512k')
    subprocess.run(['qemu-img', 'snapshot', '-c', 'two', str(base)], check=True)
    _qemu_io(base, 'write -P 0x44 20M 4M')
    image = images / f'compressed-{compression}.qcow2'
    subprocess.run(['qemu-img', 'convert', '-c', '-O', 'qcow2', '-o',
                    f'compression_type={compression}', str(base), str(image)], check=True)
    # convert drops internal snapshots: re-create them on compressed layers
    # by writing compressed clusters into the converted image's snapshots.
    for snap, pattern, at in (('one', 0x55, '12M'), ('two', 0x66, '13M')):
        _qemu_io(image, f'write -c -P {pattern} {at} 64k')
        subprocess.run(['qemu-img', 'snapshot', '-c', snap, str(image)], check=True)
    _qemu_io(image, 'write -c -P 0x77 16M 64k')
    name = f'ad-comp-{compression}-{uuid.uuid4().hex[:6]}'
    prepared = _import(cluster, name, {'type': 'qcow', 'stream': {
        'type': 'file', 'file_path': str(image)}})
    assert any('compressed' in r for r in prepared['probe']['reasons'])
    try:
        assert _snaps(cluster, name) == ['one', 'two']
        assert _sha_rbd(cluster, f'rbd/{name}') == _sha_qemu(image)
        for snap in ('one', 'two'):
            assert _sha_rbd(cluster, f'rbd/{name}@{snap}') == _sha_qemu(image, snap)
    finally:
        _remove(cluster, name)


def test_backing_chain_over_http(cluster: Cluster, images: Path) -> None:
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root) / f'chain-{uuid.uuid4().hex[:8]}'
    www.mkdir()
    try:
        subprocess.run(['qemu-img', 'create', '-f', 'qcow2', str(www / 'base.qcow2'), '16M'],
                       check=True, capture_output=True)
        _qemu_io(www / 'base.qcow2', 'write -P 0x01 0 8M')
        lower = 'base.qcow2'
        for i, pattern in enumerate((0x02, 0x03, 0x04)):
            layer = www / f'layer{i}.qcow2'
            subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-b', lower, '-F', 'qcow2',
                            str(layer)], check=True, capture_output=True)
            _qemu_io(layer, f'write -P {pattern} {i * 2}M 1M', f'write -z {i * 2 + 1}M 64k')
            lower = layer.name
        url = f'http://127.0.0.1:{cluster.state.http_port}/{www.name}/{lower}'
        name = f'ad-chain-{uuid.uuid4().hex[:6]}'
        prepared = _import(cluster, name, {'type': 'qcow', 'stream': {'type': 'http', 'url': url}})
        assert any('backing file' in r for r in prepared['probe']['reasons'])
        try:
            assert _sha_rbd(cluster, f'rbd/{name}') == _sha_qemu(www / lower)
        finally:
            _remove(cluster, name)
    finally:
        shutil.rmtree(www)


def test_sparse_raw_with_snapshots_forced_to_adapter(cluster: Cluster, images: Path) -> None:
    size = 64 << 20
    older = images / 'sparse-older.raw'
    head = images / 'sparse-head.raw'
    with open(older, 'wb') as f:
        f.truncate(size)
        for mib in range(0, 64, 10):  # ~10% allocated
            f.seek(mib << 20)
            f.write(os.urandom(1 << 20))
    shutil.copy(older, head)
    with open(head, 'r+b') as f:
        f.seek(20 << 20)
        f.write(bytes(1 << 20))      # data zeroed in HEAD
        f.seek(33 << 20)
        f.write(os.urandom(1 << 20))  # new data in HEAD
    name = f'ad-sparse-{uuid.uuid4().hex[:6]}'
    _import(cluster, name, {
        'type': 'raw', 'stream': {'type': 'file', 'file_path': str(head)},
        'snapshots': [{'type': 'raw', 'name': 'older',
                       'stream': {'type': 'file', 'file_path': str(older)}}],
        'rbd_migration': {'engine': 'adapter'}})
    try:
        assert _snaps(cluster, name) == ['older']
        assert _sha_rbd(cluster, f'rbd/{name}') == hashlib.sha256(head.read_bytes()).hexdigest()
        assert _sha_rbd(cluster, f'rbd/{name}@older') == \
            hashlib.sha256(older.read_bytes()).hexdigest()
        du = json.loads(_rbd(cluster, 'du', '--format', 'json', f'rbd/{name}'))
        used = sum(i['used_size'] for i in du['images'])
        # rbd du counts whole 4 MiB objects: 7 hold the snapshot's 7 MiB of
        # data, 2 more changed in HEAD; a thick copy would use 2 x 64 MiB.
        assert used <= 9 * (4 << 20), du
    finally:
        _remove(cluster, name)


def test_abort_leaves_nothing_and_names_are_reserved(cluster: Cluster, images: Path) -> None:
    src = images / 'abort.raw'
    src.write_bytes(os.urandom(4 << 20))
    name = f'ad-abort-{uuid.uuid4().hex[:6]}'
    spec = {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(src)},
            'rbd_migration': {'engine': 'adapter'}}
    trash_before = _rbd(cluster, 'trash', 'ls', '--all', 'rbd')
    _prepare(cluster, name, spec)
    again = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                  '--source-spec', json.dumps(spec))
    assert again.returncode == 17 and 'reserved by an import in progress' in again.stderr
    _wait(cluster, _task(cluster, 'abort', f'rbd/{name}'))
    assert _rbd(cluster, 'trash', 'ls', '--all', 'rbd') == trash_before
    assert name not in _rbd(cluster, 'ls', 'rbd').split()
    status = cluster.ceph_json('rbd', 'migration', 'status')
    assert not [m for m in status['migrations'] if m['dest']['name'] == name]


def test_url_credentials_go_through_the_adapter(cluster: Cluster) -> None:
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root) / f'cred-{uuid.uuid4().hex[:8]}'
    www.mkdir()
    data = os.urandom(3 << 20)
    (www / 'disk.raw').write_bytes(data)
    secret = 'S3cr3t-' + uuid.uuid4().hex
    url = f'http://user:{secret}@127.0.0.1:{cluster.state.http_port}/{www.name}/disk.raw'
    name = f'ad-cred-{uuid.uuid4().hex[:6]}'
    try:
        prepared = _import(cluster, name, {'type': 'raw', 'stream': {'type': 'http', 'url': url}})
        assert secret not in json.dumps(prepared)
        assert _sha_rbd(cluster, f'rbd/{name}') == hashlib.sha256(data).hexdigest()
        tasks = cluster.ceph('rbd', 'migration', 'task', 'list', '-f', 'json')
        assert secret not in tasks
    finally:
        _remove(cluster, name)
        shutil.rmtree(www)


def test_execute_resumes_from_checkpoint_after_mgr_fail(cluster: Cluster, images: Path) -> None:
    src = images / 'resume.raw'
    with open(src, 'wb') as f:
        for _ in range(96):
            f.write(os.urandom(4 << 20))  # 384 MiB, all data
    name = f'ad-resume-{uuid.uuid4().hex[:6]}'
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/adapter_bandwidth_mbps', '30')
    try:
        _prepare(cluster, name, {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(src)},
                                 'rbd_migration': {'engine': 'adapter'}})
        task = _task(cluster, 'execute', f'rbd/{name}')
        time.sleep(8)  # ~240 MB at 30 MB/s: past the first checkpoint (5 s)
        epoch = cluster.ceph_json('mgr', 'stat')['epoch']
        cluster.ceph('mgr', 'fail')
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if cluster.ceph_json('mgr', 'stat')['epoch'] > epoch and \
                    _ceph(cluster, 'rbd', 'migration', 'task', 'get', task).returncode in (0, 11):
                break
            time.sleep(0.5)
        cluster.reset_module_option('adapter_bandwidth_mbps')
        _wait(cluster, task)
        status = cluster.ceph_json('rbd', 'migration', 'status', f'rbd/{name}')
        stats = status['migrations'][0]
        assert stats['state'] == 'executed'
        record_task = status['tasks'][-1]
        assert record_task['attempts'] >= 1
        _wait(cluster, _task(cluster, 'commit', f'rbd/{name}'))
        assert _sha_rbd(cluster, f'rbd/{name}') == hashlib.sha256(src.read_bytes()).hexdigest()
        written = _written_by_last_run(cluster, name)
        assert written is not None and written < 384 << 20, written
    finally:
        cluster.reset_module_option('adapter_bandwidth_mbps')
        _remove(cluster, name)


def _written_by_last_run(cluster: Cluster, name: str) -> Optional[int]:
    """Bytes the last execute wrote, from its task's result."""
    tasks = cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
    runs = [t for t in tasks if t['image_name'] == name and t['action'] == 'execute']
    result = runs[-1].get('result') or {}
    return result.get('bytes_written')


def test_rbd_export_v2_with_snapshots_metadata_and_protection(cluster: Cluster,
                                                               images: Path) -> None:
    src = f'ad-exp-src-{uuid.uuid4().hex[:6]}'
    _rbd(cluster, 'create', '--size', '32M', f'rbd/{src}')
    for snap in ('monday', 'tuesday'):
        _rbd(cluster, 'bench', '--io-type', 'write', '--io-size', '64K', '--io-total', '4M',
             '--io-pattern', 'rand', f'rbd/{src}')
        _rbd(cluster, 'snap', 'create', f'rbd/{src}@{snap}')
    _rbd(cluster, 'snap', 'protect', f'rbd/{src}@monday')
    _rbd(cluster, 'image-meta', 'set', f'rbd/{src}', 'owner', 'team-a')
    _rbd(cluster, 'bench', '--io-type', 'write', '--io-size', '64K', '--io-total', '2M',
         '--io-pattern', 'rand', f'rbd/{src}')
    export = images / f'{src}.export'
    _rbd(cluster, 'export', '--no-progress', '--export-format', '2', f'rbd/{src}', str(export))
    name = f'ad-exp-{uuid.uuid4().hex[:6]}'
    try:
        prepared = _import(cluster, name, {'type': 'export', 'stream': {
            'type': 'file', 'file_path': str(export)}})
        assert any("no reader for type 'export'" in r for r in prepared['probe']['reasons'])
        assert _snaps(cluster, name) == ['monday', 'tuesday']
        for spec in ('', '@monday', '@tuesday'):
            assert _sha_rbd(cluster, f'rbd/{name}{spec}') == _sha_rbd(cluster, f'rbd/{src}{spec}')
        assert _rbd(cluster, 'image-meta', 'get', f'rbd/{name}', 'owner').strip() == 'team-a'
        info = json.loads(_rbd(cluster, 'snap', 'ls', '--format', 'json', f'rbd/{name}'))
        assert {s['name']: s['protected'] for s in info} == {'monday': 'true', 'tuesday': 'false'}
    finally:
        for image in (src, name):
            subprocess.run(['rbd', '--conf', cluster.state.conf, 'snap', 'unprotect',  # type: ignore
                            f'rbd/{image}@monday'], capture_output=True)
            _remove(cluster, image)
