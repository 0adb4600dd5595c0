"""VMware disks through the module: vmdk files and OVAs, from a file and over
HTTP, imported whole and compared byte for byte with ``qemu-img convert``."""
import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict

from qa.cluster import Cluster
from tests.clusterops import mig, mig_refused, wait_task

MiB = 1 << 20


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _disk(path: Path, seed: int) -> Path:
    """A 24 MiB raw disk: data in a few places, holes between."""
    data = bytearray(24 * MiB)
    for i, at in enumerate((0, 5 * MiB + 4096, 17 * MiB)):
        chunk = hashlib.sha256(f'{seed}-{i}'.encode()).digest() * (MiB // 32 * 2)
        data[at:at + len(chunk)] = chunk
    path.write_bytes(bytes(data))
    return path


def _vmdk(raw: Path, out: Path, subformat: str) -> Path:
    _run('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o', f'subformat={subformat}',
         str(raw), str(out))
    return out


def _sha_rbd(cluster: Cluster, spec: str) -> str:
    assert cluster.state
    out = subprocess.run(['rbd', '--conf', cluster.state.conf, 'export', '--no-progress',
                          spec, '-'], capture_output=True, check=True).stdout
    return hashlib.sha256(out).hexdigest()


def _import(cluster: Cluster, spec: Dict[str, Any], reference: Path) -> str:
    name = f'vmw-{uuid.uuid4().hex[:8]}'
    prepared = mig(cluster, 'prepare', '--import-only', f'rbd/{name}',
                   '--source-spec', json.dumps(spec))
    assert prepared['path'] == 'adapter', prepared
    wait_task(cluster, str(mig(cluster, 'execute', f'rbd/{name}')['task']['id']))
    # verify reads the source again through the same reader, and must pass.
    wait_task(cluster, str(mig(cluster, 'verify', f'rbd/{name}')['task']['id']))
    wait_task(cluster, str(mig(cluster, 'commit', f'rbd/{name}')['task']['id']))
    assert _sha_rbd(cluster, f'rbd/{name}') == \
        hashlib.sha256(reference.read_bytes()).hexdigest()
    return name


def test_vmdk_file_and_flat_descriptor_over_http(cluster: Cluster, roots: Path) -> None:
    raw = _disk(roots / 'disk.raw', 1)
    sparse = _vmdk(raw, roots / 'stream.vmdk', 'streamOptimized')
    _import(cluster, {'type': 'vmdk', 'stream': {'type': 'file', 'file_path': str(sparse)}},
            raw)
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root) / f'vmw-{uuid.uuid4().hex[:6]}'
    www.mkdir()
    try:
        _vmdk(raw, www / 'flat.vmdk', 'monolithicFlat')   # + flat-flat.vmdk beside it
        url = f'http://127.0.0.1:{cluster.state.http_port}/{www.name}/flat.vmdk'
        _import(cluster, {'type': 'vmdk', 'stream': {'type': 'http', 'url': url}}, raw)
    finally:
        shutil.rmtree(www)


def test_ova_over_http_by_disk_index(cluster: Cluster, roots: Path) -> None:
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root)
    raws = [_disk(roots / f'{n}.raw', n) for n in (1, 2)]
    for n, raw in enumerate(raws):
        _vmdk(raw, roots / f'disk{n}.vmdk', 'streamOptimized')
    (roots / 'vm.ovf').write_text('<Envelope/>')
    ova = www / f'vm-{uuid.uuid4().hex[:6]}.ova'
    try:
        _run('tar', '-C', str(roots), '-cf', str(ova), 'vm.ovf', 'disk0.vmdk', 'disk1.vmdk')
        url = f'http://127.0.0.1:{cluster.state.http_port}/{ova.name}'
        spec: Dict[str, Any] = {'type': 'ova', 'stream': {'type': 'http', 'url': url}}
        _, err = mig_refused(cluster, 'prepare', '--import-only', 'rbd/vmw-two',
                             '--source-spec', json.dumps(spec))
        assert err.startswith('Error EINVAL: source-spec: disk: ') or \
            'source-spec: disk: ' in err, err
        assert 'holds 2 disks' in err
        _import(cluster, dict(spec, disk=1), raws[1])
    finally:
        ova.unlink()


def test_delta_disk_refused_with_the_fix(cluster: Cluster, roots: Path) -> None:
    raw = _disk(roots / 'base.raw', 3)
    _vmdk(raw, roots / 'base.vmdk', 'monolithicSparse')
    _run('qemu-img', 'create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk',
         str(roots / 'child.vmdk'))
    _, err = mig_refused(cluster, 'prepare', '--import-only', 'rbd/vmw-delta',
                         '--source-spec', json.dumps({'type': 'vmdk', 'stream': {
                             'type': 'file', 'file_path': str(roots / 'child.vmdk')}}))
    assert 'delta disk' in err and 'qemu-img convert' in err
