"""Import-only migrations end to end: every stream with raw and qcow2, the
probe's refusals (each one line, nothing left behind), config:// secrets and
their masking."""
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import boto3
import pytest
from botocore.config import Config

from qa.cluster import S3_BUCKET, Cluster
from tests.clusterops import wait_task


def _ceph(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, timeout=120)


def _run_task(cluster: Cluster, *command: str) -> None:
    wait_task(cluster, str(cluster.ceph_json('rbd', 'migration', *command)['task']['id']))


def _sha_export(cluster: Cluster, spec: str) -> str:
    assert cluster.state
    out = subprocess.run(['rbd', '--conf', cluster.state.conf, 'export',
                          '--no-progress', spec, '-'], capture_output=True, check=True).stdout
    return hashlib.sha256(out).hexdigest()


def _sha_raw_of(image: Path) -> str:
    raw = image.with_suffix('.reference')
    subprocess.run(['qemu-img', 'convert', '-O', 'raw', str(image), str(raw)], check=True)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.unlink()
    return digest


def _snapshot(cluster: Cluster) -> Tuple[Any, ...]:
    """What a refused prepare must leave exactly as it was."""
    assert cluster.state
    rbd = ['rbd', '--conf', cluster.state.conf]
    ls = subprocess.run([*rbd, 'ls', 'rbd'], capture_output=True, text=True).stdout
    trash = subprocess.run([*rbd, 'trash', 'ls', '--all', 'rbd'],
                           capture_output=True, text=True).stdout
    status = cluster.ceph_json('rbd', 'migration', 'status')
    return ls, trash, len(status['migrations']), len(status['tasks'])


@pytest.fixture(scope='module')
def images(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Path]]:
    """Test images, as files under an allowed root and published over HTTP."""
    d = tmp_path_factory.mktemp('import-images')
    raw = d / 'disk.raw'
    with open(raw, 'wb') as f:
        f.truncate(16 << 20)
        for mib in (0, 5, 11):
            f.seek(mib << 20)
            f.write(os.urandom(1 << 20))
    qcow = d / 'disk.qcow2'
    subprocess.run(['qemu-img', 'convert', '-O', 'qcow2', str(raw), str(qcow)], check=True)
    subprocess.run(['qemu-img', 'snapshot', '-c', 'first', str(qcow)], check=True)
    subprocess.run(['qemu-io', '-c', 'write -P 0x5a 2M 1M', str(qcow)], check=True,
                   capture_output=True)
    compressed = d / 'compressed.qcow2'  # from compressible data: qemu-img
    text = d / 'text.raw'                   # stores what does not shrink as is
    text.write_bytes(b'rbd_migration compresses well. ' * (1 << 17))
    subprocess.run(['qemu-img', 'convert', '-c', '-O', 'qcow2', str(text), str(compressed)],
                   check=True)
    text.unlink()
    overlay = d / 'overlay.qcow2'
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-b', 'disk.qcow2', '-F', 'qcow2',
                    str(overlay)], check=True, capture_output=True)
    orphan = d / 'orphan.qcow2'  # an overlay whose backing file is gone
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2',
                    '-u', str(orphan), '16M'], check=True, capture_output=True)
    external = d / 'external.qcow2'
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-o',
                    f"data_file={d / 'external.data'}", str(external), '16M'],
                   check=True, capture_output=True)
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root) / f'import-{uuid.uuid4().hex[:8]}'
    shutil.copytree(d, www)
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', str(d))
    yield {'dir': d, 'raw': raw, 'qcow': qcow, 'compressed': compressed,
           'overlay': overlay, 'orphan': orphan, 'external': external, 'www': www}
    cluster.reset_module_option('file_source_roots')
    shutil.rmtree(www, ignore_errors=True)


@pytest.fixture(scope='module')
def s3(rgw: Cluster, images: Dict[str, Path]) -> str:
    """The test images uploaded to the RGW bucket; returns the bucket URL."""
    env = rgw.state.env() if rgw.state else {}
    client = boto3.client('s3', endpoint_url=env['RBD_MIGRATION_S3_URL'],
                          aws_access_key_id=env['RBD_MIGRATION_S3_ACCESS_KEY'],
                          aws_secret_access_key=env['RBD_MIGRATION_S3_SECRET_KEY'],
                          region_name='us-east-1',
                          config=Config(s3={'addressing_style': 'path'},
                                        signature_version='s3v4'))
    prefix = f'import-{uuid.uuid4().hex[:8]}'
    for name in ('raw', 'qcow'):
        client.upload_file(str(images[name]), S3_BUCKET, f'{prefix}/{images[name].name}')
    return f"{env['RBD_MIGRATION_S3_URL']}/{S3_BUCKET}/{prefix}"


def _stream(kind: str, name: str, cluster: Cluster, images: Dict[str, Path],
            s3_url: str = '') -> Dict[str, Any]:
    assert cluster.state
    if kind == 'file':
        return {'type': 'file', 'file_path': str(images['dir'] / name)}
    if kind == 'http':
        return {'type': 'http', 'url': f'http://127.0.0.1:{cluster.state.http_port}/'
                                       f"{images['www'].name}/{name}"}
    return {'type': 's3', 'url': f'{s3_url}/{name}',
            'access_key': 'config://rbd/test/access_key',
            'secret_key': 'config://rbd/test/secret_key'}


@pytest.mark.parametrize('stream', ['file', 'http', 's3'])
@pytest.mark.parametrize('fmt', ['raw', 'qcow'])
def test_import_each_stream_and_format(cluster: Cluster, images: Dict[str, Path],
                                       request: pytest.FixtureRequest,
                                       stream: str, fmt: str) -> None:
    s3_url = ''
    if stream == 's3':
        s3_url = request.getfixturevalue('s3')
        env = cluster.state.env() if cluster.state else {}
        cluster.ceph('config-key', 'set', 'rbd/test/access_key',
                     env['RBD_MIGRATION_S3_ACCESS_KEY'])
        cluster.ceph('config-key', 'set', 'rbd/test/secret_key',
                     env['RBD_MIGRATION_S3_SECRET_KEY'])
    source = images['raw' if fmt == 'raw' else 'qcow']
    spec = {'type': fmt, 'stream': _stream(stream, source.name, cluster, images, s3_url)}
    name = f'imp-{fmt}-{stream}-{uuid.uuid4().hex[:6]}'
    prepared = cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only',
                                 f'rbd/{name}', '--source-spec', json.dumps(spec))
    assert prepared['import_only'] and prepared['state'] == 'prepared'
    if stream == 'file':
        # librbd would reopen the file by name at execute: the module's
        # reader, which keeps the file it checked open, imports it.
        assert prepared['path'] == 'adapter', prepared
        assert any('again by name at execute' in r for r in prepared['probe']['reasons'])
    else:
        assert prepared['path'] == 'librbd', prepared
    _run_task(cluster, 'execute', f'rbd/{name}')
    _run_task(cluster, 'commit', f'rbd/{name}')
    assert _sha_export(cluster, f'rbd/{name}') == _sha_raw_of(source)
    if fmt == 'qcow':
        snaps = json.loads(subprocess.run(
            ['rbd', '--conf', cluster.state.conf, 'snap', 'ls', '--format', 'json',  # type: ignore
             f'rbd/{name}'], capture_output=True, text=True, check=True).stdout)
        assert [s['name'] for s in snaps] == ['first']
    subprocess.run(['rbd', '--conf', cluster.state.conf, 'snap', 'purge',  # type: ignore
                    f'rbd/{name}'], capture_output=True)
    subprocess.run(['rbd', '--conf', cluster.state.conf, 'rm', '--no-progress',  # type: ignore
                    f'rbd/{name}'], check=True, capture_output=True)


REFUSALS = [
    ('raw-holding-qcow', lambda i: {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(i['qcow'])}},
     ['type', 'use "type": "qcow"']),
    ('compressed-librbd-forced', lambda i: {
        'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(i['compressed'])},
        'rbd_migration': {'engine': 'librbd'}},
     ['compressed clusters', 'drop "engine": "librbd"']),
    ('backing-librbd-forced', lambda i: {
        'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(i['overlay'])},
        'rbd_migration': {'engine': 'librbd'}},
     ['backing file', "'disk.qcow2'"]),
    ('file-librbd-forced', lambda i: {
        'type': 'raw', 'stream': {'type': 'file', 'file_path': str(i['raw'])},
        'rbd_migration': {'engine': 'librbd'}},
     ['again by name at execute', 'drop "engine": "librbd"']),
    ('backing-missing', lambda i: {'type': 'qcow', 'stream': {
        'type': 'file', 'file_path': str(i['orphan'])}},
     ['gone.qcow2']),
    ('external-data-file', lambda i: {'type': 'qcow', 'stream': {
        'type': 'file', 'file_path': str(i['external'])}},
     ['external file', 'qemu-img convert']),
    ('outside-roots', lambda i: {'type': 'raw', 'stream': {'type': 'file', 'file_path': '/etc/ceph/../hostname'}},
     ['stream.file_path', 'file_source_roots']),
    ('missing-file', lambda i: {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(i['dir'] / 'nope.raw')}},
     ['stream.file_path', 'not']),
    ('http-404', lambda i: {'type': 'raw', 'stream': {'type': 'http', 'url': 'http://127.0.0.1:{port}/nope.raw'}},
     ['stream.url', '404']),
    ('server-down', lambda i: {'type': 'raw', 'stream': {'type': 'http', 'url': 'http://127.0.0.1:9/x.raw'}},
     ['stream.url', 'cannot connect']),
    ('bad-type', lambda i: {'type': 'vmdk', 'stream': {'type': 'file', 'file_path': str(i['raw'])}},
     ['type', 'vmdk']),
    ('unknown-field', lambda i: {'type': 'raw', 'stream': {'type': 'file', 'file_pth': str(i['raw'])}},
     ['stream.file_pth', 'unknown field']),
    ('missing-config-key', lambda i: {'type': 'raw', 'stream': {
        'type': 's3', 'url': 'http://127.0.0.1:9/b/k', 'access_key': 'config://rbd/test/none',
        'secret_key': 'x' * 8}}, ["config-key 'rbd/test/none' not found"]),
]


@pytest.mark.parametrize('case', [r[0] for r in REFUSALS])
def test_probe_refusals_are_one_line_and_leave_nothing(cluster: Cluster, images: Dict[str, Path],
                                                        case: str) -> None:
    build, expected = next((b, e) for n, b, e in REFUSALS if n == case)
    spec = json.dumps(build(images)).replace(
        '{port}', str(cluster.state.http_port if cluster.state else 0))
    before = _snapshot(cluster)
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only',
              f'rbd/refused-{case}', '--source-spec', spec)
    assert r.returncode != 0
    message = r.stderr.strip()
    assert '\n' not in message and 'Traceback' not in message, message
    for phrase in expected:
        assert phrase in message, message
    assert 'does your client key have mgr caps' not in message
    assert _snapshot(cluster) == before


def test_invalid_json_says_where(cluster: Cluster) -> None:
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', 'rbd/badjson',
              '--source-spec', '{"type": "raw", "stream": {')
    assert r.returncode == 22
    assert 'source-spec: invalid JSON at line 1 column' in r.stderr


def test_source_spec_from_input_file(cluster: Cluster, images: Dict[str, Path],
                                     tmp_path: Path) -> None:
    spec_file = tmp_path / 'spec.json'
    spec_file.write_text(json.dumps({'type': 'raw', 'stream': {
        'type': 'file', 'file_path': str(images['raw'])}}))
    name = f'imp-inbuf-{uuid.uuid4().hex[:6]}'
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                 '-i', str(spec_file))
    _run_task(cluster, 'abort', f'rbd/{name}')
    assert name not in _snapshot(cluster)[0]


def test_secrets_are_masked_in_status(cluster: Cluster, s3: str) -> None:
    env = cluster.state.env() if cluster.state else {}
    secret = env['RBD_MIGRATION_S3_SECRET_KEY']
    spec = {'type': 'raw', 'stream': {'type': 's3', 'url': f'{s3}/disk.raw',
                                      'access_key': env['RBD_MIGRATION_S3_ACCESS_KEY'],
                                      'secret_key': secret}}
    name = f'imp-mask-{uuid.uuid4().hex[:6]}'
    cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                 '--source-spec', json.dumps(spec))
    try:
        for out in (cluster.ceph('rbd', 'migration', 'status'),
                    cluster.ceph('rbd', 'migration', 'status', '-f', 'json'),
                    cluster.ceph('rbd', 'migration', 'status', f'rbd/{name}', '-f', 'json')):
            assert secret not in out
            assert name in out
    finally:
        _run_task(cluster, 'abort', f'rbd/{name}')


def test_url_credentials_librbd_cannot_send_are_refused(cluster: Cluster,
                                                         images: Dict[str, Path]) -> None:
    """Forced onto librbd, a URL with credentials is refused at prepare (the
    adapter engine takes it otherwise: tests/cluster/test_adapter.py)."""
    secret = 'TOPSECRET-' + uuid.uuid4().hex
    spec = {'type': 'raw', 'stream': {'type': 'http', 'url': (
        f'http://user:{secret}@127.0.0.1:{cluster.state.http_port}/'  # type: ignore
        f"{images['www'].name}/disk.raw")}, 'rbd_migration': {'engine': 'librbd'}}
    before = _snapshot(cluster)
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only', 'rbd/imp-cred',
              '--source-spec', json.dumps(spec))
    assert r.returncode != 0 and 'user:password@' in r.stderr
    assert secret not in r.stderr and secret not in r.stdout
    assert _snapshot(cluster) == before
