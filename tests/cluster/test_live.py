"""Live imports on a real cluster: sources librbd cannot read itself
(compressed qcow2 over HTTP and S3, a qcow2 overlay from files and from
S3, rbd export and export-diff files, export-diff over HTTP, VMDK from a
file, HTTP and S3, an OVA over HTTP and from S3, raw over NBD, a URL with a
query string) are served by the mgr as a qcow2 view, so clients read
and write the target from prepare on, before execute.  Checked: what they
read equals the source at HEAD and each snapshot, their writes survive the
copy, the committed image is no bigger than ``rbd import`` makes it, abort
leaves nothing, a mgr failover costs a reader no error, an execute cut by
a failover runs again to the same image, writes and qemu-img reads during
execute see the source with the writes, and a source gone away fails reads
instead of crash-looping the mgr."""
import hashlib
import json
import random
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import rados
import rbd

from qa.cluster import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, Cluster
from rbd_migration.context import SourceContext
from rbd_migration.engine.copier import CopyOptions
from rbd_migration.engine.librbd import LibrbdEngine
from rbd_migration.engine.prefill import ObjectLayout, fill
from rbd_migration.formats import open_format
from tests.clusterops import ceph_run, mig

MiB = 1 << 20
KiB = 1 << 10
SIZE = 32 * MiB
BLOCK = 4 * KiB


@dataclass
class Source:
    """A source-spec and what the target must read: each snapshot, oldest
    first, then HEAD."""

    spec: Dict[str, Any]
    head: bytes
    snaps: List[Tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Places:
    """Where a case's sources are written: a file root and nginx's root, and
    on demand the test bucket (RGW started on first use) or an NBD server;
    what a case put there is removed or stopped after its test."""

    files: Path
    www: Path
    url: str
    cluster: Cluster
    keys: List[str] = field(default_factory=list)
    servers: List['subprocess.Popen[bytes]'] = field(default_factory=list)

    def s3_spec(self, name: str, data: bytes) -> Dict[str, Any]:
        """A stream spec of ``data`` put in the test bucket."""
        self.cluster.ensure_rgw()
        assert self.cluster.state and self.cluster.state.rgw_port
        endpoint = f'http://127.0.0.1:{self.cluster.state.rgw_port}'
        key = f'{self.www.name}/{name}'
        _s3(endpoint).put_object(Bucket=S3_BUCKET, Key=key, Body=data)
        self.keys.append(key)
        return {'type': 's3', 'url': f'{endpoint}/{S3_BUCKET}/{key}',
                'access_key': S3_ACCESS_KEY, 'secret_key': S3_SECRET_KEY}

    def nbd_uri(self, image: Path, fmt: str, shared: int = 8) -> str:
        """An nbd:// URI of ``image`` served read-only by qemu-nbd on a free
        loopback port to ``shared`` clients at once, for as long as the test
        runs."""
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = int(s.getsockname()[1])
        proc = subprocess.Popen(['qemu-nbd', '--read-only', '--persistent', '--shared', str(shared),
                                 '-f', fmt, '-x', 'disk', '-b', '127.0.0.1', '-p', str(port),
                                 str(image)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.servers.append(proc)
        until = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(('127.0.0.1', port)) == 0:
                    return f'nbd://127.0.0.1:{port}/disk'
            assert proc.poll() is None and time.monotonic() < until, 'qemu-nbd did not start'
            time.sleep(0.05)

    def clean(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait(10)
        if self.keys:
            assert self.cluster.state and self.cluster.state.rgw_port
            client = _s3(f'http://127.0.0.1:{self.cluster.state.rgw_port}')
            for key in self.keys:
                client.delete_object(Bucket=S3_BUCKET, Key=key)


def _s3(endpoint: str) -> Any:
    """A boto3 client of the test user."""
    import boto3
    from botocore.config import Config
    return boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1',
                        aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                        config=Config(s3={'addressing_style': 'path'}, signature_version='s3v4'))


@pytest.fixture(scope='module')
def live(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with live imports on (the suite turns them off)."""
    with cluster.module_option('live_imports', 'true'):
        yield cluster


@pytest.fixture
def places(live: Cluster, roots: Path) -> Iterator[Places]:
    assert live.state and live.state.http_root
    www = Path(live.state.http_root) / f'live-{uuid.uuid4().hex[:8]}'
    www.mkdir()
    p = Places(roots, www, f'http://127.0.0.1:{live.state.http_port}/{www.name}', live)
    try:
        yield p
    finally:
        p.clean()
        shutil.rmtree(www, ignore_errors=True)


# -- sources ----------------------------------------------------------------------

def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _qemu_io(image: Path, *commands: str) -> None:
    _run('qemu-io', *[a for c in commands for a in ('-c', c)], str(image))


def _raw_of(image: Path, snapshot: Optional[str] = None) -> bytes:
    """What qemu reads of an image (at a snapshot)."""
    out = image.with_name(image.name + '.ref')
    _run('qemu-img', 'convert', '-O', 'raw',
         *(['-l', f'snapshot.name={snapshot}'] if snapshot else []), str(image), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def _disk(seed: int) -> bytes:
    """SIZE bytes: random data in a few places, holes between (the object
    at 16 MiB holds two pieces, far apart)."""
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for at, length in ((0, MiB), (5 * MiB + 4096, MiB), (16 * MiB + 64 * KiB, 64 * KiB),
                       (17 * MiB, 2 * MiB)):
        data[at:at + length] = rng.randbytes(length)
    return bytes(data)


def _compressed_qcow2_http(p: Places, origin: 'Origin') -> Source:
    base = p.files / 'base.qcow2'
    _run('qemu-img', 'create', '-f', 'qcow2', str(base), '32M')
    _qemu_io(base, 'write -P 0x11 0 3M', 'write -P 0x22 9M 1M')
    image = p.www / 'compressed.qcow2'
    _run('qemu-img', 'convert', '-c', '-O', 'qcow2', str(base), str(image))
    _qemu_io(image, 'write -c -P 0x55 12M 64k')
    _run('qemu-img', 'snapshot', '-c', 'one', str(image))
    _qemu_io(image, 'write -c -P 0x77 16M 64k', 'write -P 0x33 1M 64k')
    return Source({'type': 'qcow', 'stream': {'type': 'http',
                                              'url': f'{p.url}/compressed.qcow2'}},
                  _raw_of(image), [('one', _raw_of(image, 'one'))])


def _compressed_qcow2_s3(p: Places, origin: 'Origin') -> Source:
    """The compressed qcow2 with a snapshot, as an object in RGW."""
    src = _compressed_qcow2_http(p, origin)
    stream = p.s3_spec('compressed.qcow2', (p.www / 'compressed.qcow2').read_bytes())
    return Source({'type': 'qcow', 'stream': stream}, src.head, src.snaps)


def _raw_nbd(p: Places, origin: 'Origin') -> Source:
    """A sparse qcow2 served by qemu-nbd, read as raw over NBD (block
    status tells its holes)."""
    data = _disk(13)
    raw = p.files / 'nbd.raw'
    raw.write_bytes(data)
    image = p.files / 'nbd.qcow2'
    _run('qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', str(raw), str(image))
    raw.unlink()
    return Source({'type': 'raw', 'stream': {'type': 'nbd', 'uri': p.nbd_uri(image, 'qcow2')}},
                  data)


def _qcow2_overlay_file(p: Places, origin: 'Origin') -> Source:
    backing = p.files / 'backing.qcow2'
    _run('qemu-img', 'create', '-f', 'qcow2', str(backing), '32M')
    _qemu_io(backing, 'write -P 0x01 0 8M', 'write -P 0x02 20M 1M')
    overlay = p.files / 'overlay.qcow2'
    _run('qemu-img', 'create', '-f', 'qcow2', '-b', backing.name, '-F', 'qcow2', str(overlay))
    _qemu_io(overlay, 'write -P 0x03 4M 6M', 'write -z 20M 512k')
    return Source({'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(overlay)}},
                  _raw_of(overlay))


def _export_v2_file(p: Places, origin: 'Origin') -> Source:
    path = p.files / 'origin.export'
    origin.cluster.rbd('export', '--no-progress', '--export-format', '2',
                       f'rbd/{origin.name}', str(path))
    return Source({'type': 'export', 'stream': {'type': 'file', 'file_path': str(path)}},
                  origin.head, [('s1', origin.s1)])


def _export_diff_http(p: Places, origin: 'Origin') -> Source:
    rbd_ = origin.cluster.rbd
    rbd_('export-diff', '--no-progress', f'rbd/{origin.name}@s1', str(p.www / 'd1'))
    rbd_('export-diff', '--no-progress', '--from-snap', 's1', f'rbd/{origin.name}',
         str(p.www / 'dh'))
    return Source({'type': 'export-diff', 'stream': {'type': 'http', 'url': f'{p.url}/d1'},
                   'diffs': [{'stream': {'type': 'http', 'url': f'{p.url}/dh'}}]},
                  origin.head, [('s1', origin.s1)])


def _raw_http_query(p: Places, origin: 'Origin') -> Source:
    data = _disk(11)
    (p.www / 'disk.raw').write_bytes(data)
    return Source({'type': 'raw', 'stream': {
        'type': 'http', 'url': f'{p.url}/disk.raw?versionId=7&x-id=GetObject'}}, data)


def _vmdk_file(p: Places, origin: 'Origin') -> Source:
    data = _disk(12)
    raw = p.files / 'disk.raw'
    raw.write_bytes(data)
    vmdk = p.files / 'disk.vmdk'
    _run('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized',
         str(raw), str(vmdk))
    raw.unlink()
    return Source({'type': 'vmdk', 'stream': {'type': 'file', 'file_path': str(vmdk)}}, data)


def _vmdk_s3(p: Places, origin: 'Origin') -> Source:
    """The streamOptimized vmdk, as an object in RGW."""
    src = _vmdk_file(p, origin)
    path = Path(src.spec['stream']['file_path'])
    return Source({'type': 'vmdk', 'stream': p.s3_spec('disk.vmdk', path.read_bytes())},
                  src.head)


def _ova_http(p: Places, origin: 'Origin') -> Source:
    """An OVA (the descriptor, then a streamOptimized disk) served by nginx,
    read in place."""
    src = _vmdk_file(p, origin)
    (p.files / 'vm.ovf').write_text('<Envelope/>')
    _run('tar', '-C', str(p.files), '-cf', str(p.www / 'vm.ova'), 'vm.ovf', 'disk.vmdk')
    return Source({'type': 'ova', 'stream': {'type': 'http', 'url': f'{p.url}/vm.ova'}},
                  src.head)


def _vmdk_http(p: Places, origin: 'Origin') -> Source:
    """The streamOptimized vmdk served by nginx."""
    src = _vmdk_file(p, origin)
    shutil.copy(src.spec['stream']['file_path'], p.www / 'disk.vmdk')
    return Source({'type': 'vmdk', 'stream': {'type': 'http', 'url': f'{p.url}/disk.vmdk'}},
                  src.head)


def _ova_s3(p: Places, origin: 'Origin') -> Source:
    """The OVA as an object in RGW."""
    src = _ova_http(p, origin)
    return Source({'type': 'ova', 'stream': p.s3_spec('vm.ova', (p.www / 'vm.ova').read_bytes())},
                  src.head)


def _qcow2_overlay_s3(p: Places, origin: 'Origin') -> Source:
    """The overlay and its backing file as two objects side by side in RGW
    (the backing file found as a sibling key)."""
    src = _qcow2_overlay_file(p, origin)
    p.s3_spec('backing.qcow2', (p.files / 'backing.qcow2').read_bytes())
    stream = p.s3_spec('overlay.qcow2', (p.files / 'overlay.qcow2').read_bytes())
    return Source({'type': 'qcow', 'stream': stream}, src.head)


def _export_diff_file(p: Places, origin: 'Origin') -> Source:
    src = _export_diff_http(p, origin)
    for name in ('d1', 'dh'):
        shutil.copy(p.www / name, p.files / name)
    return Source({'type': 'export-diff',
                   'stream': {'type': 'file', 'file_path': str(p.files / 'd1')},
                   'diffs': [{'stream': {'type': 'file', 'file_path': str(p.files / 'dh')}}]},
                  src.head, src.snaps)


def _compressed_qcow2_file(p: Places, origin: 'Origin') -> Source:
    """The compressed qcow2 with a snapshot, from a file."""
    src = _compressed_qcow2_http(p, origin)
    shutil.copy(p.www / 'compressed.qcow2', p.files / 'compressed.qcow2')
    return Source({'type': 'qcow', 'stream': {
        'type': 'file', 'file_path': str(p.files / 'compressed.qcow2')}}, src.head, src.snaps)


def _qcow2_overlay_http(p: Places, origin: 'Origin') -> Source:
    """The overlay and its backing file side by side under nginx (the
    backing file found beside the overlay's URL)."""
    src = _qcow2_overlay_file(p, origin)
    for name in ('backing.qcow2', 'overlay.qcow2'):
        shutil.copy(p.files / name, p.www / name)
    return Source({'type': 'qcow', 'stream': {'type': 'http', 'url': f'{p.url}/overlay.qcow2'}},
                  src.head)


def _export_v2_s3(p: Places, origin: 'Origin') -> Source:
    """The export with its snapshot, as an object in RGW."""
    src = _export_v2_file(p, origin)
    path = Path(src.spec['stream']['file_path'])
    return Source({'type': 'export', 'stream': p.s3_spec('origin.export', path.read_bytes())},
                  src.head, src.snaps)


def _export_v2_http(p: Places, origin: 'Origin') -> Source:
    """The export with its snapshot, served by nginx."""
    src = _export_v2_file(p, origin)
    shutil.copy(src.spec['stream']['file_path'], p.www / 'origin.export')
    return Source({'type': 'export', 'stream': {'type': 'http', 'url': f'{p.url}/origin.export'}},
                  src.head, src.snaps)


def _export_diff_s3(p: Places, origin: 'Origin') -> Source:
    """The base diff and the one after it, two objects in RGW."""
    src = _export_diff_http(p, origin)
    first, second = (p.s3_spec(name, (p.www / name).read_bytes()) for name in ('d1', 'dh'))
    return Source({'type': 'export-diff', 'stream': first, 'diffs': [{'stream': second}]},
                  src.head, src.snaps)


def _ova_file(p: Places, origin: 'Origin') -> Source:
    """The OVA from a file."""
    src = _ova_http(p, origin)
    shutil.copy(p.www / 'vm.ova', p.files / 'vm.ova')
    return Source({'type': 'ova', 'stream': {'type': 'file', 'file_path': str(p.files / 'vm.ova')}},
                  src.head)


@dataclass
class Origin:
    """An rbd image with a snapshot, which export and export-diff files
    are made of: its data is the reference."""

    cluster: Cluster
    name: str
    s1: bytes
    head: bytes


@pytest.fixture(scope='module')
def origin(live: Cluster, rados_handle: rados.Rados) -> Iterator[Origin]:
    name = f'live-origin-{uuid.uuid4().hex[:6]}'
    live.rbd('create', '--size', '32M', f'rbd/{name}')
    try:
        rng = random.Random(5)
        with rados_handle.open_ioctx('rbd') as io, rbd.Image(io, name) as img:
            img.write(rng.randbytes(MiB), 0)
            img.write(rng.randbytes(MiB), 5 * MiB + 4096)
            img.create_snap('s1')
            img.write(rng.randbytes(2 * MiB), 17 * MiB)
            img.discard(5 * MiB, MiB)
            img.write(rng.randbytes(64 * KiB), 8 * MiB + 512)
        yield Origin(live, name, _export(live, f'rbd/{name}@s1'), _export(live, f'rbd/{name}'))
    finally:
        _remove(live, name)


#: Every case: the format and stream a live import is to serve.
CASES: Dict[str, Callable[[Places, Origin], Source]] = {
    'compressed-qcow2-snapshot-http': _compressed_qcow2_http,
    'compressed-qcow2-snapshot-s3': _compressed_qcow2_s3,
    'raw-nbd': _raw_nbd,
    'qcow2-overlay-file': _qcow2_overlay_file,
    'export-v2-snapshot-file': _export_v2_file,
    'export-diff-chain-http': _export_diff_http,
    'raw-http-query-string': _raw_http_query,
    'vmdk-file': _vmdk_file,
    'vmdk-s3': _vmdk_s3,
    'vmdk-http': _vmdk_http,
    'ova-http': _ova_http,
    'ova-s3': _ova_s3,
    'qcow2-overlay-s3': _qcow2_overlay_s3,
    'export-diff-chain-file': _export_diff_file,
    'compressed-qcow2-snapshot-file': _compressed_qcow2_file,
    'qcow2-overlay-http': _qcow2_overlay_http,
    'export-v2-snapshot-s3': _export_v2_s3,
    'export-v2-snapshot-http': _export_v2_http,
    'export-diff-chain-s3': _export_diff_s3,
    'ova-file': _ova_file,
}


# -- the cluster's side -------------------------------------------------------------

def _export(cluster: Cluster, spec: str) -> bytes:
    """What a client reads of an image (or image@snap)."""
    assert cluster.state
    r = subprocess.run(['rbd', '--conf', cluster.state.conf, 'export', '--no-progress',
                        spec, '-'], capture_output=True, timeout=180)
    assert r.returncode == 0, f'rbd export {spec}: {r.stderr.decode().strip()}'
    return r.stdout


def _same(actual: bytes, expected: bytes, what: str) -> None:
    """Equal, or a message naming the first differing 4 KiB block."""
    if actual == expected:
        return
    first = next((off for off in range(0, min(len(actual), len(expected)), BLOCK)
                  if actual[off:off + BLOCK] != expected[off:off + BLOCK]), None)
    raise AssertionError(f'{what}: {len(actual)} bytes read, {len(expected)} expected, '
                         f'first difference in the block at {first}')


def _qemu_read(cluster: Cluster, name: str, scratch: Path) -> bytes:
    """What ``qemu-img convert`` over ``rbd:`` reads of the image (it asks
    librbd for block status, which librbd 16.2 answers for a target of a
    non-image source by killing the client with SIGFPE, unless the module
    flagged its fast diff invalid)."""
    assert cluster.state
    copy = scratch / f'{name}.qemu.raw'
    try:
        r = subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'raw',
                            f'rbd:rbd/{name}:conf={cluster.state.conf}', str(copy)],
                           capture_output=True, timeout=180)
        assert r.returncode == 0, f'qemu-img over rbd: exit {r.returncode}: ' \
                                  f'{r.stderr.decode().strip()}'
        return copy.read_bytes()
    finally:
        copy.unlink(missing_ok=True)


def _check_reads(cluster: Cluster, name: str, head: bytes, src: Source, when: str) -> None:
    _same(_export(cluster, f'rbd/{name}'), head, f'{when}: rbd/{name}')
    for snap, data in src.snaps:
        _same(_export(cluster, f'rbd/{name}@{snap}'), data, f'{when}: rbd/{name}@{snap}')


def _prepare(cluster: Cluster, name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    return mig(cluster, 'prepare', '--import-only', f'rbd/{name}',
               '--source-spec', json.dumps(spec), timeout=120)


def _prepare_live(cluster: Cluster, name: str, spec: Dict[str, Any]) -> None:
    prepared = _prepare(cluster, name, spec)
    assert prepared['path'] == 'live', prepared
    assert prepared['probe']['path'] == 'live' and prepared['probe']['hidden'] == '', prepared
    status = mig(cluster, 'status', f'rbd/{name}')['migrations']
    assert [m['path'] for m in status] == ['live'], status
    assert name in cluster.rbd('ls', 'rbd').split()   # visible from prepare on


def _task(cluster: Cluster, action: str, name: str, timeout: float = 240) -> Dict[str, Any]:
    """Run a migration action as a module task, which must complete (riding
    out a mgr failover); the task as it ended."""
    task = str(mig(cluster, action, f'rbd/{name}', timeout=120)['task']['id'])
    r = cluster.task_end(task, timeout)
    said = f'{action} rbd/{name}: {r.stdout.strip()} {r.stderr.strip()}'
    assert r.returncode == 0 and r.stdout.strip().endswith(' completed'), said
    ended: Dict[str, Any] = mig(cluster, 'task', 'get', task)['task']
    if action == 'execute':     # its size (for rates) read from the target's header
        size = json.loads(cluster.rbd('info', '--format', 'json', f'rbd/{name}'))['size']
        assert ended['options']['size'] == size
    return ended


def _execute_commit(cluster: Cluster, name: str) -> Dict[str, Any]:
    """Execute and commit; the execute task as it ended."""
    executed = _task(cluster, 'execute', name)
    _task(cluster, 'commit', name)
    return executed


def _copied_by(executed: Dict[str, Any], src: 'Source') -> None:
    """The module copies a live import's data itself unless the source
    has snapshots, which librbd copies (and the result says why)."""
    result = executed['result']
    if src.snaps:
        assert result == {'copied_by': 'librbd', 'why': 'the source has snapshots'}, result
    else:
        assert result['copied_by'] == 'rbd_migration', result
        assert result['bytes_written'] > 0, result
        # It wrote no zeros, so nothing read the whole target to drop them.
        assert 'sparsified' not in result, result


def _object_map_valid(cluster: Cluster, name: str) -> None:
    """``rbd object-map check`` finds the map right (a wrong one is flagged
    invalid): objects filled behind librbd's back are in it."""
    cluster.rbd('object-map', 'check', '--no-progress', f'rbd/{name}')
    flags = json.loads(cluster.rbd('info', '--format', 'json', f'rbd/{name}'))['flags']
    assert not flags, f'rbd/{name} has flags {flags} after object-map check'


def _remove(cluster: Cluster, name: str) -> None:
    """Whatever is left of a test's image: its migration aborted, the image gone."""
    assert cluster.state
    r = ceph_run(cluster, 'rbd', 'migration', 'abort', f'rbd/{name}', '-f', 'json')
    if r.returncode == 0 and r.stdout.strip():
        task = json.loads(r.stdout).get('task', {}).get('id')
        if task:
            cluster.task_end(str(task), 120)
    for args in (('snap', 'purge'), ('rm',)):
        subprocess.run(['rbd', '--conf', cluster.state.conf, *args, '--no-progress',
                        f'rbd/{name}'], capture_output=True)


def _client_write(io: rados.Ioctx, name: str, blocks: Dict[int, bytes]) -> None:
    with rbd.Image(io, name) as img:
        for offset, data in blocks.items():
            img.write(data, offset)


def _patched(data: bytes, blocks: Dict[int, bytes]) -> bytes:
    out = bytearray(data)
    for offset, block in blocks.items():
        out[offset:offset + len(block)] = block
    return bytes(out)


def _used(cluster: Cluster, name: str) -> int:
    """``rbd du``'s USED of an image and its snapshots."""
    du = json.loads(cluster.rbd('du', '--format', 'json', f'rbd/{name}'))
    return sum(int(entry['used_size']) for entry in du['images'])


def _imported(cluster: Cluster, io: rados.Ioctx, layers: List[Tuple[Optional[str], bytes]],
              scratch: Path) -> str:
    """What ``rbd import`` makes of the same data: the oldest layer imported,
    each later one written over it where it differs (zeros as zeroes, not
    data), a snapshot after each named layer; it must read as the layers."""
    name = f'live-ref-{uuid.uuid4().hex[:6]}'
    raw = scratch / f'{name}.raw'
    raw.write_bytes(layers[0][1])
    cluster.rbd('import', '--no-progress', str(raw), f'rbd/{name}')
    raw.unlink()
    with rbd.Image(io, name) as img:
        previous = layers[0][1]
        for snap, data in layers:
            for offset, length, zeros in _changed_runs(previous, data):
                if zeros:
                    img.write_zeroes(offset, length)
                else:
                    img.write(data[offset:offset + length], offset)
            previous = data
            if snap:
                img.create_snap(snap)
    for snap, data in layers:
        spec = f'rbd/{name}@{snap}' if snap else f'rbd/{name}'
        _same(_export(cluster, spec), data, f'the reference {spec}')
    return name


def _changed_runs(before: bytes, after: bytes) -> Iterator[Tuple[int, int, bool]]:
    """(offset, length, all zeros) of each run of 4 KiB blocks that differ."""
    zero = bytes(BLOCK)
    run: Optional[Tuple[int, int, bool]] = None
    for offset in range(0, len(after), BLOCK):
        block = after[offset:offset + BLOCK]
        kind = None if block == before[offset:offset + BLOCK] else block == zero[:len(block)]
        if run is not None and kind == run[2] and run[0] + run[1] == offset:
            run = (run[0], run[1] + len(block), run[2])
            continue
        if run is not None:
            yield run
        run = None if kind is None else (offset, len(block), kind)
    if run is not None:
        yield run


def _blocks(head: bytes) -> Dict[int, bytes]:
    """What a client writes during live use: data in three places, one a
    hole of every source, and zeros over the source's data."""
    assert head[512 * KiB:516 * KiB] != bytes(BLOCK), 'the source has data at 512 KiB'
    rng = random.Random(3)
    return {4 * KiB: rng.randbytes(BLOCK), 9 * MiB + 8 * KiB: rng.randbytes(BLOCK),
            30 * MiB: rng.randbytes(2 * BLOCK), 512 * KiB: bytes(BLOCK)}


# -- the tests ---------------------------------------------------------------------

@pytest.mark.parametrize('case', list(CASES))
def test_clients_read_and_write_before_execute(live: Cluster, places: Places, origin: Origin,
                                               rados_handle: rados.Rados, case: str) -> None:
    """Right after prepare any client reads the source at HEAD and each
    snapshot; its writes win over the copy; the committed image reads the
    same and takes no more room than ``rbd import`` of the same data."""
    src = CASES[case](places, origin)
    name = f'live-{case[:12]}-{uuid.uuid4().hex[:6]}'
    ref = ''
    with rados_handle.open_ioctx('rbd') as io:
        try:
            _prepare_live(live, name, src.spec)
            _check_reads(live, name, src.head, src, 'before execute')
            _same(_qemu_read(live, name, places.files), src.head, 'qemu-img before execute')
            blocks = _blocks(src.head)
            _client_write(io, name, blocks)
            head = _patched(src.head, blocks)
            _same(_export(live, f'rbd/{name}'), head, 'after the client wrote')
            _copied_by(_execute_commit(live, name), src)
            _check_reads(live, name, head, src, 'after commit')
            _object_map_valid(live, name)
            ref = _imported(live, io, [*src.snaps, (None, head)], places.files)
            used, expected = _used(live, name), _used(live, ref)
            print(f'{case}: rbd du USED {used}, rbd import of the same data {expected}')
            assert used <= expected * 1.05, f'{name} uses {used} bytes, rbd import {expected}'
        finally:
            _remove(live, name)
            if ref:
                _remove(live, ref)


def _held_through_commit(live: Cluster, places: Places, origin: Origin,
                         rados_handle: rados.Rados, tag: str,
                         step: Callable[[rbd.Image, str, Source], None]) -> None:
    """A client holds a live target open and locked from right after
    prepare to after commit (a running VM) while ``step`` copies and commits
    it; then the client, through the same open image, and another one read
    every byte, and the object map is right."""
    src = _vmdk_file(places, origin)
    name = f'live-{tag}-{uuid.uuid4().hex[:6]}'
    blocks = {9 * MiB + 8 * KiB: random.Random(9).randbytes(BLOCK)}
    expected = _patched(src.head, blocks)
    with rados_handle.open_ioctx('rbd') as io:
        try:
            _prepare_live(live, name, src.spec)
            with rbd.Image(io, name) as img:
                for offset, block in blocks.items():
                    img.write(block, offset)    # takes the exclusive lock
                assert json.loads(live.rbd('lock', 'ls', '--format', 'json', f'rbd/{name}'))
                step(img, name, src)
                _same(img.read(0, SIZE), expected, 'the lock owner, after commit')
            _same(_export(live, f'rbd/{name}'), expected, 'another client, after commit')
            _object_map_valid(live, name)
        finally:
            _remove(live, name)


def test_a_client_holding_the_lock_reads_the_module_copy_after_commit(
        live: Cluster, places: Places, origin: Origin, rados_handle: rados.Rados) -> None:
    """The module fills the objects behind the lock owner's back, the
    object maps are rebuilt after (librbd hands that to the lock owner),
    and once the source is gone it still reads every byte."""
    def step(img: rbd.Image, name: str, src: Source) -> None:
        _copied_by(_execute_commit(live, name), src)
    _held_through_commit(live, places, origin, rados_handle, 'locked', step)


def test_a_copy_cut_before_its_maps_were_rebuilt_still_reads_after_commit(
        live: Cluster, places: Places, origin: Origin, rados_handle: rados.Rados) -> None:
    """An execute cut after the module's copy and the executed state, before
    the object maps' rebuild (the child killed there), of a target whose
    lock owner caches a valid object map without the copied objects (here
    an operator turned the map on after prepare, which turned it off with
    fast-diff): the map was flagged invalid with the state, so after the
    commit that may follow (which rebuilds it), the lock owner reads every
    byte, not zeros where the stale map says absent."""
    engine = LibrbdEngine(rados_handle)

    def step(img: rbd.Image, name: str, src: Source) -> None:
        img.update_features(rbd.RBD_FEATURE_OBJECT_MAP, True)
        img.rebuild_object_map()        # valid: the client's object only
        assert img.flags() == 0
        with rados_handle.open_ioctx('rbd') as io:
            ref = engine.ref(io, name)
        ctx = SourceContext(allowed_file_roots=[str(places.files)])
        with open_format(src.spec, ctx) as fmt:
            why, stats = fill(engine, ref, fmt, CopyOptions(), lambda done, total: True)
        assert why is None and stats is not None and stats.bytes_written > 0, why
        engine.record_executed(ref, invalidate_maps=True)
        _task(live, 'commit', name)
    _held_through_commit(live, places, origin, rados_handle, 'cut', step)


@pytest.mark.parametrize('create, snapshot', [
    ({}, False),
    ({'order': 20}, True),
    ({'stripe_unit': MiB, 'stripe_count': 4}, False),
    ({'data_pool': 'ecdata'}, False),
], ids=['default', 'order-20-snapshot', 'striped', 'ec-data-pool'])
def test_the_fill_reads_the_layout_librbd_opens(live: Cluster, rados_handle: rados.Rados,
                                                create: Dict[str, Any], snapshot: bool) -> None:
    """The module's copy finds where a target's objects are from its header
    alone (opening a live target opens its source too): the same as
    librbd says of the opened image."""
    name = f'live-layout-{uuid.uuid4().hex[:6]}'
    with rados_handle.open_ioctx('rbd') as io:
        try:
            rbd.RBD().create(io, name, 24 * MiB + 512, old_format=False, **create)
            with rbd.Image(io, name) as img:
                if snapshot:
                    img.create_snap('s1')
                stat = img.stat()
                pool = img.data_pool_id()
                expected = ObjectLayout(
                    data_pool_id=pool if pool >= 0 else io.get_pool_id(), namespace='',
                    prefix=str(stat['block_name_prefix']), object_size=int(stat['obj_size']),
                    size=int(stat['size']), stripe_unit=img.stripe_unit(),
                    stripe_count=img.stripe_count(), snapshots=len(list(img.list_snaps())))
            ref = LibrbdEngine(rados_handle).ref(io, name)
            assert ObjectLayout.read(io, ref) == expected
        finally:
            _remove(live, name)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_abort_after_a_client_read(live: Cluster, places: Places, origin: Origin,
                                   rados_handle: rados.Rados) -> None:
    src = _qcow2_overlay_file(places, origin)
    files = {p: _sha(p) for p in places.files.iterdir()}
    name = f'live-abort-{uuid.uuid4().hex[:6]}'
    try:
        _prepare_live(live, name, src.spec)
        _same(_export(live, f'rbd/{name}'), src.head, 'before abort')
        with rados_handle.open_ioctx('rbd') as io:
            _client_write(io, name, _blocks(src.head))
        _task(live, 'abort', name)
        assert name not in live.rbd('ls', 'rbd').split()
        assert {p: _sha(p) for p in places.files.iterdir()} == files
    finally:
        _remove(live, name)


@dataclass
class Reads:
    """What a reader of random 4 KiB blocks saw."""

    count: int = 0
    errors: List[str] = field(default_factory=list)
    mismatches: List[int] = field(default_factory=list)
    longest: float = 0.0


def _read_randomly(io: rados.Ioctx, name: str, expected: bytes, stop: threading.Event,
                   out: Reads) -> None:
    rng = random.Random(9)
    try:
        with rbd.Image(io, name) as img:
            while not stop.is_set():
                offset = rng.randrange(len(expected) // BLOCK) * BLOCK
                began = time.monotonic()
                try:
                    data = img.read(offset, BLOCK)
                except rbd.Error as e:
                    out.errors.append(f'{offset}: {e}')
                    continue
                finally:
                    out.longest = max(out.longest, time.monotonic() - began)
                if data != expected[offset:offset + BLOCK]:
                    out.mismatches.append(offset)
                out.count += 1
                time.sleep(0.01)
    except Exception as e:  # the open itself, reported to the test
        out.errors.append(f'open: {e!r}')


def test_reader_sees_no_error_across_mgr_failover(live: Cluster, places: Places,
                                                  origin: Origin,
                                                  rados_handle: rados.Rados) -> None:
    src = _raw_http_query(places, origin)
    name = f'live-failover-{uuid.uuid4().hex[:6]}'
    stop, reads = threading.Event(), Reads()
    with rados_handle.open_ioctx('rbd') as io:
        reader = threading.Thread(target=_read_randomly,
                                  args=(io, name, src.head, stop, reads), daemon=True)
        try:
            _prepare_live(live, name, src.spec)
            reader.start()
            began = time.monotonic()
            time.sleep(2)
            before = reads.count
            live.ceph('mgr', 'fail', 'x')
            live.wait_module()
            time.sleep(max(0.0, 10 - (time.monotonic() - began)))
            stop.set()
            reader.join(60)
            assert not reader.is_alive(), 'the reader is stuck'
            print(f'failover: {reads.count} reads, longest {reads.longest:.2f} s')
            assert reads.errors == [] and reads.mismatches == [], reads
            assert before > 0 and reads.count > before + 50, reads
            _execute_commit(live, name)
            _same(_export(live, f'rbd/{name}'), src.head, 'after failover and commit')
        finally:
            stop.set()
            if reader.is_alive():
                reader.join(60)
            _remove(live, name)


class PacedRelay(socketserver.ThreadingTCPServer):
    """A TCP relay to nginx that passes its answers on at ``rate`` bytes a
    second in all: a source slow enough for an execute to be caught in the
    middle, with nginx's own answers (ranges, ETag)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: Tuple[str, int], rate: float) -> None:
        super().__init__(('127.0.0.1', 0), _Relayed)
        self.upstream, self.rate = upstream, rate
        self._lock = threading.Lock()

    def pace(self, length: int) -> None:
        with self._lock:
            time.sleep(length / self.rate)

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.server_address[1]}/{path}'


class _Relayed(socketserver.BaseRequestHandler):
    server: PacedRelay

    def handle(self) -> None:
        client: socket.socket = self.request
        with socket.create_connection(self.server.upstream) as upstream:
            threading.Thread(target=_pump, args=(client, upstream, None), daemon=True).start()
            _pump(upstream, client, self.server.pace)


def _pump(src: socket.socket, dst: socket.socket,
          pace: Optional[Callable[[int], None]]) -> None:
    """Copy until either side closes, then close both ways."""
    try:
        while True:
            chunk = src.recv(64 * KiB)
            if not chunk:
                break
            if pace:
                pace(len(chunk))
            dst.sendall(chunk)
    except OSError:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def paced(live: Cluster, places: Places) -> Iterator[Tuple[PacedRelay, bytes]]:
    """64 MiB of random data (nothing to sparsify) from nginx at 8 MiB/s:
    an execute takes about 8 s."""
    assert live.state and live.state.http_port
    data = random.Random(21).randbytes(64 * MiB)
    (places.www / 'disk.raw').write_bytes(data)
    relay = PacedRelay(('127.0.0.1', live.state.http_port), 8 * MiB)
    thread = threading.Thread(target=relay.serve_forever, daemon=True)
    thread.start()
    try:
        yield relay, data
    finally:
        relay.shutdown()
        relay.server_close()
        thread.join(10)


def _task_of(cluster: Cluster, task_id: str) -> Dict[str, Any]:
    tasks = mig(cluster, 'task', 'list')['tasks']
    return next(t for t in tasks if t['id'] == task_id)


def test_execute_cut_by_mgr_failover_runs_again(live: Cluster, places: Places,
                                                paced: Tuple[PacedRelay, bytes]) -> None:
    """``ceph mgr fail`` while librbd copies from the view: the task runs
    again under the next mgr, which serves the view again under the same
    URL, and the committed image equals the source."""
    name = f'live-exec-failover-{uuid.uuid4().hex[:6]}'
    relay, data = paced
    url = relay.url(f'{places.www.name}/disk.raw?v=1')
    spec = {'type': 'raw', 'stream': {'type': 'http', 'url': url}}
    try:
        _prepare_live(live, name, spec)
        task = str(mig(live, 'execute', f'rbd/{name}', timeout=120)['task']['id'])
        # Running is enough: the module's copy reads this paced source in
        # four parallel 16 MiB requests that land together near its end, so
        # its progress may show nothing until then.
        live.task_running(task, past=-1.0)
        failed_at = time.time()
        live.ceph('mgr', 'fail', 'x')
        live.wait_module()
        r = live.task_end(task, 240)
        assert r.returncode == 0 and r.stdout.strip().endswith(' completed'), \
            f'execute rbd/{name}: {r.stdout.strip()} {r.stderr.strip()}'
        ended = _task_of(live, task)
        print(f'execute across failover: {ended["attempts"]} attempts, '
              f'{ended["finished"] - failed_at:.1f} s after mgr fail')
        assert ended['finished'] > failed_at, f'it ended before the mgr failed: {ended}'
        assert ended['started'] > failed_at, f'it did not run again: {ended}'
        _task(live, 'commit', name)
        _same(_export(live, f'rbd/{name}'), data, 'after failover and commit')
    finally:
        _remove(live, name)


def test_clients_write_and_qemu_reads_during_execute(live: Cluster, places: Places,
                                                     rados_handle: rados.Rados,
                                                     paced: Tuple[PacedRelay, bytes]) -> None:
    """While the execute copies: a python-rbd client writes blocks at both
    ends and reads them back, the rbd CLI and ``qemu-img`` over ``rbd:``
    read the target as the source with those writes, and after commit the
    image is the source with them.  (The module's copy reads this source
    in four parallel 16 MiB requests, which land together near the end:
    the writes come before any lands, so they come before the copy's.)"""
    assert live.state
    name = f'live-exec-writes-{uuid.uuid4().hex[:6]}'
    relay, data = paced
    url = relay.url(f'{places.www.name}/disk.raw?v=2')
    spec = {'type': 'raw', 'stream': {'type': 'http', 'url': url}}
    rng = random.Random(5)
    blocks = {off: rng.randbytes(BLOCK)
              for off in (0, 3 * MiB + 512, len(data) // 2, len(data) - 2 * BLOCK)}
    io = rados_handle.open_ioctx('rbd')
    try:
        _prepare_live(live, name, spec)
        task = str(mig(live, 'execute', f'rbd/{name}', timeout=120)['task']['id'])
        live.task_running(task, past=-1.0)
        _client_write(io, name, blocks)
        with rbd.Image(io, name, read_only=True) as img:
            for offset, block in blocks.items():
                assert img.read(offset, len(block)) == block, f'read back at {offset}'
            assert img.read(len(data) - MiB, 4096) == data[len(data) - MiB:][:4096]
        expected = _patched(data, blocks)
        read = _qemu_read(live, name, places.www.parent)
        state = _task_of(live, task)['state']
        print(f'qemu-img over rbd: read the whole target, execute {state} at its end')
        _same(read, expected, f'qemu-img read during execute (task {state})')
        ended = live.task_end(task, 240)
        assert ended.returncode == 0 and ended.stdout.strip().endswith(' completed'), \
            ended.stdout
        _task(live, 'commit', name)
        _same(_export(live, f'rbd/{name}'), expected, 'after commit')
    finally:
        io.close()
        _remove(live, name)


def test_source_gone_across_failover_fails_reads_not_the_mgr(live: Cluster,
                                                            places: Places,
                                                            origin: Origin) -> None:
    log = Path(live.path('out', 'mgr.x.log'))
    seen = log.stat().st_size
    src = _compressed_qcow2_http(places, origin)
    path = places.www / 'compressed.qcow2'
    away = places.www.parent / f'{places.www.name}.away'
    name = f'live-gone-{uuid.uuid4().hex[:6]}'
    assert live.state
    try:
        _prepare_live(live, name, src.spec)
        path.rename(away)
        live.ceph('mgr', 'fail', 'x')
        live.wait_module()
        status = mig(live, 'status', f'rbd/{name}')['migrations']
        assert [m['path'] for m in status] == ['live'], status
        r = subprocess.run(['rbd', '--conf', live.state.conf, 'export', '--no-progress',
                            f'rbd/{name}', '-'], capture_output=True, timeout=120)
        err = r.stderr.decode()
        print(f'source gone: {err.strip().splitlines()[-1:]}')
        assert r.returncode != 0 and 'Input/output error' in err, err
        time.sleep(3)   # a crash would show by now
        mig(live, 'status', f'rbd/{name}')
        with open(log, 'rb') as f:
            f.seek(seen)
            assert b'Caught signal' not in f.read()
        away.rename(path)
        _same(_export(live, f'rbd/{name}'), src.head, 'with the source back')
        _task(live, 'abort', name)
        assert name not in live.rbd('ls', 'rbd').split()
    finally:
        if away.exists():
            away.rename(path)
        _remove(live, name)


def test_spec_asking_for_the_hidden_path(live: Cluster, places: Places,
                                         origin: Origin) -> None:
    src = _qcow2_overlay_file(places, origin)
    name = f'live-hidden-{uuid.uuid4().hex[:6]}'
    try:
        prepared = _prepare(live, name, dict(src.spec, rbd_migration={'live': False}))
        assert prepared['path'] == 'adapter', prepared
        assert prepared['probe']['path'] == 'adapter', prepared
        assert '"live": false' in prepared['probe']['hidden'], prepared
        assert name not in live.rbd('ls', 'rbd').split()
        _task(live, 'abort', name)
    finally:
        _remove(live, name)


def test_nbd_server_of_one_client_is_imported_hidden(live: Cluster, places: Places) -> None:
    """qemu-nbd serves one client by default; a live import would read it
    twice at once (the view and the copy), so prepare takes the hidden path
    and says why, and the import still completes."""
    data = _disk(17)
    raw = places.files / 'single.raw'
    raw.write_bytes(data)
    spec = {'type': 'raw', 'stream': {'type': 'nbd', 'uri': places.nbd_uri(raw, 'raw', 1)}}
    name = f'live-single-{uuid.uuid4().hex[:6]}'
    try:
        prepared = _prepare(live, name, spec)
        assert prepared['path'] == 'adapter', prepared
        hidden = prepared['probe']['hidden']
        assert 'second reader' in hidden and '--shared 2' in hidden, prepared
        for action in ('execute', 'commit'):    # hidden: no image by name until commit
            task = str(mig(live, action, f'rbd/{name}', timeout=120)['task']['id'])
            r = live.task_end(task, 240)
            assert r.returncode == 0 and r.stdout.strip().endswith(' completed'), r
        _same(_export(live, f'rbd/{name}'), data, f'rbd/{name}')
    finally:
        _remove(live, name)

